"""Analyses of a trained residual EBM: the residual-EBM seed's §4.2–4.3 figures and Tab. 2 export.

Notation: B windows (prefixes) of a split, p = 1 + P prefix length (BOS included), C
continuation tokens, T = p + C, n LM samples per estimate, K candidates per joint draw,
V vocabulary.

Each analysis reads one residual run folder (``model.arch=residual``; its config, frozen base
LM, energy weights and tokenizer) and the windows ``[BOS] + P + C`` of one split
(``ResidualTask.rows[split]``), and returns an :class:`~seqebm.eval.analysis.Analysis`
(Markdown, JSON and a PNG) written like the other ``seqebm analyze`` commands:

* :func:`bounds_vs_samples`: joint-model perplexity lower/upper bounds and the jackknife point
  estimate (Thm. 2, Eq. 4) as a function of the number n of LM samples, with the base LM's
  perplexity as a line (seed Fig. 2, left). The estimates for every n reuse the first n of one
  set of ``max(ns)`` samples per prefix (nested subsets, one sampling pass).
* :func:`unique_ngram_analysis`: percentage of unique n-grams (n = 1..4) of the real
  continuations, LM samples and joint samples (Alg. 1, :func:`~seqebm.sampling.joint_sample`)
  of the same prefixes, within each continuation and pooled over the set (seed Fig. 2, right).
* :func:`log_prob_density`: densities of the per-token log P_LM (and of the per-token joint
  log-probability, log Z estimated per prefix) of real continuations, LM samples and joint
  samples (seed Fig. 3), with mean and standard deviation.
* :func:`position_gain`: per-position perplexity of the joint model vs the LM at positions
  1..C of the continuation, with lower/upper bounds from Eq. 5 (exact at the last position),
  as gain = LM ppl − joint ppl (seed Fig. 1).
* :func:`ab_export`: pairs of continuations of two systems (real / lm / joint) per prefix for a
  human A/B evaluation (seed §4.2, Tab. 2, App. A.4), order shuffled per item with a seeded RNG,
  the key written to a separate file.

On the command line these are ``seqebm analyze <command> --run RUN --out DIR``
(:func:`register_residual_commands`). ``--top-k`` of the LM samples defaults to the untruncated
LM for the bound estimates (bounds-vs-samples, position-gain; as the run's ``results.json``),
the only proposal under which they are bounds of the joint model itself, and to the run's
``data.residual.top_k`` for generation (joint and LM samples); 0 means untruncated.
Sampling is batched over ``batch_size`` prefixes at a time; the sampler encodes each prefix
once and shares it among its samples.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seqebm.estimators.nowozin import log_partition_bounds
from seqebm.estimators.residual import sample_log_weights
from seqebm.eval.analysis import (
    Analysis,
    _add_output_args,
    _document,
    _emit,
    _json_float,
    load_runs,
    markdown_table,
    mean_std,
    write_analysis,
)
from seqebm.eval.residual_metrics import (_check_count, _chunks, _energy, _fmt, _generator, _png, _ppl, _pyplot,
                                          _truncation_note, ab_pairs, bound_inputs, draw_continuations,
                                          last_position_check, per_text_unique_ngrams, perplexity_by_num_samples, position_log_probs,
                                          position_perplexities)
from seqebm.io import atomic_write_bytes

__all__ = [
    "DEFAULT_NS", "SYSTEMS", "ab_export", "ab_pairs", "bound_inputs", "bounds_vs_samples", "draw_continuations",
    "last_position_check",
    "log_prob_density", "per_text_unique_ngrams", "perplexity_by_num_samples", "position_gain",
    "position_log_probs", "position_perplexities", "register_residual_commands", "unique_ngram_analysis",
]

#: numbers of LM samples of ``bounds-vs-samples`` (seed Fig. 2, left, on a small scale)
DEFAULT_NS: tuple[int, ...] = (2, 4, 8, 16, 32, 64, 128)
#: continuation sources: the corpus, the base LM (P_LM) and the joint model (Alg. 1)
SYSTEMS: tuple[str, ...] = ("real", "lm", "joint")
#: generator seed offsets, so that each source has its own random stream
_COLOURS = {"real": "tab:red", "lm": "black", "joint": "tab:green"}  # as in the seed's Fig. 3


# --------------------------------------------------------------------------- run folders


class _Residual:
    """The loaded residual run: task, model, device and the chosen windows (B, T)."""

    def __init__(self, run: str | Path, *, split: str, max_rows: int | None, device: str) -> None:
        from seqebm.cli import _load_run
        from seqebm.training.trainer import BEST_MODEL

        if max_rows is not None and (isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1):
            raise ValueError(f"max_rows must be a positive int, got {max_rows!r}")
        info = load_runs([run], need_results=False)[0]
        arch = info.config.get("model", {}).get("arch")
        if arch != "residual":
            raise ValueError(f"{info.path} is not a residual-EBM run (model.arch={arch!r}): the residual analyses "
                             "need a run trained with model.arch=residual on top of a base LM (model.base_run=...)")
        if not (info.path / BEST_MODEL).is_file():
            raise FileNotFoundError(f"no trained weights ({BEST_MODEL}) in run folder {info.path}")
        _, self.task, self.model, self.device = _load_run(info.path, device)
        if getattr(self.task, "kind", None) != "residual":
            raise ValueError(f"{info.path} did not load as a residual task (got {getattr(self.task, 'kind', None)!r})")
        if split not in self.task.rows:
            raise ValueError(f"unknown split {split!r}; the run has {', '.join(self.task.rows)}")
        self.path, self.split = info.path, split
        all_rows = self.task.rows[split]
        self.rows = all_rows[:max_rows].to(self.device)  # (B, T)
        self.prefix_len = 1 + self.task.prefix_len  # p, BOS included
        self.cont_len = self.task.cont_len

    def top_k(self, override: int | None, *, bounds: bool = False) -> int | None:
        """``override`` if given (0 = untruncated LM); else the untruncated LM for bounds (the seed's
        §3.2 estimates use P_LM itself, as do the run's results.json bounds) and the run's
        ``data.residual.top_k`` for generation."""
        if override is not None and (isinstance(override, bool) or not isinstance(override, int) or override < 0):
            raise ValueError(f"top_k must be an int >= 0 (0: the untruncated LM), got {override!r}")
        if override is None:
            return None if bounds else self.task.top_k
        return override or None

    def meta(self, **extra: Any) -> dict[str, Any]:
        return {"run": str(self.path), "split": self.split, "rows": int(self.rows.shape[0]),
                "prefix_len": self.task.prefix_len, "cont_len": self.cont_len, **extra}

    def decode(self, ids: Tensor) -> list[str]:
        return self.task.tokenizer.decode_batch(ids.tolist())


# --------------------------------------------------------------------------- bounds vs samples (Fig. 2 left)


def bounds_vs_samples(run: str | Path, *, ns: Sequence[int] = DEFAULT_NS, split: str = "test",
                      max_rows: int | None = None, seed: int = 0, top_k: int | None = None, device: str = "auto",
                      batch_size: int = 16, max_batch_tokens: int | None = None, decimals: int = 2,
                      name: str = "bounds_vs_samples") -> Analysis:
    """Joint-model perplexity bounds vs the number of LM samples n (residual-EBM seed Fig. 2, left).

    ``max(ns)`` LM continuations are drawn once per prefix (top-k: the run's
    ``data.residual.top_k`` unless ``top_k`` is given, 0 = untruncated; with top-k the weights
    include P_LM / proposal); the estimate for each n uses the first n of them
    (:func:`perplexity_by_num_samples`). The bracket is asymptotic (Thm. 2): it should narrow
    as n grows.
    """
    ns = sorted(set(ns))
    if not ns or any(isinstance(n, bool) or not isinstance(n, int) or n < 2 for n in ns):
        raise ValueError(f"--ns must be ints >= 2 (the upper estimate needs two samples), got {list(ns)}")
    r = _Residual(run, split=split, max_rows=max_rows, device=device)
    k = r.top_k(top_k, bounds=True)
    lp, e, lw = bound_inputs(r.model, r.rows, prefix_len=r.prefix_len, num_samples=ns[-1], top_k=k,
                             generator=_generator(seed, "bounds"), batch_size=batch_size,
                             max_batch_tokens=max_batch_tokens)
    tokens = r.rows.shape[0] * r.cont_len
    curve = perplexity_by_num_samples(lp, e, lw, ns, num_tokens=tokens)
    lm_ppl = _ppl(-float(lp.sum()), tokens)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    x = [c["n"] for c in curve]
    ax.fill_between(x, [c["ppl_lower"] for c in curve], [c["ppl_upper"] for c in curve], alpha=0.2,
                    color="tab:blue", label="joint: lower-upper")
    ax.plot(x, [c["ppl_upper"] for c in curve], "v-", color="tab:blue", ms=4, label="joint upper")
    ax.plot(x, [c["ppl_lower"] for c in curve], "^-", color="tab:blue", ms=4, label="joint lower")
    ax.plot(x, [c["ppl_jackknife"] for c in curve], "--", color="tab:orange", label="joint jackknife")
    ax.axhline(lm_ppl, color="black", lw=1, label="base LM")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("LM samples per prefix n")
    ax.set_ylabel(f"perplexity ({split})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    png = _png(fig)
    rows = [[c["n"], _fmt(c["ppl_lower"], decimals), _fmt(c["ppl_upper"], decimals),
             _fmt(c["ppl_upper"] - c["ppl_lower"], decimals), _fmt(c["ppl_jackknife"], decimals),
             _fmt(lm_ppl, decimals), _fmt(c["ess"], decimals)] for c in curve]
    table = markdown_table(["n", "joint ppl lower", "joint ppl upper", "gap", "jackknife", "base LM ppl",
                            "mean ESS"], rows)
    notes = [f"{r.rows.shape[0]} windows of the {split} split, {r.cont_len} continuation tokens each "
             f"({tokens} tokens); top-k of the LM samples: {k if k is not None else 'none (untruncated)'}",
             "the estimates for every n reuse the first n of the same samples (nested subsets)"]
    notes += _truncation_note(k)
    if curve[-1]["ppl_upper"] - curve[-1]["ppl_lower"] > curve[0]["ppl_upper"] - curve[0]["ppl_lower"]:
        notes.append("the bracket did not narrow from the smallest to the largest n: n is too small for these "
                     "weights (Thm. 2 holds only asymptotically)")
    intro = ("Residual-EBM seed Fig. 2 (left): joint-model perplexity lower/upper estimates (Thm. 2, Eq. 4) "
             f"and the jackknife estimate vs the number n of LM samples per prefix: ![{name}]({name}.png)")
    data = r.meta(analysis="bounds_vs_samples", seed=seed, top_k=k, ns=ns, lm_ppl=_json_float(lm_ppl),
                  curve=[{kk: (_json_float(v) if isinstance(v, float) else v) for kk, v in c.items()} for c in curve])
    return Analysis(name, _document("Perplexity bounds vs number of samples", intro, table, notes), data, png)


# --------------------------------------------------------------------------- unique n-grams (Fig. 2 right)


def _continuations(r: _Residual, systems: Sequence[str], *, seed: int, top_k: int | None, num_candidates: int,
                   batch_size: int, max_batch_tokens: int | None) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """``{system: (B, C) tokens}`` and ``{system: (B,) ESS}`` for the joint draws."""
    prefixes = r.rows[:, :r.prefix_len]
    out, ess = {}, {}
    for system in systems:
        if system == "real":
            out[system] = r.rows[:, r.prefix_len:]
            continue
        out[system], e = draw_continuations(r.model, prefixes, system, cont_len=r.cont_len,
                                            num_candidates=num_candidates, top_k=top_k,
                                            generator=_generator(seed, system), batch_size=batch_size,
                                            max_batch_tokens=max_batch_tokens)
        if e is not None:
            ess[system] = e
    return out, ess


def unique_ngram_analysis(run: str | Path, *, split: str = "test", max_rows: int | None = None, seed: int = 0,
                          top_k: int | None = None, num_candidates: int = 64, max_n: int = 4, unit: str = "token",
                          device: str = "auto", batch_size: int = 16, max_batch_tokens: int | None = None,
                          decimals: int = 2, name: str = "unique_ngrams") -> Analysis:
    """Unique n-gram percentages of real continuations, LM samples and joint samples (seed Fig. 2, right).

    One continuation per prefix and source: the window's own continuation, one LM sample, one
    joint sample (Alg. 1 over ``num_candidates`` LM samples, softmax(−E) resampling). ``unit``
    "token" counts n-grams of token ids (every continuation has C tokens); "word" of the
    whitespace-separated words of the decoded text. Two scopes: "within" = mean over
    continuations of the distinct-n-gram percentage inside each one (repetitions, the seed's
    §4.3); "pooled" = distinct over the whole set (:func:`seqebm.eval.metrics.unique_ngrams`).
    """
    from seqebm.eval.metrics import unique_ngrams

    if unit not in ("token", "word"):
        raise ValueError(f"unit must be 'token' or 'word', got {unit!r}")
    _check_count(num_candidates, "num_candidates")
    _check_count(max_n, "max_n")
    r = _Residual(run, split=split, max_rows=max_rows, device=device)
    k = r.top_k(top_k)
    conts, ess = _continuations(r, SYSTEMS, seed=seed, top_k=k, num_candidates=num_candidates,
                                batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    stats: dict[str, dict[str, dict[str, float | None]]] = {}
    for system, ids in conts.items():
        if unit == "token":
            lists = [[str(i) for i in row] for row in ids.tolist()]
        else:
            lists = [t.split() for t in r.decode(ids)]
        pooled = unique_ngrams([" ".join(x) for x in lists], max_n)
        longest = max(map(len, lists), default=0)
        stats[system] = {"within": per_text_unique_ngrams(lists, max_n),  # no n-gram at all: None, not 0 %
                         "pooled": {key: (v if int(key.split("_")[1]) <= longest else None)
                                    for key, v in pooled.items()}}
    keys = [f"unique_{n}" for n in range(1, max_n + 1)]
    rows = [[system, scope, *(_fmt(stats[system][scope][key], decimals) for key in keys)]
            for scope in ("within", "pooled") for system in SYSTEMS]
    table = markdown_table(["source", "scope", *(f"{n}-grams %" for n in range(1, max_n + 1))], rows)
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    width = 0.8 / len(SYSTEMS)
    for ax, scope in zip(axes, ("within", "pooled")):
        for i, system in enumerate(SYSTEMS):
            vals = [math.nan if (v := stats[system][scope][key]) is None else v for key in keys]  # n/a: no bar
            ax.bar([n + (i - 1) * width for n in range(1, max_n + 1)], vals, width, color=_COLOURS[system],
                   label=system)
        ax.set_xticks(range(1, max_n + 1))
        ax.set_xlabel("n")
        ax.set_title(f"unique n-grams ({scope})")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3, axis="y")
    axes[0].set_ylabel("%")
    axes[0].legend(fontsize=8, loc="lower right")
    png = _png(fig)
    joint_ess = ess["joint"]
    notes = [f"{r.rows.shape[0]} prefixes of the {split} split, one continuation of {r.cont_len} tokens per source; "
             f"n-grams of {'token ids' if unit == 'token' else 'words of the decoded text'}",
             f"LM and joint samples with top-k {k if k is not None else 'none (untruncated)'}; joint: Alg. 1 over "
             f"{num_candidates} LM samples per prefix (mean ESS {float(joint_ess.mean()):.2f})",
             "pooled percentages depend on the number of continuations: compare sources at equal counts only"]
    intro = ("Residual-EBM seed Fig. 2 (right): percentage of unique n-grams in real continuations, base-LM "
             f"samples and joint-model samples of the same prefixes: ![{name}]({name}.png)")
    data = r.meta(analysis="unique_ngrams", seed=seed, top_k=k, num_candidates=num_candidates, unit=unit,
                  max_n=max_n, joint_ess_mean=float(joint_ess.mean()),
                  sources={s: {scope: {key: _json_float(v) for key, v in d.items()} for scope, d in st.items()}
                           for s, st in stats.items()})
    return Analysis(name, _document("Unique n-grams", intro, table, notes), data, png)


# --------------------------------------------------------------------------- log-prob densities (Fig. 3)


def log_prob_density(run: str | Path, *, split: str = "test", max_rows: int | None = None, seed: int = 0,
                     top_k: int | None = None, num_candidates: int = 64, bound_samples: int = 64, bins: int = 30,
                     device: str = "auto", batch_size: int = 16, max_batch_tokens: int | None = None,
                     decimals: int = 3, name: str = "log_prob_density") -> Analysis:
    """Densities of per-token log-probabilities of real, LM and joint continuations (seed Fig. 3).

    Left panel: log P_LM(continuation | prefix) / C. Right panel: the joint model's
    (log P_LM − E − log Ẑ(prefix)) / C with log Ẑ the jackknife estimate of log Z_θ(prefix) from
    ``bound_samples`` LM samples per prefix (Thm. 2). If the joint model matched the data,
    the real and the joint curves would coincide (§4.3, "a necessary condition").
    """
    _check_count(num_candidates, "num_candidates")
    _check_count(bound_samples, "bound_samples", 2)
    _check_count(bins, "bins")
    r = _Residual(run, split=split, max_rows=max_rows, device=device)
    k = r.top_k(top_k)
    conts, ess = _continuations(r, SYSTEMS, seed=seed, top_k=k, num_candidates=num_candidates,
                                batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    prefixes = r.rows[:, :r.prefix_len]
    g = _generator(seed, "log_z")
    log_z = torch.cat([log_partition_bounds(sample_log_weights(
        r.model, prefixes[s], num_samples=bound_samples, max_new_tokens=r.cont_len, top_k=k, generator=g,
        max_batch_tokens=max_batch_tokens)).jackknife for s in _chunks(prefixes.shape[0], batch_size)])  # (B,)
    scores: dict[str, dict[str, Tensor]] = {"lm": {}, "joint": {}}
    with torch.no_grad():
        for system, ids in conts.items():
            full = torch.cat([prefixes, ids], 1)  # (B, T)
            lp = torch.cat([r.model.lm_log_prob(full[s], prefix_len=r.prefix_len)
                            for s in _chunks(full.shape[0], batch_size)])
            e = torch.cat([_energy(r.model, full[s]) for s in _chunks(full.shape[0], batch_size)])
            scores["lm"][system] = (lp / r.cont_len).cpu()
            scores["joint"][system] = ((lp - e - log_z) / r.cont_len).cpu()
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    rows, summary = [], {}
    for ax, scorer in zip(axes, ("lm", "joint")):
        lo = min(float(v.min()) for v in scores[scorer].values())
        hi = max(float(v.max()) for v in scores[scorer].values())
        edges = torch.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1).tolist()
        real_mean = float(scores[scorer]["real"].mean())
        for system in SYSTEMS:
            v = scores[scorer][system]
            ax.hist(v.numpy(), bins=edges, density=True, histtype="step", lw=1.5, color=_COLOURS[system],
                    label=system)
            st = mean_std(v.tolist())
            diff = st.mean - real_mean
            rows.append([scorer, system, st.n, _fmt(st.mean, decimals), _fmt(st.std, decimals),
                         _fmt(diff, decimals)])
            summary.setdefault(scorer, {})[system] = {"mean": _json_float(st.mean), "std": _json_float(st.std),
                                                      "n": st.n, "mean_minus_real": _json_float(diff)}
        ax.set_xlabel("log P_LM per token" if scorer == "lm" else "log P_joint per token (log Z: jackknife)")
        ax.set_ylabel("density")
        ax.set_title("base LM" if scorer == "lm" else "joint model")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    png = _png(fig)
    table = markdown_table(["scorer", "source", "n", "mean", "std", "mean − real mean"], rows)
    notes = [f"{r.rows.shape[0]} prefixes of the {split} split, one continuation of {r.cont_len} tokens per source; "
             f"top-k {k if k is not None else 'none (untruncated)'}; joint: Alg. 1 over {num_candidates} LM samples "
             f"(mean ESS {float(ess['joint'].mean()):.2f})",
             f"log Z_θ(prefix) for the joint scores: jackknife estimate from {bound_samples} LM samples per prefix",
             *_truncation_note(k)]
    intro = ("Residual-EBM seed Fig. 3: distributions of the per-token log-probability of real continuations "
             f"(red), base-LM samples (black) and joint samples (green) under each model: ![{name}]({name}.png)")
    data = r.meta(analysis="log_prob_density", seed=seed, top_k=k, num_candidates=num_candidates,
                  bound_samples=bound_samples, summary=summary,
                  scores={sc: {s: [_json_float(x) for x in v.tolist()] for s, v in d.items()}
                          for sc, d in scores.items()})
    return Analysis(name, _document("Log-probability densities", intro, table, notes), data, png)


# --------------------------------------------------------------------------- per-position gain (Fig. 1)


def position_gain(run: str | Path, *, split: str = "test", max_rows: int | None = None, seed: int = 0,
                  top_k: int | None = None, num_samples: int = 64, device: str = "auto", batch_size: int = 16,
                  max_batch_tokens: int | None = None, decimals: int = 3, name: str = "position_gain") -> Analysis:
    """Per-position perplexity gain of the joint model over the base LM (residual-EBM seed Fig. 1).

    Eq. 5 at every continuation position t = 1..C: numerator and denominator are bracketed with
    ``num_samples`` LM samples each (Thm. 2; lower = lower numerator − upper denominator); the
    last position is enumerated over the vocabulary and exact (lower = upper).
    """
    _check_count(num_samples, "num_samples", 2)
    r = _Residual(run, split=split, max_rows=max_rows, device=device)
    k = r.top_k(top_k, bounds=True)
    lp = position_log_probs(r.model, r.rows, prefix_len=r.prefix_len, num_samples=num_samples, top_k=k,
                            generator=_generator(seed, "positions"), batch_size=batch_size,
                            max_batch_tokens=max_batch_tokens)
    table_rows = position_perplexities(lp["lm"], lp["lower"], lp["upper"], lp["estimate"])
    check = last_position_check(r.model, r.rows, num_samples=num_samples, top_k=k,
                                generator=_generator(seed, "last-position"), batch_size=batch_size,
                                max_batch_tokens=max_batch_tokens, exact=lp["lower"][:, -1])
    plt = _pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    pos = [t["position"] for t in table_rows]
    ax1.plot(pos, [t["lm_ppl"] for t in table_rows], "o-", color="black", ms=3, label="base LM")
    ax1.fill_between(pos, [t["ppl_lower"] for t in table_rows], [t["ppl_upper"] for t in table_rows],
                     color="tab:green", alpha=0.25, label="joint: lower-upper")
    ax1.plot(pos, [t["ppl_estimate"] for t in table_rows], "s--", color="tab:green", ms=3, label="joint estimate")
    ax1.set_ylabel("perplexity at the position")
    ax2.fill_between(pos, [t["gain_lower"] for t in table_rows], [t["gain_upper"] for t in table_rows],
                     color="tab:blue", alpha=0.25, label="gain: bounds")
    ax2.plot(pos, [t["gain"] for t in table_rows], "o-", color="tab:blue", ms=3, label="gain (estimate)")
    ax2.axhline(0.0, color="black", lw=0.8)
    ax2.set_ylabel("LM ppl − joint ppl")
    for ax in (ax1, ax2):
        ax.set_xlabel("position in the continuation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    png = _png(fig)
    rows = [[t["position"], _fmt(t["lm_ppl"], decimals), _fmt(t["ppl_lower"], decimals),
             _fmt(t["ppl_upper"], decimals), _fmt(t["ppl_estimate"], decimals), _fmt(t["gain"], decimals),
             f"[{_fmt(t['gain_lower'], decimals)}, {_fmt(t['gain_upper'], decimals)}]",
             "exact" if t["exact"] else "estimated"] for t in table_rows]
    table = markdown_table(["position", "LM ppl", "joint ppl lower", "joint ppl upper", "joint ppl estimate",
                            "gain", "gain bounds", "joint"], rows)
    notes = [f"{r.rows.shape[0]} windows of the {split} split; {num_samples} LM samples per numerator and per "
             f"denominator of Eq. 5; top-k {k if k is not None else 'none (untruncated)'}",
             f"position {r.cont_len} (the last) is enumerated over the {r.task.vocab_size} tokens: exact",
             f"bound tightness at the last position: {num_samples}-sample bounds give ppl "
             f"[{_fmt(check['ppl_lower'], decimals)}, {_fmt(check['ppl_upper'], decimals)}] "
             f"(jackknife {_fmt(check['ppl_estimate'], decimals)}) against the exact "
             f"{_fmt(check['ppl_exact'], decimals)}",
             *_truncation_note(k)]
    intro = ("Residual-EBM seed Fig. 1: per-position perplexity of the joint model (Eq. 5, bounds from Thm. 2) "
             f"and its gain over the base LM, positions 1..{r.cont_len} of the continuation: ![{name}]({name}.png)")
    data = r.meta(analysis="position_gain", seed=seed, top_k=k, num_samples=num_samples,
                  last_position_check={kk: _json_float(v) for kk, v in check.items()},
                  positions=[{kk: (_json_float(v) if isinstance(v, float) else v) for kk, v in t.items()}
                             for t in table_rows])
    return Analysis(name, _document("Per-position perplexity gain", intro, table, notes), data, png)


# --------------------------------------------------------------------------- A/B export (Tab. 2)


def ab_export(run: str | Path, *, a: str = "joint", b: str = "lm", split: str = "test", max_rows: int | None = None,
              seed: int = 0, top_k: int | None = None, num_candidates: int = 64, device: str = "auto",
              batch_size: int = 16, max_batch_tokens: int | None = None,
              name: str = "ab_export") -> tuple[Analysis, list[dict[str, str]], list[dict[str, str]]]:
    """Pairs of continuations for a human A/B evaluation (residual-EBM seed §4.2, Tab. 2, App. A.4).

    For each of the first ``max_rows`` windows of ``split``: the decoded prefix and one
    continuation from each of systems ``a`` and ``b`` ("real", "lm", "joint"), their order
    shuffled per item (:func:`ab_pairs`, seeded). Returns the summary :class:`Analysis`, the
    ``pairs`` rows (for the raters) and the ``key`` rows (which system wrote ``text_1`` /
    ``text_2``; keep it from the raters).
    """
    for role, system in (("a", a), ("b", b)):
        if system not in SYSTEMS:
            raise ValueError(f"system {role} must be one of {', '.join(SYSTEMS)}, got {system!r}")
    if a == b:
        raise ValueError(f"--a and --b must differ, got {a!r} twice")
    _check_count(num_candidates, "num_candidates")
    r = _Residual(run, split=split, max_rows=max_rows, device=device)
    k = r.top_k(top_k)
    conts, ess = _continuations(r, (a, b), seed=seed, top_k=k, num_candidates=num_candidates,
                                batch_size=batch_size, max_batch_tokens=max_batch_tokens)
    n = r.rows.shape[0]
    ids = [f"{split}-{i:05d}" for i in range(n)]
    prefixes = r.decode(r.rows[:, 1:r.prefix_len])
    texts = {s: r.decode(v) for s, v in conts.items()}
    pairs, key = ab_pairs(ids, prefixes, texts[a], texts[b], a=a, b=b, seed=seed)
    a_first = sum(x["text_1"] == a for x in key)
    identical = sum(ta == tb for ta, tb in zip(texts[a], texts[b]))
    table = markdown_table(["items", "system A", "system B", "A shown first", "B shown first", "identical texts"],
                           [[n, a, b, a_first, n - a_first, identical]])
    notes = ["pairs.jsonl holds id, prefix, text_1, text_2 for the raters; key.jsonl maps each id to the systems "
             "behind text_1 and text_2: do not show it to the raters",
             f"order shuffled with random.Random({seed}), balanced between the two sides",
             f"samples: top-k {k if k is not None else 'none (untruncated)'}"
             + (f"; joint: Alg. 1 over {num_candidates} LM samples (mean ESS {float(ess['joint'].mean()):.2f})"
                if "joint" in ess else ""),
             "seed Tab. 2 / App. A.4: count, per item, which text more raters prefer; a one-sided binomial test "
             "gives the p-value"]
    intro = (f"A/B export for a human evaluation (residual-EBM seed Tab. 2): {n} prefixes of the {split} split, "
             f"one continuation of {r.cont_len} tokens from each of `{a}` and `{b}`.")
    data = r.meta(analysis="ab_export", seed=seed, top_k=k, num_candidates=num_candidates, a=a, b=b,
                  a_first=a_first, identical=identical, files=["pairs.jsonl", "key.jsonl"])
    return Analysis(name, _document("A/B export", intro, table, notes), data), pairs, key


# --------------------------------------------------------------------------- command line


def _check_free(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Fail before the computation when an output exists (without --force)."""
    if args.force:
        return
    existing = [str(p) for nm in names if (p := Path(args.out) / nm).exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass --force to overwrite, "
                              "or choose another --out / --name)")


def _outputs(args: argparse.Namespace, png: bool = True) -> list[str]:
    return [f"{args.name}{s}" for s in (".md", ".json", *((".png",) if png else ()))]


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {"split": args.split, "max_rows": args.max_rows, "seed": args.seed, "top_k": args.top_k,
            "device": args.device, "batch_size": args.batch_size, "max_batch_tokens": args.max_batch_tokens,
            "decimals": args.decimals, "name": args.name}


def _cmd_bounds(args: argparse.Namespace) -> int:
    _check_free(args, _outputs(args))
    return _emit(bounds_vs_samples(args.run, ns=args.ns or list(DEFAULT_NS), **_common(args)), args)


def _cmd_unique(args: argparse.Namespace) -> int:
    _check_free(args, _outputs(args))
    return _emit(unique_ngram_analysis(args.run, num_candidates=args.num_candidates, max_n=args.max_n,
                                       unit=args.unit, **_common(args)), args)


def _cmd_density(args: argparse.Namespace) -> int:
    _check_free(args, _outputs(args))
    return _emit(log_prob_density(args.run, num_candidates=args.num_candidates, bound_samples=args.bound_samples,
                                  bins=args.bins, **_common(args)), args)


def _cmd_position(args: argparse.Namespace) -> int:
    _check_free(args, _outputs(args))
    return _emit(position_gain(args.run, num_samples=args.num_samples, **_common(args)), args)


def _cmd_ab(args: argparse.Namespace) -> int:
    files = ("pairs.jsonl", "key.jsonl")
    _check_free(args, [*_outputs(args, png=False), *files])
    common = _common(args)
    del common["decimals"]
    analysis, pairs, key = ab_export(args.run, a=args.a, b=args.b, num_candidates=args.num_candidates, **common)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    for fname, rows in zip(files, (pairs, key)):
        atomic_write_bytes(out / fname, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows).encode())
    paths = write_analysis(analysis, out, force=True)  # existence checked above
    print(analysis.markdown)
    print(f"[seqebm] wrote {', '.join(map(str, [out / f for f in files] + paths))}")
    return 0


