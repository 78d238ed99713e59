"""Gradient-guided MCMC over continuous states: Langevin dynamics (ULA), MALA and SGLD.

Notation: C parallel chains, ``event`` the shape of one state (e.g. (D,) vectors or (1, 8, 8)
images), S kept states per chain.

Target: p(x) = exp(-E(x)) / Z for an energy ``energy(x: Tensor (C, *event)) -> Tensor (C,)``
(lower energy = more likely), so ∇_x log p(x) = -∇_x E(x) and Z is never needed. References are
to the monograph "Energy-based models for speech and language", §2.3.1, "Gradient guided MCMC"
(the monograph writes U = -E, so its ∇_x U is our -∇_x E).

* :func:`langevin` with ``metropolis=False`` — the unadjusted Langevin algorithm (ULA), Eq. (2.23):
  x' = x - (σ²/2) ∇E(x) + σ ε, ε ~ N(0, I), σ = ``step_size``. Every move is taken; the chain's
  stationary distribution is only approximately p (the bias vanishes as σ → 0).
* :func:`langevin` with ``metropolis=True`` — the Metropolis-adjusted Langevin algorithm (MALA,
  monograph [13], [143]): the Eq. (2.23) move is a proposal with density
  q(x'|x) = N(x'; x - (σ²/2) ∇E(x), σ² I), accepted with the Eq. (2.22) probability
  min{1, p(x') q(x|x') / (p(x) q(x'|x))}. Exact for any σ > 0.
* :func:`sgld` — stochastic gradient Langevin dynamics (monograph [190]), Eq. (2.24):
  z_l = z_{l-1} + δ_l Δ(z_{l-1}) + sqrt(2 δ_l) η_l, with Δ a noisy unbiased estimate of
  ∇ log p. By Theorem 2.1 the iterates have p as their limiting distribution when
  Σ δ_l = ∞ and Σ δ_l² < ∞ (e.g. :func:`polynomial_step_sizes`).

Gradients come from ``torch.autograd.grad(E.sum(), x)`` taken with respect to x only (inside
``torch.enable_grad()``, so samplers also run under ``torch.no_grad()``); nothing is
accumulated into the ``.grad`` of the energy module's parameters, and every returned tensor is
detached. All C chains advance together as one batch; there is no per-chain Python loop.
Acceptance tests use float64 log space. After ``burn_in`` transitions every ``thin``-th state
is kept, so ``samples`` has S = (num_steps - burn_in) // thin states per chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from seqebm.sampling.mcmc import _accept, _check_int, _energy, _is_kept, _keep_schedule

Energy = Callable[[Tensor], Tensor]
#: ``grad_log_prob(x (C, *event)) -> Tensor (C, *event)``, a (noisy, unbiased) estimate of ∇_x log p(x).
GradLogProb = Callable[[Tensor], Tensor]
#: A constant step size, one step size per iteration, or ``l -> δ_l`` for l = 1, 2, ...
StepSizes = Union[float, Sequence[float], Tensor, Callable[[int], float]]


@dataclass
class ContinuousMCMCResult:
    """Output of :func:`langevin`, :func:`sgld` and :func:`seqebm.sampling.hamiltonian.hmc`.

    Attributes:
        samples: Tensor (S, C, *event) in x0's dtype, the kept states (after ``burn_in``, every
            ``thin``-th); S = 0 when ``keep_samples=False`` or burn-in covers the whole run.
        final: Tensor (C, *event), the last state of every chain.
        final_energy: float64 Tensor (C,), E(final); None when no energy was given (SGLD driven
            by ``grad_log_prob`` alone).
        acceptance_rate: float64 Tensor (C,), the fraction of accepted proposals per chain (ones
            for ULA and SGLD, which take every move).
    """

    samples: Tensor
    final: Tensor
    final_energy: Optional[Tensor]
    acceptance_rate: Tensor


# ---------------------------------------------------------------- shared helpers (also used by hmc.py)

def _check_x0_continuous(x0: object) -> Tensor:
    """A detached private copy of x0 (C, *event), floating point, finite."""
    if not isinstance(x0, Tensor):
        raise ValueError(f"x0 must be a floating-point Tensor of shape (C, *event), got {type(x0).__name__}")
    if not x0.is_floating_point():
        raise ValueError(f"x0 must have a floating-point dtype, got {x0.dtype}")
    if x0.dim() < 2 or x0.numel() == 0:
        raise ValueError(f"x0 must have shape (C, *event) with C >= 1 and a non-empty event "
                         f"(use (C, 1) for scalar states), got {tuple(x0.shape)}")
    if not torch.isfinite(x0).all():
        raise ValueError("x0 must be finite (no NaN or inf)")
    return x0.detach().clone()


def _check_positive(name: str, value: object, *, allow_zero: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_clamp(clamp: object) -> tuple[float, float] | None:
    if clamp is None:
        return None
    if not isinstance(clamp, (tuple, list)) or len(clamp) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in clamp):
        raise ValueError(f"clamp must be None or a pair (lo, hi) of numbers, got {clamp!r}")
    lo, hi = float(clamp[0]), float(clamp[1])
    if not lo < hi:
        raise ValueError(f"clamp must satisfy lo < hi, got ({lo}, {hi})")
    return lo, hi


def _energy_and_grad(energy: Energy, x: Tensor) -> tuple[Tensor, Tensor]:
    """E(x) as float64 (C,) and ∇_x E(x) (C, *event) in x's dtype, both detached.

    The gradient is taken with respect to x only: parameters of ``energy`` get no ``.grad``.
    """
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        e = energy(xg)
        if not isinstance(e, Tensor) or e.shape != (x.shape[0],):
            got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"energy must return a Tensor of shape ({x.shape[0]},) for input "
                             f"{tuple(x.shape)}, got {got}")
        if not e.requires_grad:
            raise ValueError("energy output does not depend differentiably on x (was it computed under "
                             "torch.no_grad() or on a detached copy?); gradient samplers need ∇_x E")
        (grad,) = torch.autograd.grad(e.sum(), xg)
    return e.detach().to(torch.float64), grad.detach().to(x.dtype)


def _gaussian_noise(x: Tensor, generator: torch.Generator | None) -> Tensor:
    return torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)


def _sq_norm(v: Tensor) -> Tensor:
    """Per-chain squared norm in float64: (C, *event) -> (C,)."""
    return v.to(torch.float64).pow(2).flatten(1).sum(1)


def _mala_log_ratio(x: Tensor, x_new: Tensor, e: Tensor, e_new: Tensor, grad: Tensor, grad_new: Tensor,
                    step_size: float) -> Tensor:
    """log[p(x') q(x|x') / (p(x) q(x'|x))] (C,) float64 for the Langevin proposal of Eq. (2.23).

    log q(x'|x) = -|x' - x + (σ²/2) ∇E(x)|² / (2σ²) + const (the constants cancel).
    """
    half = step_size ** 2 / 2
    x64, x_new64 = x.to(torch.float64), x_new.to(torch.float64)
    forward = _sq_norm(x_new64 - x64 + half * grad.to(torch.float64))  # (C,) -2σ² log q(x'|x)
    backward = _sq_norm(x64 - x_new64 + half * grad_new.to(torch.float64))  # (C,) -2σ² log q(x|x')
    return (e - e_new) + (forward - backward) / (2 * step_size ** 2)


# ---------------------------------------------------------------- Langevin: ULA and MALA

def langevin(
    energy: Energy,
    x0: Tensor,
    *,
    num_steps: int,
    step_size: float,
    metropolis: bool = False,
    generator: torch.Generator | None = None,
    burn_in: int = 0,
    thin: int = 1,
    keep_samples: bool = True,
    clamp: tuple[float, float] | None = None,
) -> ContinuousMCMCResult:
    """Run C Langevin chains in parallel: ULA or MALA (§2.3.1, "Langevin dynamics (LD) sampler", Eq. 2.23).

    Each transition proposes x' = x - (σ²/2) ∇E(x) + σ ε with ε ~ N(0, I) and σ = ``step_size``.
    With ``metropolis=False`` (ULA) x' is always taken: cheap, but biased — for a Gaussian
    N(0, s²) the stationary variance is s² / (1 - σ²/(4 s²)) instead of s². With
    ``metropolis=True`` (MALA) x' is accepted iff
    log u < E(x) - E(x') + log q(x|x') - log q(x'|x) (float64, NaN rejects), where
    q(x'|x) = N(x'; x - (σ²/2) ∇E(x), σ² I); the chain then leaves p exactly invariant.

    Args:
        energy: callable Tensor (N, *event) -> Tensor (N,), differentiable in its input; called
            with gradients once on x0 and once per step (on the current states for ULA, on the
            proposals for MALA), plus once without gradients on the final ULA states.
        x0: floating-point Tensor (C, *event), initial states (float64 recommended for tests).
        num_steps: number of transitions per chain.
        step_size: σ > 0, the noise standard deviation; the drift step is σ²/2.
        metropolis: False for ULA, True for MALA.
        generator: torch random generator on x0's device (reproducibility).
        burn_in: transitions discarded before keeping states.
        thin: keep every ``thin``-th state after burn-in.
        keep_samples: if False, only the final state is returned (``samples`` has S = 0).
        clamp: optional (lo, hi); ULA only. Every new state is clamped to [lo, hi] (e.g. pixel
            ranges for images, as in JEM). Clamping changes the transition kernel, so the chain
            is no longer even approximately a discretised Langevin diffusion near the bounds:
            a practical knob, not an exact sampler.

    Returns:
        :class:`ContinuousMCMCResult` with samples (S, C, *event), S = (num_steps - burn_in) // thin,
        final_energy = E(final) (float64) and per-chain acceptance rates (ones for ULA).

    Raises:
        ValueError: on malformed x0 or knobs, clamp with MALA, or an energy that returns the
            wrong shape or is not differentiable in x.
    """
    _check_int("num_steps", num_steps, 0)
    sigma = _check_positive("step_size", step_size)
    if not isinstance(metropolis, bool):
        raise ValueError(f"metropolis must be a bool, got {metropolis!r}")
    bounds = _check_clamp(clamp)
    if bounds is not None and metropolis:
        raise ValueError("clamp is only supported with metropolis=False: clamping changes the proposal "
                         "density, so the MALA acceptance ratio would be wrong")
    x = _check_x0_continuous(x0)
    s = _keep_schedule(num_steps, burn_in, thin, keep_samples)
    c = x.shape[0]
    samples = torch.empty((s, *x.shape), dtype=x.dtype, device=x.device)
    accepted = torch.zeros(c, dtype=torch.float64, device=x.device)
    half = sigma ** 2 / 2
    e: Tensor | None = None
    if metropolis:
        e, grad = _energy_and_grad(energy, x)
    kept = 0
    for step in range(1, num_steps + 1):
        if metropolis:
            x_new = x - half * grad + sigma * _gaussian_noise(x, generator)
            e_new, grad_new = _energy_and_grad(energy, x_new)
            log_ratio = _mala_log_ratio(x, x_new, e, e_new, grad, grad_new, sigma)
            accept, (x, e, grad) = _accept(log_ratio, (x_new, x), (e_new, e), (grad_new, grad),
                                           generator=generator)
            accepted += accept.to(torch.float64)
        else:
            _, grad = _energy_and_grad(energy, x)
            x = x - half * grad + sigma * _gaussian_noise(x, generator)
            if bounds is not None:
                x = x.clamp(bounds[0], bounds[1])
            accepted += 1.0
        if s and _is_kept(step, burn_in, thin):
            samples[kept] = x
            kept += 1
    if e is None:
        e = _energy(energy, x)
    rate = accepted / num_steps if num_steps else torch.zeros(c, dtype=torch.float64, device=x.device)
    return ContinuousMCMCResult(samples=samples, final=x, final_energy=e, acceptance_rate=rate)


# ---------------------------------------------------------------- SGLD

@dataclass(frozen=True)
class _PolynomialStepSizes:
    a: float
    b: float
    gamma: float

    def __call__(self, l: int) -> float:
        return self.a * (self.b + l) ** (-self.gamma)


def polynomial_step_sizes(a: float, b: float, gamma: float) -> Callable[[int], float]:
    """The SGLD schedule δ_l = a (b + l)^(-γ), l = 1, 2, ... (Welling & Teh 2011, monograph [190]).

    With 0.5 < γ <= 1 it satisfies the conditions of Theorem 2.1: Σ_l δ_l = ∞ (γ <= 1) and
    Σ_l δ_l² < ∞ (2γ > 1).

    Args:
        a: scale, > 0.
        b: offset, >= 0 (damps the first steps).
        gamma: decay exponent in (0.5, 1].

    Returns:
        A callable ``l -> δ_l`` for :func:`sgld`'s ``step_sizes``.

    Raises:
        ValueError: if a <= 0, b < 0 or γ is outside (0.5, 1].
    """
    a = _check_positive("a", a)
    b = _check_positive("b", b, allow_zero=True)
    ok = isinstance(gamma, (int, float)) and not isinstance(gamma, bool) and 0.5 < gamma <= 1
    if not ok:
        raise ValueError(f"gamma must lie in (0.5, 1] so that Σδ = ∞ and Σδ² < ∞ (Theorem 2.1), got {gamma!r}")
    return _PolynomialStepSizes(a, b, float(gamma))


def _resolve_step_sizes(step_sizes: StepSizes, num_steps: int | None) -> tuple[int, Callable[[int], float]]:
    """(L, l -> δ_l) from a constant, a sequence of L values, or a callable (then num_steps is L)."""
    if isinstance(step_sizes, (int, float)) and not isinstance(step_sizes, bool):
        delta = _check_positive("step_sizes", step_sizes)
        if num_steps is None:
            raise ValueError("num_steps is required when step_sizes is a constant")
        return _check_int("num_steps", num_steps, 0), lambda l: delta
    if callable(step_sizes):
        if num_steps is None:
            raise ValueError("num_steps is required when step_sizes is a callable")
        schedule = step_sizes

        def checked(l: int) -> float:
            d = schedule(l)
            if isinstance(d, Tensor) and d.numel() == 1:
                d = d.item()
            return _check_positive(f"step_sizes({l})", d)
        return _check_int("num_steps", num_steps, 0), checked
    if isinstance(step_sizes, Tensor):
        if step_sizes.dim() != 1:
            raise ValueError(f"step_sizes as a Tensor must be 1-D, got shape {tuple(step_sizes.shape)}")
        values = [float(v) for v in step_sizes.tolist()]
    elif isinstance(step_sizes, Sequence) and not isinstance(step_sizes, (str, bytes)):
        values = list(step_sizes)
    else:
        raise ValueError(f"step_sizes must be a number, a sequence of numbers or a callable l -> δ_l, "
                         f"got {type(step_sizes).__name__}")
    values = [_check_positive(f"step_sizes[{i}]", v) for i, v in enumerate(values)]
    if num_steps is not None and _check_int("num_steps", num_steps, 0) != len(values):
        raise ValueError(f"num_steps ({num_steps}) does not match len(step_sizes) ({len(values)})")
    return len(values), lambda l: values[l - 1]


def sgld(
    energy: Energy | None,
    x0: Tensor,
    *,
    step_sizes: StepSizes,
    num_steps: int | None = None,
    grad_log_prob: GradLogProb | None = None,
    noise_scale: float | None = None,
    generator: torch.Generator | None = None,
    burn_in: int = 0,
    thin: int = 1,
    keep_samples: bool = True,
    clamp: tuple[float, float] | None = None,
) -> ContinuousMCMCResult:
    """Run C stochastic gradient Langevin chains in parallel (§2.3.1, SGLD, Theorem 2.1, Eq. 2.24).

    Iterates z_l = z_{l-1} + δ_l Δ(z_{l-1}) + sqrt(2 δ_l) η_l, η_l ~ N(0, I), l = 1..L, where Δ
    is a noisy, unbiased estimate of ∇_z log p(z): either -∇E from ``energy`` (a minibatch or
    otherwise noisy energy is fine — the estimate is then -∇ of the noisy energy) or the output
    of ``grad_log_prob``. There is no accept/reject step. Theorem 2.1 needs δ_l → 0 with
    Σ δ_l = ∞ and Σ δ_l² < ∞ (:func:`polynomial_step_sizes`); with a constant δ the exact-gradient
    iteration is ULA with σ² = 2δ (see :func:`langevin`) and carries its discretisation bias.

    Args:
        energy: callable Tensor (N, *event) -> Tensor (N,), differentiable in its input; or None
            when ``grad_log_prob`` is given. Exactly one of the two must be given.
        x0: floating-point Tensor (C, *event), initial states.
        step_sizes: δ: a constant > 0, a sequence (or 1-D Tensor) of L values, or a callable
            ``l -> δ_l`` for l = 1..L.
        num_steps: L; required for a constant or callable schedule, defaults to len(step_sizes).
        grad_log_prob: callable Tensor (C, *event) -> Tensor (C, *event), an estimate of ∇ log p
            (e.g. true gradient plus zero-mean noise); close over your own generator for noise.
        noise_scale: if given, the injected noise is ``noise_scale * η`` instead of sqrt(2 δ_l) η,
            the JEM-style practical knob (e.g. δ = 1, noise 0.01). This decouples drift and noise,
            so the chain is NOT a sampler of p (it is a noisy gradient descent on E); use it for
            short-run EBM training chains, never for estimates that need exact samples.
        generator: torch random generator on x0's device, used for η.
        burn_in: iterations discarded before keeping states.
        thin: keep every ``thin``-th state after burn-in.
        keep_samples: if False, only the final state is returned.
        clamp: optional (lo, hi): every new state is clamped to [lo, hi] (bounded data such as
            images); this breaks exactness, as for :func:`langevin`.

    Returns:
        :class:`ContinuousMCMCResult` with samples (S, C, *event), S = (L - burn_in) // thin,
        final_energy = E(final) in float64 when ``energy`` is given (one extra no-grad call; a
        noisy energy gives a noisy value) and None otherwise, acceptance_rate all ones.

    Raises:
        ValueError: on malformed x0, schedules or knobs, both or neither of energy and
            grad_log_prob, or gradient/energy outputs of the wrong shape.
    """
    if (energy is None) == (grad_log_prob is None):
        raise ValueError("give exactly one of energy and grad_log_prob")
    num_steps, delta = _resolve_step_sizes(step_sizes, num_steps)
    if noise_scale is not None:
        noise_scale = _check_positive("noise_scale", noise_scale, allow_zero=True)
    bounds = _check_clamp(clamp)
    x = _check_x0_continuous(x0)
    s = _keep_schedule(num_steps, burn_in, thin, keep_samples)
    c = x.shape[0]
    samples = torch.empty((s, *x.shape), dtype=x.dtype, device=x.device)
    kept = 0
    for step in range(1, num_steps + 1):
        d = delta(step)
        if energy is not None:
            _, grad_e = _energy_and_grad(energy, x)
            drift = -grad_e  # (C, *event) estimate of ∇ log p
        else:
            drift = grad_log_prob(x)  # type: ignore[misc]
            if not isinstance(drift, Tensor) or drift.shape != x.shape:
                got = tuple(drift.shape) if isinstance(drift, Tensor) else type(drift).__name__
                raise ValueError(f"grad_log_prob must return a Tensor of shape {tuple(x.shape)}, got {got}")
            drift = drift.detach().to(x.dtype)
        scale = math.sqrt(2 * d) if noise_scale is None else noise_scale
        x = x + d * drift + scale * _gaussian_noise(x, generator)
        if bounds is not None:
            x = x.clamp(bounds[0], bounds[1])
        if s and _is_kept(step, burn_in, thin):
            samples[kept] = x
            kept += 1
    final_energy = _energy(energy, x) if energy is not None else None
    rate = torch.ones(c, dtype=torch.float64, device=x.device) if num_steps else \
        torch.zeros(c, dtype=torch.float64, device=x.device)
    return ContinuousMCMCResult(samples=samples, final=x, final_energy=final_energy, acceptance_rate=rate)
