"""Annealed importance sampling (AIS) and reverse AIS for log Z of fixed-length sequence energies.

Notation: C chains, T sequence length, V vocabulary, K + 1 inverse temperatures
0 = β_0 < β_1 < ... < β_K = 1.

Target: p(x) = exp(-E(x)) / Z over V^T, energy ``energy(x: LongTensor (N, T)) -> Tensor (N,)``.
Base: the uniform distribution p_0 over V^T, exact sampling and log Z_0 = T log V.
Geometric path: p_k(x) ∝ f_k(x) = exp(-β_k E(x)) (the uniform base has f_0 ≡ 1, so the
intermediate energies are β_k · E). Transitions: T_k is one systematic-scan Gibbs sweep
(§2.3.1 Algorithm 2 of the monograph "Energy-based models for speech and language", reusing
:func:`seqebm.sampling.mcmc._gibbs_site_update`) for energy β_k · E, which leaves p_k invariant.

The seed monograph covers plain importance sampling for Z (§2.3.2, Eq. (2.28)) but not AIS; the
method and the bracketing are from

* R. M. Neal, "Annealed importance sampling", Statistics and Computing 11, 2001;
* R. B. Grosse, Z. Ghahramani, R. P. Adams, "Sandwiching the marginal likelihood using
  bidirectional Monte Carlo", arXiv:1511.02543, 2015 (reverse AIS / BDMC).

Forward AIS (:func:`ais_log_partition`): x_0 ~ p_0; for k = 1..K,
log w += log f_k(x_{k-1}) - log f_{k-1}(x_{k-1}) = -(β_k - β_{k-1}) E(x_{k-1}), then
x_k ~ T_k(x_{k-1}) (the last sweep at β_K is skipped: it would not change w). E[w] = Z / Z_0, so
Ẑ = Z_0 · mean(w) is unbiased and, by Jensen, E[log Ẑ] ≤ log Z: a stochastic LOWER bound.

Reverse AIS (:func:`reverse_ais_log_partition`): AIS along the reversed path, started from exact
target samples x_K ~ p: for k = K..1, log v += log f_{k-1}(x_k) - log f_k(x_k) = (β_k - β_{k-1}) E(x_k),
then x_{k-1} ~ T_{k-1}(x_k) (skipped for k = 1). E[v] = Z_0 / Z, so
log Ž = log Z_0 - log mean(v) has E[log Ž] ≥ log Z: a stochastic UPPER bound.

Together E[log Ẑ] ≤ log Z ≤ E[log Ž] brackets the true value; the gap shrinks as the path gets
finer (more temperatures) and as C grows. With β = [0, 1] forward AIS is plain importance
sampling from the uniform distribution and reverse AIS the harmonic-mean estimator.
All weights are accumulated in float64; energies are evaluated under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

from seqebm.sampling.mcmc import _check_int, _energy, _gibbs_site_update

Energy = Callable[[Tensor], Tensor]


def _check_betas(betas: Sequence[float] | Tensor) -> list[float]:
    b = betas.detach().double().cpu().tolist() if isinstance(betas, Tensor) else [float(v) for v in betas]
    if isinstance(betas, Tensor) and betas.dim() != 1:
        raise ValueError(f"betas must be one-dimensional, got shape {tuple(betas.shape)}")
    if len(b) < 2 or b[0] != 0.0 or b[-1] != 1.0:
        raise ValueError(f"betas must start at 0 and end at 1 with at least 2 entries, got {b[:3]}...{b[-3:]}")
    if any(not math.isfinite(v) for v in b) or any(b1 <= b0 for b0, b1 in zip(b[:-1], b[1:])):
        raise ValueError("betas must be finite and strictly increasing")
    return b


def _gibbs_sweep(energy: Energy, beta: float, x: Tensor, vocab_size: int,
                 generator: torch.Generator | None) -> Tensor:
    """One systematic-scan Gibbs sweep for the tempered energy β·E (leaves p_β invariant)."""
    c, t = x.shape

    def tempered(y: Tensor) -> Tensor:
        return beta * energy(y)

    for i in range(t):
        pos = torch.full((c,), i, dtype=torch.long, device=x.device)
        x = _gibbs_site_update(tempered, x, pos, vocab_size, generator)
    return x


def _run_path(energy: Energy, x: Tensor, betas: list[float], vocab_size: int,
              generator: torch.Generator | None) -> Tensor:
    """AIS along ``betas`` (either direction) from x ~ p_{betas[0]}; returns log w (C,) float64.

    log w = Σ_k -(betas[k] - betas[k-1]) E(x_{k-1}), with a Gibbs sweep at betas[k] between
    weight updates (none after the last one).
    """
    log_w = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for k in range(1, len(betas)):
        log_w = log_w - (betas[k] - betas[k - 1]) * _energy(energy, x)
        if k < len(betas) - 1:
            x = _gibbs_sweep(energy, betas[k], x, vocab_size, generator)
    return log_w


def ais_log_partition(
    energy: Energy,
    vocab_size: int,
    length: int,
    *,
    num_chains: int,
    betas: Sequence[float] | Tensor,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[float, Tensor]:
    """Forward AIS estimate of log Z from the uniform base (Neal 2001); a stochastic lower bound.

    Args:
        energy: callable LongTensor (N, T) -> Tensor (N,).
        vocab_size: V.
        length: T.
        num_chains: C independent AIS runs.
        betas: inverse temperatures, strictly increasing from 0 to 1 (K + 1 entries).
        generator: torch random generator on ``device``.
        device: device of the chains (default CPU).

    Returns:
        ``(log_Z_hat, log_weights)``: log Ẑ = T log V + logsumexp(log w) - log C as a float, and the
        float64 log importance weights (C,) relative to the base (E[exp(log w)] = Z / V^T).
        E[log Ẑ] ≤ log Z.

    Raises:
        ValueError: on malformed sizes, betas or energy outputs.
    """
    _check_int("vocab_size", vocab_size, 1)
    _check_int("length", length, 1)
    _check_int("num_chains", num_chains, 1)
    b = _check_betas(betas)
    x = torch.randint(vocab_size, (num_chains, length), generator=generator, device=device)  # exact p_0
    log_w = _run_path(energy, x, b, vocab_size, generator)
    log_z0 = length * math.log(vocab_size)
    return log_z0 + float(torch.logsumexp(log_w, 0)) - math.log(num_chains), log_w


def reverse_ais_log_partition(
    energy: Energy,
    vocab_size: int,
    length: int,
    *,
    exact_samples: Tensor,
    betas: Sequence[float] | Tensor,
    generator: torch.Generator | None = None,
) -> tuple[float, Tensor]:
    """Reverse AIS estimate of log Z from exact target samples (Grosse et al. 2015); a stochastic upper bound.

    Runs the path β_K = 1 → β_0 = 0 from ``exact_samples`` ~ p; the reverse weights v satisfy
    E[v] = Z_0 / Z, so log Ž = T log V - (logsumexp(log v) - log C) has E[log Ž] ≥ log Z.

    Args:
        energy: callable LongTensor (N, T) -> Tensor (N,).
        vocab_size: V.
        length: T.
        exact_samples: LongTensor (C, T), independent exact draws from p(x) ∝ exp(-E(x)) (e.g. from
            :func:`seqebm.estimators.exact.exact_distribution` on tiny problems, or the data for a
            model fitted to it — then the bound is only approximate).
        betas: inverse temperatures, strictly increasing from 0 to 1 (given forward; run reversed).
        generator: torch random generator on the samples' device.

    Returns:
        ``(log_Z_upper, log_weights)``: the estimate as a float and the float64 reverse log weights
        log v (C,) (E[exp(log v)] = V^T / Z).

    Raises:
        ValueError: on malformed sizes, samples, betas or energy outputs.
    """
    _check_int("vocab_size", vocab_size, 1)
    _check_int("length", length, 1)
    b = _check_betas(betas)
    x = exact_samples
    if not isinstance(x, Tensor) or x.dtype != torch.long or x.dim() != 2 or x.shape[0] < 1 or x.shape[1] != length:
        got = (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"exact_samples must be a LongTensor of shape (C>=1, {length}), got {got}")
    if x.min() < 0 or x.max() >= vocab_size:
        raise ValueError(f"exact_samples tokens must lie in [0, {vocab_size})")
    log_v = _run_path(energy, x.clone(), b[::-1], vocab_size, generator)
    c = x.shape[0]
    log_z0 = length * math.log(vocab_size)
    return log_z0 - (float(torch.logsumexp(log_v, 0)) - math.log(c)), log_v