def _add_common_args(p: argparse.ArgumentParser, default_name: str, decimals: int = 2) -> None:
    p.add_argument("--run", required=True, help="run folder of a residual EBM (model.arch=residual)")
    p.add_argument("--split", default="test", choices=["train", "valid", "test"], help="windows used (default test)")
    p.add_argument("--max-rows", type=int, default=None,
                   help="first N windows of the split (default: all the run kept, data.residual.max_eval_rows)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=None,
                   help="top-k of the LM samples (default: the run's data.residual.top_k; 0: untruncated)")
    p.add_argument("--batch-size", type=int, default=16, help="prefixes per sampling chunk (default 16)")
    p.add_argument("--max-batch-tokens", type=int, default=None, help="sampler memory budget: rows x length")
    p.add_argument("--device", default="auto")
    _add_output_args(p, default_name, decimals)


def register_residual_commands(subparsers: Any) -> None:
    """Add bounds-vs-samples, unique-ngrams, log-prob-density, position-gain, ab-export and window-ppl to
    ``seqebm analyze`` (``subparsers``: the analyze parser's ``add_subparsers`` object)."""
    from seqebm.eval.residual_baselines import register_window_ppl_command

    register_window_ppl_command(subparsers)
    multi = {"action": "extend", "nargs": "+", "default": None}

    b = subparsers.add_parser("bounds-vs-samples", help="residual EBM: joint perplexity bounds vs number of LM "
                                                        "samples (seed Fig. 2 left)")
    b.add_argument("--ns", type=int, **multi, help=f"numbers of LM samples (default {' '.join(map(str, DEFAULT_NS))})")
    _add_common_args(b, "bounds_vs_samples")
    b.set_defaults(func=_cmd_bounds)

    u = subparsers.add_parser("unique-ngrams", help="residual EBM: unique n-grams of real, LM and joint "
                                                    "continuations (seed Fig. 2 right)")
    u.add_argument("--num-candidates", type=int, default=64, help="LM samples per joint draw (Alg. 1; default 64)")
    u.add_argument("--max-n", type=int, default=4)
    u.add_argument("--unit", choices=["token", "word"], default="token", help="n-grams of token ids or of words")
    _add_common_args(u, "unique_ngrams")
    u.set_defaults(func=_cmd_unique)

    d = subparsers.add_parser("log-prob-density", help="residual EBM: densities of per-token log-probabilities "
                                                       "of real, LM and joint continuations (seed Fig. 3)")
    d.add_argument("--num-candidates", type=int, default=64, help="LM samples per joint draw (Alg. 1; default 64)")
    d.add_argument("--bound-samples", type=int, default=64, help="LM samples per prefix for log Z (default 64)")
    d.add_argument("--bins", type=int, default=30)
    _add_common_args(d, "log_prob_density", decimals=3)
    d.set_defaults(func=_cmd_density)

    p = subparsers.add_parser("position-gain", help="residual EBM: per-position perplexity of the joint model vs "
                                                    "the LM with Eq. 5 bounds (seed Fig. 1)")
    p.add_argument("--num-samples", type=int, default=64, help="LM samples per Eq. 5 term (default 64)")
    _add_common_args(p, "position_gain", decimals=3)
    p.set_defaults(func=_cmd_position)

    a = subparsers.add_parser("ab-export", help="residual EBM: continuation pairs of two systems for a human A/B "
                                                "evaluation, key in a separate file (seed Tab. 2)")
    a.add_argument("--a", default="joint", choices=list(SYSTEMS), help="system A (default joint)")
    a.add_argument("--b", default="lm", choices=list(SYSTEMS), help="system B (default lm)")
    a.add_argument("--num-candidates", type=int, default=64, help="LM samples per joint draw (Alg. 1; default 64)")
    _add_common_args(a, "ab_export")
    a.set_defaults(func=_cmd_ab)
