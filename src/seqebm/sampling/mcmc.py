"""Markov chain Monte Carlo over fixed-length token sequences: Metropolis–Hastings and Gibbs.

Notation: C parallel chains, T sequence length, V vocabulary, S kept states per chain.

Target: p(x) = exp(-E(x)) / Z for an energy ``energy(x: LongTensor (N, T)) -> Tensor (N,)``
(lower energy = more likely). Z is never needed: it cancels in the MH ratio and in the Gibbs
conditionals. References are to the monograph "Energy-based models for speech and language",
§2.3.1 (Markov chain Monte Carlo).

* :func:`metropolis_hastings` — Algorithm 1 with acceptance probability Eq. (2.22),
  r = min{1, p(x') q(x|x') / (p(x) q(x'|x))}, evaluated in log space:
  accept iff log u < -E(x') + E(x) + log q(x|x') - log q(x'|x), u ~ Uni[0, 1].
  The built-in ``"uniform_site"`` proposal resamples one uniformly chosen position with a
  uniformly chosen token; it is symmetric (the Metropolis special case), so its log q terms are 0.
* :func:`gibbs` — Algorithm 2 (Gibbs sampler): each site update draws x_i from the exact
  conditional p(x_i | x_\\i) ∝ exp(-E(x with x_i = v)), v = 0..V-1, scored for all chains in one
  batched energy call on C·V sequences. Gibbs is MH with acceptance probability one.

All C chains advance together as one batch; there is no per-chain Python loop. After
``burn_in`` transitions (MH steps or Gibbs sweeps) every ``thin``-th state is kept, so
``samples`` has S = (num_steps - burn_in) // thin states per chain. Energies are evaluated under
``torch.no_grad()`` and acceptance decisions use float64.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Optional, Tuple

import torch
from torch import Tensor

Energy = Callable[[Tensor], Tensor]
#: ``proposal(x (C, T), generator) -> (x_new (C, T), log q(x_new | x) (C,), log q(x | x_new) (C,))``
Proposal = Callable[[Tensor, Optional[torch.Generator]], Tuple[Tensor, Tensor, Tensor]]


@dataclass
class MCMCResult:
    """Output of :func:`metropolis_hastings` and :func:`gibbs`.

    Attributes:
        samples: LongTensor (S, C, T), the kept states (after ``burn_in``, every ``thin``-th);
            S = 0 when ``keep_samples=False`` or burn-in covers the whole run.
        final: LongTensor (C, T), the last state of every chain.
        final_energy: float64 Tensor (C,), E(final).
        acceptance_rate: float64 Tensor (C,), the fraction of accepted proposals per chain over all
            transitions (ones for Gibbs, whose moves are always accepted).
    """

    samples: Tensor
    final: Tensor
    final_energy: Tensor
    acceptance_rate: Tensor


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_x0(x0: object, vocab_size: int | None) -> Tensor:
    if not isinstance(x0, Tensor):
        raise ValueError(f"x0 must be a LongTensor of shape (C, T), got {type(x0).__name__}")
    if x0.dtype != torch.long:
        raise ValueError(f"x0 must have dtype torch.long, got {x0.dtype}")
    if x0.dim() != 2 or x0.shape[0] < 1 or x0.shape[1] < 1:
        raise ValueError(f"x0 must have shape (C, T) with C, T >= 1, got {tuple(x0.shape)}")
    if vocab_size is not None and (x0.min() < 0 or x0.max() >= vocab_size):
        raise ValueError(f"x0 tokens must lie in [0, {vocab_size}), got range "
                         f"[{int(x0.min())}, {int(x0.max())}]")
    return x0


def _energy(energy: Energy, x: Tensor) -> Tensor:
    with torch.no_grad():
        e = energy(x)
    if not isinstance(e, Tensor) or e.shape != (x.shape[0],):
        got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
        raise ValueError(f"energy must return a Tensor of shape ({x.shape[0]},) for input {tuple(x.shape)}, got {got}")
    return e.detach().to(torch.float64)


def _keep_schedule(num_steps: int, burn_in: int, thin: int, keep_samples: bool) -> int:
    _check_int("burn_in", burn_in, 0)
    _check_int("thin", thin, 1)
    if burn_in > num_steps:
        raise ValueError(f"burn_in ({burn_in}) must not exceed the number of transitions ({num_steps})")
    return (num_steps - burn_in) // thin if keep_samples else 0


def _is_kept(step: int, burn_in: int, thin: int) -> bool:
    """Whether the state after transition ``step`` (1-based) is kept."""
    return step > burn_in and (step - burn_in) % thin == 0


def _accept(log_ratio: Tensor, *pairs: tuple[Tensor, Tensor],
            generator: torch.Generator | None) -> tuple[Tensor, list[Tensor]]:
    """Metropolis test ``log u < log_ratio`` per chain (NaN rejects), float64.

    ``pairs`` are (proposed, current) tensors with chains on dim 0; returns the acceptance mask
    (C,) and, for each pair, the proposed rows where accepted and the current rows elsewhere.
    """
    c = log_ratio.shape[0]
    log_u = torch.log(torch.rand(c, dtype=torch.float64, generator=generator, device=log_ratio.device))
    accept = log_u < log_ratio  # (C,)
    kept = [torch.where(accept.view(-1, *([1] * (new.dim() - 1))), new, cur) for new, cur in pairs]
    return accept, kept


def _uniform_site_proposal(x: Tensor, vocab_size: int, generator: torch.Generator | None
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """Set one uniformly chosen position of every chain to a uniformly chosen token (symmetric)."""
    c, t = x.shape
    pos = torch.randint(t, (c,), generator=generator, device=x.device)  # (C,)
    tok = torch.randint(vocab_size, (c,), generator=generator, device=x.device)  # (C,)
    x_new = x.clone()
    x_new[torch.arange(c, device=x.device), pos] = tok
    zeros = torch.zeros(c, dtype=torch.float64, device=x.device)
    return x_new, zeros, zeros


def metropolis_hastings(
    energy: Energy,
    x0: Tensor,
    *,
    num_steps: int,
    proposal: Literal["uniform_site"] | Proposal = "uniform_site",
    vocab_size: int | None = None,
    generator: torch.Generator | None = None,
    burn_in: int = 0,
    thin: int = 1,
    keep_samples: bool = True,
) -> MCMCResult:
    """Run C Metropolis–Hastings chains in parallel (§2.3.1, Algorithm 1, Eq. 2.22).

    Args:
        energy: callable LongTensor (N, T) -> Tensor (N,); called once on x0 and once per step on
            the C proposals.
        x0: LongTensor (C, T), initial states.
        num_steps: number of MH transitions per chain.
        proposal: ``"uniform_site"`` (needs ``vocab_size``) or a callable
            ``proposal(x (C, T), generator) -> (x_new (C, T), log_q_forward (C,), log_q_backward (C,))``
            with log_q_forward = log q(x_new | x) and log_q_backward = log q(x | x_new).
        vocab_size: V; required for ``"uniform_site"``; when given, x0 and proposals are range-checked.
        generator: torch random generator on x0's device (reproducibility).
        burn_in: transitions discarded before keeping states.
        thin: keep every ``thin``-th state after burn-in.
        keep_samples: if False, only the final state is returned (``samples`` has S = 0).

    Returns:
        :class:`MCMCResult` with samples (S, C, T), S = (num_steps - burn_in) // thin.

    Raises:
        ValueError: on malformed x0, knobs, proposal outputs or energy outputs.
    """
    _check_int("num_steps", num_steps, 0)
    if vocab_size is not None:
        _check_int("vocab_size", vocab_size, 1)
    if isinstance(proposal, str):
        if proposal != "uniform_site":
            raise ValueError(f"unknown proposal {proposal!r}; use 'uniform_site' or a callable")
        if vocab_size is None:
            raise ValueError("proposal='uniform_site' requires vocab_size")
        v = vocab_size

        def propose(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return _uniform_site_proposal(x, v, generator)
    elif callable(proposal):
        user_proposal = proposal

        def propose(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            return user_proposal(x, generator)
    else:
        raise ValueError(f"proposal must be 'uniform_site' or a callable, got {type(proposal).__name__}")
    x = _check_x0(x0, vocab_size).clone()
    s = _keep_schedule(num_steps, burn_in, thin, keep_samples)
    c, t = x.shape
    samples = torch.empty((s, c, t), dtype=torch.long, device=x.device)
    e = _energy(energy, x)  # (C,)
    accepted = torch.zeros(c, dtype=torch.float64, device=x.device)
    kept = 0
    for step in range(1, num_steps + 1):
        x_new, log_qf, log_qb = propose(x)
        if not isinstance(x_new, Tensor) or x_new.shape != x.shape or x_new.dtype != torch.long:
            raise ValueError(f"proposal must return x_new as a LongTensor of shape {tuple(x.shape)}")
        if vocab_size is not None and (x_new.min() < 0 or x_new.max() >= vocab_size):
            raise ValueError(f"proposal returned tokens outside [0, {vocab_size})")
        for name, q in (("log_q_forward", log_qf), ("log_q_backward", log_qb)):
            if not isinstance(q, Tensor) or q.shape != (c,):
                raise ValueError(f"proposal must return {name} as a Tensor of shape ({c},)")
        e_new = _energy(energy, x_new)  # (C,)
        log_ratio = (e - e_new) + (log_qb.to(torch.float64) - log_qf.to(torch.float64))  # (C,)
        accept, (x, e) = _accept(log_ratio, (x_new, x), (e_new, e), generator=generator)
        accepted += accept.to(torch.float64)
        if s and _is_kept(step, burn_in, thin):
            samples[kept] = x
            kept += 1
    rate = accepted / num_steps if num_steps else torch.zeros(c, dtype=torch.float64, device=x.device)
    return MCMCResult(samples=samples, final=x, final_energy=e, acceptance_rate=rate)


def _gibbs_site_update(energy: Energy, x: Tensor, pos: Tensor, vocab_size: int,
                       generator: torch.Generator | None) -> Tensor:
    """Resample x[c, pos[c]] from its exact conditional for every chain c (one energy call).

    Args:
        x: LongTensor (C, T); pos: LongTensor (C,) position per chain.

    Returns:
        LongTensor (C, T), the updated states.
    """
    c, t = x.shape
    cand = x[:, None, :].expand(c, vocab_size, t).clone()  # (C, V, T)
    values = torch.arange(vocab_size, device=x.device)[None, :, None].expand(c, vocab_size, 1)  # (C, V, 1)
    cand.scatter_(2, pos[:, None, None].expand(c, vocab_size, 1), values)
    logits = -_energy(energy, cand.reshape(c * vocab_size, t)).reshape(c, vocab_size)  # (C, V)
    if torch.isnan(logits).any() or (logits == float("-inf")).all(dim=1).any():
        raise ValueError("energy gave NaN or +inf for every value of a site; the conditional is undefined")
    # Gumbel-max: argmax_v (logit_v + G_v), G ~ Gumbel(0, 1), is an exact draw from softmax(logits).
    u = torch.rand((c, vocab_size), dtype=torch.float64, generator=generator, device=x.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
    new_tok = torch.argmax(logits + gumbel, dim=1)  # (C,)
    return cand[torch.arange(c, device=x.device), new_tok]


def gibbs(
    energy: Energy,
    x0: Tensor,
    *,
    num_sweeps: int,
    vocab_size: int,
    scan: Literal["systematic", "random"] = "systematic",
    generator: torch.Generator | None = None,
    burn_in: int = 0,
    thin: int = 1,
    keep_samples: bool = True,
) -> MCMCResult:
    """Run C Gibbs chains in parallel (§2.3.1, Algorithm 2).

    A sweep is T site updates. ``scan="systematic"`` visits positions 0..T-1 in order (as in
    Algorithm 2); ``scan="random"`` draws a uniform position per update, independently per chain.
    Each site update makes one energy call on C·V sequences (every value of the site for every
    chain) and samples from the exact conditional softmax(-E).

    Args:
        energy: callable LongTensor (N, T) -> Tensor (N,).
        x0: LongTensor (C, T), initial states with tokens in [0, V).
        num_sweeps: number of sweeps.
        vocab_size: V.
        scan: ``"systematic"`` or ``"random"``.
        generator: torch random generator on x0's device.
        burn_in: sweeps discarded before keeping states.
        thin: keep the state after every ``thin``-th sweep after burn-in.
        keep_samples: if False, only the final state is returned.

    Returns:
        :class:`MCMCResult` with samples (S, C, T), S = (num_sweeps - burn_in) // thin, and
        acceptance_rate all ones.

    Raises:
        ValueError: on malformed x0 or knobs, or an unknown scan.
    """
    _check_int("num_sweeps", num_sweeps, 0)
    _check_int("vocab_size", vocab_size, 1)
    if scan not in ("systematic", "random"):
        raise ValueError(f"scan must be 'systematic' or 'random', got {scan!r}")
    x = _check_x0(x0, vocab_size).clone()
    s = _keep_schedule(num_sweeps, burn_in, thin, keep_samples)
    c, t = x.shape
    samples = torch.empty((s, c, t), dtype=torch.long, device=x.device)
    kept = 0
    for sweep in range(1, num_sweeps + 1):
        for i in range(t):
            if scan == "systematic":
                pos = torch.full((c,), i, dtype=torch.long, device=x.device)
            else:
                pos = torch.randint(t, (c,), generator=generator, device=x.device)
            x = _gibbs_site_update(energy, x, pos, vocab_size, generator)
        if s and _is_kept(sweep, burn_in, thin):
            samples[kept] = x
            kept += 1
    return MCMCResult(samples=samples, final=x, final_energy=_energy(energy, x),
                      acceptance_rate=torch.ones(c, dtype=torch.float64, device=x.device))
