"""Exact likelihood evaluation of autoregressive models.

Perplexity here is exact for the model under the given chunking: every target token is scored
once with the context its row provides, ``ppl = exp(Σ NLL / #tokens)``. Word-level perplexity
divides the same total NLL by the number of words instead (EOS counted as one word per
document, as in the usual PTB/WikiText convention), so it is comparable across tokenizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from seqebm.data.batching import Batch
from seqebm.objectives.base import token_nll


@torch.no_grad()
def corpus_nll(model: nn.Module, batches: Iterable[Batch], device: torch.device | str = "cpu") -> tuple[float, int]:
    """Total negative log-likelihood (nats, float64 accumulation) and number of target tokens."""
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), dtype=torch.float64), 0
    for batch in batches:
        batch = batch.to(device)
        logits = model(batch.inputs, **batch.model_kwargs())
        total += token_nll(logits, batch.targets, batch.mask).double().sum().cpu()
        count += batch.num_tokens
    model.train(was_training)
    return float(total), count


def perplexity_metrics(nll_sum: float, tokens: int, *, words: int | None = None,
                       prefix: str = "") -> dict[str, float]:
    """``loss`` (nats/token), ``ppl``, ``bits_per_token`` and, given ``words``, ``word_ppl``."""
    if tokens <= 0:
        raise ValueError("cannot compute perplexity over zero tokens")
    nll = nll_sum / tokens
    out = {f"{prefix}loss": nll, f"{prefix}ppl": math.exp(min(nll, 700.0)), f"{prefix}bits_per_token": nll / math.log(2)}
    if words:
        out[f"{prefix}word_ppl"] = math.exp(min(nll_sum / words, 700.0))
        out[f"{prefix}tokens_per_word"] = tokens / words
    return out


def bits_per_dim(nll_sum: float, dims: int) -> float:
    """Negative log-likelihood in bits per dimension (pixel) for discrete image models."""
    if dims <= 0:
        raise ValueError("cannot compute bits/dim over zero dimensions")
    return nll_sum / dims / math.log(2)
