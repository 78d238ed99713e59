"""The joint loss of calibrated NLU: cross-entropy plus NCE of the residual energy (monograph §5.5).

Notation: B labelled data rows, N noise rows, ν = N / B the noise ratio, K labels.

L_CE (Eq. 5.17) is the cross-entropy of p_θ(y|x) = softmax f_CLS(enc(x)) on the data. The residual
EBM E_θ(x) = −log p_N(x) + Ê_θ(x) (Eq. 5.18) uses the noise distribution p_N as its base, so the
NCE log-odds of "data" against "noise" reduce to −Ê_θ(x) − log ν and L_NCE is the residual NCE loss
of Eq. 4.33 with a noise ratio,

    L_NCE = −E_{x⁺∼p_data} log 1/(1 + ν exp Ê_θ(x⁺)) − ν E_{x⁻∼p_N} log 1/(1 + exp(−Ê_θ(x⁻))/ν),

i.e. with G(x) = −Ê_θ(x) − log ν (:func:`seqebm.objectives.nce.nce_logits` with log q = 0 and no
free normaliser: the residual model is self-normalised at the optimum) and a minibatch of B data and
N = νB noise rows,

    L_NCE ≈ −(1/B) [Σ_data log σ(G(x⁺)) + Σ_noise log σ(−G(x⁻))].

Training minimises L_joint = L_CE + λ L_NCE (λ = 1 in §5.5). With no noise rows the loss is L_CE
alone: the fine-tuning baseline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.objectives.base import ObjectiveOutput
from seqebm.objectives.nce import nce_logits

__all__ = ["CalibratedNLULoss", "NluBatch", "residual_nce_loss"]


@dataclass
class NluBatch:
    """Padded encoder inputs: data (B, T) with labels (B,) and optional noise rows (N, T')."""

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    noise_ids: Tensor | None = None
    noise_mask: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def residual_nce_loss(energy_data: Tensor, energy_noise: Tensor, *, nu: float | None = None,
                      reduction: str = "mean") -> Tensor:
    """L_NCE of §5.5 (Eq. 4.33 with noise ratio ν) for residual energies Ê of B data rows (B,) and N
    noise rows (N,).

    Args:
        nu: the prior ratio ν in the classifier's logit; ``None`` = N / B, the batch's own ratio.
        reduction: ``"mean"`` (the sum divided by B, the estimate of L_NCE) or ``"sum"``.

    Returns:
        −[Σ_data log σ(−Ê − log ν) + Σ_noise log σ(Ê + log ν)], divided by B for ``"mean"``.
    """
    if energy_data.dim() != 1 or energy_noise.dim() != 1 or energy_data.numel() == 0 or energy_noise.numel() == 0:
        raise ValueError(f"energies must be non-empty 1-D tensors, got {tuple(energy_data.shape)} and "
                         f"{tuple(energy_noise.shape)}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    b = energy_data.shape[0]
    nu = energy_noise.shape[0] / b if nu is None else float(nu)
    if not nu > 0:
        raise ValueError(f"nu must be positive, got {nu}")
    zero = energy_data.new_zeros(())
    g_data = nce_logits(energy_data.float(), zero, zero, nu)
    g_noise = nce_logits(energy_noise.float(), zero, zero, nu)
    total = -(F.logsigmoid(g_data).sum() + F.logsigmoid(-g_noise).sum())
    return total / b if reduction == "mean" else total


class CalibratedNLULoss(nn.Module):
    """L_CE + λ L_NCE (§5.5) for a model ``model(input_ids, attention_mask) -> (logits (B, K), energy (B,))``
    such as :class:`~seqebm.models.calibrated_nlu.EncoderClassifier`.

    Data and noise rows go through the model in one forward (padded to a common width). Without
    noise rows in the batch (or with ``nce_weight=0``) the loss is L_CE alone.

    Args:
        nce_weight: λ >= 0.
        reduction: ``"mean"`` (per data row) or ``"sum"``.
    """

    def __init__(self, *, nce_weight: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if not nce_weight >= 0:
            raise ValueError(f"nce_weight must be >= 0, got {nce_weight}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        self.nce_weight, self.reduction = float(nce_weight), reduction

    def forward(self, model: nn.Module, batch: NluBatch, *, step: int | None = None) -> ObjectiveOutput:
        if not isinstance(batch, NluBatch):
            raise ValueError(f"CalibratedNLULoss needs an NluBatch, got {type(batch).__name__}")
        b = len(batch)
        use_noise = batch.noise_ids is not None and self.nce_weight > 0
        ids, mask = batch.input_ids, batch.attention_mask
        if use_noise:
            width = max(ids.shape[1], batch.noise_ids.shape[1])
            ids = torch.cat([F.pad(ids, (0, width - ids.shape[1])),
                             F.pad(batch.noise_ids, (0, width - batch.noise_ids.shape[1]))])
            mask = torch.cat([F.pad(mask, (0, width - mask.shape[1])),
                              F.pad(batch.noise_mask, (0, width - batch.noise_mask.shape[1]))])
        out = model(ids, mask)
        logits, energy = out.logits[:b].float(), out.energy.float()
        ce = F.cross_entropy(logits, batch.labels, reduction="sum")
        metrics: dict[str, Tensor | float] = {
            "ce_sum": ce.detach(), "accuracy_sum": (logits.detach().argmax(1) == batch.labels).sum().float(),
            "energy_data_sum": energy[:b].detach().sum(), "tokens": float(b)}
        total = ce
        if use_noise:
            e_data, e_noise = energy[:b], energy[b:]
            nce = residual_nce_loss(e_data, e_noise, reduction="sum")
            total = total + self.nce_weight * nce
            log_nu = math.log(e_noise.shape[0] / b)
            correct = (-e_data.detach() - log_nu > 0).sum() + (-e_noise.detach() - log_nu <= 0).sum()
            metrics.update(nce_sum=nce.detach(), nce_accuracy_sum=correct.float() * b / (b + e_noise.shape[0]),
                           energy_noise_sum=e_noise.detach().sum() * b / e_noise.shape[0])
        loss = total / b if self.reduction == "mean" else total
        return ObjectiveOutput(loss, metrics)
