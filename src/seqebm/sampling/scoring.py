"""Scoring sequences under an autoregressive model: log p(x_{>=prefix} | x_{<prefix}).

Notation: B batch, T length (BOS included at position 0), V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def token_log_probs(model: nn.Module, tokens: Tensor, context: dict[str, Tensor] | None = None) -> Tensor:
    """log p(tokens[:, t] | tokens[:, :t]) for t = 1..T-1, as (B, T-1) float32. Keeps autograd."""
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must have shape (B, T>=2) with BOS first, got {tuple(tokens.shape)}")
    logits = model(tokens[:, :-1], **(context or {}))  # (B, T-1, V)
    return torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, 1:, None]).squeeze(-1)


def sequence_log_prob(model: nn.Module, tokens: Tensor, *, prefix_len: int | Tensor = 1,
                      lengths: Tensor | None = None, context: dict[str, Tensor] | None = None) -> Tensor:
    """Sum of log p over positions ``prefix_len <= t < lengths`` of each row, as (B,) float64.

    ``tokens`` (B, T) start with BOS; ``prefix_len`` (int or (B,)) counts BOS, so the default 1
    scores the whole sequence. ``lengths`` (B,) are the real lengths of right-padded rows
    (default: T). Batched scoring equals scoring each row alone.
    """
    b, t = tokens.shape
    lengths = torch.full((b,), t, device=tokens.device) if lengths is None else lengths.to(tokens.device)
    prefix_len = torch.as_tensor(prefix_len, device=tokens.device).expand(b)
    if bool((prefix_len < 1).any()) or bool((lengths > t).any()) or bool((prefix_len > lengths).any()):
        raise ValueError(f"need 1 <= prefix_len <= lengths <= T={t}; got prefix_len={prefix_len.tolist()}, "
                         f"lengths={lengths.tolist()}")
    lp = token_log_probs(model, tokens, context)  # (B, T-1): position j scores tokens[:, j + 1]
    pos = torch.arange(1, t, device=tokens.device)[None]
    mask = (pos >= prefix_len[:, None]) & (pos < lengths[:, None])
    return lp.double().masked_fill(~mask, 0.0).sum(-1)
