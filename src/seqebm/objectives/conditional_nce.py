"""Conditional NCE for residual energy models (residual-EBM seed §3.1, Eq. 3; Ma & Collins 2018).

Notation: B pairs (a real sequence and an LM sample continuing the same prefix).

With the joint model P_θ ∝ P_LM·exp(−E_θ) as the model and the LM itself as the noise, the NCE
log-odds log P_θ − log P_LM reduce to −E_θ, and the objective of Eq. 3 is a binary classifier
between real continuations x⁺ and LM samples x⁻ for the same prefixes:

    max  E_{x⁺∼P_data}[log σ(−E_θ(x⁺))] + E_{x⁻∼P_LM}[log σ(E_θ(x⁻))].

The loss returned is its negative, averaged over the B balanced pairs. There is no separate log
normaliser: by Theorem 1, at the optimum log P_LM − E_θ = log P_data, so the learned model is
self-normalised (E_θ = E_true + log Z_true when the data come from P_LM·exp(−E_true)/Z_true).
Accuracy is that of the classifier "real iff E < 0".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from seqebm.data.batching import PairBatch
from seqebm.objectives.base import ObjectiveOutput


class ConditionalNCELoss(nn.Module):
    """−Eq. 3 over balanced (real, LM sample) pairs; ``model(tokens, mask) -> E (B,)``.

    Args:
        reduction: ``"mean"`` over pairs or ``"sum"``.
    """

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.reduction = reduction

    def forward(self, model: nn.Module, batch: PairBatch, step: int = 0) -> ObjectiveOutput:
        if not isinstance(batch, PairBatch):
            raise ValueError(f"ConditionalNCELoss needs a PairBatch (real, negative), got {type(batch).__name__}")
        b = len(batch)
        width = max(batch.positive.shape[1], batch.negative.shape[1])
        tokens = torch.cat([F.pad(batch.positive, (0, width - batch.positive.shape[1])),
                            F.pad(batch.negative, (0, width - batch.negative.shape[1]))])
        mask = torch.cat([F.pad(batch.positive_mask, (0, width - batch.positive.shape[1])),
                          F.pad(batch.negative_mask, (0, width - batch.negative.shape[1]))])
        e = model(tokens, mask)  # one forward for both halves (DDP-friendly)
        if e.shape != (2 * b,):
            raise ValueError(f"the energy model must return shape ({2 * b},), got {tuple(e.shape)}")
        e_pos, e_neg = e[:b].float(), e[b:].float()
        per_pair = -(F.logsigmoid(-e_pos) + F.logsigmoid(e_neg))  # (B,)
        loss = per_pair.mean() if self.reduction == "mean" else per_pair.sum()
        correct = (e_pos.detach() < 0).sum() + (e_neg.detach() > 0).sum()
        return ObjectiveOutput(loss, {"nce_sum": per_pair.detach().sum(), "accuracy_sum": correct.float() / 2,
                                      "energy_real_sum": e_pos.detach().sum(),
                                      "energy_lm_sum": e_neg.detach().sum(), "tokens": float(b)})
