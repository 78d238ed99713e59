"""Noise-contrastive estimation (NCE) and dynamic NCE (DNCE) for energy models.

Notation: N data rows in the batch, K noise rows, ν = K / N the noise ratio.

The model is p_{θ,ζ}(x) = exp(−E_θ(x) − ζ) (monograph §2.4, Eq. 2.44 with log p̃_θ = −E_θ):
the log normaliser ζ is a free parameter learned with θ. A binary classifier tells data (C=+)
from noise (C=−) with the posterior of Eq. (2.45),

    p(C=+ | x) = p_{θ,ζ}(x) / (p_{θ,ζ}(x) + ν q(x)) = σ(G(x)),
    G(x) = −E_θ(x) − ζ − log ν − log q(x),

and NCE maximises Eq. (2.46), J = E_data[log σ(G)] + ν E_q[log σ(−G)]. With a minibatch of N
data rows and K = νN noise rows (Algorithm 9) the loss returned here is

    loss = −(1/N) [ Σ_data log σ(G(x)) + Σ_noise log σ(−G(x)) ].

The ``log ν`` term matters: without it the learned ζ settles at log Z + log ν instead of log Z
(with K = ν N noise samples the prior ratio is ν; the model's total mass then settles at 1/ν). At the optimum (Theorem 2.4) p_{θ,ζ} equals
the data distribution, so ζ estimates log Z_θ.

DNCE (§2.4.1, Eq. 2.48) replaces the fixed q by a noise model q_φ trained by maximum
likelihood on the data, and the data distribution by the interpolation
p_int = α p_data + (1 − α) q_φ. Per batch it draws two noise sets,
|B1| = (1 − α)/α · N (mixed with the data to form samples of p_int) and |B2| = ν/α · N (the
negatives), and ascends

    (α/N) Σ_{x∈D∪B1} ∇ log σ(G(x)) + (α/N) Σ_{x∈B2} ∇ log σ(−G(x))     (θ, ζ)
    (1/N) Σ_{x∈D} ∇_φ log q_φ(x)                                         (φ),

whose loss is returned as one scalar (q_φ is detached inside G, so each part only moves its
own parameters). ζ and the noise model are parameters of the objective: the trainer optimises
and checkpoints them together with the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.objectives.base import ObjectiveOutput, check_reduction
from seqebm.objectives.contrastive_divergence import ebm_data, energies
from seqebm.objectives.noise import NoiseDistribution


def _count(name: str, value: float, n: int) -> int:
    k = int(round(value * n))
    if k < 1:
        raise ValueError(f"{name} gives {value} x {n} = {value * n:.3g} noise rows per batch; need at least 1")
    return k


def nce_logits(energy: Tensor, log_q: Tensor, log_z: Tensor, nu: float) -> Tensor:
    """G(x) = −E(x) − ζ − log ν − log q(x), the logit of p(C=+|x) in Eq. (2.45). Shapes (N,)."""
    return -energy - log_z - math.log(nu) - log_q.to(energy.dtype)


class NCELoss(nn.Module):
    """NCE loss (§2.4, Eq. 2.44–2.47, Algorithm 9) with a learnable log normaliser ζ.

    Args:
        noise: a :class:`~seqebm.objectives.noise.NoiseDistribution` (sample + exact log_prob);
            fixed (its parameters, if any, are not trained here; use :class:`DNCELoss` for that).
        nu: ν, noise rows per data row (K = round(ν N) per batch).
        log_z_init: initial ζ.
        learn_log_z: if False, ζ stays fixed (a self-normalised model, ζ = log_z_init).
        reduction: ``"mean"`` (per data row, as above) or ``"sum"``.

    Attributes:
        log_z: the parameter ζ, the estimate of log Z_θ.
    """

    def __init__(self, noise: NoiseDistribution, *, nu: float = 1.0, log_z_init: float = 0.0,
                 learn_log_z: bool = True, reduction: str = "mean") -> None:
        super().__init__()
        if not (hasattr(noise, "sample") and hasattr(noise, "log_prob")):
            raise ValueError("noise must provide sample(n, generator) and log_prob(x)")
        if not nu > 0:
            raise ValueError(f"nu must be positive, got {nu}")
        if reduction not in ("mean", "sum"):
            check_reduction(reduction)
            raise ValueError("reduction='none' is not defined for NCE (data and noise rows differ); use mean or sum")
        self.noise, self.nu, self.reduction = noise, float(nu), reduction
        self.log_z = nn.Parameter(torch.tensor(float(log_z_init)), requires_grad=learn_log_z)

    def classify(self, model: nn.Module, x: Tensor, log_q: Tensor, nu: float) -> Tensor:
        """G(x) for a batch, shape (N,)."""
        e = energies(model, x)
        return nce_logits(e, log_q.detach(), self.log_z.to(e.dtype), nu)

    def forward(self, model: nn.Module, batch: object, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        x = ebm_data(batch)
        n = x.shape[0]
        k = _count("nu", self.nu, n)
        with torch.no_grad():
            y, log_q_y = self.noise.sample(k, generator)
            log_q_x = self.noise.log_prob(x)
        nu = k / n  # the prior ratio actually used in this batch
        g = self.classify(model, torch.cat([x, y.to(x.dtype)]), torch.cat([log_q_x, log_q_y.to(log_q_x.dtype)]), nu)
        g_data, g_noise = g[:n], g[n:]
        total = -(F.logsigmoid(g_data).sum() + F.logsigmoid(-g_noise).sum())
        loss = total / n if self.reduction == "mean" else total
        correct = (g_data.detach() > 0).sum() + (g_noise.detach() <= 0).sum()
        return ObjectiveOutput(loss, {"nce_sum": total.detach(), "accuracy_sum": correct.double() * n / (n + k),
                                      "log_z_sum": self.log_z.detach().double() * n, "tokens": float(n)})


class DNCELoss(nn.Module):
    """Dynamic NCE (§2.4.1, Eq. 2.48) with a noise model trained by maximum likelihood.

    Args:
        noise: a trainable noise distribution, an ``nn.Module`` such as
            :class:`~seqebm.objectives.noise.AutoregressiveNoise`; its parameters are
            optimised (by the trainer) on −log q_φ(data).
        alpha: α in (0, 1], the weight of the data in p_int (α = 1: NCE with a trained noise).
        nu: ν, the noise-to-p_int ratio; |B2| = ν/α · N.
        log_z_init: initial ζ.
        noise_weight: scale of the noise model's NLL term in the returned loss (1 = the
            monograph's update; 0 freezes q_φ at its current state).
        reduction: ``"mean"`` or ``"sum"``.
    """

    def __init__(self, noise: nn.Module, *, alpha: float = 0.5, nu: float = 1.0, log_z_init: float = 0.0,
                 noise_weight: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        if not (isinstance(noise, nn.Module) and hasattr(noise, "sample") and hasattr(noise, "log_prob")):
            raise ValueError("noise must be an nn.Module with sample(n, generator) and log_prob(x), "
                             "e.g. AutoregressiveNoise")
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must lie in (0, 1], got {alpha}")
        if not nu > 0:
            raise ValueError(f"nu must be positive, got {nu}")
        if noise_weight < 0:
            raise ValueError(f"noise_weight must be >= 0, got {noise_weight}")
        if reduction not in ("mean", "sum"):
            check_reduction(reduction)
            raise ValueError("reduction='none' is not defined for DNCE; use mean or sum")
        self.noise, self.alpha, self.nu, self.noise_weight, self.reduction = noise, alpha, nu, noise_weight, reduction
        self.log_z = nn.Parameter(torch.tensor(float(log_z_init)))

    def forward(self, model: nn.Module, batch: object, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        x = ebm_data(batch)
        n = x.shape[0]
        k1 = int(round((1 - self.alpha) / self.alpha * n))
        k2 = _count("nu / alpha", self.nu / self.alpha, n)
        with torch.no_grad():
            y, log_q_y = self.noise.sample(k1 + k2, generator)  # B1 = first k1 rows, B2 = the rest
        log_q_x = self.noise.log_prob(x)  # keeps the graph: trains q_φ
        nu = k2 / (n + k1)  # |B2| / |D ∪ B1|, the prior ratio of the classifier
        e = energies(model, torch.cat([x, y.to(x.dtype)]))
        log_q = torch.cat([log_q_x.detach(), log_q_y.to(log_q_x.dtype)])
        g = nce_logits(e, log_q, self.log_z.to(e.dtype), nu)
        g_pos, g_neg = g[: n + k1], g[n + k1:]
        nce_total = -(self.alpha * (F.logsigmoid(g_pos).sum() + F.logsigmoid(-g_neg).sum()))
        noise_nll = -log_q_x.sum()
        total = nce_total + self.noise_weight * noise_nll.to(nce_total.dtype)
        loss = total / n if self.reduction == "mean" else total
        correct = (g_pos.detach() > 0).sum() + (g_neg.detach() <= 0).sum()
        return ObjectiveOutput(loss, {"dnce_sum": nce_total.detach(), "noise_nll_sum": noise_nll.detach(),
                                      "accuracy_sum": correct.double() * n / g.shape[0],
                                      "log_z_sum": self.log_z.detach().double() * n, "tokens": float(n)})
