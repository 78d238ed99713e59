"""Denoising score matching (DSM) for energy models on continuous data.

Notation: N data rows, D = the number of entries of one configuration (any event shape).

Score matching fits the model's score ∇_x log p_θ(x) = −∇_x E_θ(x) (no log Z needed, §2.3.1)
to the data's by minimising the Fisher divergence (§2.3.5). Vincent (2011) showed that for data
perturbed with Gaussian noise, x̃ = x + σ ε, the Fisher divergence to the perturbed data
distribution equals, up to a constant, the denoising objective

    J(θ) = E_{x, ε} [ ½ ‖ −∇_x̃ E_θ(x̃) + (x̃ − x)/σ² ‖² ],

whose minimiser is the score of the perturbed density q_σ(x̃) = ∫ p_data(x) N(x̃; x, σ²I) dx.
So DSM learns p_data convolved with N(0, σ²I): for Gaussian data N(μ, Σ) and a quadratic
energy the optimum is exactly N(μ, Σ + σ²I). This module returns σ² J (the usual weighting
that keeps the loss scale independent of σ). It applies to continuous data only: the score
does not exist for tokens (§2.3.5).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seqebm.objectives.base import ObjectiveOutput, check_reduction
from seqebm.objectives.contrastive_divergence import ebm_data, energies


def model_score(model: nn.Module, x: Tensor, *, create_graph: bool = True) -> Tensor:
    """−∇_x E(x) for every row of x (N, ...), same shape as x."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        e = energies(model, x)
        (grad,) = torch.autograd.grad(e.sum(), x, create_graph=create_graph)
    return -grad


class DenoisingScoreMatchingLoss(nn.Module):
    """Denoising score matching loss σ² · J(θ) (Vincent 2011; monograph §2.3.5).

    Args:
        sigma: noise standard deviation σ > 0.
        reduction: ``"mean"`` over rows, ``"sum"``, or ``"none"`` (per row, shape (N,)).
    """

    def __init__(self, sigma: float, *, reduction: str = "mean") -> None:
        super().__init__()
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        self.sigma, self.reduction = float(sigma), check_reduction(reduction)

    def forward(self, model: nn.Module, batch: object, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        x = ebm_data(batch)
        if not x.is_floating_point():
            raise ValueError(f"score matching needs continuous (floating-point) data, got dtype {x.dtype}")
        eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        x_noisy = x + self.sigma * eps
        score = model_score(model, x_noisy)
        # σ² · ½‖s + (x̃ − x)/σ²‖² = ½‖σ s + ε‖²
        per_row = 0.5 * (self.sigma * score + eps).pow(2).flatten(1).sum(1)  # (N,)
        if self.reduction == "mean":
            loss = per_row.mean()
        elif self.reduction == "sum":
            loss = per_row.sum()
        else:
            loss = per_row
        return ObjectiveOutput(loss, {"dsm_sum": per_row.detach().sum(), "tokens": float(x.shape[0])})
