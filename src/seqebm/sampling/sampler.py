"""Batched ancestral sampling with the exact log-probability of what was sampled.

Notation: B prefixes, K samples per prefix, N = B·K rows, P prefix length, L new tokens,
V vocabulary.

Two densities are returned for every sampled token, because importance weights need both:

* ``log_q``: the *proposal* actually sampled from, i.e. the model's logits after temperature,
  top-k / top-p truncation and the min-length EOS mask, renormalised. Tokens outside the
  truncated support have q = 0, so ``exp(sum log_q)`` sums to 1 over every sequence the
  sampler can produce (tested by enumeration).
* ``log_p``: the model's raw, untruncated log-probability at temperature 1.

Shared prefixes: each prefix is encoded once (one ``step`` over P tokens for the B prefixes;
models whose ``step`` takes ``last_only`` project only the last position onto the vocabulary).
Models with ``share_state`` (the Transformer LM) then keep one copy of each prefix's keys and
values for its K samples; other models gather the state K times with ``select_state`` (copied,
not recomputed). With ``max_batch_tokens`` the N rows are generated in chunks whose
``rows × (P + L)`` stays under the budget.

Randomness: one uniform number per (row, step) is drawn up front from ``generator`` and the
token is read off the proposal's CDF (inverse-CDF sampling, float64). Every row therefore
owns its random stream, so the samples do not depend on chunking, and sharing a prefix state
gives the same samples as re-encoding the prefix for every row.

Order of the proposal's transformations: EOS is masked while fewer than ``min_new_tokens``
tokens exist, then temperature, top-k (exactly k tokens), top-p. With top-k the sampling math
runs on the k candidates only (O(k) instead of O(V) per row and step); only the raw log p
needs one logsumexp over the vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.sampling.basic import filter_logits


@dataclass
class SampleOutput:
    tokens: Tensor  # (N, L) new tokens; pad_id after a row's EOS
    lengths: Tensor  # (N,) generated tokens per row, EOS included
    token_log_q: Tensor  # (N, L) float32 log proposal prob per token, 0 after the end
    token_log_p: Tensor  # (N, L) float32 raw model log prob per token, 0 after the end
    prefix_index: Tensor  # (N,) which prefix each row continues (rows are grouped by prefix)

    @property
    def log_q(self) -> Tensor:  # (N,) float64
        return self.token_log_q.double().sum(-1)

    @property
    def log_p(self) -> Tensor:  # (N,) float64
        return self.token_log_p.double().sum(-1)

    @property
    def mask(self) -> Tensor:  # (N, L) bool, True at generated tokens
        return torch.arange(self.tokens.shape[1], device=self.tokens.device)[None] < self.lengths[:, None]


def _check(prefix: Tensor, num_samples: int, max_new_tokens: int, min_new_tokens: int, eos_id: int | None) -> None:
    if not isinstance(prefix, Tensor) or prefix.dim() != 2 or prefix.shape[1] < 1:
        shape = tuple(prefix.shape) if isinstance(prefix, Tensor) else type(prefix).__name__
        raise ValueError(f"prefix must be a (B, P>=1) LongTensor starting with BOS, got {shape}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError(f"min_new_tokens must be in [0, max_new_tokens={max_new_tokens}], got {min_new_tokens}")
    if min_new_tokens and eos_id is None:
        raise ValueError("min_new_tokens needs eos_id (it only forbids an early EOS)")


@torch.no_grad()
def sample(
    model: nn.Module,
    prefix: Tensor,
    *,
    max_new_tokens: int,
    num_samples: int = 1,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    max_batch_tokens: int | None = None,
    context: dict[str, Tensor] | None = None,
) -> SampleOutput:
    """Draw ``num_samples`` continuations of each prefix row (B, P).

    ``context`` holds per-prefix keyword tensors for conditional models (``source``,
    ``source_mask`` with B rows); they are encoded once per prefix like the prefix itself.
    """
    _check(prefix, num_samples, max_new_tokens, min_new_tokens, eos_id)
    context = context or {}
    b, p = prefix.shape
    if model.max_len is not None and p + max_new_tokens - 1 > model.max_len:
        raise ValueError(f"prefix length {p} + max_new_tokens {max_new_tokens} exceeds the model's context "
                         f"max_len={model.max_len} (the last sampled token is never fed back)")
    device = prefix.device
    n = b * num_samples
    if max_batch_tokens is None:
        rows_per_chunk = n
    else:
        rows_per_chunk = max(1, max_batch_tokens // (p + max_new_tokens))
    capacity = p + max_new_tokens
    kw = {"capacity": capacity} if _accepts_capacity(model) else {}
    uniforms = torch.rand(n, max_new_tokens, generator=generator, dtype=torch.float64,
                          device=generator.device if generator is not None else "cpu").to(device)
    state = model.init_state(b, device, **context, **kw)
    step_kw = {"last_only": True} if _accepts(model.step, "last_only") else {}
    logits, state = model.step(prefix, state, **step_kw)
    first = logits[:, -1]  # (B, V): next-token logits after each prefix
    # Models that can share a prefix state (one stored copy per prefix) get chunks of whole groups.
    share = num_samples > 1 and hasattr(model, "share_state") and rows_per_chunk >= num_samples
    if share:
        rows_per_chunk -= rows_per_chunk % num_samples
    outs = []
    for start in range(0, n, rows_per_chunk):
        rows = torch.arange(start, min(n, start + rows_per_chunk), device=device)
        owner = rows // num_samples  # prefix of each row
        if share:
            groups = torch.arange(start // num_samples, (int(rows[-1]) // num_samples) + 1, device=device)
            chunk_state = model.share_state(model.select_state(state, groups), num_samples)
            chunk_first = first.index_select(0, owner)
        elif num_samples == 1 and rows_per_chunk >= n:  # one chunk holding every row in order:
            chunk_state, chunk_first = state, first  # the state is not used afterwards, no copy
        else:
            chunk_state = model.select_state(state, owner)
            chunk_first = first.index_select(0, owner)
        outs.append(_generate_rows(model, chunk_state, chunk_first,
                                   owner, uniforms.index_select(0, rows), min_new_tokens, temperature,
                                   top_k, top_p, eos_id, pad_id))
    return SampleOutput(*(torch.cat([getattr(o, f) for o in outs]) for f in
                          ("tokens", "lengths", "token_log_q", "token_log_p", "prefix_index")))


def _accepts_capacity(model: nn.Module) -> bool:
    return _accepts(model.init_state, "capacity")


def _accepts(fn: Any, name: str) -> bool:
    import inspect

    return name in inspect.signature(fn).parameters


def proposal_log_probs(logits: Tensor, *, step: int, min_new_tokens: int, temperature: float,
                       top_k: int | None, top_p: float | None, eos_id: int | None) -> Tensor:
    """log q(. | prefix) (M, V) of the sampled proposal at generation step ``step`` (0-based)."""
    if eos_id is not None and step < min_new_tokens:
        logits = logits.clone()
        logits[:, eos_id] = float("-inf")
    return torch.log_softmax(filter_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p), -1)


def sample_top_k(logits: Tensor, u: Tensor, *, step: int, min_new_tokens: int, temperature: float, top_k: int,
                 top_p: float | None, eos_id: int | None) -> tuple[Tensor, Tensor]:
    """Token (M,) and its log q (M,) from the top-k proposal, computed on the k candidates only.

    The proposal is the same distribution as :func:`proposal_log_probs` with ``top_k``; the
    inverse CDF walks the candidates in descending order of probability.
    """
    logits = logits.float()
    if eos_id is not None and step < min_new_tokens:
        logits = logits.clone()
        logits[:, eos_id] = float("-inf")
    vals, idx = logits.topk(min(top_k, logits.shape[-1]), dim=-1)  # (M, k), descending
    vals = vals / temperature
    if top_p is not None:
        probs = vals.softmax(-1)
        vals = vals.masked_fill((probs.cumsum(-1) - probs) >= top_p, float("-inf"))
    lq = torch.log_softmax(vals.double(), -1)
    choice = inverse_cdf(lq, u)
    return idx.gather(1, choice[:, None]).squeeze(1), lq.gather(1, choice[:, None]).squeeze(1).float()


def inverse_cdf(log_q: Tensor, u: Tensor) -> Tensor:
    """Token whose CDF interval holds ``u`` (M,) in [0, 1); never a zero-probability token."""
    q = log_q.double().exp()
    cdf = q.cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    support = q > 0
    last_ok = q.shape[1] - 1 - support.flip(-1).int().argmax(-1)  # float rounding at the top end
    return torch.minimum(idx, last_ok)


def _generate_rows(model: nn.Module, state: Any, last: Tensor, owner: Tensor, uniforms: Tensor, min_new: int,
                   temperature: float, top_k: int | None, top_p: float | None, eos_id: int | None,
                   pad_id: int) -> SampleOutput:
    m, max_new = uniforms.shape
    device = last.device
    tokens = torch.full((m, max_new), pad_id, dtype=torch.long, device=device)
    log_q = torch.zeros(m, max_new, device=device)
    log_p = torch.zeros(m, max_new, device=device)
    done = torch.zeros(m, dtype=torch.bool, device=device)
    lengths = torch.full((m,), max_new, dtype=torch.long, device=device)
    for i in range(max_new):
        last = last.float()
        if top_k is not None and top_k < last.shape[-1]:
            tok, tok_q = sample_top_k(last, uniforms[:, i], step=i, min_new_tokens=min_new,
                                      temperature=temperature, top_k=top_k, top_p=top_p, eos_id=eos_id)
        else:
            q = proposal_log_probs(last, step=i, min_new_tokens=min_new, temperature=temperature, top_k=top_k,
                                   top_p=top_p, eos_id=eos_id)
            tok = inverse_cdf(q, uniforms[:, i])  # (M,)
            tok_q = q.gather(1, tok[:, None]).squeeze(1)
        tok_p = last.gather(1, tok[:, None]).squeeze(1) - last.logsumexp(-1)  # raw log p, T = 1
        live = ~done
        tokens[:, i] = torch.where(live, tok, pad_id)
        log_q[:, i] = torch.where(live, tok_q, 0.0)
        log_p[:, i] = torch.where(live, tok_p, 0.0)
        if eos_id is not None:
            ended = live & (tok == eos_id)
            lengths = torch.where(ended, i + 1, lengths)
            done = done | ended
            if bool(done.all()):
                break
        if i + 1 < max_new:
            logits, state = model.step(tokens[:, i:i + 1], state)
            last = logits[:, -1]
    return SampleOutput(tokens, lengths, log_q, log_p, owner)


@torch.no_grad()
def enumerate_proposal(model: nn.Module, prefix: Tensor, max_new_tokens: int, **kw: Any) -> dict[tuple, float]:
    """Exact proposal probabilities of every reachable continuation (brute force; tiny V, L only).

    Uses the same truncation as :func:`sample` but one full forward pass per sequence, as an
    independent oracle for tests. Returns ``{continuation tuple: log q}``.
    """
    eos_id, min_new = kw.get("eos_id"), kw.get("min_new_tokens", 0)
    out: dict[tuple, float] = {}

    def rec(seq: list[int], lq: float) -> None:
        if len(seq) == max_new_tokens or (eos_id is not None and seq and seq[-1] == eos_id):
            out[tuple(seq)] = lq
            return
        logits = model(torch.cat([prefix, torch.tensor([seq], dtype=torch.long)], 1) if seq else prefix)[:, -1]
        q = proposal_log_probs(logits.double(), step=len(seq), min_new_tokens=min_new,
                               temperature=kw.get("temperature", 1.0), top_k=kw.get("top_k"),
                               top_p=kw.get("top_p"), eos_id=eos_id)[0]
        for v in range(q.shape[0]):
            if math.isfinite(float(q[v])):
                rec(seq + [v], lq + float(q[v]))

    rec([], 0.0)
    return out
