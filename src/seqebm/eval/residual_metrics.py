"""Computations behind the residual-EBM analyses (:mod:`seqebm.eval.residual_analysis`): perplexity
bounds as a function of the number of samples, unique n-grams, per-position perplexities, A/B pairs,
and the batched sampling/scoring they need (residual-EBM seed §3.2–4)."""

from __future__ import annotations

import io
import math
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.estimators.nowozin import log_partition_bounds
from seqebm.estimators.residual import perplexity_bounds, position_log_prob, sample_log_weights

_STREAM = {"lm": 1, "joint": 2, "bounds": 3, "positions": 4, "log_z": 5, "last-position": 6}


def _generator(seed: int, stream: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + _STREAM[stream])


def _ppl(neg_log_prob_sum: float, num_tokens: float) -> float:
    """exp(Σ −log p / N), capped like :func:`~seqebm.estimators.residual.perplexity_bounds`."""
    return math.exp(min(neg_log_prob_sum / num_tokens, 700.0))


# --------------------------------------------------------------------------- pure helpers


def perplexity_by_num_samples(lm_log_prob: Tensor, energy: Tensor, sample_log_weights: Tensor,
                              ns: Sequence[int], *, num_tokens: int) -> list[dict[str, float]]:
    """Joint-model perplexity bounds from the first n sample weights, for every n in ``ns``.

    For each n, log Z_θ(prefix) is bracketed by Nowozin's T_n and U_n and estimated by the
    jackknife (:func:`~seqebm.estimators.log_partition_bounds`, residual-EBM seed Thm. 2,
    Eq. 4) from ``sample_log_weights[:, :n]``; log P_θ = log P_LM − E − log Z, so the *upper*
    log Z gives the *lower* log-probability and the *upper* perplexity.

    Args:
        lm_log_prob: (B,) log P_LM(continuation | prefix) of the evaluated windows.
        energy: (B,) E_θ of the evaluated windows.
        sample_log_weights: (B, n_max) log weights of n_max LM samples per prefix
            (:func:`~seqebm.estimators.residual.sample_log_weights`).
        ns: sample counts, each 2 <= n <= n_max.
        num_tokens: predicted tokens in all, B·C.

    Returns:
        One dict per n: ``n``, ``ppl_lower``, ``ppl_upper``, ``ppl_jackknife``, ``log_z_lower``
        / ``log_z_upper`` (means over prefixes) and ``ess`` (mean effective sample size
        (Σw)² / Σw² of the n weights).
    """
    if lm_log_prob.dim() != 1 or energy.shape != lm_log_prob.shape or sample_log_weights.dim() != 2 \
            or sample_log_weights.shape[0] != lm_log_prob.shape[0]:
        raise ValueError(f"shapes must be (B,), (B,), (B, n_max); got {tuple(lm_log_prob.shape)}, "
                         f"{tuple(energy.shape)}, {tuple(sample_log_weights.shape)}")
    n_max = sample_log_weights.shape[1]
    bad = [n for n in ns if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= n_max]
    if bad or not ns:
        raise ValueError(f"every n must be an int in [2, {n_max}] (the samples drawn per prefix), got {list(ns)}")
    base = lm_log_prob.double() - energy.double()  # (B,)
    out = []
    for n in ns:
        lw = sample_log_weights[:, :n].double()  # (B, n)
        z = log_partition_bounds(lw)
        bounds = perplexity_bounds(base - z.upper, base - z.lower, num_tokens)
        ess = torch.exp(2 * torch.logsumexp(lw, -1) - torch.logsumexp(2 * lw, -1))  # (B,)
        out.append({"n": n, "ppl_lower": bounds["ppl_lower"], "ppl_upper": bounds["ppl_upper"],
                    "ppl_jackknife": _ppl(-float((base - z.jackknife).sum()), num_tokens),
                    "log_z_lower": float(z.lower.mean()), "log_z_upper": float(z.upper.mean()),
                    "ess": float(ess.mean())})
    return out


