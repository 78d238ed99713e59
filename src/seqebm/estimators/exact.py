"""Exact normalising constants of sequence energies by enumeration (small V, T only).

Notation: V vocabulary, T sequence length, N = V^T enumerated sequences.

An energy is any callable ``energy(x: LongTensor (N, T)) -> Tensor (N,)`` with
p(x) = exp(-E(x)) / Z and Z = Σ_x exp(-E(x)) (monograph "Energy-based models for speech and
language", §2.1 Eq. 2.13 in the seed's sign convention U = -E). For tiny problems Z can be
computed by brute force; these functions are the ground truth that the Monte Carlo estimators of
§2.3 (MCMC, §2.3.1; importance sampling, §2.3.2) are tested against.

All reductions are done in float64 with ``logsumexp``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

Energy = Callable[[Tensor], Tensor]

MAX_ENUMERATION = 2_000_000


def _check_sizes(vocab_size: int, length: int) -> int:
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    if not isinstance(length, int) or length < 1:
        raise ValueError(f"length must be a positive int, got {length!r}")
    n = vocab_size**length
    if n > MAX_ENUMERATION:
        raise ValueError(
            f"enumerating V^T = {vocab_size}^{length} = {n} sequences exceeds the limit of "
            f"{MAX_ENUMERATION}; use an estimator (importance sampling / MCMC) instead"
        )
    return n


def enumerate_sequences(vocab_size: int, length: int, *, device: torch.device | str | None = None) -> Tensor:
    """All V^T sequences of length T over tokens [0, V), in lexicographic order.

    Args:
        vocab_size: V.
        length: T.
        device: device of the result (default CPU).

    Returns:
        LongTensor (V^T, T); row i is the base-V expansion of i (most significant digit first).

    Raises:
        ValueError: if V or T is not positive, or V^T > 2_000_000.
    """
    n = _check_sizes(vocab_size, length)
    idx = torch.arange(n, dtype=torch.long, device=device)  # (N,)
    powers = vocab_size ** torch.arange(length - 1, -1, -1, dtype=torch.long, device=device)  # (T,)
    return (idx[:, None] // powers[None, :]) % vocab_size  # (N, T)


def _all_log_unnorm(energy: Energy, vocab_size: int, length: int, batch_size: int,
                    device: torch.device | str | None) -> tuple[Tensor, Tensor]:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    seqs = enumerate_sequences(vocab_size, length, device=device)  # (N, T)
    chunks = []
    with torch.no_grad():
        for start in range(0, seqs.shape[0], batch_size):
            x = seqs[start:start + batch_size]
            e = energy(x)
            if e.shape != (x.shape[0],):
                raise ValueError(f"energy must return shape ({x.shape[0]},) for input {tuple(x.shape)}, "
                                 f"got {tuple(e.shape)}")
            chunks.append(-e.detach().to(torch.float64))
    return seqs, torch.cat(chunks)  # (N, T), (N,)


def exact_log_partition(energy: Energy, vocab_size: int, length: int, batch_size: int = 65536, *,
                        device: torch.device | str | None = None) -> float:
    """log Z = log Σ_x exp(-E(x)) over all V^T sequences, in float64.

    Args:
        energy: callable LongTensor (N, T) -> Tensor (N,).
        vocab_size: V.
        length: T.
        batch_size: sequences per energy call.
        device: device on which sequences are built and passed to ``energy``.

    Returns:
        log Z as a Python float.
    """
    _, log_unnorm = _all_log_unnorm(energy, vocab_size, length, batch_size, device)
    return float(torch.logsumexp(log_unnorm, dim=0))


def exact_distribution(energy: Energy, vocab_size: int, length: int, batch_size: int = 65536, *,
                       device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """The exact distribution p(x) = exp(-E(x)) / Z over all sequences.

    Returns:
        ``(sequences, log_probs)``: LongTensor (V^T, T) in the order of
        :func:`enumerate_sequences`, and float64 Tensor (V^T,) with logsumexp(log_probs) = 0.
    """
    seqs, log_unnorm = _all_log_unnorm(energy, vocab_size, length, batch_size, device)
    return seqs, log_unnorm - torch.logsumexp(log_unnorm, dim=0)
