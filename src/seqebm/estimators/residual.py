"""Perplexity bounds and per-position probabilities of a residual EBM (residual-EBM seed §3.2).

Notation: B sequences of total length T (BOS + prefix + continuation, fixed length as in the
seed's analysis), p prefix length (BOS included), n LM samples per estimate, V vocabulary.

The joint model's log-likelihood of a continuation is
log P_θ(x) = log P_LM(x) − E_θ(x) − log Z_θ(prefix), and log Z_θ(prefix) = log E_{P_LM}[exp(−E)]
is estimated from n LM samples with Nowozin's lower/upper estimates (Thm. 2, Eq. 4;
:func:`seqebm.estimators.log_partition_bounds`). An *upper* estimate of log Z gives a *lower*
estimate of log P_θ and so an *upper* estimate of the perplexity, and vice versa. When the
samples come from a truncated/tempered proposal r (top-k), the weights are
exp(−E)·P_LM/r (the sampler returns both log-probabilities), which keeps the estimate exact in
expectation where r covers P_LM's support; top-k never does, so its bounds are of the top-k
truncated normaliser (stated in the results).

Per-position probabilities (Eq. 5): marginalising the future,

    P(x_t | x_<t) = P_LM(x_t | x_<t) · E_{x'∼P_LM(·|x_≤t)}[e^{−E(x_≤t, x'_{>t})}]
                                    / E_{x'∼P_LM(·|x_<t)}[e^{−E(x_<t, x'_{≥t})}],

with numerator and denominator estimated like Z (lower bound = lower numerator − upper
denominator). At the last position t = T both are exact: the numerator is e^{−E(x)} and the
denominator a sum over the V values of x_T (enumerated in batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from seqebm.estimators.nowozin import LogPartitionBounds, log_partition_bounds
from seqebm.sampling.sampler import sample


def residual_log_weights(energy: Tensor, log_p: Tensor | None = None, log_q: Tensor | None = None) -> Tensor:
    """log w = −E (+ log P_LM − log r when the samples came from a proposal r ≠ P_LM), float64."""
    lw = -energy.double()
    if (log_p is None) != (log_q is None):
        raise ValueError("give both log_p (LM) and log_q (proposal) or neither")
    if log_p is not None:
        lw = lw + log_p.double() - log_q.double()
    return lw


@dataclass
class JointLogProbBounds:
    """Lower / upper estimates of log P_θ(continuation | prefix) per row, with the log Z bounds used."""

    lower: Tensor
    upper: Tensor
    log_z: LogPartitionBounds


def joint_log_prob_bounds(lm_log_prob: Tensor, energy: Tensor, sample_log_weights: Tensor) -> JointLogProbBounds:
    """log P_θ = log P_LM − E − log Z with log Z bracketed by ``sample_log_weights`` (B, n).

    Args:
        lm_log_prob: (B,) log P_LM(continuation | prefix) of the evaluated sequences.
        energy: (B,) E_θ of the evaluated sequences.
        sample_log_weights: (B, n) :func:`residual_log_weights` of n LM samples per prefix.
    """
    if lm_log_prob.shape != energy.shape or sample_log_weights.shape[:-1] != energy.shape:
        raise ValueError(f"shapes must be (B,), (B,), (B, n); got {tuple(lm_log_prob.shape)}, "
                         f"{tuple(energy.shape)}, {tuple(sample_log_weights.shape)}")
    z = log_partition_bounds(sample_log_weights)
    base = lm_log_prob.double() - energy.double()
    return JointLogProbBounds(lower=base - z.upper, upper=base - z.lower, log_z=z)


def perplexity_bounds(lower: Tensor, upper: Tensor, num_tokens: Tensor | int) -> dict[str, float]:
    """Perplexity bounds from per-row log-probability bounds over ``num_tokens`` predicted tokens.

    Returns ``{"ppl_lower": exp(−Σ upper / N), "ppl_upper": exp(−Σ lower / N), "tokens": N}``.
    """
    n = float(num_tokens.sum()) if isinstance(num_tokens, Tensor) else float(num_tokens)
    if n <= 0:
        raise ValueError("num_tokens must be positive")
    return {"ppl_lower": math.exp(min(-float(upper.sum()) / n, 700.0)),
            "ppl_upper": math.exp(min(-float(lower.sum()) / n, 700.0)), "tokens": n}


def _energies(model: nn.Module, tokens: Tensor, batch_size: int) -> Tensor:
    out = []
    for i in range(0, tokens.shape[0], batch_size):
        chunk = tokens[i:i + batch_size]
        out.append(model.energy(chunk, torch.ones_like(chunk, dtype=torch.bool)).double())
    return torch.cat(out)


@torch.no_grad()
def sample_log_weights(model: nn.Module, prefix: Tensor, *, num_samples: int, max_new_tokens: int,
                       top_k: int | None = None, generator: torch.Generator | None = None,
                       max_batch_tokens: int | None = None, energy_batch_size: int = 4096) -> Tensor:
    """Draw n LM continuations of every prefix row (shared-prefix engine) and return their
    log weights (B, n) for log Z_θ(prefix) (:func:`residual_log_weights`)."""
    b = prefix.shape[0]
    out = sample(model.lm, prefix, max_new_tokens=max_new_tokens, num_samples=num_samples, top_k=top_k,
                 generator=generator, max_batch_tokens=max_batch_tokens)
    shared = getattr(getattr(model, "energy_net", None), "shared_prefix_energy", None)
    if shared is not None:  # the energy also reads each prefix once (UniT on a Transformer LM)
        rows_per_call = max(1, energy_batch_size // num_samples)
        e = torch.cat([shared(prefix[i:i + rows_per_call],
                              out.tokens.view(b, num_samples, -1)[i:i + rows_per_call]).double()
                       for i in range(0, b, rows_per_call)])
    else:
        full = torch.cat([prefix.repeat_interleave(num_samples, 0), out.tokens], 1)  # (B·n, T)
        e = _energies(model, full, energy_batch_size).view(b, num_samples)
    if top_k is None:
        return residual_log_weights(e)
    return residual_log_weights(e, out.log_p.view(b, num_samples), out.log_q.view(b, num_samples))


@torch.no_grad()
def last_position_distribution(model: nn.Module, tokens: Tensor, *, energy_batch_size: int = 4096) -> Tensor:
    """Exact log P_θ(x_T = v | x_<T) for every v, shape (B, V) float64 (Eq. 5 at t = T).

    log P(v | x_<T) = log P_LM(v | x_<T) − E(x_<T, v) − logsumexp_u[log P_LM(u | x_<T) − E(x_<T, u)].
    """
    b, t = tokens.shape
    logits = model.lm(tokens[:, :-1])[:, -1].double()  # (B, V)
    log_p_lm = torch.log_softmax(logits, -1)
    v = log_p_lm.shape[1]
    cand = tokens[:, None, :].expand(b, v, t).clone()
    cand[:, :, -1] = torch.arange(v, device=tokens.device)
    e = _energies(model, cand.reshape(b * v, t), energy_batch_size).view(b, v)
    joint = log_p_lm - e
    return joint - torch.logsumexp(joint, -1, keepdim=True)


@dataclass
class PositionLogProb:
    """Per-position log P_θ(x_t | x_<t) estimates (Eq. 5), each (B,) float64."""

    lower: Tensor
    upper: Tensor
    estimate: Tensor  # jackknife numerator minus jackknife denominator
    lm: Tensor  # log P_LM(x_t | x_<t)


@torch.no_grad()
def position_log_prob(model: nn.Module, tokens: Tensor, position: int, *, num_samples: int,
                      top_k: int | None = None, generator: torch.Generator | None = None,
                      max_batch_tokens: int | None = None, exact_last: bool = True) -> PositionLogProb:
    """Bounds on log P_θ(x_t | x_<t) at 0-based ``position`` t of fixed-length ``tokens`` (B, T).

    The last position (t = T − 1) is computed exactly (lower = upper = estimate) unless
    ``exact_last=False``: then its denominator E_{x_T∼P_LM}[e^{−E}] is bracketed from
    ``num_samples`` LM draws like every other position (the numerator e^{−E(x)} has no future
    and stays exact), which measures how tight the sampled bounds are against the exact value.
    """
    b, t_len = tokens.shape
    if not 1 <= position < t_len:
        raise ValueError(f"position must be in [1, {t_len - 1}] (0 is BOS), got {position}")
    lm_lp = torch.log_softmax(model.lm(tokens[:, :position]).double()[:, -1], -1)
    lm_lp = lm_lp.gather(1, tokens[:, position:position + 1]).squeeze(1)
    if position == t_len - 1 and exact_last:
        exact = last_position_distribution(model, tokens).gather(1, tokens[:, -1:]).squeeze(1)
        return PositionLogProb(lower=exact, upper=exact, estimate=exact, lm=lm_lp)
    kw = dict(num_samples=num_samples, top_k=top_k, generator=generator, max_batch_tokens=max_batch_tokens)
    if position == t_len - 1:
        minus_e = -_energies(model, tokens, 4096)
        den = log_partition_bounds(sample_log_weights(model, tokens[:, :position], max_new_tokens=1, **kw))
        return PositionLogProb(lower=lm_lp + minus_e - den.upper, upper=lm_lp + minus_e - den.lower,
                               estimate=lm_lp + minus_e - den.jackknife, lm=lm_lp)
    num = log_partition_bounds(sample_log_weights(model, tokens[:, :position + 1],
                                                  max_new_tokens=t_len - position - 1, **kw))
    den = log_partition_bounds(sample_log_weights(model, tokens[:, :position], max_new_tokens=t_len - position,
                                                  **kw))
    return PositionLogProb(lower=lm_lp + num.lower - den.upper, upper=lm_lp + num.upper - den.lower,
                           estimate=lm_lp + num.jackknife - den.jackknife, lm=lm_lp)