def per_text_unique_ngrams(token_lists: Sequence[Sequence[Any]], max_n: int = 4) -> dict[str, float | None]:
    """Mean over texts of the percentage of distinct n-grams *within* each text, n = 1..``max_n``.

    A text with fewer than n tokens has no n-gram and is left out of the n-gram mean (None when
    no text has n tokens). Example: ``[["a", "a", "b"], ["c"]]``: unigrams 2/3 and 1/1 -> mean
    83.33; bigrams only from the first text, 2/2 -> 100. The pooled counterpart (distinct over
    the whole set) is :func:`seqebm.eval.metrics.unique_ngrams`.
    """
    if isinstance(max_n, bool) or not isinstance(max_n, int) or max_n < 1:
        raise ValueError(f"max_n must be a positive int, got {max_n!r}")
    out: dict[str, float | None] = {}
    for n in range(1, max_n + 1):
        fractions = []
        for tokens in token_lists:
            grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
            if grams:
                fractions.append(100.0 * len(set(grams)) / len(grams))
        out[f"unique_{n}"] = sum(fractions) / len(fractions) if fractions else None
    return out


def position_perplexities(lm: Tensor, lower: Tensor, upper: Tensor, estimate: Tensor) -> list[dict[str, Any]]:
    """Per-position perplexities and gains from per-token log-probabilities, each (B, C).

    Position t (1-based) of the continuation: LM ppl = exp(−mean_b lm[b, t]); the joint
    model's ``ppl_lower`` = exp(−mean upper), ``ppl_upper`` = exp(−mean lower),
    ``ppl_estimate`` = exp(−mean estimate); ``gain`` = LM ppl − joint ppl estimate, with
    ``gain_lower`` = LM ppl − ppl_upper <= ``gain_upper`` = LM ppl − ppl_lower (seed Fig. 1).
    ``exact`` marks the last position, where Eq. 5 is enumerated (lower = upper).
    """
    shapes = {tuple(x.shape) for x in (lm, lower, upper, estimate)}
    if len(shapes) != 1 or lm.dim() != 2 or lm.shape[0] == 0:
        raise ValueError(f"lm, lower, upper, estimate must share one (B>=1, C) shape, got "
                         f"{[tuple(x.shape) for x in (lm, lower, upper, estimate)]}")
    b, c = lm.shape

    def ppl(x: Tensor) -> float:
        return _ppl(-float(x.double().sum()), b)

    rows = []
    for t in range(c):
        lm_ppl = ppl(lm[:, t])
        p_lo, p_hi, p_est = ppl(upper[:, t]), ppl(lower[:, t]), ppl(estimate[:, t])
        rows.append({"position": t + 1, "lm_ppl": lm_ppl, "ppl_lower": p_lo, "ppl_upper": p_hi,
                     "ppl_estimate": p_est, "gain": lm_ppl - p_est, "gain_lower": lm_ppl - p_hi,
                     "gain_upper": lm_ppl - p_lo, "exact": t == c - 1})
    return rows


