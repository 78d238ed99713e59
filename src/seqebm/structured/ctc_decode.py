"""Decoding CTC-style frame posteriors: greedy, and prefix beam search with LM shallow fusion and n-best.

Monograph §4.2.1 (CTC, Eqs. 4.17-4.18) and §4.2.2 (CTC-CRF): for frame log-probabilities
log p(pi_t | x) over blank (0) and labels 1..V, the probability of a label sequence sums over its
alignments, p(y | x) = sum_{pi: B(pi) = y} prod_t p(pi_t | x). Prefix beam search (Hannun et al.
2014) keeps, per label prefix, the log-probability of its alignments ending in blank and in a
label, so a wide enough beam computes the exact sum. With an LM scorer the search ranks

    score(y) = log p(y | x) + lm_weight * log p_LM(y) + length_bonus * |y|

(shallow fusion; ``log p_LM`` includes ``</s>`` when ``lm_eos=True``). CTC-CRF decoding is this
search with its label n-gram at ``lm_weight=1``: p_CTC-CRF(y | x) is proportional to
p_LM(y) * sum_{B(pi) = y} prod_t p(pi_t | x) (Eqs. 4.22, 4.24).

Notation: T frames, C = V + 1 symbols (blank first), W beam.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from seqebm.structured.label_ngram import LabelNGram

__all__ = ["Hypothesis", "ctc_greedy_decode", "ctc_prefix_beam_search", "NGramScorer", "ModelScorer", "collapse"]

#: An LM scorer: ``scorer(prefix)`` -> log p(next | prefix) over ``[</s>, 1, ..., V]`` (length V + 1).
LMScorer = Callable[[tuple[int, ...]], Sequence[float]]

_NEG = -math.inf


def _lse(a: float, b: float) -> float:
    if a == _NEG:
        return b
    if b == _NEG:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def collapse(path: Sequence[int]) -> list[int]:
    """The CTC collapse B: merge repeated symbols, then drop blanks (0)."""
    out, prev = [], None
    for s in path:
        if s != prev and s != 0:
            out.append(int(s))
        prev = s
    return out


@dataclass
class Hypothesis:
    """One n-best entry: ``labels``; ``acoustic`` = log sum over its alignments of prod_t p(pi_t|x);
    ``lm`` = log p_LM(labels) (0 without an LM); ``score`` = the fused ranking score."""

    labels: list[int]
    acoustic: float
    lm: float
    score: float


def ctc_greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[list[int]]:
    """Best path per frame, collapsed: (B, T, C) + (B,) -> label lists."""
    best = log_probs.argmax(-1).tolist()
    return [collapse(row[: int(n)]) for row, n in zip(best, lengths.tolist())]


class NGramScorer:
    """:class:`LabelNGram` as an LM scorer (memoised per history)."""

    def __init__(self, lm: LabelNGram) -> None:
        self.lm = lm
        self._cache: dict[tuple[int, ...], list[float]] = {}

    def __call__(self, prefix: tuple[int, ...]) -> list[float]:
        ctx = max(self.lm.order - 1, 0)
        key = prefix[len(prefix) - ctx:] if ctx else ()
        if len(key) < ctx:
            key = (0,) * (ctx - len(key)) + key
        out = self._cache.get(key)
        if out is None:
            out = [math.log(self.lm.prob(k, key)) for k in range(self.lm.num_labels + 1)]
            self._cache[key] = out
        return out


class ModelScorer:
    """Any seqebm autoregressive model (the ``init_state``/``step`` protocol) as an LM scorer.

    Args:
        model: the LM (eval mode); its states are cached per label prefix.
        label_tokens: ``label_tokens[k - 1]`` = the model's token id of label k (e.g. the character
            ids of the speech units in a char-level tokenizer).
        bos_id, eos_id: the model's begin and end tokens (``eos_id`` scores ``</s>``).

    The next-label distribution is the model's next-token distribution restricted to the label
    tokens and ``</s>`` and renormalised over them.
    """

    def __init__(self, model: torch.nn.Module, label_tokens: Sequence[int], *, bos_id: int, eos_id: int) -> None:
        self.model, self.bos_id = model, bos_id
        self.index = torch.tensor([eos_id, *label_tokens], dtype=torch.long)
        self._cache: dict[tuple[int, ...], tuple[list[float], object]] = {}

    @torch.no_grad()
    def _entry(self, prefix: tuple[int, ...]) -> tuple[list[float], object]:
        hit = self._cache.get(prefix)
        if hit is not None:
            return hit
        device = next(self.model.parameters()).device
        if prefix:
            _, state = self._entry(prefix[:-1])
            token = int(self.index[prefix[-1]])
        else:
            state = self.model.init_state(1, device)
            token = self.bos_id
        logits, state = self.model.step(torch.tensor([[token]], device=device), state)
        scores = logits[0, -1].float().log_softmax(-1).cpu()[self.index]
        out = (torch.log_softmax(scores, -1).tolist(), state)
        self._cache[prefix] = out
        return out

    def __call__(self, prefix: tuple[int, ...]) -> list[float]:
        return self._entry(tuple(prefix))[0]


def ctc_prefix_beam_search(log_probs: Tensor, *, beam_size: int = 8, nbest: int = 1,
                           lm: LMScorer | None = None, lm_weight: float = 1.0, lm_eos: bool = True,
                           length_bonus: float = 0.0, label_threshold: float | None = None) -> list[Hypothesis]:
    """Prefix beam search over one utterance's (T, C) frame log-probabilities.

    Args:
        beam_size: prefixes kept per frame (ranked by fused score). A beam holding every prefix
            makes the search exact: the acoustic scores are then exact sums over alignments.
        nbest: hypotheses returned, best first.
        lm: optional LM scorer (see :data:`LMScorer`), fused with ``lm_weight``; ``lm_eos`` adds
            ``log p(</s> | y)`` at the end.
        length_bonus: added per label (counters the LM's preference for short outputs).
        label_threshold: skip labels whose frame log-probability is below this (speed; None = keep all).
    """
    if log_probs.dim() != 2:
        raise ValueError(f"log_probs must be (T, C) for one utterance, got shape {tuple(log_probs.shape)}")
    if beam_size < 1 or nbest < 1:
        raise ValueError(f"beam_size and nbest must be >= 1, got {beam_size}, {nbest}")
    lp = log_probs.detach().double().cpu().tolist()
    C = len(lp[0]) if lp else 0
    # prefix -> [log p(alignments ending in blank), ... ending in a label, fused LM + bonus part]
    beams: dict[tuple[int, ...], list[float]] = {(): [0.0, _NEG, 0.0]}
    for frame in lp:
        nxt: dict[tuple[int, ...], list[float]] = {}

        def slot(prefix: tuple[int, ...], extra: float) -> list[float]:
            e = nxt.get(prefix)
            if e is None:
                e = nxt[prefix] = [_NEG, _NEG, extra]
            return e

        blank = frame[0]
        labels = range(1, C) if label_threshold is None else [c for c in range(1, C) if frame[c] >= label_threshold]
        for prefix, (pb, pnb, extra) in beams.items():
            total = _lse(pb, pnb)
            e = slot(prefix, extra)
            e[0] = _lse(e[0], total + blank)
            last = prefix[-1] if prefix else None
            lm_next = lm(prefix) if lm is not None else None
            for c in labels:
                p = frame[c]
                ext = prefix + (c,)
                add = (lm_weight * lm_next[c] if lm_next is not None else 0.0) + length_bonus
                ee = slot(ext, extra + add)
                if c == last:
                    e[1] = _lse(e[1], pnb + p)  # repeated frame of the same label
                    ee[1] = _lse(ee[1], pb + p)  # a new label after a blank
                else:
                    ee[1] = _lse(ee[1], total + p)
        ranked = sorted(nxt.items(), key=lambda kv: _lse(kv[1][0], kv[1][1]) + kv[1][2], reverse=True)
        beams = dict(ranked[:beam_size])
    hyps = []
    for prefix, (pb, pnb, extra) in beams.items():
        acoustic = _lse(pb, pnb)
        lm_score = 0.0
        if lm is not None:
            lm_score = sum(lm(prefix[:i])[c] for i, c in enumerate(prefix))
            if lm_eos:
                lm_score += lm(prefix)[0]
        score = acoustic + lm_weight * lm_score + length_bonus * len(prefix)
        hyps.append(Hypothesis(list(prefix), acoustic, lm_score, score))
    hyps.sort(key=lambda h: h.score, reverse=True)
    return hyps[:nbest]
