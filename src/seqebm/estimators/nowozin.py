"""Lower and upper estimates of log Z from n importance weights (Nowozin 2018; residual EBM Thm. 2).

Notation: n weights per estimate, ``...`` any leading batch shape (e.g. one estimate per prefix).

Given n i.i.d. draws x_i ∼ q and log weights log w_i = log p̃(x_i) − log q(x_i) (for the
residual EBM of the residual-EBM seed, q = P_LM and log w_i = −E(x_i)), Z = E_q[w] and

    T_n = log (1/n) Σ_i w_i

is a consistent but downward-biased estimate of log Z: by Jensen E[T_n] <= log Z, with
E[T_n] = log Z − Var(w)/(2 n μ²) + O(n⁻²) (Nowozin 2018, Eq. 35; residual-EBM seed App. A.2).
The seed's Theorem 2 (§3.2, Eq. 4) pairs it with

    U_n = (2n − 1) T_n − 2(n − 1) T_{n−1},

whose leading bias is the mirror image, +Var(w)/(2 n μ²), so that for n large enough
E[T_n] < log Z < E[U_n] and both gaps shrink like 1/n. T_{n−1} is estimated with the
leave-one-out average T̄_{n−1} = (1/n) Σ_j log (1/(n−1)) Σ_{i≠j} w_i, which uses all n draws
(the seed's "leave-one-out strategy", following Nowozin). The first-order jackknife
n T_n − (n − 1) T̄_{n−1} (Nowozin's debiased estimate, bias O(n⁻²)) is their midpoint.

Caveat (stated in the seed and worth repeating): the bracket is *asymptotic*. E[T_n] <= log Z
holds for every n, but with heavy-tailed weights (a proposal far from the target) E[U_n] can lie
below log Z at small n. Check that the two estimates move towards each other as n grows, and
report the effective sample size (:func:`seqebm.estimators.effective_sample_size`).

All sums are in float64 log space. Leave-one-out sums are computed in O(n) per estimate:
log Σ_{i≠j} w_i = log S + log1p(−w_j / S) for every j except the largest weight, whose
complement is summed directly (the only term for which w_j / S can exceed 1/2).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class LogPartitionBounds:
    """Estimates of log Z, each with the leading shape of the weights.

    Attributes:
        lower: T_n, biased low (E[T_n] <= log Z for every n).
        upper: U_n = (2n − 1) T_n − 2(n − 1) T̄_{n−1}, biased high for large enough n.
        jackknife: n T_n − (n − 1) T̄_{n−1}, the debiased point estimate (midpoint of the two).
        n: number of weights per estimate.
    """

    lower: Tensor
    upper: Tensor
    jackknife: Tensor
    n: int


def leave_one_out_logsumexp(log_w: Tensor) -> Tensor:
    """log Σ_{i≠j} exp(log_w_i) for every j along the last dim, stably, shape (..., n) float64.

    Needs n >= 2. Entries equal to −inf are allowed (zero weights).
    """
    if log_w.shape[-1] < 2:
        raise ValueError(f"leave-one-out needs at least 2 weights, got {log_w.shape[-1]}")
    lw = log_w.to(torch.float64)
    log_s = torch.logsumexp(lw, -1, keepdim=True)  # (..., 1)
    ratio = torch.exp(lw - log_s).clamp(max=1.0)  # (..., n) w_j / S
    loo = log_s + torch.log1p(-ratio)  # accurate where w_j / S <= 1/2
    # the largest weight: sum the others directly
    top = lw.argmax(-1, keepdim=True)  # (..., 1)
    others = lw.scatter(-1, top, float("-inf"))
    loo = loo.scatter(-1, top, torch.logsumexp(others, -1, keepdim=True))
    return loo


def log_partition_bounds(log_weights: Tensor) -> LogPartitionBounds:
    """T_n, U_n and the jackknife estimate of log Z from log importance weights (..., n).

    Args:
        log_weights: Tensor (..., n), n >= 2, log w_i = log p̃(x_i) − log q(x_i) for x_i ∼ q
            (residual EBM: −E(x_i) for x_i ∼ P_LM). Finite or −inf (zero weight); NaN and +inf
            are rejected.

    Returns:
        :class:`LogPartitionBounds` with float64 tensors of shape ``...``. When only one weight
        of an estimate is non-zero the leave-one-out sums are empty, and ``upper`` and
        ``jackknife`` are +inf (honestly: n is far too small for that proposal).

    Raises:
        ValueError: on fewer than 2 weights, NaN, +inf, or all weights zero.
    """
    if not isinstance(log_weights, Tensor) or log_weights.dim() < 1:
        raise ValueError("log_weights must be a Tensor (..., n)")
    n = log_weights.shape[-1]
    if n < 2:
        raise ValueError(f"need n >= 2 weights per estimate for the upper estimate, got n={n}")
    lw = log_weights.to(torch.float64)
    if torch.isnan(lw).any() or (lw == float("inf")).any():
        raise ValueError("log_weights contain NaN or +inf")
    lower = torch.logsumexp(lw, -1) - math.log(n)  # T_n
    if (lower == float("-inf")).any():
        raise ValueError("all weights of an estimate are zero (log weight -inf): log Z cannot be estimated")
    t_loo = (leave_one_out_logsumexp(lw) - math.log(n - 1)).mean(-1)  # T̄_{n−1}
    upper = (2 * n - 1) * lower - 2 * (n - 1) * t_loo
    jackknife = n * lower - (n - 1) * t_loo
    return LogPartitionBounds(lower=lower, upper=upper, jackknife=jackknife, n=n)
