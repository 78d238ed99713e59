"""Beam search with length normalisation for any model of the seqebm protocol.

Notation: B prefixes, W beam width, V vocabulary, L new tokens.
A hypothesis' score is ``log p(y | prefix) / len(y) ** length_penalty`` (``length_penalty`` 0:
raw log-probability; 1: per-token average). Hypotheses end at EOS (counted in the length) or at
``max_new_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class BeamOutput:
    tokens: Tensor  # (B, L) best hypothesis per prefix, right-padded with pad_id
    lengths: Tensor  # (B,)
    scores: Tensor  # (B,) length-normalised scores
    log_probs: Tensor  # (B,) raw log p of the best hypotheses


@torch.no_grad()
def beam_search(model: nn.Module, prefix: Tensor, *, max_new_tokens: int, beam_size: int = 5,
                eos_id: int | None = None, length_penalty: float = 1.0, pad_id: int = 0,
                context: dict[str, Tensor] | None = None) -> BeamOutput:
    """Best continuation of each prefix row (B, P); ``beam_size=1`` is greedy decoding."""
    if prefix.dim() != 2 or prefix.shape[1] < 1:
        raise ValueError(f"prefix must have shape (B, P>=1), got {tuple(prefix.shape)}")
    if beam_size < 1 or max_new_tokens < 1:
        raise ValueError(f"beam_size and max_new_tokens must be >= 1, got {beam_size}, {max_new_tokens}")
    b, p = prefix.shape
    w, device = beam_size, prefix.device
    if model.max_len is not None and p + max_new_tokens - 1 > model.max_len:
        raise ValueError(f"prefix length {p} + max_new_tokens {max_new_tokens} exceeds max_len={model.max_len}")
    state = model.init_state(b, device, **(context or {}))
    logits, state = model.step(prefix, state)
    rows = torch.arange(b, device=device).repeat_interleave(w)
    state = model.select_state(state, rows)
    last = logits[:, -1].index_select(0, rows)  # (B*W, V)
    scores = torch.full((b, w), float("-inf"), device=device, dtype=torch.float64)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    seqs = torch.zeros(b, w, 0, dtype=torch.long, device=device)
    finished: list[list[tuple[float, float, list[int]]]] = [[] for _ in range(b)]

    def norm(logp: float, n: int) -> float:
        return logp / (n ** length_penalty) if length_penalty else logp

    for i in range(max_new_tokens):
        v = last.shape[-1]
        cand = scores[..., None] + torch.log_softmax(last.double(), -1).view(b, w, v)  # (B, W, V)
        top_scores, top_idx = cand.view(b, -1).topk(min(2 * w, w * v), dim=-1)  # (B, 2W)
        beam_idx, tok = top_idx // v, top_idx % v
        new_scores = torch.full((b, w), float("-inf"), device=device, dtype=torch.float64)
        new_beam = torch.zeros(b, w, dtype=torch.long, device=device)
        new_tok = torch.zeros(b, w, dtype=torch.long, device=device)
        for r in range(b):
            k = 0
            for s, bi, t in zip(top_scores[r].tolist(), beam_idx[r].tolist(), tok[r].tolist()):
                if s == float("-inf"):
                    break
                hyp_len = i + 1
                if (eos_id is not None and t == eos_id) or i + 1 == max_new_tokens:
                    finished[r].append((norm(s, hyp_len), s, seqs[r, bi].tolist() + [t]))
                    continue
                if k < w:
                    new_scores[r, k], new_beam[r, k], new_tok[r, k] = s, bi, t
                    k += 1
        if i + 1 == max_new_tokens:
            break
        done = all(_cannot_improve(finished[r], float(new_scores[r].max()), norm, max_new_tokens) for r in range(b))
        if done or bool(torch.isinf(new_scores).all()):
            break
        flat = (torch.arange(b, device=device)[:, None] * w + new_beam).view(-1)
        seqs = torch.cat([seqs.gather(1, new_beam[..., None].expand(-1, -1, seqs.shape[2])), new_tok[..., None]], 2)
        scores = new_scores
        state = model.select_state(state, flat)
        logits, state = model.step(new_tok.view(-1, 1), state)
        last = logits[:, -1]
    tokens = torch.full((b, max_new_tokens), pad_id, dtype=torch.long, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    best_scores = torch.zeros(b, dtype=torch.float64, device=device)
    best_logp = torch.zeros(b, dtype=torch.float64, device=device)
    for r in range(b):
        sc, lp, hyp = max(finished[r], key=lambda f: f[0])
        tokens[r, : len(hyp)] = torch.tensor(hyp, device=device)
        lengths[r], best_scores[r], best_logp[r] = len(hyp), sc, lp
    return BeamOutput(tokens, lengths, best_scores, best_logp)


def _cannot_improve(finished: list, best_alive: float, norm, max_len: int) -> bool:
    """True when no live hypothesis can beat the best finished one.

    Log-probabilities only fall as a hypothesis grows, so with ``s <= 0`` a live score can reach
    at most ``s / max_len ** length_penalty`` after normalisation (``s`` itself when there is no
    length penalty).
    """
    if best_alive == float("-inf"):
        return True
    if not finished:
        return False
    bound = max(norm(best_alive, max_len), best_alive)
    return max(f[0] for f in finished) >= bound
