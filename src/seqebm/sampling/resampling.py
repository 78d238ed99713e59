"""Choosing one of k candidate sequences by their energies: importance resampling and reranking.

Notation: B groups (prefixes / source sentences), k candidates per group, m draws per group,
P prefix length (BOS included), L new tokens, N = B·k candidate rows, V vocabulary.

**The shared problem.** k candidates x⁽¹⁾..x⁽ᵏ⁾ were drawn from a proposal r (an autoregressive
sampler); we want one draw from a target p(x) ∝ exp(log_target(x)) that r only approximates.
Sampling-importance-resampling (SIR; Rubin 1987, "The calculation of posterior distributions
by data augmentation: comment", JASA 82) draws x⁽ʲ⁾ with probability given by the
self-normalised importance weights

    ω_j = w_j / Σ_i w_i,     w_j = exp(log_target(x⁽ʲ⁾) − log r(x⁽ʲ⁾)),

which is exact as k → ∞ and biased by O(1/k) for finite k (k = 1 returns the proposal's draw).
Reranking instead keeps argmax_j log_target(x⁽ʲ⁾) (the lowest energy). Both are
:func:`importance_resample`; the effective sample size ESS = 1 / Σ_j ω_j² ∈ [1, k] measures how
many candidates carry the weight.

**Residual EBM** (residual-EBM seed, §3 Eq. 2 and §3.3 Alg. 1 "Top-k joint sampling"): the joint
model is P(x) ∝ P_LM(x)·exp(−E_res(x)), so ``log_target = log P_LM(x) − E_res(x)`` and
``log_proposal`` = the sampler's log q of the candidate (``SampleOutput.log_q``). With an
untruncated LM proposal both LM terms cancel and the weight is exp(−E_res(x)) — the seed's
Alg. 1, which is ``importance_resample(-energies, None)`` (``log_proposal=None`` means the caller
already divided by the proposal). With the seed's optional top-k truncation, Alg. 1's weights
target P_LM,top-k·exp(−E_res) instead; pass the full ``log_target`` and ``log_proposal`` to target
P itself (exact as k → ∞ wherever the truncated proposal covers P's support).

**E-Forcing** (E-Forcing seed, §3 Eq. 3, App. C.1 / Tab. 7 "Top-K energy re-sampling"): the
autoregressive model q_θ is itself an EBM. For a whole continuation x = (x_1..x_K) of the prefix
(K = its last position, EOS included when it ends at EOS), Eq. 3 at step k = K gives

    E_θ(x) = −logit_θ(x_K | x_<K) − log q_θ(x_<K | prefix),       p_θ(x) ∝ exp(−E_θ(x)),

with the *raw* logits (§3.1), computed by :func:`autoregressive_sequence_energy`. Since
q(x) = q(x_<K)·q(x_K | x_<K) and q(x_K | x_<K) = exp(logit_K(x_K)) / S_K(x_<K) with
S_K(x_<K) = Σ_v exp(logit_v at step K), the importance weight of a candidate drawn from the
untruncated model (r = q_θ) is

    w(x) = exp(−E_θ(x)) / q_θ(x) = exp(logit_K(x_K)) / q_θ(x_K | x_<K) = S_K(x_<K):

resampling keeps q's last-token conditional and reweights prefixes by their logit mass S_K,
exactly the prefix marginal p_θ(x_<K) ∝ q_θ(x_<K)·S_K(x_<K) of Eq. 3. :func:`energy_resample`
passes ``log_target = −E_θ(x)`` and ``log_proposal = log r(x)`` (the sampler's ``log_q`` after
temperature / top-k / top-p), so tempered or truncated proposals are corrected too. With
``mode="rerank"`` it returns the lowest-energy candidate. Note that candidates of different
lengths K are compared under one unnormalised exp(−E_θ), i.e. one target over all lengths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.sampling.sampler import sample

MODES = ("sample", "rerank")


@dataclass
class ResampleResult:
    index: Tensor  # (B, m) long: the chosen candidates of each group
    log_weights: Tensor  # (B, k) float64 self-normalised log ω (logsumexp over k = 0)
    ess: Tensor  # (B,) float64 effective sample size 1 / Σ ω², in [1, k]


def importance_resample(log_target: Tensor, log_proposal: Tensor | None = None, *, mode: str = "sample",
                        num_draws: int = 1, generator: torch.Generator | None = None) -> ResampleResult:
    """Pick candidates per group by SIR weights or by the highest target score.

    Args:
        log_target: (B, k) log p̃(x) of each candidate, an unnormalised target (e.g. −E(x)).
            −inf is allowed (never picked); +inf and NaN are not.
        log_proposal: (B, k) log r(x) of the proposal that drew each candidate (whole
            candidate, finite), or None when ``log_target`` is already log p̃ − log r.
        mode: ``"sample"``: ``num_draws`` independent draws (with replacement) with probability
            ω_j ∝ exp(log_target − log_proposal) (SIR, Rubin 1987; residual-EBM seed Alg. 1).
            ``"rerank"``: the ``num_draws`` highest ``log_target`` (the first is the argmax; ties
            go to the lower index), distinct, best first. Reranking ignores ``log_proposal``.
        num_draws: m, draws per group (rerank: at most the number of finite candidates).
        generator: randomness of ``"sample"`` (one float64 uniform per draw, inverse CDF).

    Returns:
        :class:`ResampleResult` with ``index`` (B, m), the SNIS ``log_weights`` (B, k) and the
        ``ess`` (B,) — in both modes (for reranking they are diagnostics only).
    """
    log_w = _check_log_scores(log_target, log_proposal)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(num_draws, bool) or not isinstance(num_draws, int) or num_draws < 1:
        raise ValueError(f"num_draws must be an int >= 1, got {num_draws!r}")
    b, k = log_w.shape
    log_weights = log_w - torch.logsumexp(log_w, dim=1, keepdim=True)  # (B, k)
    ess = torch.exp(-torch.logsumexp(2.0 * log_weights, dim=1))  # (B,)
    if mode == "rerank":
        scores = log_target.double()
        n_finite = torch.isfinite(scores).sum(1)
        if num_draws > int(n_finite.min()):
            raise ValueError(f"rerank with num_draws={num_draws} needs that many finite log_target "
                             f"candidates per group; the fewest is {int(n_finite.min())}")
        if num_draws == 1:
            index = scores.argmax(1, keepdim=True)  # first maximum
        else:
            index = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :num_draws]
    else:
        dev = generator.device if generator is not None else "cpu"
        u = torch.rand(b, num_draws, generator=generator, dtype=torch.float64, device=dev).to(log_w.device)
        w = log_weights.exp()  # (B, k)
        cdf = w.cumsum(1)
        index = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # (B, m)
        last_ok = k - 1 - (w > 0).flip(1).int().argmax(1, keepdim=True)  # rounding at the top end
        index = torch.minimum(index, last_ok)
    return ResampleResult(index.long(), log_weights, ess)


def _check_log_scores(log_target: Tensor, log_proposal: Tensor | None) -> Tensor:
    """Validated log weights log p̃ − log r (B, k) float64."""
    if not isinstance(log_target, Tensor) or log_target.dim() != 2 or log_target.shape[1] < 1:
        shape = tuple(log_target.shape) if isinstance(log_target, Tensor) else type(log_target).__name__
        raise ValueError(f"log_target must be a (B, k>=1) tensor, got {shape}")
    if not torch.is_floating_point(log_target):
        raise ValueError(f"log_target must be floating point, got {log_target.dtype}")
    lt = log_target.double()
    if torch.isnan(lt).any():
        raise ValueError(f"log_target contains NaN at (group, candidate) {_first(torch.isnan(lt))}")
    if (lt == float("inf")).any():
        raise ValueError(f"log_target contains +inf at (group, candidate) {_first(lt == float('inf'))}")
    if log_proposal is None:
        log_w = lt
    else:
        if not isinstance(log_proposal, Tensor) or log_proposal.shape != log_target.shape:
            shape = tuple(log_proposal.shape) if isinstance(log_proposal, Tensor) else type(log_proposal).__name__
            raise ValueError(f"log_proposal must have the shape of log_target {tuple(log_target.shape)}, got {shape}")
        if not torch.is_floating_point(log_proposal):
            raise ValueError(f"log_proposal must be floating point, got {log_proposal.dtype}")
        lp = log_proposal.double()
        if not torch.isfinite(lp).all():
            raise ValueError(f"log_proposal must be finite (a candidate with r(x) = 0 cannot have been drawn); "
                             f"bad entry at (group, candidate) {_first(~torch.isfinite(lp))}")
        log_w = lt - lp
    dead = torch.isneginf(log_w).all(1)
    if dead.any():
        raise ValueError(f"every candidate of group(s) {dead.nonzero().flatten().tolist()[:10]} has "
                         f"log_target = -inf: nothing to choose")
    return log_w


def _first(mask: Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def gather_candidates(candidates: Tensor, index: Tensor) -> Tensor:
    """Rows ``candidates[b, index[b, j]]``: (B, k, *rest) and (B, m) -> (B, m, *rest)."""
    if not isinstance(candidates, Tensor) or candidates.dim() < 2:
        raise ValueError(f"candidates must have shape (B, k, ...), got "
                         f"{tuple(candidates.shape) if isinstance(candidates, Tensor) else type(candidates).__name__}")
    if not isinstance(index, Tensor) or index.dim() != 2 or index.shape[0] != candidates.shape[0]:
        raise ValueError(f"index must have shape (B={candidates.shape[0]}, m), got "
                         f"{tuple(index.shape) if isinstance(index, Tensor) else type(index).__name__}")
    if index.dtype != torch.long:
        raise ValueError(f"index must be a LongTensor, got {index.dtype}")
    k = candidates.shape[1]
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= k):
        raise ValueError(f"index values must lie in [0, k={k}), got range [{int(index.min())}, {int(index.max())}]")
    rest = candidates.shape[2:]
    idx = index.view(*index.shape, *(1,) * len(rest)).expand(*index.shape, *rest)
    return candidates.gather(1, idx)


def autoregressive_sequence_energy(model: nn.Module, tokens: Tensor, *, prefix_len: int,
                                   lengths: Tensor | None = None,
                                   context: dict[str, Tensor] | None = None) -> Tensor:
    """E-Forcing energy of each whole continuation (E-Forcing seed, §3 Eq. 3 at k = K).

    E_θ(x) = −logit_θ(x_K | prefix, x_<K) − Σ_{i<K} log q_θ(x_i | prefix, x_<i), with raw logits
    and K the last real token of the continuation.

    Args:
        model: any seqebm autoregressive model (``forward(tokens, **context) -> (N, T, V)``).
        tokens: (N, P + L) prefix (BOS first) followed by the continuation, right-padded.
        prefix_len: P >= 1, the prefix tokens (not scored).
        lengths: (N,) real continuation tokens per row, 1 <= lengths <= L (EOS included);
            default L for every row. Tokens after a row's end never change its energy.
        context: per-row model keywords (``source``, ``source_mask``) with N rows.

    Returns:
        (N,) float64 energies (keeps autograd; lower = more probable under p_θ).
    """
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (N, P + L), got "
                         f"{tuple(tokens.shape) if isinstance(tokens, Tensor) else type(tokens).__name__}")
    n, t = tokens.shape
    if isinstance(prefix_len, bool) or not isinstance(prefix_len, int) or not 1 <= prefix_len < t:
        raise ValueError(f"prefix_len must be an int with 1 <= prefix_len < tokens.shape[1]={t}, got {prefix_len!r}")
    steps = t - prefix_len  # L
    if lengths is None:
        lengths = torch.full((n,), steps, dtype=torch.long, device=tokens.device)
    else:
        if not isinstance(lengths, Tensor) or lengths.shape != (n,):
            raise ValueError(f"lengths must have shape (N={n},), got "
                             f"{tuple(lengths.shape) if isinstance(lengths, Tensor) else type(lengths).__name__}")
        lengths = lengths.to(tokens.device).long()
        if n and (int(lengths.min()) < 1 or int(lengths.max()) > steps):
            raise ValueError(f"lengths must lie in [1, L={steps}] (L = tokens.shape[1] - prefix_len), got "
                             f"range [{int(lengths.min())}, {int(lengths.max())}]")
    width = prefix_len + (int(lengths.max()) if n else steps)  # drop all-padding columns
    logits = model(tokens[:, :width - 1], **(context or {}))[:, prefix_len - 1:]  # (N, L', V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = tokens[:, prefix_len:width]  # (N, L')
    logit_tgt = logits.gather(-1, targets[..., None]).squeeze(-1).double()  # (N, L')
    log_q_tok = logit_tgt - torch.logsumexp(logits, -1).double()  # (N, L')
    pos = torch.arange(targets.shape[1], device=tokens.device)[None]
    last = lengths - 1  # (N,)
    before = (pos < last[:, None]).double()
    log_q_prefix = (log_q_tok * before).sum(1)  # log q(x_<K | prefix)
    return -logit_tgt.gather(1, last[:, None]).squeeze(1) - log_q_prefix


@torch.no_grad()
def energy_resample(model: nn.Module, prefix: Tensor, *, num_candidates: int, max_new_tokens: int,
                    mode: str = "sample", eos_id: int | None = None, context: dict[str, Tensor] | None = None,
                    generator: torch.Generator | None = None,
                    **sample_kwargs: Any) -> tuple[Tensor, Tensor, ResampleResult]:
    """Top-K energy re-sampling (E-Forcing seed, App. C.1 / Tab. 7) with the model's own energy.

    Draws ``num_candidates`` = k continuations of every prefix with :func:`seqebm.sampling.sample`
    (``sample_kwargs``: ``temperature``, ``top_k``, ``top_p``, ``min_new_tokens``, ``pad_id``,
    ``max_batch_tokens``), scores each by :func:`autoregressive_sequence_energy` (stopping at
    EOS), and keeps one per prefix with :func:`importance_resample`: ``log_target = −E_θ(x)``,
    ``log_proposal`` = the sampler's log q of the candidate (see the module docstring for why the
    weight is S_K(x_<K) with the untruncated proposal). ``mode="sample"`` targets
    p_θ(x) ∝ exp(−E_θ(x)) (exact as k → ∞); ``mode="rerank"`` keeps the lowest energy.

    ``num_candidates`` 0 or 1 is plain sampling: one draw per prefix, no energy computed
    (``index`` zeros (B, 1), ``log_weights`` zeros (B, 1), ``ess`` ones). Put the model in
    ``eval()`` mode first: dropout would make the energies random.

    Args:
        model: seqebm autoregressive model.
        prefix: (B, P) prefixes, BOS first.
        context: per-prefix model keywords with B rows (``source``, ``source_mask``).

    Returns:
        ``tokens`` (B, max_new_tokens) chosen continuations (``pad_id`` after EOS), ``lengths``
        (B,) (EOS included) and the :class:`ResampleResult` (``index`` (B, 1) into the k
        candidates, ``log_weights`` (B, k), ``ess`` (B,)).
    """
    if isinstance(num_candidates, bool) or not isinstance(num_candidates, int) or num_candidates < 0:
        raise ValueError(f"num_candidates must be an int >= 0, got {num_candidates!r}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    k = max(1, num_candidates)
    out = sample(model, prefix, max_new_tokens=max_new_tokens, num_samples=k, eos_id=eos_id,
                 generator=generator, context=context, **sample_kwargs)
    b, length = prefix.shape[0], out.tokens.shape[1]
    if k == 1:
        ones = torch.ones(b, dtype=torch.float64, device=prefix.device)
        return out.tokens, out.lengths, ResampleResult(torch.zeros(b, 1, dtype=torch.long, device=prefix.device),
                                                       torch.zeros(b, 1, dtype=torch.float64, device=prefix.device),
                                                       ones)
    owner = out.prefix_index  # (N,) rows grouped by prefix, k each
    rows = torch.cat([prefix.index_select(0, owner), out.tokens], 1)  # (N, P + L)
    row_context = {key: v.index_select(0, owner) for key, v in (context or {}).items()}
    energy = _chunked_energy(model, rows, prefix.shape[1], out.lengths, row_context,
                             sample_kwargs.get("max_batch_tokens"))  # (N,)
    res = importance_resample(-energy.view(b, k), out.log_q.view(b, k), mode=mode, generator=generator)
    tokens = gather_candidates(out.tokens.view(b, k, length), res.index).squeeze(1)  # (B, L)
    lengths = out.lengths.view(b, k).gather(1, res.index).squeeze(1)  # (B,)
    return tokens, lengths, res


def _chunked_energy(model: nn.Module, rows: Tensor, prefix_len: int, lengths: Tensor, context: dict[str, Tensor],
                    max_batch_tokens: int | None) -> Tensor:
    """:func:`autoregressive_sequence_energy` over row chunks of at most ``max_batch_tokens`` tokens."""
    n = rows.shape[0]
    step = n if max_batch_tokens is None else max(1, max_batch_tokens // rows.shape[1])
    parts = [autoregressive_sequence_energy(model, rows[i:i + step], prefix_len=prefix_len,
                                            lengths=lengths[i:i + step],
                                            context={key: v[i:i + step] for key, v in context.items()})
             for i in range(0, n, step)]
    return torch.cat(parts)


__all__ = ["ResampleResult", "autoregressive_sequence_energy", "energy_resample", "gather_candidates",
           "importance_resample"]


@torch.no_grad()
def joint_sample(model: nn.Module, prefix: Tensor, *, num_candidates: int, max_new_tokens: int,
                 top_k: int | None = None, correct_proposal: bool = False, num_draws: int = 1,
                 generator: torch.Generator | None = None, max_batch_tokens: int | None = None,
                 energy_batch_size: int = 4096) -> tuple[Tensor, ResampleResult]:
    """Top-k joint sampling from a residual EBM (residual-EBM seed §3.3, Algorithm 1).

    Draws ``num_candidates`` continuations of every prefix row (B, P) from the frozen LM
    (``model.lm``; with ``top_k``), scores E_θ of each whole sequence and resamples with
    probability softmax(−E) (Algorithm 1). Without top-k this is sampling-importance-resampling
    from P_LM·exp(−E) and is exact as n → ∞. With ``correct_proposal=True`` the weights are
    exp(log P_LM − E − log r) instead, which targets the untruncated joint model even under a
    top-k proposal r (where r covers it); the seed's Algorithm 1 is ``correct_proposal=False``.

    Args:
        model: a :class:`~seqebm.models.residual.ResidualEBM` (``.lm`` and ``.energy(tokens, mask)``).
        prefix: LongTensor (B, P), BOS first.

    Returns:
        ``(tokens (B, num_draws, P + L), ResampleResult)``: whole sequences, prefix included.
    """
    if not isinstance(num_candidates, int) or num_candidates < 1:
        raise ValueError(f"num_candidates must be a positive int, got {num_candidates!r}")
    b, p = prefix.shape
    out = sample(model.lm, prefix, max_new_tokens=max_new_tokens, num_samples=num_candidates, top_k=top_k,
                 generator=generator, max_batch_tokens=max_batch_tokens)
    full = torch.cat([prefix.repeat_interleave(num_candidates, 0), out.tokens], 1)  # (B·n, P+L)
    energies = torch.cat([model.energy(full[i:i + energy_batch_size],
                                       torch.ones_like(full[i:i + energy_batch_size], dtype=torch.bool)).double()
                          for i in range(0, full.shape[0], energy_batch_size)]).view(b, num_candidates)
    if correct_proposal:
        res = importance_resample(out.log_p.view(b, num_candidates) - energies,
                                  out.log_q.view(b, num_candidates), num_draws=num_draws, generator=generator)
    else:
        res = importance_resample(-energies, None, num_draws=num_draws, generator=generator)
    return gather_candidates(full.view(b, num_candidates, -1), res.index), res
