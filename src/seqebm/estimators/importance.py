"""Importance sampling (IS) and self-normalised IS (SNIS) estimators, all in log space.

Notation: K samples x^(1..K) ~ q. Inputs are per-sample log quantities:
``log_unnorm`` (K,) = log p̃(x) = -E(x) (unnormalised target) and ``log_q`` (K,) = log q(x)
(normalised proposal). Log importance weights are log w̃ = log p̃ - log q.

Monograph "Energy-based models for speech and language", §2.3.2 (importance sampling):

* Eq. (2.28): Z_p / Z_q ≈ (1/K) Σ_k w̃_k, an unbiased estimate of Z when q is normalised
  (Z_q = 1). We return log Ẑ = logsumexp(log w̃) - log K (biased low in log space, by Jensen).
* Eq. (2.29)/(2.30): SNIS, E_p[g] ≈ Σ_k ω_k g(x_k) with ω_k = w̃_k / Σ_j w̃_j; only needs p/q
  up to a constant, biased by O(1/K).
* Effective sample size ESS = (Σ w)² / Σ w², computed as exp(2·lse(log w) - lse(2·log w)).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _log_weights(log_unnorm: Tensor, log_q: Tensor) -> Tensor:
    if not isinstance(log_unnorm, Tensor) or not isinstance(log_q, Tensor):
        raise ValueError("log_unnorm and log_q must be tensors")
    if log_unnorm.dim() != 1 or log_unnorm.shape != log_q.shape:
        raise ValueError(f"log_unnorm and log_q must both have shape (K,), got {tuple(log_unnorm.shape)} "
                         f"and {tuple(log_q.shape)}")
    if log_unnorm.numel() == 0:
        raise ValueError("need at least one sample (K >= 1)")
    if not torch.is_floating_point(log_unnorm) or not torch.is_floating_point(log_q):
        raise ValueError("log_unnorm and log_q must be floating point")
    if torch.isnan(log_unnorm).any() or torch.isnan(log_q).any():
        raise ValueError("log_unnorm / log_q contain NaN")
    if (log_q == float("-inf")).any():
        raise ValueError("log_q contains -inf: a sample with q(x) = 0 cannot have been drawn from q")
    return log_unnorm - log_q  # (K,)


def importance_log_partition(log_unnorm: Tensor, log_q: Tensor) -> Tensor:
    """log Ẑ = logsumexp(log p̃ - log q) - log K (Eq. 2.28 with Z_q = 1).

    Args:
        log_unnorm: (K,) log p̃(x_k) = -E(x_k).
        log_q: (K,) log q(x_k) of a normalised proposal.

    Returns:
        0-dim tensor, log Ẑ.
    """
    log_w = _log_weights(log_unnorm, log_q)
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def snis_weights(log_unnorm: Tensor, log_q: Tensor) -> Tensor:
    """Normalised importance weights ω_k = w̃_k / Σ_j w̃_j (Eq. 2.30), via softmax of log w̃.

    Returns:
        (K,) non-negative weights summing to one. ``log_q`` may be unnormalised.
    """
    return torch.softmax(_log_weights(log_unnorm, log_q), dim=0)


def effective_sample_size(log_weights: Tensor) -> Tensor:
    """ESS = (Σ_k w_k)² / Σ_k w_k², from log weights (any additive constant cancels).

    Args:
        log_weights: (K,) log importance weights.

    Returns:
        0-dim tensor in [1, K].
    """
    if not isinstance(log_weights, Tensor) or log_weights.dim() != 1 or log_weights.numel() == 0:
        raise ValueError("log_weights must be a non-empty tensor of shape (K,)")
    if not torch.is_floating_point(log_weights) or torch.isnan(log_weights).any():
        raise ValueError("log_weights must be floating point without NaN")
    if (log_weights == float("-inf")).all():
        raise ValueError("all weights are zero; ESS is undefined")
    return torch.exp(2 * torch.logsumexp(log_weights, dim=0) - torch.logsumexp(2 * log_weights, dim=0))


def snis_expectation(values: Tensor, log_unnorm: Tensor, log_q: Tensor) -> Tensor:
    """SNIS estimate of E_p[g] = Σ_k ω_k g(x_k) (Eq. 2.29/2.30).

    Args:
        values: (K,) or (K, ...) g(x_k).
        log_unnorm: (K,) log p̃(x_k).
        log_q: (K,) log q(x_k), possibly unnormalised.

    Returns:
        Tensor of shape ``values.shape[1:]``.
    """
    w = snis_weights(log_unnorm, log_q)
    if not isinstance(values, Tensor) or values.dim() < 1 or values.shape[0] != w.shape[0]:
        raise ValueError(f"values must have leading dimension K={w.shape[0]}")
    return torch.tensordot(w, values.to(w.dtype), dims=([0], [0]))
