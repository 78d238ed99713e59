"""Metropolis independence sampler (MIS) for fixed-length token sequences.

Notation: C parallel chains, T sequence length, V vocabulary, S kept states per chain.

Target: p(x) = exp(-E(x)) / Z for an energy ``energy(x: LongTensor (N, T)) -> Tensor (N,)``.
MIS is the special case of Metropolis–Hastings (monograph "Energy-based models for speech and
language", §2.3.1, Algorithm 1 with acceptance Eq. (2.22)) whose proposal ignores the current
state, q(x' | x) = q(x'). The acceptance probability then becomes (§2.3.1, "The Metropolis
independence sampler (MIS)", the unnumbered display right after Eq. (2.22) and Algorithm 1):

    r = min{1, w(x') / w(x)},   w(x) = p(x) / q(x) (the usual importance weight),

evaluated in log space with unnormalised weights (Z cancels):

    accept iff log u < [-E(x') - log q(x')] - [-E(x) - log q(x)],   u ~ Uni[0, 1].

``log q`` must be the *exact* log-probability of each draw under the proposal (a wrong log q
gives a chain whose stationary distribution is not p), and the proposal's support must cover
the target's. :func:`autoregressive_proposal` turns seqebm's ancestral sampler
(:func:`seqebm.sampling.sampler.sample`, which returns that exact log q) into such a proposal —
this is how MIS with an autoregressive auxiliary model is used for EBM training in §2.3.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

import torch
from torch import Tensor, nn

from seqebm.sampling.mcmc import MCMCResult, _accept, _check_int, _energy, _is_kept, _keep_schedule
from seqebm.sampling.sampler import sample

Energy = Callable[[Tensor], Tensor]
#: ``proposal(n, generator) -> (x (n, T) LongTensor, log_q (n,) float64)``: n independent draws and
#: the exact log-probability of each under the proposal.
IndependentProposal = Callable[[int, Optional[torch.Generator]], Tuple[Tensor, Tensor]]


def _propose(proposal: IndependentProposal, n: int, generator: torch.Generator | None,
             length: int | None) -> tuple[Tensor, Tensor]:
    out = proposal(n, generator)
    if not isinstance(out, tuple) or len(out) != 2:
        raise ValueError("proposal must return a tuple (x (n, T) LongTensor, log_q (n,) Tensor)")
    x, log_q = out
    if not isinstance(x, Tensor) or x.dtype != torch.long or x.dim() != 2 or x.shape[0] != n or x.shape[1] < 1:
        got = (tuple(x.shape), x.dtype) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"proposal must return x as a LongTensor of shape ({n}, T>=1), got {got}")
    if length is not None and x.shape[1] != length:
        raise ValueError(f"proposal changed the sequence length from {length} to {x.shape[1]}")
    if not isinstance(log_q, Tensor) or log_q.shape != (n,):
        got = tuple(log_q.shape) if isinstance(log_q, Tensor) else type(log_q).__name__
        raise ValueError(f"proposal must return log_q as a Tensor of shape ({n},), got {got}")
    return x, log_q.detach().to(torch.float64)


def metropolis_independence(
    energy: Energy,
    proposal: IndependentProposal,
    *,
    num_chains: int,
    num_steps: int,
    generator: torch.Generator | None = None,
    burn_in: int = 0,
    thin: int = 1,
) -> MCMCResult:
    """Run C Metropolis independence samplers in parallel (§2.3.1, MIS; Eq. (2.22) with q(x'|x) = q(x')).

    Every chain starts at its own first proposal draw (always accepted; not counted as a step).
    Each of the ``num_steps`` transitions makes exactly one ``proposal(C, generator)`` call and
    one ``energy`` call on the C proposals, and accepts per chain iff
    log u < [-E(x') - log q(x')] - [-E(x) - log q(x)] (float64; NaN ratios reject).

    Args:
        energy: callable LongTensor (N, T) -> Tensor (N,), p(x) ∝ exp(-E(x)).
        proposal: ``proposal(n, generator) -> (x (n, T) LongTensor, log_q (n,))``, independent draws
            with their exact log-probabilities under q (support must cover the target's).
        num_chains: C.
        num_steps: MIS transitions per chain.
        generator: torch random generator, passed to ``proposal`` and used for the uniforms
            (on the device of the proposals).
        burn_in: transitions discarded before keeping states.
        thin: keep every ``thin``-th state after burn-in.

    Returns:
        :class:`~seqebm.sampling.mcmc.MCMCResult` with samples (S, C, T),
        S = (num_steps - burn_in) // thin, the final states and energies, and the per-chain
        acceptance rate over the ``num_steps`` transitions.

    Raises:
        ValueError: on malformed knobs, proposal outputs or energy outputs.
    """
    _check_int("num_chains", num_chains, 1)
    _check_int("num_steps", num_steps, 0)
    if not callable(proposal):
        raise ValueError(f"proposal must be callable, got {type(proposal).__name__}")
    s = _keep_schedule(num_steps, burn_in, thin, True)
    c = num_chains
    x, log_q = _propose(proposal, c, generator, None)  # (C, T), (C,)
    t = x.shape[1]
    e = _energy(energy, x)  # (C,)
    log_w = -e - log_q  # (C,) log unnormalised importance weight of the current state
    samples = torch.empty((s, c, t), dtype=torch.long, device=x.device)
    accepted = torch.zeros(c, dtype=torch.float64, device=x.device)
    kept = 0
    for step in range(1, num_steps + 1):
        x_new, log_q_new = _propose(proposal, c, generator, t)
        e_new = _energy(energy, x_new)  # (C,)
        log_w_new = -e_new - log_q_new.to(x_new.device)
        accept, (x, e, log_w) = _accept(log_w_new - log_w, (x_new, x), (e_new, e), (log_w_new, log_w),
                                        generator=generator)
        accepted += accept.to(torch.float64)
        if s and _is_kept(step, burn_in, thin):
            samples[kept] = x
            kept += 1
    rate = accepted / num_steps if num_steps else torch.zeros(c, dtype=torch.float64, device=x.device)
    return MCMCResult(samples=samples, final=x, final_energy=e, acceptance_rate=rate)


def autoregressive_proposal(model: nn.Module, length: int, *, bos_id: int, **sample_kwargs: Any
                            ) -> IndependentProposal:
    """Wrap :func:`seqebm.sampling.sampler.sample` as an independent MIS proposal.

    ``proposal(n, generator)`` draws n sequences of exactly ``length`` tokens continuing the
    one-token prefix ``[bos_id]`` (no EOS) and returns ``(tokens (n, length), log_q (n,) float64)``
    with log_q = :attr:`SampleOutput.log_q`, the exact log-probability under the proposal actually
    sampled (after temperature / top-k / top-p). Note that top-k / top-p truncation shrinks the
    proposal's support, which then may not cover the target's (MIS is then not exact).

    Args:
        model: an autoregressive model accepted by ``sample`` (e.g. TransformerLM); ``bos_id`` must
            be a valid input token of it.
        length: T, number of generated tokens.
        bos_id: prefix token id.
        **sample_kwargs: forwarded to ``sample`` (temperature, top_k, top_p, max_batch_tokens, ...);
            ``eos_id``, ``min_new_tokens``, ``prefix``, ``max_new_tokens``, ``num_samples`` and
            ``generator`` are not allowed.

    Raises:
        ValueError: on a bad length / bos_id or a forbidden keyword.
    """
    _check_int("length", length, 1)
    _check_int("bos_id", bos_id, 0)
    forbidden = {"eos_id", "min_new_tokens", "prefix", "max_new_tokens", "num_samples", "generator"}
    bad = sorted(forbidden & set(sample_kwargs))
    if bad:
        raise ValueError(f"autoregressive_proposal does not accept {bad}: sequences have fixed length "
                         f"{length} without EOS, and n / generator come from the MIS call")

    def proposal(n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")
        prefix = torch.full((1, 1), bos_id, dtype=torch.long, device=device)
        out = sample(model, prefix, max_new_tokens=length, num_samples=n, generator=generator, **sample_kwargs)
        return out.tokens, out.log_q

    return proposal
