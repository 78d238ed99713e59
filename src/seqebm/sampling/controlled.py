"""Samplers for controlled generation from a product of experts p(x) ∝ exp(−E(x)).

Notation: C chains (batch), T length, V vocabulary, K experts, k candidates per prompt, m draws,
P prompt length (BOS included), L new tokens, S kept states per chain.

The energy is a :class:`~seqebm.models.experts.ProductOfExperts` E = Σ_i α_i E_i (monograph
§4.4.2, Eq. 4.36) or any callable ``energy(tokens (N, T)[, mask]) -> (N,)``. The three samplers of
the monograph's Table 2.1 (§2.5) for controlled text generation:

* :func:`mh_mlm` — Metropolis–Hastings within Gibbs with a masked-LM proposal (§4.4.2, the
  mix-and-match sampler; §2.3.1, Algorithm 1 / Eq. 2.22). At each step one position i of every
  chain is masked, a token is drawn from the MLM conditional q(v | x_\\i) and the move is accepted
  with probability

      min{1, exp(−E(x')) q(x_i | x_\\i) / (exp(−E(x)) q(x'_i | x_\\i))},

  the display after Eq. 4.36: x and x' share the masked context x_\\i, so one MLM call gives both
  the forward and the reverse proposal probabilities. The proposal ignores the current x_i, so
  each site update is a Metropolis independence step (the monograph's footnote 9). Exact for any
  MLM whose support covers the target's.
* :func:`cold_decode` — COLD (§4.4.2, "Constrained decoding with Langevin dynamics", Eq. 4.37;
  §2.3.1 Langevin dynamics): gradient steps with Gaussian noise on soft logits ỹ (T, V) of the
  soft energy E(softmax(ỹ/τ)), then guided discretisation: y_t = argmax over the LM's top-k
  tokens given y_<t of ỹ_t(v). A decoder (not an exact sampler).
* :func:`snis_generate` — self-normalised importance sampling / resampling with an
  autoregressive proposal (§2.5, Table 2.1 "SNIS"; residual-EBM seed §3.3, Algorithm 1): draw k
  candidates with :func:`~seqebm.sampling.sampler.sample` (exact proposal log q), weight by
  exp(−E(x))·p_LM(x)^[include_base] / q(x), resample with
  :func:`~seqebm.sampling.resampling.importance_resample`. Exact as k → ∞.

Annealing (MH): at step s the chain targets exp(−E_s(x)/τ_s) with E_s = Σ_i α_i(s) E_i; experts
are scored once per proposal and re-weighted from the cached per-expert energies.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from seqebm.models.experts import ProductOfExperts
from seqebm.models.masked_lm import check_padding_mask
from seqebm.sampling.basic import filter_logits
from seqebm.sampling.langevin_dynamics import _energy_and_grad
from seqebm.sampling.mcmc import MCMCResult, _accept, _check_int, _check_x0, _is_kept, _keep_schedule
from seqebm.sampling.resampling import ResampleResult, gather_candidates, importance_resample
from seqebm.sampling.sampler import inverse_cdf, sample

__all__ = ["ColdResult", "MHMLMResult", "SNISResult", "cold_decode", "geometric_schedule", "guided_discretize",
           "mh_mlm", "snis_generate"]

#: A constant, one value per step, or ``s -> value`` for steps s = 1..num_steps.
Schedule = float | Sequence[float] | Tensor | Callable[[int], float]


def _resolve_schedule(name: str, value: Schedule, num_steps: int, *, allow_zero: bool = False) -> list[float]:
    if callable(value) and not isinstance(value, Tensor):
        values = [value(s) for s in range(1, num_steps + 1)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        values = [float(value)] * num_steps
    elif isinstance(value, (Sequence, Tensor)) and not isinstance(value, str):
        values = [float(v) for v in (value.tolist() if isinstance(value, Tensor) else value)]
        if len(values) != num_steps:
            raise ValueError(f"{name} has {len(values)} values but num_steps={num_steps}")
    else:
        raise ValueError(f"{name} must be a number, a sequence of numbers or a callable step -> number, "
                         f"got {type(value).__name__}")
    for s, v in enumerate(values, 1):
        ok = isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or (allow_zero and v == 0))
        if not ok:
            raise ValueError(f"{name} at step {s} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {v!r}")
    return [float(v) for v in values]


def geometric_schedule(start: float, end: float, num_steps: int) -> list[float]:
    """``num_steps`` values from ``start`` to ``end`` (both > 0) evenly spaced in log space."""
    if not (start > 0 and end > 0) or num_steps < 1:
        raise ValueError(f"need start > 0, end > 0 and num_steps >= 1, got {start}, {end}, {num_steps}")
    if num_steps == 1:
        return [float(start)]
    r = math.log(end / start) / (num_steps - 1)
    return [float(start * math.exp(r * s)) for s in range(num_steps)]


def _progress(n: int, enabled: bool, desc: str):
    if not enabled:
        return range(n)
    from tqdm.auto import tqdm

    return tqdm(range(n), desc=desc)


def _plain_energy(energy: Callable, x: Tensor, mask: Tensor | None) -> Tensor:
    e = energy(x) if mask is None or bool(mask.all()) else energy(x, mask)
    if not isinstance(e, Tensor) or e.shape != (x.shape[0],):
        got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
        raise ValueError(f"energy must return a Tensor of shape ({x.shape[0]},) for tokens {tuple(x.shape)}, got {got}")
    return e.detach().double()


class _Scorer:
    """Per-expert energies (N, K) float64 of a PoE, or (N, 1) of a plain energy callable."""

    def __init__(self, energy: Callable, alpha_schedule: Callable[[int], Mapping[str, float]] | None) -> None:
        if not callable(energy):
            raise TypeError(f"energy must be a ProductOfExperts or a callable (tokens, mask) -> (N,), "
                            f"got {type(energy).__name__}")
        self.poe = energy if isinstance(energy, ProductOfExperts) else None
        if alpha_schedule is not None and self.poe is None:
            raise ValueError("alpha_schedule needs the energy to be a ProductOfExperts")
        if alpha_schedule is not None and not callable(alpha_schedule):
            raise ValueError("alpha_schedule must be a callable step -> {expert name: weight}")
        self.energy, self.alpha_schedule = energy, alpha_schedule
        self.names = list(self.poe.names) if self.poe is not None else ["energy"]
        self.base_alpha = self.poe.alpha_vector() if self.poe is not None else torch.ones(1, dtype=torch.float64)

    def __call__(self, x: Tensor, mask: Tensor) -> Tensor:
        with torch.no_grad():
            if self.poe is None:
                return _plain_energy(self.energy, x, mask)[:, None]
            parts = self.poe.energies(x, mask)
        return torch.stack([parts[n].detach() for n in self.names], 1)

    def alpha(self, step: int) -> Tensor:
        if self.alpha_schedule is None:
            return self.base_alpha
        return self.poe.alpha_vector(self.alpha_schedule(step))


# ---------------------------------------------------------------------------------- MH with an MLM proposal
@dataclass
class MHMLMResult(MCMCResult):
    """:class:`~seqebm.sampling.mcmc.MCMCResult` (samples (S, C, T), final (C, T), final_energy (C,)
    under the un-annealed target, acceptance_rate (C,)) plus:

    Attributes:
        step_acceptance: float64 (num_steps,), the fraction of chains that accepted at each step.
        energy_evals: sequences scored by the energy (C initially, then only changed proposals).
        proposal_evals: MLM rows run (C per step).
        parts: per-expert energies of the final states, name -> (C,) float64.
    """

    step_acceptance: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    energy_evals: int = 0
    proposal_evals: int = 0
    parts: dict[str, Tensor] = field(default_factory=dict)


def _positions(editable: Tensor, schedule: str, step: int, generator: torch.Generator | None) -> Tensor:
    """The position (C,) each chain updates at ``step`` (1-based) among its editable ones."""
    if schedule == "random":
        return torch.multinomial(editable.double(), 1, generator=generator).squeeze(1)
    t = editable.shape[1]
    order = torch.argsort((~editable).long() * t + torch.arange(t, device=editable.device), dim=1)  # editable first
    count = editable.sum(1)
    return order.gather(1, ((step - 1) % count)[:, None]).squeeze(1)


def mh_mlm(
    energy: ProductOfExperts | Callable,
    mlm: nn.Module,
    x0: Tensor,
    *,
    num_steps: int,
    mask: Tensor | None = None,
    editable: Tensor | None = None,
    schedule: str = "random",
    temperature: Schedule = 1.0,
    alpha_schedule: Callable[[int], Mapping[str, float]] | None = None,
    proposal_temperature: float = 1.0,
    top_k: int | None = None,
    banned_ids: Sequence[int] = (),
    generator: torch.Generator | None = None,
    burn_in: int = 0,
    thin: int = 1,
    keep_samples: bool = False,
    progress: bool = False,
    _proposal_correction: bool = True,
) -> MHMLMResult:
    """MH-within-Gibbs with a masked-LM proposal, C chains as one batch (monograph §4.4.2, Eq. 4.36).

    Args:
        energy: a :class:`~seqebm.models.experts.ProductOfExperts` or ``energy(tokens (N, T)[, mask]) -> (N,)``.
        mlm: ``mlm(tokens (C, T), mask (C, T)) -> logits (C, T, >=V)`` with int ``vocab_size`` (V)
            and ``mask_id`` (e.g. :class:`~seqebm.models.masked_lm.MaskedLM`; call ``eval()``).
        x0: LongTensor (C, T), initial states in [0, V) (prompt tokens stay fixed where not editable).
        num_steps: MH steps; each updates one position of every chain.
        mask: (C, T) bool padding mask (True at real tokens, right padding), passed to the MLM
            and the experts; default all True.
        editable: (T,) or (C, T) bool, the positions that may change (default: the real ones).
        schedule: ``"random"`` (uniform position per step and chain) or ``"sweep"`` (left to right
            over the editable positions, cycling; one sweep = an "epoch" of the seed's ref. [105]).
        temperature: τ_s > 0 (constant, per-step values or ``s -> τ_s``): step s targets
            exp(−E_s(x)/τ_s). The final energies are reported under τ = 1 and the given α.
        alpha_schedule: ``s -> {expert name: α}`` overriding weights at step s (PoE only).
        proposal_temperature, top_k: applied to the MLM logits before the softmax of q; ``banned_ids``
            get q = 0. Moves whose reverse probability is 0 are always rejected.
        generator: random source (positions, proposals, acceptance); reproducible runs.
        burn_in, thin, keep_samples: kept states as in :func:`~seqebm.sampling.mcmc.metropolis_hastings`.
        progress: show a tqdm bar.
        _proposal_correction: private, for tests: False drops log q(x_i|·) − log q(x'_i|·) (wrong).

    Returns:
        :class:`MHMLMResult`.

    Raises:
        ValueError / TypeError: malformed inputs (shapes, ids, schedules, an MLM without mask_id,
        a chain without an editable position).
    """
    _check_int("num_steps", num_steps, 0)
    vocab, mask_id = getattr(mlm, "vocab_size", None), getattr(mlm, "mask_id", None)
    if not isinstance(mlm, nn.Module) or not isinstance(vocab, int) or not isinstance(mask_id, int):
        raise TypeError(f"mlm must be an nn.Module with int vocab_size and mask_id, got {type(mlm).__name__}")
    x = _check_x0(x0, vocab).clone()
    c, t = x.shape
    mask = torch.ones_like(x, dtype=torch.bool) if mask is None else check_padding_mask(x, mask)
    if editable is None:
        editable = mask.clone()
    else:
        if not isinstance(editable, Tensor) or editable.dtype != torch.bool or editable.shape not in ((t,), (c, t)):
            raise ValueError(f"editable must be a bool tensor of shape ({t},) or ({c}, {t}), got "
                             f"{tuple(editable.shape) if isinstance(editable, Tensor) else type(editable).__name__}")
        editable = editable.to(x.device).expand(c, t) & mask
    if not bool(editable.any(1).all()):
        raise ValueError(f"chain {int((~editable.any(1)).nonzero()[0, 0])} has no editable real position")
    if schedule not in ("random", "sweep"):
        raise ValueError(f"schedule must be 'random' or 'sweep', got {schedule!r}")
    temps = _resolve_schedule("temperature", temperature, num_steps)
    banned = [int(i) for i in banned_ids]
    if any(not 0 <= i < vocab for i in banned):
        raise ValueError(f"banned_ids must lie in [0, {vocab}), got {banned}")
    scorer = _Scorer(energy, alpha_schedule)
    s_keep = _keep_schedule(num_steps, burn_in, thin, keep_samples)
    samples = torch.empty((s_keep, c, t), dtype=torch.long, device=x.device)
    parts = scorer(x, mask)  # (C, K)
    energy_evals, kept = c, 0
    accepted = torch.zeros(c, dtype=torch.float64, device=x.device)
    step_acc = torch.zeros(num_steps, dtype=torch.float64)
    rows = torch.arange(c, device=x.device)
    for step in _progress(num_steps, progress, "mh-mlm"):
        step += 1
        pos = _positions(editable, schedule, step, generator)  # (C,)
        old = x[rows, pos]
        masked = x.clone()
        masked[rows, pos] = mask_id
        with torch.no_grad():
            logits = mlm(masked, mask)[rows, pos, :vocab].double()  # (C, V)
        if banned:
            logits[:, banned] = float("-inf")
        log_q = torch.log_softmax(filter_logits(logits, temperature=proposal_temperature, top_k=top_k), -1)
        u = torch.rand(c, dtype=torch.float64, generator=generator, device=x.device)
        new = inverse_cdf(log_q, u)  # (C,)
        log_qf, log_qb = log_q.gather(1, new[:, None])[:, 0], log_q.gather(1, old[:, None])[:, 0]
        x_new = x.clone()
        x_new[rows, pos] = new
        parts_new = parts.clone()
        changed = new != old
        n_changed = int(changed.sum())
        if n_changed:
            parts_new[changed] = scorer(x_new[changed], mask[changed])
            energy_evals += n_changed
        alpha = scorer.alpha(step).to(x.device)
        log_ratio = (parts @ alpha - parts_new @ alpha) / temps[step - 1]
        if _proposal_correction:
            log_ratio = log_ratio + (log_qb - log_qf)
        log_ratio = torch.where(changed, log_ratio, torch.zeros_like(log_ratio))  # x' = x: always "accepted"
        accept, (x, parts) = _accept(log_ratio, (x_new, x), (parts_new, parts), generator=generator)
        accepted += accept.double()
        step_acc[step - 1] = accept.double().mean().item()
        if s_keep and _is_kept(step, burn_in, thin):
            samples[kept] = x
            kept += 1
    rate = accepted / num_steps if num_steps else torch.zeros(c, dtype=torch.float64, device=x.device)
    return MHMLMResult(samples=samples, final=x, final_energy=parts @ scorer.base_alpha.to(x.device),
                       acceptance_rate=rate, step_acceptance=step_acc, energy_evals=energy_evals,
                       proposal_evals=c * num_steps, parts={n: parts[:, i] for i, n in enumerate(scorer.names)})


# ---------------------------------------------------------------------------------- COLD
@dataclass
class ColdResult:
    """Output of :func:`cold_decode`.

    Attributes:
        tokens: LongTensor (C, T), the discretised sequences.
        soft_logits: (C, T, V), the final soft logits ỹ.
        energy: float64 (C,), E(tokens) of the discrete sequences (None when ``energy`` has no
            discrete form, i.e. is a plain callable on probabilities).
        soft_energy_trace: float64 (num_steps + 1, C), E(softmax(ỹ/τ)) before each step and at the end.
        energy_evals: soft-energy (+ gradient) rows evaluated, plus the C discrete rows.
    """

    tokens: Tensor
    soft_logits: Tensor
    energy: Tensor | None
    soft_energy_trace: Tensor
    energy_evals: int


@torch.no_grad()
def guided_discretize(lm: nn.Module, soft_logits: Tensor, *, top_k: int, bos_id: int,
                      fixed: Tensor | None = None) -> Tensor:
    """COLD's top-k filtering (monograph §4.4.2): y_t = argmax_{v ∈ top-k of p_LM(·|BOS, y_<t)} ỹ_t(v).

    Args:
        lm: seqebm AR model (``init_state`` / ``step`` protocol); soft_logits: (C, T, V).
        fixed: (C, T) long, a token to force at each position or −1 (free).

    Returns:
        LongTensor (C, T); every free token is among the LM's top-k given the chosen prefix.
    """
    c, t, v = soft_logits.shape
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ValueError(f"top_k must be a positive int, got {top_k!r}")
    state = lm.init_state(c, soft_logits.device)
    logits, state = lm.step(torch.full((c, 1), bos_id, dtype=torch.long, device=soft_logits.device), state)
    out = torch.empty(c, t, dtype=torch.long, device=soft_logits.device)
    for i in range(t):
        cand = logits[:, -1, :v].topk(min(top_k, v), dim=-1).indices  # (C, k)
        pick = cand.gather(1, soft_logits[:, i].gather(1, cand).argmax(1, keepdim=True)).squeeze(1)
        if fixed is not None:
            pick = torch.where(fixed[:, i] >= 0, fixed[:, i], pick)
        out[:, i] = pick
        if i + 1 < t:
            logits, state = lm.step(pick[:, None], state)
    return out


def _soft_energy_fn(energy: Callable) -> Callable[[Tensor], Tensor]:
    """``probs (C, T, V) -> (C,)``: the soft energy of a PoE / expert, or ``energy`` itself."""
    if isinstance(energy, ProductOfExperts) and not energy.supports_soft:
        missing = [n for n in energy.names
                   if energy.alphas[n] > 0 and not getattr(energy.expert(n), "supports_soft", False)]
        raise TypeError(f"experts {missing} have no continuous relaxation (soft_forward); COLD needs one for "
                        "every expert with a weight > 0")
    soft = getattr(energy, "soft_forward", None)
    if callable(soft):
        if not getattr(energy, "supports_soft", True):
            raise TypeError(f"{type(energy).__name__} has no continuous relaxation (soft_forward) for COLD")
        return soft
    if not callable(energy):
        raise TypeError(f"energy must be a PoE, an expert or a callable probs -> (C,), got {type(energy).__name__}")
    return energy


def cold_decode(
    energy: ProductOfExperts | Callable,
    lm: nn.Module,
    *,
    length: int,
    num_chains: int = 1,
    num_steps: int = 100,
    step_size: Schedule = 0.1,
    noise: Schedule | None = None,
    softmax_temperature: float = 1.0,
    top_k: int = 5,
    bos_id: int | None = None,
    fixed: Tensor | None = None,
    init: str | Tensor = "lm",
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> ColdResult:
    """COLD decoding (monograph §4.4.2, Eq. 4.37; Langevin dynamics §2.3.1, Eq. 2.23).

    Iterates ỹ ← ỹ − η_s ∇_ỹ E(π(ỹ)) + σ_s ε, ε ~ N(0, I), s = 1..num_steps, where π(ỹ) =
    softmax(ỹ/τ) per position (one-hot at ``fixed`` positions), then discretises with
    :func:`guided_discretize`. The noise decouples from the step (as in COLD), so this is a noisy
    gradient descent on the soft energy, not an exact sampler of exp(−E).

    Args:
        energy: a PoE whose experts (with α > 0) have ``soft_forward``, an expert with
            ``soft_forward``, or a callable ``probs (C, T, V) -> (C,)`` differentiable in probs.
        lm: the guide AR LM (seqebm protocol, ``vocab_size`` = V), used for the ``"lm"`` init and
            the top-k discretisation; ``bos_id`` defaults to ``lm.bos_id``.
        length: T; num_chains: C.
        step_size: η_s > 0 (constant, per-step values or ``s -> η_s``).
        noise: σ_s >= 0; default geometric from 1.0 down to 0.01 over the steps.
        softmax_temperature: τ > 0.
        top_k: LM candidates per position in the discretisation.
        fixed: (T,) or (C, T) long, a forced token or −1 per position (e.g. a prompt).
        init: ``"lm"`` (the LM's greedy-decoding logits, as in COLD), ``"random"`` (N(0, 1)) or
            a (C, T, V) tensor of initial logits.
        generator: random source of the noise (and the random init).

    Returns:
        :class:`ColdResult`.
    """
    _check_int("length", length, 1)
    _check_int("num_chains", num_chains, 1)
    _check_int("num_steps", num_steps, 0)
    vocab = getattr(lm, "vocab_size", None)
    if not isinstance(lm, nn.Module) or not isinstance(vocab, int):
        raise TypeError(f"lm must be a seqebm AR nn.Module with an int vocab_size, got {type(lm).__name__}")
    bos_id = getattr(lm, "bos_id", None) if bos_id is None else bos_id
    if not isinstance(bos_id, int) or not 0 <= bos_id < vocab:
        raise ValueError(f"bos_id must be an int in [0, {vocab}) (pass bos_id=...), got {bos_id!r}")
    if not (isinstance(softmax_temperature, (int, float)) and softmax_temperature > 0):
        raise ValueError(f"softmax_temperature must be > 0, got {softmax_temperature!r}")
    etas = _resolve_schedule("step_size", step_size, num_steps)
    sigmas = (geometric_schedule(1.0, 0.01, num_steps) if noise is None and num_steps
              else _resolve_schedule("noise", 0.0 if noise is None else noise, num_steps, allow_zero=True))
    c, t = num_chains, length
    device = next(lm.parameters()).device
    if fixed is not None:
        if not isinstance(fixed, Tensor) or fixed.is_floating_point() or fixed.shape not in ((t,), (c, t)):
            raise ValueError(f"fixed must be an integer tensor of shape ({t},) or ({c}, {t}) with -1 at free "
                             f"positions, got {fixed!r}")
        fixed = fixed.long().to(device).expand(c, t)
        if bool(((fixed < -1) | (fixed >= vocab)).any()):
            raise ValueError(f"fixed tokens must be -1 (free) or lie in [0, {vocab})")
    soft_energy = _soft_energy_fn(energy)
    if isinstance(init, Tensor):
        if init.shape != (c, t, vocab) or not init.is_floating_point():
            raise ValueError(f"init logits must be a float tensor of shape ({c}, {t}, {vocab}), "
                             f"got {tuple(init.shape)}")
        y = init.detach().clone().to(device)
    elif init == "random":
        y = torch.randn(c, t, vocab, generator=generator, device=device)
    elif init == "lm":
        y = _greedy_logits(lm, c, t, bos_id, fixed)
    else:
        raise ValueError(f"init must be 'lm', 'random' or a (C, T, V) tensor, got {init!r}")
    one_hot = None
    if fixed is not None:
        one_hot = nn.functional.one_hot(fixed.clamp_min(0), vocab).to(y.dtype)

    def soft_e(logits: Tensor) -> Tensor:
        probs = torch.softmax(logits / softmax_temperature, -1)  # (C, T, V)
        if one_hot is not None:
            probs = torch.where((fixed >= 0)[..., None], one_hot, probs)
        return soft_energy(probs)

    trace = torch.empty(num_steps + 1, c, dtype=torch.float64)
    for s in _progress(num_steps, progress, "cold"):
        e, grad = _energy_and_grad(soft_e, y)
        trace[s] = e.cpu()
        y = y - etas[s] * grad
        if sigmas[s] > 0:
            y = y + sigmas[s] * torch.randn(y.shape, generator=generator, device=y.device, dtype=y.dtype)
    with torch.no_grad():
        trace[num_steps] = soft_e(y).detach().double().cpu()
    tokens = guided_discretize(lm, y, top_k=top_k, bos_id=bos_id, fixed=fixed)
    discrete = None
    if callable(getattr(energy, "soft_forward", None)):  # an expert / PoE also scores discrete tokens
        with torch.no_grad():
            discrete = energy(tokens).double()
    return ColdResult(tokens=tokens, soft_logits=y.detach(), energy=discrete, soft_energy_trace=trace,
                      energy_evals=c * (num_steps + 1) + (c if discrete is not None else 0))


@torch.no_grad()
def _greedy_logits(lm: nn.Module, c: int, t: int, bos_id: int, fixed: Tensor | None) -> Tensor:
    """The LM's next-token logits (C, T, V) along its greedy decoding (forced tokens kept)."""
    device = next(lm.parameters()).device
    state = lm.init_state(c, device)
    logits, state = lm.step(torch.full((c, 1), bos_id, dtype=torch.long, device=device), state)
    out = []
    for i in range(t):
        last = logits[:, -1].float()
        out.append(last)
        tok = last.argmax(-1)
        if fixed is not None:
            tok = torch.where(fixed[:, i] >= 0, fixed[:, i], tok)
        if i + 1 < t:
            logits, state = lm.step(tok[:, None], state)
    return torch.stack(out, 1)


# ---------------------------------------------------------------------------------- SNIS
@dataclass
class SNISResult:
    """Output of :func:`snis_generate`.

    Attributes:
        tokens: LongTensor (B, m, L), the resampled continuations (``pad_id`` after EOS).
        lengths: (B, m) their lengths (EOS included).
        energy: float64 (B, m), E of the scored sequences (prompt after BOS + continuation).
        resample: the :class:`~seqebm.sampling.resampling.ResampleResult` (index (B, m),
            log_weights (B, k), ess (B,)).
        energy_evals: sequences scored (B·k).
    """

    tokens: Tensor
    lengths: Tensor
    energy: Tensor
    resample: ResampleResult
    energy_evals: int

    @property
    def ess(self) -> Tensor:
        return self.resample.ess


@torch.no_grad()
def snis_generate(
    energy: ProductOfExperts | Callable,
    lm: nn.Module,
    prompt: Tensor,
    *,
    num_candidates: int,
    max_new_tokens: int,
    num_draws: int = 1,
    include_base: bool = False,
    score_prompt: bool = True,
    mode: str = "sample",
    top_k: int | None = None,
    temperature: float = 1.0,
    eos_id: int | None = None,
    pad_id: int = 0,
    generator: torch.Generator | None = None,
    energy_batch_size: int = 4096,
    max_batch_tokens: int | None = None,
    _proposal_correction: bool = True,
) -> SNISResult:
    """SNIS / sampling-importance-resampling with an AR proposal (monograph §2.5, Table 2.1).

    Draws k = ``num_candidates`` continuations per prompt row from q (``lm`` after ``temperature``
    / ``top_k``, exact log q from :func:`~seqebm.sampling.sampler.sample`), and resamples m =
    ``num_draws`` of them per prompt with weights

        w(x) = exp(−E(x)) · p_LM(x)^[include_base] / q(x)

    (``include_base=True``: the target is the residual EBM p_LM(x)·exp(−E(x)) of the residual-EBM
    seed §3, Eq. 2; with an untruncated proposal p_LM/q = 1 and w = exp(−E)). ``mode="rerank"``
    keeps the best candidates instead. The experts see ``prompt[:, 1:]`` (BOS dropped) followed by
    the continuation when ``score_prompt`` (else the continuation only), with a padding mask after EOS.

    Args:
        prompt: LongTensor (B, P), BOS first.
        energy_batch_size: sequences per energy call.

    Returns:
        :class:`SNISResult` with ESS = 1/Σ ω² per prompt.
    """
    _check_int("num_candidates", num_candidates, 1)
    _check_int("energy_batch_size", energy_batch_size, 1)
    if not isinstance(prompt, Tensor) or prompt.dim() != 2 or prompt.shape[1] < 1 or prompt.is_floating_point():
        raise ValueError(f"prompt must be a LongTensor (B, P>=1) starting with BOS, got {prompt!r}")
    scorer = _Scorer(energy, None)
    b, k = prompt.shape[0], num_candidates
    out = sample(lm, prompt, max_new_tokens=max_new_tokens, num_samples=k, top_k=top_k, temperature=temperature,
                 eos_id=eos_id, pad_id=pad_id, generator=generator, max_batch_tokens=max_batch_tokens)
    seqs, mask = out.tokens, out.mask  # (N, L)
    if score_prompt and prompt.shape[1] > 1:
        head = prompt[out.prefix_index, 1:]
        seqs, mask = torch.cat([head, seqs], 1), torch.cat([torch.ones_like(head, dtype=torch.bool), mask], 1)
    energies = torch.cat([scorer(seqs[i:i + energy_batch_size], mask[i:i + energy_batch_size])
                          @ scorer.base_alpha.to(seqs.device)
                          for i in range(0, seqs.shape[0], energy_batch_size)]).view(b, k)
    log_target = -energies + (out.log_p.view(b, k) if include_base else 0.0)
    log_proposal = out.log_q.view(b, k) if _proposal_correction else None
    res = importance_resample(log_target, log_proposal, mode=mode, num_draws=num_draws, generator=generator)
    tokens = gather_candidates(out.tokens.view(b, k, -1), res.index)
    lengths = out.lengths.view(b, k).gather(1, res.index)
    return SNISResult(tokens=tokens, lengths=lengths, energy=energies.gather(1, res.index), resample=res,
                      energy_evals=b * k)
