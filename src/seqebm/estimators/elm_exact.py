"""Exact normalisers of energy-based LMs by enumerating every sentence (tiny vocabularies only).

Notation: W the word ids a sentence may use, m the maximum length, S = Σ_l |W|^l sentences.

These are the oracles of the ELM tests and of the label-bias example (monograph §4.1.2): the
per-length log Z_l of a TRF-LM (Eq. 3.5), the single log Z of a GN-ELM (Eq. 3.3) and of a
residual ELM (Eq. 3.15), and the exact log-likelihood used for maximum-likelihood fitting of
small models. Everything is computed in float64 with ``logsumexp``.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["enumerate_sentences", "exact_trf_log_normalizers", "exact_log_partition", "MAX_ENUMERATED"]

#: refuse to enumerate more sentences than this
MAX_ENUMERATED = 2_000_000


def enumerate_sentences(word_ids: Sequence[int], max_length: int, *, min_length: int = 1,
                        device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
    """Every sentence of ``min_length``..``max_length`` words over ``word_ids``, shortest first.

    Returns tokens (S, m) long, right-padded with 0, and mask (S, m) bool.
    """
    ids = [int(i) for i in word_ids]
    if not ids or len(set(ids)) != len(ids):
        raise ValueError(f"word_ids must be non-empty and distinct, got {ids}")
    if not 1 <= min_length <= max_length:
        raise ValueError(f"need 1 <= min_length <= max_length, got {min_length}, {max_length}")
    total = sum(len(ids) ** l for l in range(min_length, max_length + 1))
    if total > MAX_ENUMERATED:
        raise ValueError(f"{total} sentences ({len(ids)} words, lengths {min_length}..{max_length}) exceed "
                         f"MAX_ENUMERATED={MAX_ENUMERATED}")
    rows = [list(s) + [0] * (max_length - l) for l in range(min_length, max_length + 1)
            for s in itertools.product(ids, repeat=l)]
    tokens = torch.tensor(rows, dtype=torch.long, device=device)
    lengths = torch.tensor([l for l in range(min_length, max_length + 1) for _ in range(len(ids) ** l)],
                           device=device)
    mask = torch.arange(max_length, device=device)[None] < lengths[:, None]
    return tokens, mask


def _scores(fn, tokens: Tensor, mask: Tensor, batch_size: int) -> Tensor:
    out = []
    for s in range(0, tokens.shape[0], batch_size):
        t, m = tokens[s:s + batch_size], mask[s:s + batch_size]
        width = max(1, int(m.sum(1).max()))  # trim padding columns of this chunk
        out.append(fn(t[:, :width], m[:, :width]).double())
    return torch.cat(out)


def exact_trf_log_normalizers(potential: nn.Module, word_ids: Sequence[int], max_length: int, *,
                              batch_size: int = 4096) -> Tensor:
    """log Z_l = log Σ_{x of length l} exp(U(x)) for l = 1..m (Eq. 3.5), as (m + 1,) float64, entry 0 = −inf.

    Differentiable w.r.t. the potential's parameters (used for exact MLE).
    """
    dev = next((p.device for p in potential.parameters()), torch.device("cpu"))
    tokens, mask = enumerate_sentences(word_ids, max_length, device=dev)
    u = _scores(potential, tokens, mask, batch_size)  # (S,)
    lengths = mask.sum(1)
    out = [torch.full((), float("-inf"), dtype=torch.float64, device=dev)]
    for l in range(1, max_length + 1):
        out.append(torch.logsumexp(u[lengths == l], 0))
    return torch.stack(out)


def exact_log_partition(log_unnormalized, word_ids: Sequence[int], max_length: int, *,
                        batch_size: int = 4096, device: torch.device | str | None = None) -> Tensor:
    """log Z = log Σ_x exp(log p̃(x)) over all sentences of 1..m words, a float64 scalar.

    ``log_unnormalized(tokens, mask) -> (S,)`` is e.g. :meth:`GNELM.log_unnormalized` (Eq. 3.3)
    or :meth:`ResidualELM.log_unnormalized` (Eq. 3.15).
    """
    tokens, mask = enumerate_sentences(word_ids, max_length, device=device)
    return torch.logsumexp(_scores(log_unnormalized, tokens, mask, batch_size), 0)
