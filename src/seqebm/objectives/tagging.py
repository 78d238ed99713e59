"""Losses of the sequence labellers in :mod:`seqebm.models.taggers` (monograph §4.1.3, §4.3).

Each is called as ``loss(model, batch, step=...)`` with a :class:`seqebm.data.tag_batching.TagBatch`
and returns an :class:`ObjectiveOutput` whose ``loss`` is the summed negative log-likelihood over
the batch divided by its number of words (so micro-batches and DDP ranks combine exactly), and
whose metrics hold ``nll_sum`` and ``tokens``.

* :class:`TokenTaggingLoss`: cross-entropy of locally normalised per-word distributions (the
  softmax tagger, and the RNN-T labeller under teacher forcing, Eq. 4.28).
* :class:`CRFTaggingLoss`: exact conditional NLL of a linear-chain CRF (Eq. 4.10).
* :class:`CRFTransducerLoss`: the CRF transducer's NLL -u(y*, x) + log Z(x) with log Z
  approximated (§4.3.2): ``"early_update"`` sums over the beam at the step where the gold prefix
  leaves it (partial-sequence loss), ``"monte_carlo"`` estimates Z by importance sampling from the
  locally normalised transducer, ``"exact"`` enumerates all K^T sequences (tiny problems, tests).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.objectives.base import ObjectiveOutput, unwrap
from seqebm.structured.transducer import enumerate_label_sequences, transducer_beam_search, transducer_sample

__all__ = ["TokenTaggingLoss", "CRFTaggingLoss", "CRFTransducerLoss", "build_tagging_objective"]


def _finish(nll: Tensor, batch: Any) -> ObjectiveOutput:
    tokens = batch.mask.sum()
    return ObjectiveOutput(nll.sum() / tokens.clamp_min(1),
                           {"nll_sum": nll.detach().sum(), "tokens": tokens.to(nll.dtype)})


def _check_gold(net: nn.Module, tags: Tensor, mask: Tensor) -> None:
    """Gold tags must be valid ids and satisfy the model's constraints (else the NLL is infinite)."""
    real = tags[mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= net.num_tags):
        raise ValueError(f"gold tag ids must be in 0..{net.num_tags - 1}, got {int(real.min())}..{int(real.max())}")
    allowed, start = getattr(net, "allowed", None), getattr(net, "start_allowed", None)
    if start is not None and not bool(start[tags[:, 0].clamp_min(0)].all()):
        raise ValueError("a gold tag sequence starts with a tag that start_allowed forbids")
    if allowed is not None and tags.shape[1] > 1:
        ok = allowed[tags[:, :-1].clamp_min(0), tags[:, 1:].clamp_min(0)] | ~mask[:, 1:]
        if not bool(ok.all()):
            b, i = (~ok).nonzero()[0].tolist()
            raise ValueError(f"gold tag sequence {b} violates the constraints: tag {int(tags[b, i + 1])} may not "
                             f"follow tag {int(tags[b, i])} (position {i + 1})")


