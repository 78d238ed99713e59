"""Hamiltonian Monte Carlo (HMC) over continuous states.

Notation: C parallel chains, ``event`` the shape of one state, S kept states per chain,
L leapfrog steps per transition, ε the leapfrog step size, M the (diagonal) mass.

Target: p(x) = exp(-E(x)) / Z for ``energy(x: Tensor (C, *event)) -> Tensor (C,)``. HMC is one
of the continuous-dynamics samplers of the monograph "Energy-based models for speech and
language", §2.3.1, "Gradient guided MCMC", which refers to Neal (2011) [113] for it. Each
transition (Neal 2011, §5.3.2):

1. draws a fresh momentum p ~ N(0, M);
2. simulates Hamiltonian dynamics for H(x, p) = E(x) + K(p), K(p) = ½ Σ p² / M, with L
   leapfrog steps of size ε:
   p ← p - (ε/2) ∇E(x); then L times {x ← x + ε p / M; p ← p - ε ∇E(x)}, the last momentum
   update being a half step;
3. accepts the end point (x', p') iff log u < H(x, p) - H(x', p') (float64; a NaN or infinite
   H(x', p') rejects).

Leapfrog is volume preserving and time reversible, so this Metropolis test (Eq. 2.22 with a
symmetric proposal on (x, p)) leaves p(x) exactly invariant for every ε. HMC with L = 1 is
exactly MALA (:func:`seqebm.sampling.langevin_dynamics.langevin`, ``metropolis=True``) with σ = ε and
M = 1. Gradients are taken with respect to x only, and all C chains advance as one batch.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from seqebm.sampling.langevin_dynamics import (ContinuousMCMCResult, _check_positive, _check_x0_continuous,
                                      _energy_and_grad, _gaussian_noise)
from seqebm.sampling.mcmc import _accept, _check_int, _is_kept, _keep_schedule

Energy = Callable[[Tensor], Tensor]


def _check_mass(mass: float | Tensor, x: Tensor) -> Tensor:
    """The diagonal mass as a Tensor broadcastable to (C, *event), x's dtype and device."""
    if isinstance(mass, Tensor):
        event = tuple(x.shape[1:])
        try:
            ok = torch.broadcast_shapes(tuple(mass.shape), event) == event
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"mass as a Tensor must broadcast to the event shape {event}, got {tuple(mass.shape)}")
        if not (torch.isfinite(mass).all() and (mass > 0).all()):
            raise ValueError("mass must be finite and > 0 everywhere")
        return mass.detach().to(dtype=x.dtype, device=x.device)
    return torch.tensor(_check_positive("mass", mass), dtype=x.dtype, device=x.device)


def _kinetic_energy(p: Tensor, mass: Tensor) -> Tensor:
    """K(p) = ½ Σ p² / M per chain: (C, *event) -> (C,) float64."""
    return 0.5 * (p.to(torch.float64).pow(2) / mass.to(torch.float64)).flatten(1).sum(1)


def _hmc_log_ratio(h_current: Tensor, h_proposed: Tensor) -> Tensor:
    """log acceptance ratio H(x, p) - H(x', p') (C,) float64; non-finite H(x', p') gives -inf."""
    log_ratio = h_current - h_proposed
    return torch.where(torch.isfinite(h_proposed), log_ratio, torch.full_like(log_ratio, -math.inf))


def _leapfrog(energy: Energy, x: Tensor, p: Tensor, grad: Tensor, step_size: float, num_leapfrog: int,
              mass: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L leapfrog steps from (x, p) given ∇E(x); returns (x', p', E(x') float64, ∇E(x'))."""
    p = p - (step_size / 2) * grad
    for i in range(num_leapfrog):
        x = x + step_size * p / mass
        e, grad = _energy_and_grad(energy, x)
        p = p - (step_size if i < num_leapfrog - 1 else step_size / 2) * grad
    return x, p, e, grad


def hmc(
    energy: Energy,
    x0: Tensor,
    *,
    num_steps: int,
    step_size: float,
    num_leapfrog: int,
    mass: float | Tensor = 1.0,
    generator: torch.Generator | None = None,
    burn_in: int = 0,
    thin: int = 1,
    keep_samples: bool = True,
) -> ContinuousMCMCResult:
    """Run C Hamiltonian Monte Carlo chains in parallel (§2.3.1 "Gradient guided MCMC"; Neal 2011 [113]).

    Args:
        energy: callable Tensor (N, *event) -> Tensor (N,), differentiable in its input; called
            with gradients once on x0 and ``num_leapfrog`` times per transition.
        x0: floating-point Tensor (C, *event), initial states.
        num_steps: number of HMC transitions per chain (each resamples the momentum).
        step_size: leapfrog step ε > 0.
        num_leapfrog: L >= 1 leapfrog steps per transition (trajectory length L·ε).
        mass: diagonal mass M > 0: a number or a Tensor broadcastable to the event shape.
        generator: torch random generator on x0's device (momenta and uniforms).
        burn_in: transitions discarded before keeping states.
        thin: keep every ``thin``-th state after burn-in.
        keep_samples: if False, only the final state is returned.

    Returns:
        :class:`~seqebm.sampling.langevin_dynamics.ContinuousMCMCResult` with samples (S, C, *event),
        S = (num_steps - burn_in) // thin, final_energy = E(final) in float64 and the
        per-chain fraction of accepted trajectories.

    Raises:
        ValueError: on malformed x0, mass or knobs, or an energy that returns the wrong shape or
            is not differentiable in x.
    """
    _check_int("num_steps", num_steps, 0)
    eps = _check_positive("step_size", step_size)
    _check_int("num_leapfrog", num_leapfrog, 1)
    x = _check_x0_continuous(x0)
    m = _check_mass(mass, x)
    s = _keep_schedule(num_steps, burn_in, thin, keep_samples)
    c = x.shape[0]
    samples = torch.empty((s, *x.shape), dtype=x.dtype, device=x.device)
    accepted = torch.zeros(c, dtype=torch.float64, device=x.device)
    e, grad = _energy_and_grad(energy, x)
    kept = 0
    for step in range(1, num_steps + 1):
        p = _gaussian_noise(x, generator) * m.sqrt()  # (C, *event) ~ N(0, M)
        x_new, p_new, e_new, grad_new = _leapfrog(energy, x, p, grad, eps, num_leapfrog, m)
        log_ratio = _hmc_log_ratio(e + _kinetic_energy(p, m), e_new + _kinetic_energy(p_new, m))
        accept, (x, e, grad) = _accept(log_ratio, (x_new, x), (e_new, e), (grad_new, grad), generator=generator)
        accepted += accept.to(torch.float64)
        if s and _is_kept(step, burn_in, thin):
            samples[kept] = x
            kept += 1
    rate = accepted / num_steps if num_steps else torch.zeros(c, dtype=torch.float64, device=x.device)
    return ContinuousMCMCResult(samples=samples, final=x, final_energy=e, acceptance_rate=rate)
