"""RNN-Transducer loss and decoding (monograph §4.3.1; Graves 2012) in plain PyTorch.

An RNN-T scores, at every lattice node (t, u) = (frame t, u labels emitted), a distribution over
the next output, blank (0: move to frame t+1) or label k (emit y_{u+1} = k, stay at frame t):

    log p(y | x) = log sum over monotone lattice paths from (0, 0) to (T-1, U) of the emissions,
                   ending with the blank that leaves frame T-1.

:func:`rnnt_loss` computes it with the forward variable alpha(t, u) (Graves 2012, Eq. 16),

    alpha(t, u) = logaddexp(alpha(t-1, u) + blank(t-1, u), alpha(t, u-1) + label(t, u-1)),

one frame at a time: within a frame the u-recursion is a prefix sum, solved in closed form with
``torch.logcumsumexp``; autograd differentiates it. :func:`rnnt_beam_search` decodes with a
frame-synchronous beam over label prefixes, merging the probabilities of equal prefixes, so an
unpruned beam (with ``max_symbols`` >= U) returns the exact p(y | x) of every hypothesis.

Notation: B utterances, T frames, U labels, C = V + 1 symbols (blank first).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["rnnt_loss", "rnnt_greedy_decode", "rnnt_beam_search", "RNNTHypothesis"]


def rnnt_loss(log_probs: Tensor, targets: Tensor, frame_lengths: Tensor, target_lengths: Tensor, *,
              reduction: str = "mean") -> Tensor:
    """-log p(y | x) of an RNN-T (Graves 2012).

    Args:
        log_probs: (B, T, U + 1, C) joint-network log-probabilities (log_softmax over C), blank = 0.
        targets: (B, U) label ids in 1..C-1 (padding beyond ``target_lengths`` ignored).
        frame_lengths: (B,) frames per utterance (1..T); target_lengths: (B,) labels (0..U).
        reduction: ``"none"`` (B,), ``"sum"``, ``"mean"`` (over utterances).
    """
    if log_probs.dim() != 4:
        raise ValueError(f"log_probs must be (B, T, U + 1, C), got shape {tuple(log_probs.shape)}")
    B, T, U1, C = log_probs.shape
    if targets.shape != (B, U1 - 1):
        raise ValueError(f"targets must be (B, U) = ({B}, {U1 - 1}), got {tuple(targets.shape)}")
    if frame_lengths.shape != (B,) or target_lengths.shape != (B,):
        raise ValueError("frame_lengths and target_lengths must be (B,)")
    if int(frame_lengths.min()) < 1 or int(frame_lengths.max()) > T:
        raise ValueError(f"frame_lengths must be in 1..{T}, got {frame_lengths.tolist()}")
    if int(target_lengths.min()) < 0 or int(target_lengths.max()) > U1 - 1:
        raise ValueError(f"target_lengths must be in 0..{U1 - 1}, got {target_lengths.tolist()}")
    pos = torch.arange(U1 - 1, device=targets.device).unsqueeze(0)
    real = pos < target_lengths.unsqueeze(1)
    if real.any() and (int(targets[real].min()) < 1 or int(targets[real].max()) >= C):
        raise ValueError(f"target label ids must be in 1..{C - 1} (0 is the blank)")
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction must be none, sum or mean, got {reduction!r}")
    blank = log_probs[..., 0]  # (B, T, U+1)
    tg = targets.masked_fill(~real, 1).clamp(0, C - 1)
    emit = log_probs[:, :, :-1, :].gather(3, tg.view(B, 1, U1 - 1, 1).expand(B, T, U1 - 1, 1)).squeeze(-1)  # (B,T,U)
    zeros = blank.new_zeros(B, T, 1)
    cum = torch.cat([zeros, emit.cumsum(2)], 2)  # (B, T, U+1): sum_{k<u} emit(t, k)
    alphas = []
    # frame 0: alpha(0, u) = sum_{k<u} emit(0, k)
    a = cum[:, 0]
    alphas.append(a)
    for t in range(1, T):
        entry = a + blank[:, t - 1]  # arriving at frame t at each u by a blank
        a = cum[:, t] + torch.logcumsumexp(entry - cum[:, t], dim=1)
        alphas.append(a)
    alpha = torch.stack(alphas, 1)  # (B, T, U+1)
    bi = torch.arange(B, device=blank.device)
    tl, ul = frame_lengths - 1, target_lengths
    ll = alpha[bi, tl, ul] + blank[bi, tl, ul]
    nll = -ll
    if reduction == "none":
        return nll
    return nll.sum() if reduction == "sum" else nll.mean()


@dataclass
class RNNTHypothesis:
    labels: list[int]
    log_prob: float  # log p(labels | x) summed over the alignments the search kept


#: ``step(t, prefixes)`` -> (N, C) log-probabilities at frame t after each label prefix.
StepFn = Callable[[int, list[tuple[int, ...]]], Tensor]


def rnnt_greedy_decode(step: StepFn, num_frames: int, *, max_symbols: int = 10) -> list[int]:
    """Greedy decoding: at each frame emit the best label while it beats blank (at most ``max_symbols``)."""
    prefix: tuple[int, ...] = ()
    for t in range(num_frames):
        for _ in range(max_symbols):
            k = int(step(t, [prefix])[0].argmax())
            if k == 0:
                break
            prefix = prefix + (k,)
    return list(prefix)


def _lse(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def rnnt_beam_search(step: StepFn, num_frames: int, *, beam_size: int = 8, max_symbols: int = 4,
                     nbest: int = 1) -> list[RNNTHypothesis]:
    """Frame-synchronous beam search with prefix merging.

    At frame t every kept prefix may emit up to ``max_symbols`` labels (each expansion scored by
    ``step``) and then a blank, which moves it to frame t+1; equal prefixes arriving at t+1 by
    different paths are merged (log-sum-exp) and the ``beam_size`` most probable are kept. Without
    pruning (large beam, ``max_symbols`` >= U) the returned log-probabilities are exact.
    """
    if beam_size < 1 or nbest < 1 or max_symbols < 0:
        raise ValueError("beam_size and nbest must be >= 1 and max_symbols >= 0")
    width = beam_size * 4  # the expansions kept at each depth: bounds the work per frame
    beams: dict[tuple[int, ...], float] = {(): 0.0}
    for t in range(num_frames):
        arrived: dict[tuple[int, ...], float] = {}
        prefixes = list(beams)  # at frame t, with the log-probability of being there
        base = torch.tensor([beams[p] for p in prefixes], dtype=torch.float64)
        for depth in range(max_symbols + 1):
            lp = step(t, prefixes).double().cpu()  # (N, C)
            for p, a in zip(prefixes, (base + lp[:, 0]).tolist()):  # blank: on to frame t+1
                arrived[p] = _lse(arrived.get(p, -math.inf), a)
            if depth == max_symbols:
                break
            # one more label: the N·(C-1) extensions p + (k,) are distinct (the prefixes are), so
            # nothing merges here; keep the ``width`` most probable
            ext = (base[:, None] + lp[:, 1:]).reshape(-1)
            if ext.numel() == 0:  # no labels at all (C = 1)
                break
            top = torch.topk(ext, min(width, ext.numel()))
            c1 = lp.shape[1] - 1
            idx = top.indices.tolist()
            prefixes = [prefixes[i // c1] + (i % c1 + 1,) for i in idx]
            base = top.values
        beams = dict(sorted(arrived.items(), key=lambda kv: kv[1], reverse=True)[:beam_size])
    hyps = [RNNTHypothesis(list(p), s) for p, s in beams.items()]
    hyps.sort(key=lambda h: h.log_prob, reverse=True)
    return hyps[:nbest]
