"""Losses of the speech recognisers (monograph §4.2-4.3): CTC, CTC-CRF and RNN-T.

Each is called as ``loss(model, batch, step=...)`` with a :class:`seqebm.data.speech_batching.SpeechBatch`
and returns an :class:`ObjectiveOutput` whose ``loss`` is the summed negative log-likelihood of the
transcripts divided by their number of labels (micro-batches and DDP ranks combine exactly), with
``nll_sum`` and ``tokens`` (labels) as metrics.

* :class:`CTCLoss`: -log p_CTC(y | x) (Eqs. 4.17-4.18) via :func:`torch.nn.functional.ctc_loss`.
* :class:`CTCCRFObjective`: -log p_CTC-CRF(y | x) (Eq. 4.24), :class:`seqebm.structured.ctc_crf.CTCCRFLoss`
  with the label n-gram estimated on the training transcripts.
* :class:`RNNTObjective`: -log p_RNN-T(y | x) (§4.3.1), :func:`seqebm.structured.rnnt.rnnt_loss`.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.objectives.base import ObjectiveOutput
from seqebm.structured.ctc_crf import CTCCRFLoss
from seqebm.structured.label_ngram import LabelNGram
from seqebm.structured.rnnt import rnnt_loss

__all__ = ["CTCLoss", "CTCCRFObjective", "RNNTObjective", "build_asr_objective", "check_alignable"]


def _finish(nll: Tensor, batch: Any) -> ObjectiveOutput:
    labels = batch.target_lengths.sum().to(nll.device)
    return ObjectiveOutput(nll.sum() / labels.clamp_min(1), {"nll_sum": nll.detach().sum(),
                                                             "tokens": labels.to(nll.dtype)})


def check_alignable(frame_lengths: Tensor, targets: Tensor, target_lengths: Tensor) -> None:
    """Every transcript must fit a CTC path of its utterance's encoder frames (repeats need a blank)."""
    for i, (n, row, u) in enumerate(zip(frame_lengths.tolist(), targets.tolist(), target_lengths.tolist())):
        y = row[:u]
        need = len(y) + sum(a == b for a, b in zip(y, y[1:]))
        if need > n:
            raise ValueError(f"utterance {i}: {n} encoder frames cannot carry its {len(y)} labels (a CTC path "
                             f"needs {need}); the audio is too short for its transcript at 4x subsampling")


class CTCLoss(nn.Module):
    """-log p_CTC(y | x) from ``model(features, lengths) -> (log_probs (B, T, C), frame_lengths)``."""

    def forward(self, model: nn.Module, batch: Any, step: int = 0) -> ObjectiveOutput:
        log_probs, frames = model(batch.features, batch.feature_lengths)
        check_alignable(frames, batch.targets, batch.target_lengths)
        nll = F.ctc_loss(log_probs.transpose(0, 1), batch.targets, frames, batch.target_lengths, blank=0,
                         reduction="none", zero_infinity=False)
        return _finish(nll, batch)


class CTCCRFObjective(nn.Module):
    """-log p_CTC-CRF(y | x) (Eq. 4.24) with a fixed label n-gram (Eq. 4.22's edge potential)."""

    def __init__(self, lm: LabelNGram) -> None:
        super().__init__()
        self.lm = lm
        self.loss = CTCCRFLoss(lm, reduction="none")

    def forward(self, model: nn.Module, batch: Any, step: int = 0) -> ObjectiveOutput:
        log_probs, frames = model(batch.features, batch.feature_lengths)
        check_alignable(frames, batch.targets, batch.target_lengths)
        nll = self.loss(log_probs, frames, batch.targets, batch.target_lengths)
        return _finish(nll, batch)


class RNNTObjective(nn.Module):
    """-log p_RNN-T(y | x) from ``model(features, lengths, targets) -> (joint log-probs, frame_lengths)``."""

    def forward(self, model: nn.Module, batch: Any, step: int = 0) -> ObjectiveOutput:
        log_probs, frames = model(batch.features, batch.feature_lengths, batch.targets)
        nll = rnnt_loss(log_probs, batch.targets, frames, batch.target_lengths, reduction="none")
        return _finish(nll, batch)


def build_asr_objective(kind: str, *, lm: LabelNGram | None = None) -> nn.Module:
    if kind == "ctc":
        return CTCLoss()
    if kind == "ctc_crf":
        if lm is None:
            raise ValueError("CTC-CRF needs the label n-gram (lm=...)")
        return CTCCRFObjective(lm)
    if kind == "rnnt":
        return RNNTObjective()
    raise ValueError(f"unknown recogniser kind {kind!r}; expected ctc, ctc_crf or rnnt")

