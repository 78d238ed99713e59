"""Markov transition kernels: one call = a few MCMC moves that leave p(x) ∝ exp(−E(x)) invariant.

A kernel is a callable ``kernel(energy, x, generator) -> x_new`` with x of shape (C, ...) (C
chains). The learning rules of the monograph's §2.3.3 (CD-k, PCD / stochastic maximum
likelihood, Algorithm 5–6) only need "move the chains a few steps under the current model", so
they take a kernel and stay agnostic of the state space: token sequences (Gibbs, MH), binary
RBM visibles (block Gibbs) or continuous vectors (Langevin, HMC).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from torch import Tensor

Energy = Callable[[Tensor], Tensor]
Kernel = Callable[[Energy, Tensor, Optional[torch.Generator]], Tensor]


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def gibbs_kernel(vocab_size: int, *, sweeps: int = 1, scan: Literal["systematic", "random"] = "systematic") -> Kernel:
    """``sweeps`` Gibbs sweeps over token sequences (§2.3.1, Algorithm 2; :func:`~seqebm.sampling.mcmc.gibbs`)."""
    from seqebm.sampling.mcmc import gibbs

    _positive("vocab_size", vocab_size)
    _positive("sweeps", sweeps)

    def kernel(energy: Energy, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return gibbs(energy, x, num_sweeps=sweeps, vocab_size=vocab_size, scan=scan, generator=generator,
                     keep_samples=False).final

    return kernel


def metropolis_kernel(vocab_size: int, *, steps: int = 1) -> Kernel:
    """``steps`` single-site Metropolis moves (§2.3.1, Algorithm 1, uniform-site proposal)."""
    from seqebm.sampling.mcmc import metropolis_hastings

    _positive("vocab_size", vocab_size)
    _positive("steps", steps)

    def kernel(energy: Energy, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return metropolis_hastings(energy, x, num_steps=steps, vocab_size=vocab_size, generator=generator,
                                   keep_samples=False).final

    return kernel


def block_gibbs_kernel(*, steps: int = 1) -> Kernel:
    """``steps`` v → h → v block-Gibbs moves of an RBM (§2.2.2, Eq. 2.11–2.12); ``energy`` must be
    a :class:`~seqebm.models.classic.RBM` (or anything with a ``block_gibbs(v, steps, generator=)``)."""
    _positive("steps", steps)

    def kernel(energy: Energy, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if not hasattr(energy, "block_gibbs"):
            raise ValueError(f"block_gibbs_kernel needs an RBM-like model with block_gibbs(), got {type(energy).__name__}")
        return energy.block_gibbs(x, steps, generator=generator)

    return kernel


def langevin_kernel(step_size: float, *, steps: int = 1, metropolis: bool = True,
                    clamp: tuple[float, float] | None = None) -> Kernel:
    """``steps`` Langevin moves on continuous states: MALA (exact) or ULA with ``metropolis=False``
    (§2.3.1, Eq. 2.23; :func:`~seqebm.sampling.langevin_dynamics.langevin`)."""
    from seqebm.sampling.langevin_dynamics import langevin

    _positive("steps", steps)

    def kernel(energy: Energy, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return langevin(energy, x, num_steps=steps, step_size=step_size, metropolis=metropolis, clamp=clamp,
                        generator=generator, keep_samples=False).final

    return kernel


def hmc_kernel(step_size: float, num_leapfrog: int, *, steps: int = 1) -> Kernel:
    """``steps`` HMC transitions (:func:`~seqebm.sampling.hamiltonian.hmc`)."""
    from seqebm.sampling.hamiltonian import hmc

    _positive("steps", steps)

    def kernel(energy: Energy, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return hmc(energy, x, num_steps=steps, step_size=step_size, num_leapfrog=num_leapfrog,
                   generator=generator, keep_samples=False).final

    return kernel
