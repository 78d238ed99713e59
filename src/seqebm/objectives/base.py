"""What every objective returns, and small helpers shared by objectives.

An objective is an ``nn.Module`` called as ``objective(model, batch, step=step)``; it returns
an :class:`ObjectiveOutput` whose ``loss`` is minimised by the trainer. ``metrics`` hold
detached *sums* with a ``"tokens"`` count so that the trainer can aggregate them exactly
across micro-batches and ranks (e.g. ``nll_sum / tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar (or per-row with reduction="none")
    metrics: dict[str, Tensor | float] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / compiled wrapper."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def token_nll(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Per-token negative log-likelihood (B, T), zero where ``mask`` is False. Float32 math."""
    nll = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return nll.masked_fill(~mask, 0.0)


def reduce_loss(per_token: Tensor, mask: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_token.sum() / mask.sum().clamp_min(1)
    if reduction == "sum":
        return per_token.sum()
    if reduction == "none":
        return per_token.sum(1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def check_reduction(reduction: str) -> str:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    return reduction


def nll_metrics(nll: Tensor, mask: Tensor) -> dict[str, Tensor]:
    """Detached sums (no device sync): the trainer turns them into floats when it logs."""
    return {"nll_sum": nll.detach().sum(), "tokens": mask.sum().to(nll.dtype)}