def ab_pairs(ids: Sequence[str], prefixes: Sequence[str], texts_a: Sequence[str], texts_b: Sequence[str], *,
             a: str, b: str, seed: int = 0) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """A/B items (residual-EBM seed Tab. 2, App. A.4): two continuations per prefix, order hidden.

    The side on which system ``a`` appears is balanced (⌊N/2⌋ items each way, the odd one
    drawn) and shuffled with ``random.Random(seed)``, so the order is reproducible.

    Returns:
        ``(pairs, key)``: ``pairs`` rows ``{id, prefix, text_1, text_2}`` for the raters and
        ``key`` rows ``{id, text_1, text_2}`` naming the system behind each text.
    """
    n = len(ids)
    if not len(prefixes) == len(texts_a) == len(texts_b) == n:
        raise ValueError(f"got {n} ids, {len(prefixes)} prefixes, {len(texts_a)} texts of {a!r}, "
                         f"{len(texts_b)} of {b!r}")
    if len(set(ids)) != n:
        raise ValueError("item ids must be unique")
    if a == b:
        raise ValueError(f"the two systems must differ, got {a!r} twice")
    rng = random.Random(seed)
    a_first = [True] * (n // 2) + [False] * (n // 2) + ([rng.random() < 0.5] if n % 2 else [])
    rng.shuffle(a_first)
    pairs, key = [], []
    for i, first in enumerate(a_first):
        (s1, t1), (s2, t2) = ((a, texts_a[i]), (b, texts_b[i])) if first else ((b, texts_b[i]), (a, texts_a[i]))
        pairs.append({"id": ids[i], "prefix": prefixes[i], "text_1": t1, "text_2": t2})
        key.append({"id": ids[i], "text_1": s1, "text_2": s2})
    return pairs, key


# --------------------------------------------------------------------------- batched model computations


def _chunks(n: int, batch_size: int) -> list[slice]:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    return [slice(i, min(n, i + batch_size)) for i in range(0, n, batch_size)]


def _energy(model: nn.Module, tokens: Tensor) -> Tensor:
    return model.energy(tokens, torch.ones_like(tokens, dtype=torch.bool)).double()  # (B,)


@torch.no_grad()
def bound_inputs(model: nn.Module, rows: Tensor, *, prefix_len: int, num_samples: int, top_k: int | None = None,
                 generator: torch.Generator | None = None, batch_size: int = 16,
                 max_batch_tokens: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """log P_LM (B,), E_θ (B,) of fixed-length windows ``rows`` (B, T) and the log weights
    (B, n) of n LM continuations of each prefix ``rows[:, :prefix_len]`` (Thm. 2 inputs)."""
    lp, e, lw = [], [], []
    for s in _chunks(rows.shape[0], batch_size):
        chunk = rows[s]
        lp.append(model.lm_log_prob(chunk, prefix_len=prefix_len))
        e.append(_energy(model, chunk))
        lw.append(sample_log_weights(model, chunk[:, :prefix_len], num_samples=num_samples,
                                     max_new_tokens=rows.shape[1] - prefix_len, top_k=top_k, generator=generator,
                                     max_batch_tokens=max_batch_tokens))
    return torch.cat(lp), torch.cat(e), torch.cat(lw)


@torch.no_grad()
def draw_continuations(model: nn.Module, prefixes: Tensor, system: str, *, cont_len: int, num_candidates: int = 64,
                       top_k: int | None = None, generator: torch.Generator | None = None, batch_size: int = 16,
                       max_batch_tokens: int | None = None) -> tuple[Tensor, Tensor | None]:
    """One continuation of C tokens per prefix row (B, p) from ``system`` "lm" or "joint".

    "lm": ancestral sampling from the frozen base LM (``top_k`` optional). "joint": Top-k joint
    sampling (seed §3.3, Alg. 1): ``num_candidates`` LM samples per prefix resampled with
    softmax(−E). Returns ``(tokens (B, C), ess)`` with ``ess`` (B,) the effective sample size of
    each candidate set (None for "lm").
    """
    from seqebm.sampling.resampling import joint_sample
    from seqebm.sampling.sampler import sample

    if system not in ("lm", "joint"):
        raise ValueError(f"system must be 'lm' or 'joint' (real continuations come from the data), got {system!r}")
    p = prefixes.shape[1]
    tokens, ess = [], []
    for s in _chunks(prefixes.shape[0], batch_size):
        if system == "lm":
            tokens.append(sample(model.lm, prefixes[s], max_new_tokens=cont_len, num_samples=1, top_k=top_k,
                                 generator=generator, max_batch_tokens=max_batch_tokens).tokens)
        else:
            draws, res = joint_sample(model, prefixes[s], num_candidates=num_candidates, max_new_tokens=cont_len,
                                      top_k=top_k, generator=generator, max_batch_tokens=max_batch_tokens)
            tokens.append(draws[:, 0, p:])
            ess.append(res.ess)
    return torch.cat(tokens), (torch.cat(ess) if ess else None)


@torch.no_grad()
def position_log_probs(model: nn.Module, rows: Tensor, *, prefix_len: int, num_samples: int,
                       top_k: int | None = None, generator: torch.Generator | None = None, batch_size: int = 16,
                       max_batch_tokens: int | None = None) -> dict[str, Tensor]:
    """Eq. 5 bounds of log P_θ(x_t | x_<t) at every continuation position, each (B, C) float64.

    Keys ``lm``, ``lower``, ``upper``, ``estimate``, from
    :func:`~seqebm.estimators.residual.position_log_prob` per position and chunk of rows (the
    last position exact: lower = upper).
    """
    t_len = rows.shape[1]
    out: dict[str, list[Tensor]] = {k: [] for k in ("lm", "lower", "upper", "estimate")}
    for s in _chunks(rows.shape[0], batch_size):
        per_pos = [position_log_prob(model, rows[s], t, num_samples=num_samples, top_k=top_k, generator=generator,
                                     max_batch_tokens=max_batch_tokens) for t in range(prefix_len, t_len)]
        for k in out:
            out[k].append(torch.stack([getattr(r, k).double() for r in per_pos], 1))  # (b, C)
    return {k: torch.cat(v) for k, v in out.items()}


def last_position_check(model: nn.Module, rows: Tensor, *, num_samples: int, top_k: int | None = None,
                        generator: torch.Generator | None = None, batch_size: int = 16,
                        max_batch_tokens: int | None = None, exact: Tensor | None = None) -> dict[str, float]:
    """Sampled Eq. 5 bounds at the last position against its exact enumeration (bound tightness).

    ``exact`` (B,): the exact last-position log-probabilities if already computed (e.g. by
    :func:`position_log_probs`); the enumeration over the vocabulary is the costly part.

    Returns the last position's perplexity from the ``num_samples``-sample bounds
    (``ppl_lower``, ``ppl_upper``, ``ppl_estimate``) and from enumerating the vocabulary
    (``ppl_exact``); the exact value should lie in (or, the bracket being asymptotic, near) the
    bracket, which narrows as ``num_samples`` grows.
    """
    last = rows.shape[1] - 1
    parts: dict[str, list[Tensor]] = {k: [] for k in ("lower", "upper", "estimate", "exact")}
    for s in _chunks(rows.shape[0], batch_size):
        est = position_log_prob(model, rows[s], last, num_samples=num_samples, top_k=top_k, generator=generator,
                                max_batch_tokens=max_batch_tokens, exact_last=False)
        ex = exact[s] if exact is not None else position_log_prob(model, rows[s], last, num_samples=num_samples).lower
        for k, v in (("lower", est.lower), ("upper", est.upper), ("estimate", est.estimate), ("exact", ex)):
            parts[k].append(v.double())
    lp = {k: torch.cat(v) for k, v in parts.items()}
    b = rows.shape[0]
    return {"ppl_lower": _ppl(-float(lp["upper"].sum()), b), "ppl_upper": _ppl(-float(lp["lower"].sum()), b),
            "ppl_estimate": _ppl(-float(lp["estimate"].sum()), b), "ppl_exact": _ppl(-float(lp["exact"].sum()), b),
            "num_samples": float(num_samples)}


# --------------------------------------------------------------------------- output helpers


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x: float | None, decimals: int) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{decimals}f}"


def _truncation_note(k: int | None) -> list[str]:
    if k is None:
        return []
    return [f"the LM samples are top-{k}: the weights exp(−E)·P_LM/r then estimate Z over the top-{k} support only "
            "(a truncated normaliser): the estimates are of a truncated model, typically with too high "
            "log-probabilities and too low perplexities; "
            "pass --top-k 0 for the untruncated LM (residual-EBM seed §3.2 uses P_LM itself)"]


def _check_count(value: int, what: str, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an int >= {minimum}, got {value!r}")
