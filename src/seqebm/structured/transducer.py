"""Search, sampling and enumeration for label transducers (RNN-T labeller and CRF transducer).

Monograph §4.3.2: a CRF transducer's label network G sees the whole label history, so there is
no dynamic program for its argmax or its partition function. This module gives

* :func:`transducer_beam_search`: batched beam search over label sequences, optionally tracking
  where the oracle (gold) prefix leaves the beam, as needed for training with *early updates*
  (Collins & Roark 2004; the partial-sequence loss of §4.3.2);
* :func:`transducer_sample`: ancestral sampling from the locally normalised distribution
  q(y_i | y_<i, x) = softmax(step score), with exact log q (the proposal of the Monte Carlo loss);
* :func:`enumerate_label_sequences`: all K^T label sequences of a tiny problem, the test oracle.

Notation: B rows, T positions, K labels, W beam width, N = B x W hypotheses, S samples.
A *model* here is anything with ``predictor`` (a :class:`seqebm.models.taggers.LabelPredictor`),
``step_scores(f, g)`` and optional bool buffers ``allowed`` (K, K) (permitted label bigrams) and
``start_allowed`` (K,) (permitted first labels).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["BeamResult", "transducer_beam_search", "transducer_sample", "enumerate_label_sequences"]


@dataclass
class BeamResult:
    """Output of :func:`transducer_beam_search`.

    best: (B, T) highest-scoring label sequence per row, -1 at padding.
    paths: (B, W, T) final beam, best first; slots with ``scores == -inf`` are empty.
    scores: (B, W) path scores u(y, x) (sum of step scores).
    stop: (B,) number of positions j of the early-update partial sequence (only with ``oracle``):
        the first j at which the oracle prefix y*_{1:j} is not in the beam, or the row length.
    stop_paths: (B, W, T) the beam at that step, positions >= ``stop`` set to -1 (only with ``oracle``).
    stop_has_oracle: (B,) the oracle prefix is among ``stop_paths`` (only with ``oracle``).
    """

    best: Tensor
    paths: Tensor
    scores: Tensor
    stop: Tensor | None = None
    stop_paths: Tensor | None = None
    stop_has_oracle: Tensor | None = None


def _gather_state(state: tuple[Tensor, Tensor], index: Tensor) -> tuple[Tensor, Tensor]:
    return state[0].index_select(1, index), state[1].index_select(1, index)


def _constraint_mask(model: Any, prev: Tensor, first: bool) -> Tensor | None:
    """(N, K) bool of labels allowed after ``prev`` (None when the model has no constraints)."""
    if first:
        start = getattr(model, "start_allowed", None)
        return None if start is None else start.unsqueeze(0).expand(prev.shape[0], -1)
    allowed = getattr(model, "allowed", None)
    return None if allowed is None else allowed[prev.clamp_min(0)]


def _check_mask(mask: Tensor) -> None:
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool, got {mask.dtype}")
    if not bool(mask[:, 0].all()):
        raise ValueError("every row needs at least one position (mask[:, 0] must be True)")
    if mask.shape[1] > 1 and bool((mask[:, 1:] & ~mask[:, :-1]).any()):
        raise ValueError("mask has a hole: masks must be left-aligned (True then False in every row)")


@torch.no_grad()
def transducer_beam_search(model: Any, f: Tensor, mask: Tensor, *, beam_size: int = 8,
                           oracle: Tensor | None = None) -> BeamResult:
    """Beam search for argmax_y sum_i step_score_i(y_i | y_<i, x) (monograph §4.3.2, "Decoding").

    Args:
        model: a transducer (see module notes).
        f: (B, T, K) transcription scores (``model.transcribe(batch)``).
        mask: (B, T) bool, left-aligned; every row needs at least one position.
        beam_size: W; ``W >= K^T`` makes the search exact.
        oracle: (B, T) gold labels; enables the early-update outputs ``stop*`` of :class:`BeamResult`.

    Hypotheses are distinct label prefixes, so the beam never holds duplicates. A row shorter
    than T stops extending at its length.
    """
    if f.dim() != 3 or mask.shape != f.shape[:2]:
        raise ValueError(f"f must be (B, T, K) and mask (B, T), got {tuple(f.shape)} and {tuple(mask.shape)}")
    if beam_size < 1:
        raise ValueError(f"beam_size must be >= 1, got {beam_size}")
    _check_mask(mask)
    B, T, K = f.shape
    W, dev = beam_size, f.device
    lengths = mask.sum(1)
    paths = torch.full((B, W, T), -1, dtype=torch.long, device=dev)
    scores = torch.full((B, W), float("-inf"), device=dev)
    scores[:, 0] = 0.0
    prev = torch.full((B * W,), model.predictor.bos, dtype=torch.long, device=dev)
    state = None
    track = oracle is not None
    if track:
        oslot = torch.zeros(B, dtype=torch.long, device=dev)  # beam slot holding the oracle prefix, -1 once out
        stop = lengths.clone()
        stop_paths = torch.full((B, W, T), -1, dtype=torch.long, device=dev)
        stop_has = torch.ones(B, dtype=torch.bool, device=dev)
        stopped = torch.zeros(B, dtype=torch.bool, device=dev)
    rows = torch.arange(B, device=dev)
    for i in range(T):
        g, new_state = model.predictor.step(prev, state)  # (N, K)
        inc = model.step_scores(f[:, i].repeat_interleave(W, 0), g).float()  # (N, K)
        allow = _constraint_mask(model, prev, first=i == 0)
        if allow is not None:
            inc = inc.masked_fill(~allow, float("-inf"))
        cand = (scores.unsqueeze(-1) + inc.view(B, W, K)).view(B, W * K)
        top, idx = cand.topk(W, dim=1)  # sorted, best first (W <= W*K)
        src, lab = idx // K, idx % K
        active = mask[:, i]
        new_paths = paths.gather(1, src.unsqueeze(-1).expand(-1, -1, T)).clone()
        new_paths[:, :, i] = lab
        new_paths[~torch.isfinite(top)] = -1
        flat_src = (rows.unsqueeze(1) * W + src).view(-1)
        new_state = _gather_state(new_state, flat_src)
        if state is None:  # first position: every row is active, the where() below takes new_state
            state = new_state
        keep = active.repeat_interleave(W)  # (N,)
        km = keep.view(1, -1, 1)
        state = (torch.where(km, new_state[0], state[0]), torch.where(km, new_state[1], state[1]))
        prev = torch.where(keep, lab.view(-1), prev)
        paths = torch.where(active.view(B, 1, 1), new_paths, paths)
        scores = torch.where(active.view(B, 1), top, scores)
        if track:
            hit = (src == oslot.unsqueeze(1)) & (lab == oracle[:, i].unsqueeze(1)) & torch.isfinite(top)
            new_slot = torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(oslot, -1))
            falls = active & ~stopped & (new_slot < 0)
            if bool(falls.any()):
                stop = torch.where(falls, torch.full_like(stop, i + 1), stop)
                stop_paths = torch.where(falls.view(B, 1, 1), paths, stop_paths)
                stop_has = stop_has & ~falls
                stopped = stopped | falls
            oslot = torch.where(active & ~stopped, new_slot, oslot)
    best = paths[:, 0].masked_fill(~mask, -1)
    if not track:
        return BeamResult(best, paths, scores)
    done = ~stopped  # the oracle survived to the end: the early-update set is the final beam
    stop_paths = torch.where(done.view(B, 1, 1), paths, stop_paths)
    pos = torch.arange(T, device=dev).view(1, 1, T)
    stop_paths = stop_paths.masked_fill(pos >= stop.view(B, 1, 1), -1)
    return BeamResult(best, paths, scores, stop=stop, stop_paths=stop_paths, stop_has_oracle=stop_has)


def transducer_sample(model: Any, f: Tensor, mask: Tensor, num_samples: int, *,
                      generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Ancestral samples from q(y|x) = prod_i softmax(step_score_i) and their exact log q.

    For the RNN-T labeller q is the model itself; for a CRF transducer it is the locally
    normalised version of its potentials (the importance-sampling proposal of the Monte Carlo
    loss). With constraints (``allowed``/``start_allowed``) every step renormalises over the
    allowed labels, so q is the model restricted to D_T and log q is that distribution's.
    Returns labels (B, S, T) (-1 at padding) and log q (B, S); no gradient flows.
    """
    _check_mask(mask)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    B, T, K = f.shape
    S, dev = num_samples, f.device
    with torch.no_grad():
        prev = torch.full((B * S,), model.predictor.bos, dtype=torch.long, device=dev)
        state = None
        labels = torch.full((B * S, T), -1, dtype=torch.long, device=dev)
        logq = torch.zeros(B * S, device=dev)
        fm = f.repeat_interleave(S, 0)
        m = mask.repeat_interleave(S, 0)
        for i in range(T):
            g, state = model.predictor.step(prev, state)
            logits = model.step_scores(fm[:, i], g).float()
            allow = _constraint_mask(model, prev, first=i == 0)
            if allow is not None:
                logits = logits.masked_fill(~allow, float("-inf"))
            logp = torch.log_softmax(logits, -1)
            y = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            y = torch.where(m[:, i], y, prev.new_full(y.shape, -1))
            logq = logq + torch.where(m[:, i], logp.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1), 0.0)
            labels[:, i] = y
            prev = torch.where(m[:, i], y, prev)
    return labels.view(B, S, T), logq.view(B, S)


def enumerate_label_sequences(num_tags: int, length: int, *, device: torch.device | str = "cpu") -> Tensor:
    """All ``num_tags ** length`` label sequences (K^T, T), in lexicographic order (tests only)."""
    if num_tags ** length > 100_000:
        raise ValueError(f"{num_tags}^{length} sequences is too many to enumerate")
    return torch.tensor(list(itertools.product(range(num_tags), repeat=length)), dtype=torch.long, device=device)
