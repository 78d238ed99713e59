"""Teacher forcing (maximum likelihood) with optional label smoothing.

Notation: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from seqebm.data.batching import Batch
from seqebm.objectives.base import ObjectiveOutput, check_reduction, nll_metrics, reduce_loss, token_nll


class TeacherForcingLoss(nn.Module):
    """Cross-entropy of the gold next token given the gold prefix.

    With ``label_smoothing = ε`` the target is ``(1 - ε)·onehot + ε/V`` (Szegedy et al. 2016);
    the reported ``nll_sum`` metric is always the unsmoothed negative log-likelihood.
    """

    def __init__(self, *, label_smoothing: float = 0.0, reduction: str = "mean") -> None:
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = label_smoothing
        self.reduction = check_reduction(reduction)

    def forward(self, model: nn.Module, batch: Batch, step: int = 0) -> ObjectiveOutput:
        logits = model(batch.inputs, **batch.model_kwargs())  # (B, T, V)
        nll = token_nll(logits, batch.targets, batch.mask)  # (B, T)
        if self.label_smoothing > 0:
            per_token = F.cross_entropy(
                logits.float().transpose(1, 2), batch.targets, reduction="none",
                label_smoothing=self.label_smoothing,
            ).masked_fill(~batch.mask, 0.0)
        else:
            per_token = nll
        return ObjectiveOutput(reduce_loss(per_token, batch.mask, self.reduction), nll_metrics(nll, batch.mask))
