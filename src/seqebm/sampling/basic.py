"""Batched ancestral sampling and greedy decoding through the incremental ``step`` protocol.

Notation: B batch, P prefix length, N new tokens, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def filter_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> Tensor:
    """Temperature, then top-k (exactly k tokens), then nucleus (top-p); removed entries become -inf."""
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature  # keeps float64
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        k = min(top_k, logits.shape[-1])
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))  # exactly k tokens (ties: topk's order)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, idx = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p
        drop = (probs.cumsum(-1) - probs) >= top_p
        logits = logits.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return logits


@torch.no_grad()
def generate(
    model: nn.Module,
    prefix: Tensor,  # (B, P), starts with BOS
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    greedy: bool = False,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    **context: Tensor,
) -> Tensor:
    """Continue ``prefix`` by up to ``max_new_tokens`` tokens; returns (B, N) new tokens.

    After a row emits ``eos_id`` its remaining positions are ``pad_id``.
    """
    if prefix.dim() != 2 or prefix.shape[1] < 1:
        raise ValueError(f"prefix must have shape (B, P>=1), got {tuple(prefix.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    b = prefix.shape[0]
    state = model.init_state(b, prefix.device, **context)
    logits, state = model.step(prefix, state)
    last = logits[:, -1]
    out = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=prefix.device)
    done = torch.zeros(b, dtype=torch.bool, device=prefix.device)
    for i in range(max_new_tokens):
        if greedy:
            tok = last.argmax(-1)
        else:
            probs = filter_logits(last, temperature=temperature, top_k=top_k, top_p=top_p).softmax(-1)
            tok = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        tok = tok.masked_fill(done, pad_id)
        out[:, i] = tok
        if eos_id is not None:
            done |= tok == eos_id
            if bool(done.all()):
                break
        if i + 1 < max_new_tokens:
            logits, state = model.step(tok[:, None], state)
            last = logits[:, -1]
    return out