class TokenTaggingLoss(nn.Module):
    """sum_i -log p(y*_i | x, ...) from ``model(batch)`` logits (B, T, K) (softmax tagger, RNN-T labeller)."""

    def __init__(self, *, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing

    def forward(self, model: nn.Module, batch: Any, step: int = 0) -> ObjectiveOutput:
        logits = model(batch).float()
        tags = batch.tags.masked_fill(~batch.mask, 0)  # padding may hold any id (e.g. -1)
        nll = F.cross_entropy(logits.transpose(1, 2), tags, reduction="none",
                              label_smoothing=self.label_smoothing).masked_fill(~batch.mask, 0.0)
        return _finish(nll.sum(1), batch)


class CRFTaggingLoss(nn.Module):
    """-log p(y*|x) of a linear-chain CRF tagger (monograph Eq. 4.10), exact via the forward algorithm."""

    def forward(self, model: nn.Module, batch: Any, step: int = 0) -> ObjectiveOutput:
        emissions = model(batch).float()
        nll = unwrap(model).crf.nll(emissions, batch.tags, batch.mask, reduction="none")
        return _finish(nll, batch)


class CRFTransducerLoss(nn.Module):
    """Approximate NLL of a CRF transducer, -u(y*, x) + log Z(x) (monograph §4.3.2).

    Args:
        method: ``"early_update"`` (default; beam search with early updates: if the gold prefix
            y*_{1:j} falls out of the beam at step j, the loss is
            -u(y*_{1:j}) + log sum_{y' in B_j} exp u(y'_{1:j}) with B_j the beam plus the gold
            prefix; otherwise the same over the final beam and the full sequence),
            ``"monte_carlo"`` (log Z ~ log (1/S) sum_s exp(u(y_s) - log q(y_s)) with y_s drawn from
            the locally normalised transducer q, gradients the self-normalised importance
            estimate of E_p[grad u]), or ``"exact"`` (enumeration; K^T must be small).
        beam_size: W for ``early_update``; ``W >= K^T`` gives the exact NLL.
        num_samples: S for ``monte_carlo``.
        local_steps: optimiser steps (from 0) trained with the locally normalised loss
            -log q(y* | x), q = softmax(phi_i + psi_i), before the global loss takes over. Early
            updates only train the gold prefix up to where it leaves the beam, which at the start
            of training is a word or two: local pre-training (Andor et al. 2016) gives the beam
            something to work with.

    The beam search and the sampling choose label sequences without gradient; the scores of the
    chosen sequences are then recomputed with gradient through F and G.
    """

    METHODS = ("early_update", "monte_carlo", "exact")

    def __init__(self, method: str = "early_update", *, beam_size: int = 8, num_samples: int = 16,
                 local_steps: int = 0) -> None:
        super().__init__()
        if method not in self.METHODS:
            raise ValueError(f"method must be one of {self.METHODS}, got {method!r}")
        if beam_size < 1 or num_samples < 1:
            raise ValueError(f"beam_size and num_samples must be >= 1, got {beam_size}, {num_samples}")
        if local_steps < 0:
            raise ValueError(f"local_steps must be >= 0, got {local_steps}")
        self.method, self.beam_size, self.num_samples = method, beam_size, num_samples
        self.local_steps = local_steps

    def forward(self, model: nn.Module, batch: Any, step: int = 0) -> ObjectiveOutput:
        net = unwrap(model)
        _check_gold(net, batch.tags, batch.mask)
        f = net.transcribe(batch)  # (B, T, K)
        if step < self.local_steps:
            nll = self.local_nll(net, f, batch.tags, batch.mask)
        elif self.method == "exact":
            nll = self.exact_nll(net, f, batch.tags, batch.mask)
        elif self.method == "early_update":
            nll = self._early_update(net, f, batch.tags, batch.mask)
        else:
            nll = self._monte_carlo(net, f, batch.tags, batch.mask)
        return _finish(nll, batch)

    def local_nll(self, net: nn.Module, f: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """-log q(y* | x) (B,) of the locally normalised transducer q(y_i | y_<i, x) = softmax(phi_i + psi_i),
        the pre-training loss (Andor et al. 2016 pre-train globally normalised models locally)."""
        logq = torch.log_softmax(net.history_scores(f, tags.masked_fill(~mask, 0)), -1)
        tok = logq.gather(2, tags.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return -tok.masked_fill(~mask, 0.0).sum(1)

    def _path_scores(self, net: nn.Module, f: Tensor, paths: Tensor) -> Tensor:
        """u of each path (B, P, T) (positions with label -1 are skipped) -> (B, P)."""
        B, P, T = paths.shape
        flat = paths.reshape(B * P, T)
        u = net.path_scores(f.repeat_interleave(P, 0), flat, flat >= 0)
        return u.view(B, P)

    def _early_update(self, net: nn.Module, f: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        res = transducer_beam_search(net, f.detach(), mask, beam_size=self.beam_size, oracle=tags)
        T = tags.shape[1]
        pos = torch.arange(T, device=tags.device).unsqueeze(0)
        gold = tags.masked_fill(pos >= res.stop.unsqueeze(1), -1)  # y*_{1:j}
        paths = torch.cat([gold.unsqueeze(1), res.stop_paths], 1)  # (B, 1 + W, T)
        u = self._path_scores(net, f, paths)
        valid = torch.cat([~res.stop_has_oracle.unsqueeze(1), res.stop_paths[:, :, 0] >= 0], 1)
        return torch.logsumexp(u.masked_fill(~valid, float("-inf")), 1) - u[:, 0]

    def _monte_carlo(self, net: nn.Module, f: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        samples, logq = transducer_sample(net, f.detach(), mask, self.num_samples)
        gold = tags.masked_fill(~mask, -1)
        u = self._path_scores(net, f, torch.cat([gold.unsqueeze(1), samples], 1))
        log_z = torch.logsumexp(u[:, 1:] - logq, 1) - math.log(self.num_samples)
        return log_z - u[:, 0]

    @torch.no_grad()
    def exact_log_partition(self, net: nn.Module, f: Tensor, mask: Tensor) -> Tensor:
        """log Z(x) (B,) by enumerating all K^{L_b} label sequences of every row (tiny problems only)."""
        return torch.stack([self._row_log_z(net, f[b:b + 1], int(mask[b].sum())) for b in range(f.shape[0])])

    def _row_log_z(self, net: nn.Module, f: Tensor, n: int) -> Tensor:
        seqs = enumerate_label_sequences(f.shape[-1], n, device=f.device)  # (K^n, n)
        u = net.path_scores(f[:, :n].expand(seqs.shape[0], -1, -1), seqs, torch.ones_like(seqs, dtype=torch.bool))
        allowed, start = getattr(net, "allowed", None), getattr(net, "start_allowed", None)
        if allowed is not None and n > 1:  # sequences outside D_T get probability 0
            u = u.masked_fill(~allowed[seqs[:, :-1], seqs[:, 1:]].all(1), float("-inf"))
        if start is not None:
            u = u.masked_fill(~start[seqs[:, 0]], float("-inf"))
        return torch.logsumexp(u, 0)

    def exact_nll(self, net: nn.Module, f: Tensor, tags: Tensor, mask: Tensor) -> Tensor:
        """Exact -log p(y*|x) (B,) by enumeration, differentiable."""
        out = []
        for b in range(f.shape[0]):
            n = int(mask[b].sum())
            log_z = self._row_log_z(net, f[b:b + 1], n)
            gold = tags[b:b + 1, :n]
            out.append(log_z - net.path_scores(f[b:b + 1, :n], gold, torch.ones_like(gold, dtype=torch.bool))[0])
        return torch.stack(out)


def build_tagging_objective(kind: str, *, method: str = "early_update", beam_size: int = 8,
                            num_samples: int = 16, label_smoothing: float = 0.0, local_steps: int = 0) -> nn.Module:
    """The loss that trains a tagger of ``kind`` (see :data:`seqebm.models.taggers.TAGGER_KINDS`)."""
    if kind in ("softmax", "rnnt"):
        return TokenTaggingLoss(label_smoothing=label_smoothing)
    if kind == "crf":
        return CRFTaggingLoss()
    if kind == "crf_transducer":
        return CRFTransducerLoss(method, beam_size=beam_size, num_samples=num_samples, local_steps=local_steps)
    raise ValueError(f"unknown tagger kind {kind!r}")
