"""Distributional control of a pretrained LM (GDC-style): fit the target EBM, then distil it into a policy.

Notation: N samples, K features (constraints), B prompts, L new tokens, V vocabulary.

Monograph §4.4.2 (the distributional approach of its ref. [72], "A distributional approach to
controlled text generation"): constraints on a pretrained LM a(x) are either *pointwise* (every
sample must satisfy b(x) = 1) or *distributional* (moment constraints E_P[φ(x)] = μ̄). The
distribution closest to a in KL divergence that satisfies them is an energy-based model on top of
a — a residual EBM in the sense of the residual-EBM seed §3, Eq. 2:

    P(x) ∝ a(x) · 1[b(x) = 1] · exp(λ·φ(x)),

with λ ∈ R^K fixed by the moment constraints (a pointwise constraint is the limit λ → ∞ of a
binary φ with target 1, and is kept exact instead). Then an autoregressive policy π_θ is trained
toward P by distributional policy gradient (DPG): minimising the cross-entropy CE(P, π_θ) =
−E_P[log π_θ(x)], whose gradient is estimated by importance sampling from a proposal q
(π_θ itself, or a frozen copy):

    ∇_θ CE = −E_{x∼q}[(P(x)/q(x)) ∇_θ log π_θ(x)] ≈ −Σ_i ω_i ∇_θ log π_θ(x_i),
    ω_i = softmax_i(log P̃(x_i) − log q(x_i))            (self-normalised, detached).

* :func:`fit_lambda`: λ from samples by the convex dual min_λ log Z(λ) − λ·μ̄ (Newton, float64,
  log space), Z(λ) = Σ_i w_i exp(λ·φ(x_i)) with importance weights w_i of the samples w.r.t. a.
* :class:`DistributionalTarget`: log P̃(x) = log a(x) + λ·φ(x) + log 1[b(x) = 1].
* :func:`dpg_loss` / :class:`DPGLoss`: the DPG objective.
* :func:`constraint_moments`, :func:`kl_from_samples`: E_π[φ] and KL(π || a) from samples.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seqebm.objectives.base import ObjectiveOutput, check_reduction, unwrap
from seqebm.sampling.sampler import sample
from seqebm.sampling.scoring import sequence_log_prob

__all__ = ["DPGLoss", "DistributionalTarget", "LambdaFit", "constraint_moments", "dpg_loss", "fit_lambda",
           "kl_from_samples"]

#: ``features(tokens (N, L), mask (N, L)) -> (N,) or (N, K)``; ``pointwise`` returns (N,) bool / {0, 1}.
Features = Callable[[Tensor, Tensor], Tensor]


def _features_2d(phi: object, name: str = "phi_samples") -> Tensor:
    if not isinstance(phi, Tensor) or not (phi.is_floating_point() or phi.dtype in (torch.bool, torch.long, torch.int)):
        raise TypeError(f"{name} must be a tensor of shape (N,) or (N, K), got {type(phi).__name__}")
    phi = phi.double()
    if phi.dim() == 1:
        phi = phi[:, None]
    if phi.dim() != 2 or phi.shape[0] < 1 or phi.shape[1] < 1:
        raise ValueError(f"{name} must have shape (N,) or (N, K) with N, K >= 1, got {tuple(phi.shape)}")
    if not bool(torch.isfinite(phi).all()):
        raise ValueError(f"{name} must be finite")
    return phi


def _log_weights(log_weights: Tensor | None, n: int, device: torch.device) -> Tensor:
    if log_weights is None:
        return torch.zeros(n, dtype=torch.float64, device=device)
    if not isinstance(log_weights, Tensor) or log_weights.shape != (n,):
        got = tuple(log_weights.shape) if isinstance(log_weights, Tensor) else type(log_weights).__name__
        raise ValueError(f"log_weights must have shape ({n},), got {got}")
    lw = log_weights.double().to(device)
    if bool(torch.isnan(lw).any()) or bool((lw == math.inf).any()):
        raise ValueError("log_weights must not contain NaN or +inf")
    if bool(torch.isneginf(lw).all()):
        raise ValueError("every log weight is -inf: no sample carries weight")
    return lw


def constraint_moments(phi: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """E[φ] (K,) float64 from samples: the mean, or the self-normalised weighted mean Σ ω_i φ_i.

    With samples from π and no weights this is the constraint satisfaction E_π[φ]; with
    log_weights = log P̃ − log q it is the SNIS estimate of E_P[φ].
    """
    phi = _features_2d(phi, "phi")
    lw = _log_weights(log_weights, phi.shape[0], phi.device)
    return torch.softmax(lw, 0) @ phi


def kl_from_samples(log_p: Tensor, log_q: Tensor, log_weights: Tensor | None = None) -> Tensor:
    """KL(p || q) ≈ Σ_i ω_i (log p(x_i) − log q(x_i)), a float64 scalar.

    With x_i ∼ p and no weights (ω = 1/N): the Monte Carlo estimate, e.g. KL(π || a) from policy
    samples with both normalised log-probabilities. With log_weights (log p̃ − log r for x_i ∼ r)
    the SNIS estimate. Samples where p(x_i) = 0 contribute 0.
    """
    if not isinstance(log_p, Tensor) or not isinstance(log_q, Tensor) or log_p.dim() != 1 or log_p.shape != log_q.shape:
        raise ValueError(f"log_p and log_q must be 1-D tensors of one shape, got "
                         f"{getattr(log_p, 'shape', log_p)} and {getattr(log_q, 'shape', log_q)}")
    lw = _log_weights(log_weights, log_p.shape[0], log_p.device)
    w = torch.softmax(lw, 0)
    diff = log_p.double() - log_q.double()
    return torch.where(w > 0, w * diff, torch.zeros_like(diff)).sum()


# ---------------------------------------------------------------------------------- λ by the convex dual
@dataclass
class LambdaFit:
    """Output of :func:`fit_lambda`.

    Attributes:
        lam: float64 (K,), λ.
        moments: float64 (K,), E_{P_λ}[φ] under the weighted samples (= target when converged).
        log_partition: log Σ_i ω_i exp(λ·φ_i) with ω the normalised sample weights (log Z(λ)/Z(0)).
        iterations: Newton steps taken.
        converged: max |moments − target| <= tol.
        ess: effective sample size of the tilted weights ω_i exp(λ·φ_i), 1/Σ ω̃².
    """

    lam: Tensor
    moments: Tensor
    log_partition: float
    iterations: int
    converged: bool
    ess: float


def fit_lambda(phi_samples: Tensor, log_weights: Tensor | None, target: Tensor | float | list[float], *,
               max_iter: int = 100, tol: float = 1e-10) -> LambdaFit:
    """Solve E_{P_λ}[φ] = μ̄ for λ on weighted samples (monograph §4.4.2 on ref. [72]).

    P_λ(x_i) ∝ w_i exp(λ·φ(x_i)) over the samples, w_i = exp(log_weights_i) their importance weights
    w.r.t. the base a (``None``: samples drawn from a, equal weights; with exact enumeration pass
    log a(x)). λ minimises the convex dual

        L(λ) = log Σ_i w_i exp(λ·φ_i) − λ·μ̄,   ∇L = E_λ[φ] − μ̄,   ∇²L = Cov_λ[φ],

    solved by damped Newton steps (backtracking line search) in float64 with logsumexp.

    Args:
        phi_samples: (N,) or (N, K) feature values.
        log_weights: (N,) or None.
        target: μ̄, a number or (K,) values; each must lie strictly inside the range of its feature
            over the weighted samples (else λ is infinite: use a pointwise constraint).
        max_iter, tol: Newton budget and tolerance on max |E_λ[φ] − μ̄|.

    Raises:
        ValueError: malformed shapes/values, or a target outside the features' range.
    """
    phi = _features_2d(phi_samples)
    n, k = phi.shape
    lw = _log_weights(log_weights, n, phi.device)
    mu = torch.as_tensor(target, dtype=torch.float64, device=phi.device).reshape(-1)
    if mu.shape != (k,):
        raise ValueError(f"target must have {k} value(s) (one per feature), got shape {tuple(mu.shape)}")
    if not bool(torch.isfinite(mu).all()):
        raise ValueError(f"target must be finite, got {mu.tolist()}")
    live = torch.isfinite(lw)
    lo, hi = phi[live].min(0).values, phi[live].max(0).values
    bad = (mu <= lo) | (mu >= hi)
    if bool(bad.any()):
        j = int(bad.nonzero()[0, 0])
        raise ValueError(f"target[{j}] = {float(mu[j])} is not strictly inside the range [{float(lo[j])}, "
                         f"{float(hi[j])}] of feature {j} over the weighted samples: λ would be infinite (for "
                         "'every sample must satisfy b', use a pointwise constraint instead)")

    def dual(lam: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        logits = lw + phi @ lam  # (N,)
        log_z = torch.logsumexp(logits, 0)
        p = torch.exp(logits - log_z)  # (N,)
        return log_z - lam @ mu, p, log_z

    lam = torch.zeros(k, dtype=torch.float64, device=phi.device)
    value, p, _ = dual(lam)
    it, converged = 0, False
    for it in range(1, max_iter + 1):
        m = p @ phi
        grad = m - mu
        if float(grad.abs().max()) <= tol:
            converged, it = True, it - 1
            break
        centred = phi - m
        hess = (centred * p[:, None]).T @ centred + 1e-12 * torch.eye(k, dtype=torch.float64, device=phi.device)
        step = -torch.linalg.solve(hess, grad)
        t, slope = 1.0, float(grad @ step)
        while True:
            new_value, new_p, _ = dual(lam + t * step)
            if float(new_value) <= float(value) + 1e-4 * t * slope or t < 1e-12:
                break
            t *= 0.5
        lam, value, p = lam + t * step, new_value, new_p
    else:
        converged = float((p @ phi - mu).abs().max()) <= tol
    _, p, log_z = dual(lam)
    log_z0 = torch.logsumexp(lw, 0)
    return LambdaFit(lam=lam, moments=p @ phi, log_partition=float(log_z - log_z0), iterations=it,
                     converged=converged, ess=float(torch.exp(-torch.logsumexp(2 * torch.log(p), 0))))


# ---------------------------------------------------------------------------------- target and DPG
class DistributionalTarget(nn.Module):
    """log P̃(x) = log a(x) + λ·φ(x) + log 1[b(x) = 1] (monograph §4.4.2 on ref. [72]).

    Args:
        base: the pretrained AR model a (seqebm protocol), kept frozen (never trained here).
        features: φ, ``features(tokens (N, L), mask (N, L)) -> (N,) or (N, K)``; with ``lam``.
        lam: λ (K,), e.g. ``fit_lambda(...).lam``.
        pointwise: b, ``pointwise(tokens, mask) -> (N,)`` bool/{0, 1}; rows with b = 0 get −inf.
    """

    def __init__(self, base: nn.Module, *, features: Features | None = None, lam: Tensor | None = None,
                 pointwise: Features | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Module):
            raise TypeError(f"base must be a seqebm AR nn.Module, got {type(base).__name__}")
        if (features is None) != (lam is None):
            raise ValueError("give features and lam together (or neither)")
        if features is None and pointwise is None:
            raise ValueError("a distributional target needs features with lam, a pointwise constraint, or both")
        self.base, self.features, self.pointwise = base, features, pointwise
        lam_t = torch.zeros(0, dtype=torch.float64) if lam is None else torch.as_tensor(lam, dtype=torch.float64)
        self.register_buffer("lam", lam_t.reshape(-1), persistent=False)

    def log_unnormalized(self, prompt: Tensor, tokens: Tensor, lengths: Tensor | None = None) -> Tensor:
        """(N,) float64 log P̃ of continuations ``tokens (N, L)`` (``lengths`` (N,), EOS included)
        of ``prompt (N, P)`` rows (BOS first; a (1, P) prompt is shared)."""
        n, width = tokens.shape
        lengths = torch.full((n,), width, device=tokens.device) if lengths is None else lengths.to(tokens.device)
        mask = torch.arange(width, device=tokens.device)[None] < lengths[:, None]
        prompt = prompt.expand(n, -1)
        with torch.no_grad():
            log_a = sequence_log_prob(self.base, torch.cat([prompt, tokens], 1), prefix_len=prompt.shape[1],
                                      lengths=prompt.shape[1] + lengths)
        out = log_a
        if self.features is not None:
            phi = _features_2d(self.features(tokens, mask), "features(...)")
            if phi.shape != (n, self.lam.numel()):
                raise ValueError(f"features returned {tuple(phi.shape)}, expected ({n}, {self.lam.numel()}) for lam")
            out = out + phi.to(out.device) @ self.lam.to(out.device)
        if self.pointwise is not None:
            ok = torch.as_tensor(self.pointwise(tokens, mask)).to(out.device).reshape(-1).bool()
            out = torch.where(ok, out, torch.full_like(out, -math.inf))
        return out


def dpg_loss(log_pi: Tensor, log_target: Tensor, log_q: Tensor, *, reduction: str = "mean") -> Tensor:
    """DPG loss −Σ_i ω_i log π(x_i), ω = softmax(log P̃ − log q) detached (see the module docstring).

    Per-sample terms are ℓ_i = −N ω_i log π(x_i) (weights rescaled to mean 1), so ``"mean"`` gives
    Σ_i ω_i (−log π(x_i)), ``"sum"`` N times that and ``"none"`` the (N,) terms. When every
    log P̃ is −inf (no sample satisfies a pointwise constraint) the loss is 0 (no signal).

    Args:
        log_pi: (N,) log π_θ(x_i), with autograd.
        log_target: (N,) log P̃(x_i) (−inf allowed); log_q: (N,) log q(x_i) of the proposal, finite.
    """
    check_reduction(reduction)
    if not all(isinstance(v, Tensor) and v.dim() == 1 for v in (log_pi, log_target, log_q)) or not (
            log_pi.shape == log_target.shape == log_q.shape):
        raise ValueError(f"log_pi, log_target and log_q must be 1-D tensors of one shape, got "
                         f"{[tuple(getattr(v, 'shape', ())) for v in (log_pi, log_target, log_q)]}")
    if not bool(torch.isfinite(log_q).all()):
        raise ValueError("log_q must be finite (a drawn sample has q > 0)")
    if bool(torch.isnan(log_target).any()) or bool((log_target == math.inf).any()):
        raise ValueError("log_target must not contain NaN or +inf")
    n = log_pi.shape[0]
    log_w = (log_target.double() - log_q.double()).detach()
    if bool(torch.isneginf(log_w).all()):
        terms = log_pi * 0.0
    else:
        omega = torch.softmax(log_w, 0).to(log_pi.dtype)
        terms = -n * omega * log_pi
    if reduction == "none":
        return terms
    return terms.mean() if reduction == "mean" else terms.sum()


class DPGLoss(nn.Module):
    """Distributional policy gradient toward a :class:`DistributionalTarget` (on ref. [72], §4.4.2).

    Called as ``objective(model, batch=None, step=...)`` like the other objectives: draws
    ``num_samples`` continuations of ``prompt`` from the proposal (the policy ``model`` itself when
    ``proposal`` is None — on-policy DPG — or a given frozen model), scores them under the policy
    (with autograd), the target (log P̃) and the proposal (the sampler's exact log q), and returns
    :func:`dpg_loss`. ``batch`` is ignored (the data are the samples).

    Args:
        target: the EBM P̃ to distil.
        num_samples, max_new_tokens: samples per call and their length budget.
        prompt: 1-D LongTensor, BOS first (default: ``[bos_id]``).
        proposal: q (None: the policy, detached).
        eos_id, pad_id, top_k, temperature: the sampler's knobs (log q is exact under them).
        seed: seed of the sampling generator.
        reduction: see :func:`dpg_loss`.

    Metrics: ``ess`` (of the weights), ``accept`` (fraction with P̃ > 0) as sums over ``tokens``.
    """

    def __init__(self, target: DistributionalTarget, *, num_samples: int, max_new_tokens: int,
                 prompt: Tensor | None = None, bos_id: int | None = None, proposal: nn.Module | None = None,
                 eos_id: int | None = None, pad_id: int = 0, top_k: int | None = None, temperature: float = 1.0,
                 seed: int = 0, reduction: str = "mean") -> None:
        super().__init__()
        if not isinstance(target, DistributionalTarget):
            raise TypeError(f"target must be a DistributionalTarget, got {type(target).__name__}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if prompt is None:
            bos_id = getattr(target.base, "bos_id", None) if bos_id is None else bos_id
            if not isinstance(bos_id, int):
                raise ValueError("give prompt (1-D, BOS first) or bos_id")
            prompt = torch.tensor([bos_id])
        if not isinstance(prompt, Tensor) or prompt.dim() != 1 or prompt.numel() < 1:
            raise ValueError(f"prompt must be a non-empty 1-D LongTensor starting with BOS, got {prompt!r}")
        self.target, self.proposal = target, proposal
        self.num_samples, self.max_new_tokens = num_samples, max_new_tokens
        self.register_buffer("prompt", prompt.long()[None], persistent=False)
        self.sample_kwargs = dict(eos_id=eos_id, pad_id=pad_id, top_k=top_k, temperature=temperature)
        self.generator = torch.Generator().manual_seed(seed)
        self.reduction = check_reduction(reduction)

    def forward(self, model: nn.Module, batch: object = None, step: int = 0) -> ObjectiveOutput:
        policy = unwrap(model)
        q = policy if self.proposal is None else self.proposal
        param = next(policy.parameters(), None)
        device = param.device if param is not None else self.prompt.device
        prompt = self.prompt.to(device)
        with torch.no_grad():
            out = sample(q, prompt, max_new_tokens=self.max_new_tokens, num_samples=self.num_samples,
                         generator=self.generator, **self.sample_kwargs)
        prompt = prompt.expand(self.num_samples, -1)
        rows = torch.cat([prompt, out.tokens], 1)
        log_pi = sequence_log_prob(model, rows, prefix_len=prompt.shape[1], lengths=prompt.shape[1] + out.lengths)
        log_target = self.target.log_unnormalized(prompt, out.tokens, out.lengths)
        loss = dpg_loss(log_pi, log_target, out.log_q.to(device), reduction=self.reduction)
        log_w = log_target - out.log_q.to(device)
        ess = (torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
               if bool(torch.isfinite(log_w).any()) else torch.zeros((), dtype=torch.float64))
        tokens = out.lengths.sum().double()
        metrics = {"ess_sum": ess.detach() * tokens, "accept_sum": torch.isfinite(log_target).double().mean() * tokens,
                   "tokens": tokens}
        return ObjectiveOutput(loss, metrics)
