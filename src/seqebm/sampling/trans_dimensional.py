"""Trans-dimensional MCMC for sentences of varying length (TRF-LM training and sampling).

Notation: C parallel chains, m the maximum length, l a chain's current length, V vocabulary.

Target: p(l, x) ∝ exp(log p̃(x)) over sentences of 1..m words, e.g. a TRF-LM's
log π_l − ζ_l + U(x) (monograph §3.2.2, Eq. 3.5, with the current ζ estimates). Two
Metropolis–Hastings moves (monograph §2.3.1, Algorithm 1, acceptance Eq. 2.22) keep it invariant:

* **Metropolis independence move** (MIS, §2.3.1): propose a whole sentence x' ~ q from an
  autoregressive sentence LM (:class:`~seqebm.models.sentence_lm.BoundedSentenceLM`, exact log q
  over all lengths) and accept with min{1, w(x')/w(x)}, w = p̃/q. The length changes freely.
* **Local jump** (the TRF papers' length-changing move): with probability ½ try to grow the
  sentence by one word w ~ g(·|x) (the LM's next-word distribution), otherwise try to drop its
  last word. With Γ(l→l+1) = Γ(l+1→l) = ½ (a move outside 1..m is rejected) the acceptance
  ratios are

      grow:  p̃(x w) / p̃(x) / g(w | x),       drop:  p̃(x_{<l}) / p̃(x) · g(x_l | x_{<l}).

Both are tested against the exact target by enumeration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from seqebm.sampling.mcmc import _accept

__all__ = ["SentenceChains", "mis_move", "local_jump_move", "trans_dimensional_mcmc"]

LogTarget = Callable[[Tensor, Tensor], Tensor]  # (tokens (N, T), mask (N, T)) -> (N,)


@dataclass
class SentenceChains:
    """C chain states: tokens (C, m) right-padded with 0, mask (C, m), log p̃ (C,) float64."""

    tokens: Tensor
    mask: Tensor
    log_target: Tensor

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(1)


def _uniform(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    dev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, dtype=torch.float64, generator=generator, device=dev).to(device)


def _eval(log_target: LogTarget, tokens: Tensor, mask: Tensor) -> Tensor:
    width = max(1, int(mask.sum(1).max()))
    return log_target(tokens[:, :width], mask[:, :width]).detach().double()


@torch.no_grad()
def mis_move(chains: SentenceChains, log_target: LogTarget, proposal, generator: torch.Generator | None = None
             ) -> tuple[SentenceChains, Tensor]:
    """One Metropolis independence move per chain; returns the new chains and the accept mask (C,)."""
    c, m = chains.tokens.shape
    x, mask, log_q_new = proposal.sample(c, generator, device=chains.tokens.device)
    if x.shape != (c, m):
        raise ValueError(f"proposal returned sentences of shape {tuple(x.shape)}, chains have {(c, m)}")
    log_q_cur = proposal.log_prob(chains.tokens, chains.mask).double()
    t_new = _eval(log_target, x, mask)
    log_ratio = (t_new - log_q_new.double()) - (chains.log_target - log_q_cur)
    accept, (tok, msk, lt) = _accept(log_ratio, (x, chains.tokens), (mask, chains.mask),
                                     (t_new, chains.log_target), generator=generator)
    return SentenceChains(tok, msk, lt), accept


@torch.no_grad()
def local_jump_move(chains: SentenceChains, log_target: LogTarget, proposal,
                    generator: torch.Generator | None = None) -> tuple[SentenceChains, Tensor]:
    """One grow-or-drop move per chain (see the module docstring); returns chains and accept mask (C,)."""
    tokens, mask = chains.tokens, chains.mask
    c, m = tokens.shape
    dev = tokens.device
    rows = torch.arange(c, device=dev)
    lengths = mask.sum(1)
    grow = _uniform(c, generator, dev) < 0.5
    valid = torch.where(grow, lengths < m, lengths > 1)
    # grow: w ~ g(.|x) written at position l
    log_g = proposal.next_word_log_probs(tokens, mask).double()  # (C, V)
    u = _uniform(c, generator, dev)[:, None]
    cdf = log_g.exp().cumsum(-1)
    w = torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(-1).clamp_max(log_g.shape[1] - 1)
    w = torch.where(log_g.gather(1, w[:, None]).squeeze(1).isfinite(), w, log_g.argmax(-1))
    new_tokens, new_mask = tokens.clone(), mask.clone()
    at = lengths.clamp_max(m - 1)
    up = grow & valid
    new_tokens[rows[up], at[up]] = w[up]
    new_mask[rows[up], at[up]] = True
    # drop: remove the last word (position l - 1)
    down = ~grow & valid
    last = (lengths - 1).clamp_min(0)
    dropped = tokens[rows, last]
    new_tokens[rows[down], last[down]] = 0
    new_mask[rows[down], last[down]] = False
    t_new = torch.full((c,), float("-inf"), dtype=torch.float64, device=dev)
    if bool(valid.any()):
        t_new[valid] = _eval(log_target, new_tokens[valid], new_mask[valid])
    log_ratio = t_new - chains.log_target
    log_ratio = log_ratio - torch.where(up, log_g.gather(1, w[:, None]).squeeze(1), 0.0)
    if bool(down.any()):
        back = torch.zeros(c, dtype=torch.float64, device=dev)
        back[down] = proposal.next_word_log_probs(new_tokens[down], new_mask[down]).double().gather(
            1, dropped[down, None]).squeeze(1)
        log_ratio = log_ratio + back
    log_ratio = torch.where(valid, log_ratio, torch.full_like(log_ratio, float("-inf")))
    accept, (tok, msk, lt) = _accept(log_ratio, (new_tokens, tokens), (new_mask, mask),
                                     (t_new, chains.log_target), generator=generator)
    return SentenceChains(tok, msk, lt), accept


@dataclass
class TDResult:
    chains: SentenceChains  # final states
    samples: list[tuple[Tensor, Tensor]]  # kept (tokens, mask) after every sweep past burn-in
    mis_acceptance: float
    jump_acceptance: float


@torch.no_grad()
def trans_dimensional_mcmc(log_target: LogTarget, proposal, *, num_chains: int, num_sweeps: int,
                           local_jumps: int = 1, mis: bool = True, burn_in: int = 0,
                           chains: SentenceChains | None = None, generator: torch.Generator | None = None
                           ) -> TDResult:
    """Run C chains for ``num_sweeps`` sweeps, each one MIS move (if ``mis``) then ``local_jumps`` jumps.

    Chains start from ``chains`` or from one proposal draw each. ``proposal`` provides
    ``sample(n, generator, device=...)``, ``log_prob(tokens, mask)`` and
    ``next_word_log_probs(tokens, mask)`` (a :class:`~seqebm.models.sentence_lm.BoundedSentenceLM`).
    """
    if num_chains < 1 or num_sweeps < 0 or local_jumps < 0 or burn_in < 0:
        raise ValueError(f"need num_chains >= 1 and num_sweeps, local_jumps, burn_in >= 0; got {num_chains}, "
                         f"{num_sweeps}, {local_jumps}, {burn_in}")
    if not mis and local_jumps == 0:
        raise ValueError("at least one kind of move is needed (mis=True or local_jumps >= 1)")
    if chains is None:
        dev = next((b.device for b in proposal.buffers()), torch.device("cpu"))
        x, mask, _ = proposal.sample(num_chains, generator, device=dev)
        chains = SentenceChains(x, mask, _eval(log_target, x, mask))
    elif chains.tokens.shape[0] != num_chains:
        raise ValueError(f"chains hold {chains.tokens.shape[0]} states, num_chains={num_chains}")
    samples, acc_mis, acc_jump = [], [], []
    for sweep in range(num_sweeps):
        if mis:
            chains, a = mis_move(chains, log_target, proposal, generator)
            acc_mis.append(a.double().mean())
        for _ in range(local_jumps):
            chains, a = local_jump_move(chains, log_target, proposal, generator)
            acc_jump.append(a.double().mean())
        if sweep >= burn_in:
            samples.append((chains.tokens.clone(), chains.mask.clone()))
    mean = (lambda xs: float(torch.stack(xs).mean()) if xs else float("nan"))
    return TDResult(chains, samples, mean(acc_mis), mean(acc_jump))
