"""Test helper: distance between sampled sequences and an enumerated exact distribution."""

from __future__ import annotations

import torch
from torch import Tensor


def index_of(x: Tensor, vocab_size: int) -> Tensor:
    """Base-V index of each row, matching ``enumerate_sequences`` order. x: (..., T) -> (...)."""
    powers = vocab_size ** torch.arange(x.shape[-1] - 1, -1, -1, device=x.device)
    return (x * powers).sum(-1)


def empirical_tv(samples: Tensor, log_probs: Tensor) -> float:
    """TV between the histogram of ``samples`` (..., T) and ``exp(log_probs)`` over all V^T sequences."""
    t = samples.shape[-1]
    v = round(log_probs.numel() ** (1 / t))
    assert v**t == log_probs.numel(), "log_probs must cover all V^T sequences"
    counts = torch.bincount(index_of(samples.reshape(-1, t), v), minlength=v**t).double()
    return 0.5 * float((counts / counts.sum() - log_probs.exp()).abs().sum())
