"""Stochastic approximation (SA) with Markov-chain samples (monograph §2.3.3).

SA finds a root of a mean-field function f(λ) = E_{z∼p_λ}[F_λ(z)] (Eq. 2.31) by alternating a
Markov move of z under the current λ with the update λ_t = λ_{t−1} + γ_t F_{λ_{t−1}}(z_t)
(Algorithm 4), or with the average of F over K moves (Algorithm 5, "SA with multiple moves").
The chain is never restarted: it only has to track p_λ as λ changes slowly, which Robbins–Monro
step sizes guarantee (Theorem 2.2: γ_t non-increasing, Σγ_t = ∞, Σγ_t² < ∞).

Maximum likelihood for an EBM is the special case λ = θ, z = (κ, x) and
F_θ(z) = ∇_θ U_θ(x_κ) − ∇_θ U_θ(x) (Theorem 2.3), i.e. stochastic maximum likelihood
(Algorithm 6, Eq. 2.32). With autograd models, the same algorithm is
:class:`~seqebm.objectives.ContrastiveDivergenceLoss` with ``persistent=True`` trained by SGD
under ``optim.schedule: robbins_monro``; :func:`stochastic_approximation` is the general
algorithm for any F (e.g. the normaliser updates of TRF language models).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm


def robbins_monro(a: float, *, t0: float = 1.0, exponent: float = 1.0) -> Callable[[int], float]:
    """Step sizes γ_t = a · (t0 / (t0 + t − 1))^exponent for t = 1, 2, ... (γ_1 = a).

    Satisfies Theorem 2.2 (Σγ_t = ∞, Σγ_t² < ∞, non-increasing) iff 0.5 < exponent <= 1;
    t0 > 0 keeps the first steps large (the monograph's footnote: "a large learning rate at the
    early stage of learning and decrease to 1/t").
    """
    if not a > 0:
        raise ValueError(f"a must be positive, got {a}")
    if not t0 > 0:
        raise ValueError(f"t0 must be positive, got {t0}")
    if not 0.5 < exponent <= 1:
        raise ValueError(f"exponent must lie in (0.5, 1] for Robbins–Monro convergence, got {exponent}")

    def gamma(t: int) -> float:
        if t < 1:
            raise ValueError(f"step index t starts at 1, got {t}")
        return a * (t0 / (t0 + t - 1)) ** exponent

    return gamma


@dataclass
class SAResult:
    """Output of :func:`stochastic_approximation`.

    Attributes:
        params: λ after the last iteration (or the Polyak average, see ``average_from``).
        last: λ after the last iteration.
        state: the chain state z after the last move.
        trace: (num_iters + 1, *λ.shape) iterates λ_0 .. λ_T when ``keep_trace`` else None.
    """

    params: Tensor
    last: Tensor
    state: Tensor
    trace: Tensor | None


def stochastic_approximation(
    mean_field: Callable[[Tensor, Tensor], Tensor],
    kernel: Callable[[Tensor, Tensor, Optional[torch.Generator]], Tensor],
    params0: Tensor,
    state0: Tensor,
    *,
    num_iters: int,
    step_sizes: Callable[[int], float],
    num_moves: int = 1,
    average_from: int | None = None,
    generator: torch.Generator | None = None,
    keep_trace: bool = False,
    progress: bool = False,
) -> SAResult:
    """Run SA (§2.3.3, Algorithm 4; Algorithm 5 when ``num_moves`` > 1).

    Args:
        mean_field: ``F(λ, z) -> Tensor`` shaped like λ, an unbiased stochastic measurement of
            f(λ) at a sample z (z may be a batch of parallel chains; F averages over them).
        kernel: ``kernel(λ, z, generator) -> z_new``, a Markov move leaving p_λ invariant.
        params0: λ_0 (any shape, floating point).
        state0: z_0.
        num_iters: T, number of SA updates.
        step_sizes: t -> γ_t for t = 1..T (e.g. :func:`robbins_monro`).
        num_moves: K Markov moves per update; F is averaged over the K states (Algorithm 5).
        average_from: if set, ``params`` is the Polyak–Ruppert average of λ_t over
            t >= average_from (lower variance at the same cost).
        generator: passed to ``kernel``.
        keep_trace: keep every iterate in ``trace``.
        progress: show a tqdm bar.

    Returns:
        :class:`SAResult`.

    Raises:
        ValueError: on bad knobs or when F returns a wrong shape or a non-finite value.
    """
    for name, v, lo in (("num_iters", num_iters, 1), ("num_moves", num_moves, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    if not isinstance(params0, Tensor) or not params0.is_floating_point():
        raise ValueError("params0 must be a floating-point Tensor")
    if average_from is not None and not 1 <= average_from <= num_iters:
        raise ValueError(f"average_from must lie in [1, num_iters={num_iters}], got {average_from}")
    lam, z = params0.detach().clone(), state0
    trace = [lam.clone()] if keep_trace else None
    avg, n_avg = torch.zeros_like(lam), 0
    for t in tqdm(range(1, num_iters + 1), disable=not progress, desc="SA", unit="iter"):
        total = torch.zeros_like(lam)
        for _ in range(num_moves):
            z = kernel(lam, z, generator)
            f = mean_field(lam, z)
            if not isinstance(f, Tensor) or f.shape != lam.shape:
                got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
                raise ValueError(f"mean_field must return a Tensor shaped like params {tuple(lam.shape)}, got {got}")
            if not torch.isfinite(f).all():
                raise ValueError(f"mean_field returned a non-finite value at iteration {t}")
            total += f.to(lam.dtype)
        gamma = step_sizes(t)
        if not gamma > 0:
            raise ValueError(f"step_sizes({t}) must be positive, got {gamma}")
        lam = lam + gamma * total / num_moves
        if average_from is not None and t >= average_from:
            n_avg += 1
            avg += (lam - avg) / n_avg
        if trace is not None:
            trace.append(lam.clone())
    return SAResult(params=avg if average_from is not None else lam, last=lam, state=z,
                    trace=torch.stack(trace) if trace is not None else None)
