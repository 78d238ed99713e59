"""Analyses across trained run folders: tables (Markdown + JSON) and plots (PNG).

The E-Forcing seed's analysis tables and figures, computed from run folders written by
:func:`seqebm.training.experiment.run_experiment` (``config.yaml``, ``results.json``,
``metrics.jsonl``, ``model.safetensors``, ``tokenizer/``):

* :func:`summarize_runs`: mean ± sample std over seeds of ``results.json`` metrics, runs grouped
  by ``config.yaml`` values (the "three seeds" tables; the start-epoch sweep of App. C.3, Tab. 9).
* :func:`loss_curves`: train and valid curves of several runs on one figure (App. C.4, Fig. 1).
* :func:`exposure_bias`: how often the candidate gives the reference token a higher probability
  than the baseline, in the context of each model's own greedy decoding (§5.3, Tab. 4).
* :func:`length_bucket_table`: BLEU by target-length bucket, mean ± std (§5.4, Tab. 5).
* :func:`text_metric_table`: ROUGE-1/2/L, METEOR and BLEU, mean ± std (App. C.7, Tab. 12).

Each returns an :class:`Analysis` (Markdown, a JSON-able dict and optionally a PNG) that
:func:`write_analysis` saves atomically, never overwriting a file unless ``force=True``.
On the command line they are ``seqebm analyze <command>`` (:func:`register_analysis_commands`).

Notation: B sentences in a chunk, T target positions, S source length, V vocabulary.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any



from seqebm.eval.run_tables import (Analysis, MeanStd, RunInfo, _MISSING, _document, _group_notes, _json_float,
                                    _lookup_or_missing, _number, _show, _stat_json, format_mean_std, group_runs,
                                    load_runs, lookup, markdown_table, mean_std, write_analysis)
from seqebm.eval.exposure_bias import exposure_bias, greedy_decode_ids, reference_log_probs

__all__ = [
    "Analysis", "MeanStd", "RunInfo", "exposure_bias", "format_mean_std", "greedy_decode_ids", "group_runs",
    "length_bucket_table", "load_runs", "lookup", "loss_curves", "mean_std", "reference_log_probs",
    "register_analysis_commands", "summarize_runs", "text_metric_table", "write_analysis",
]

#: (column title, results.json key) of Tab. 12; ``{beam}`` is the beam size
TEXT_METRIC_COLUMNS: tuple[tuple[str, str], ...] = (
    ("ROUGE-1", "test.rouge1"), ("ROUGE-2", "test.rouge2"), ("ROUGE-L", "test.rougeL"),
    ("METEOR", "test.meteor"), ("BLEU (beam {beam})", "test.bleu_beam{beam}"), ("BLEU (greedy)", "test.bleu_greedy"),
)


# --------------------------------------------------------------------------- summary (seeds; Tab. 9)


def summarize_runs(runs: Sequence[RunInfo], metrics: Sequence[str], group_by: Sequence[str], *,
                   decimals: int = 2, name: str = "summary") -> Analysis:
    """Mean ± sample std over the runs of each group for every ``results.json`` metric.

    ``metrics`` are dotted keys into ``results.json`` (``test.ppl``, ``test.bleu_beam5``,
    ``valid.loss``...), ``group_by`` dotted keys into ``config.yaml`` (``objective.name``;
    ``objective.ef_start_epoch`` gives the start-epoch sweep of E-Forcing App. C.3, Tab. 9).
    A metric absent from *every* run is an error naming the keys available; one absent from
    some runs is averaged over the others and the cell shows its ``n``.
    """
    if not metrics:
        raise ValueError("give at least one metric (--metrics test.ppl ...)")
    for key in metrics:
        if all(_lookup_or_missing(r.results, key) is _MISSING for r in runs):
            lookup(runs[0].results or {}, key, where=f"results.json of run {runs[0].path} (or any other run)")
    groups = group_runs(runs, group_by)
    rows, out_groups, notes = [], [], []
    for g in groups:
        stats = {m: mean_std([v for r in g.runs if (v := _number(_lookup_or_missing(r.results, m), m, r)) is not None])
                 for m in metrics}
        seeds = [_lookup_or_missing(r.config, "train.seed") for r in g.runs]
        rows.append([*map(_show, g.values), len(g.runs), ", ".join(map(str, seeds)),
                     *(format_mean_std(stats[m], decimals, expected_n=len(g.runs)) for m in metrics)])
        out_groups.append({"group": dict(zip(group_by, g.values)), "runs": [str(r.path) for r in g.runs],
                           "seeds": seeds, "metrics": {m: _stat_json(s) for m, s in stats.items()}})
        notes += _group_notes(g, group_by)
        for m in metrics:
            absent = [r.name for r in g.runs if _lookup_or_missing(r.results, m) in (_MISSING, None)]
            if absent:
                notes.append(f"{m} is absent in run(s) {', '.join(absent)}")
    table = markdown_table([*group_by, "n", "seeds", *metrics], rows)
    intro = ("Mean ± sample standard deviation (n − 1) over the runs of each group (n runs; their "
             "`train.seed` listed). Metrics from `results.json`; groups by `config.yaml` values.")
    return Analysis(name, _document("Summary over seeds", intro, table, notes),
                    {"analysis": "summary", "group_by": list(group_by), "metrics": list(metrics),
                     "groups": out_groups})


# --------------------------------------------------------------------------- curves (Fig. 1)


def _read_metrics(run: RunInfo) -> tuple[list[dict[str, Any]], int]:
    path = run.path / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"no metrics.jsonl in run folder {run.path}")
    records, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            bad += 1  # e.g. a line cut short by a killed run
    return records, bad


def _labels(runs: Sequence[RunInfo], label_by: Sequence[str]) -> list[str]:
    if not label_by:
        return [r.name for r in runs]
    labels = [" / ".join(_show(lookup(r.config, k, where=f"config.yaml of run {r.path}")) for k in label_by)
              for r in runs]
    return [f"{lab} [{r.name}]" if labels.count(lab) > 1 else lab for lab, r in zip(labels, runs)]


def loss_curves(runs: Sequence[RunInfo], keys: Sequence[str] = ("loss",), label_by: Sequence[str] = (), *,
                decimals: int = 4, name: str = "curves") -> Analysis:
    """Train (thin line) and valid (markers) curves of ``keys`` from each run's ``metrics.jsonl``.

    One subplot per key, one colour per run, labelled by the config values at ``label_by``
    (default: the folder name), as in E-Forcing App. C.4, Fig. 1 (train/test cross entropy of
    the baseline and E-Forcing). The table lists the last train value and the last and best
    valid values per run and key.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not keys:
        raise ValueError("give at least one key (--keys loss ...)")
    labels = _labels(runs, label_by)
    loaded = [_read_metrics(r) for r in runs]
    for key in keys:
        if not any(key in rec for recs, _ in loaded for rec in recs):
            avail = sorted({k for recs, _ in loaded for rec in recs for k in rec} - {"split", "step", "epoch"})
            raise ValueError(f"key {key!r} is in no run's metrics.jsonl; available keys: {', '.join(avail)}")
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    rows, series, notes = [], [], []
    for i, (run, label, (records, bad)) in enumerate(zip(runs, labels, loaded)):
        if bad:
            notes.append(f"run {run.name}: skipped {bad} malformed line(s) of metrics.jsonl")
        for ax, key in zip(axes[0], keys):
            pts = {s: [(r["step"], r[key]) for r in records if r.get("split") == s and key in r and "step" in r]
                   for s in ("train", "valid")}
            c = colours[i % len(colours)]
            if pts["train"]:
                ax.plot(*zip(*pts["train"]), "-", lw=0.8, alpha=0.8, color=c, label=f"{label} (train)")
            if pts["valid"]:
                ax.plot(*zip(*pts["valid"]), "o", ms=4, color=c, label=f"{label} (valid)")
            last_t = f"{pts['train'][-1][1]:.{decimals}f} (step {pts['train'][-1][0]})" if pts["train"] else "n/a"
            if pts["valid"]:
                best = min(pts["valid"], key=lambda p: p[1])
                last_v = f"{pts['valid'][-1][1]:.{decimals}f} (step {pts['valid'][-1][0]})"
                best_v = f"{best[1]:.{decimals}f} (step {best[0]})"
            else:
                last_v = best_v = "n/a"
            rows.append([label, run.name, key, last_t, last_v, best_v])
            series.append({"run": str(run.path), "label": label, "key": key,
                           "train": [[s, _json_float(float(v))] for s, v in pts["train"]],
                           "valid": [[s, _json_float(float(v))] for s, v in pts["valid"]]})
    for ax, key in zip(axes[0], keys):
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    table = markdown_table(["label", "run", "key", "last train", "last valid", "best valid"], rows)
    intro = (f"Train (thin lines) and valid (markers) curves from `metrics.jsonl`: ![{name}]({name}.png)")
    return Analysis(name, _document("Training curves", intro, table, notes),
                    {"analysis": "curves", "keys": list(keys), "label_by": list(label_by), "series": series},
                    buf.getvalue())


# --------------------------------------------------------------------------- BLEU by length (Tab. 5)


def _beam_sizes(runs: Sequence[RunInfo]) -> list[int]:
    """The distinct ``eval.beam_size`` > 1 of the runs (their ``test.bleu_beam<k>`` keys)."""
    sizes = {_lookup_or_missing(r.config, "eval.beam_size") for r in runs}
    return sorted(k for k in sizes if isinstance(k, int) and not isinstance(k, bool) and k > 1)


def _bucket_scores(value: Any, where: str) -> dict[str, float | None]:
    """``{bucket: BLEU}`` from a dict of numbers, of ``{"bleu", "count"}`` rows, or a list of rows."""
    if isinstance(value, list):
        if not all(isinstance(r, dict) and "bucket" in r for r in value):
            raise ValueError(f"{where}: expected a list of {{'bucket', 'bleu'}} rows, got {value!r}")
        value = {r["bucket"]: r for r in value}
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a dict bucket -> BLEU, got {value!r}")
    out = {}
    for bucket, v in value.items():
        v = v.get("bleu") if isinstance(v, dict) else v
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ValueError(f"{where}: BLEU of bucket {bucket!r} is not a number: {v!r}")
        out[str(bucket)] = None if v is None else float(v)
    return out


def _bucket_order(label: str) -> tuple[float, str]:
    """Buckets by their lower edge: ``"<10"`` first, then ``"10-19"``, ``"[25, 49)"``, ``">=50"``."""
    m = re.search(r"\d+(?:\.\d+)?", label)
    if m is None:
        return (math.inf, label)
    return (-math.inf if label.lstrip().startswith("<") else float(m.group()), label)


def length_bucket_table(runs: Sequence[RunInfo], label_by: Sequence[str] = ("objective.name",), *,
                        decodings: Sequence[str] | None = None, decimals: int = 2,
                        name: str = "length_buckets") -> Analysis:
    """BLEU per target-length bucket, mean ± std over the runs of each group (E-Forcing §5.4, Tab. 5).

    Reads ``test.bleu_by_length_<decoding>`` (a dict bucket -> BLEU, None for an empty bucket)
    and, for the "all" column, ``test.bleu_<decoding>``; ``decodings`` defaults to ``greedy``
    and ``beam<k>`` for the runs' ``eval.beam_size`` k. A run without the key is listed in the
    notes and left out of that cell; a cell with no value at all reads ``n/a``.
    """
    if decodings is None:
        decodings = ["greedy"] + [f"beam{k}" for k in _beam_sizes(runs)]
    groups = group_runs(runs, label_by)
    per_key = {d: f"test.bleu_by_length_{d}" for d in decodings}
    scores: dict[tuple[int, str], dict[str, dict[str, float | None]]] = {}
    buckets: list[str] = []
    for gi, g in enumerate(groups):
        for d, key in per_key.items():
            for r in g.runs:
                raw = _lookup_or_missing(r.results, key)
                if raw is _MISSING or raw is None:
                    continue
                s = _bucket_scores(raw, f"{key} in results.json of run {r.path}")
                scores.setdefault((gi, d), {})[str(r.path)] = s
                buckets += [b for b in s if b not in buckets]
    buckets.sort(key=_bucket_order)
    rows, out, notes = [], [], []
    absent_runs: dict[str, list[str]] = {key: [] for key in per_key.values()}
    for gi, g in enumerate(groups):
        notes += _group_notes(g, label_by)
        for d, key in per_key.items():
            have = scores.get((gi, d), {})
            absent = [r.name for r in g.runs if str(r.path) not in have]
            absent_runs[key] += absent
            stats = {b: mean_std([v for s in have.values() if (v := s.get(b)) is not None]) for b in buckets}
            overall = mean_std([v for r in g.runs
                                if (v := _number(_lookup_or_missing(r.results, f"test.bleu_{d}"), f"test.bleu_{d}", r))
                                is not None])
            cells = [format_mean_std(stats[b], decimals, expected_n=len(have)) for b in buckets]
            rows.append([*map(_show, g.values), d, f"{len(have)}/{len(g.runs)}", *cells,
                         format_mean_std(overall, decimals, expected_n=len(g.runs))])
            out.append({"group": dict(zip(label_by, g.values)), "decoding": d, "runs": [str(r.path) for r in g.runs],
                        "runs_without_key": absent, "buckets": {b: _stat_json(s) for b, s in stats.items()},
                        "all": _stat_json(overall)})
    for key, absent in absent_runs.items():
        if len(absent) == len(runs):
            notes.append(f"`{key}` is absent in every run")
        elif absent:
            notes.append(f"`{key}` is absent in run(s) {', '.join(absent)}")
    if not buckets:
        notes.append("no run has per-length BLEU: re-evaluate the runs with a version that writes "
                     + ", ".join(f"`{k}`" for k in per_key.values()))
    table = markdown_table([*label_by, "decoding", "runs with key", *buckets, "all"], rows)
    intro = ("Test BLEU by target-length bucket (reference length in words), mean ± sample std over the "
             "runs of each group; `all` is the corpus BLEU of the whole test set.")
    return Analysis(name, _document("BLEU by target length", intro, table, notes),
                    {"analysis": "length_buckets", "label_by": list(label_by), "buckets": buckets, "rows": out})


# --------------------------------------------------------------------------- text metrics (Tab. 12)


def text_metric_table(runs: Sequence[RunInfo], label_by: Sequence[str] = ("objective.name",), *,
                      beam_size: int | None = None, decimals: int = 2, name: str = "text_metrics") -> Analysis:
    """ROUGE-1/2/L, METEOR and BLEU (beam, greedy), mean ± std per group (E-Forcing App. C.7, Tab. 12).

    Keys ``test.rouge1``, ``test.rouge2``, ``test.rougeL``, ``test.meteor`` (null when WordNet
    was unavailable), ``test.bleu_beam<k>``, ``test.bleu_greedy``; missing values read ``n/a``.
    ``beam_size`` defaults to the runs' common ``eval.beam_size`` (5 when they have none > 1).
    """
    if beam_size is None:
        sizes = _beam_sizes(runs)
        if len(sizes) > 1:
            raise ValueError(f"the runs were evaluated with different beam sizes (eval.beam_size {sizes}); "
                             "choose the BLEU column with --beam-size")
        beam_size = sizes[0] if sizes else 5
    columns = [(t.format(beam=beam_size), k.format(beam=beam_size)) for t, k in TEXT_METRIC_COLUMNS]
    groups = group_runs(runs, label_by)
    rows, out, notes = [], [], []
    for g in groups:
        notes += _group_notes(g, label_by)
        stats = {}
        for _, key in columns:
            stats[key] = mean_std([v for r in g.runs if (v := _number(_lookup_or_missing(r.results, key), key, r))
                                   is not None])
            if 0 < stats[key].n < len(g.runs):
                notes.append(f"`{key}` is absent in {len(g.runs) - stats[key].n} of {len(g.runs)} runs "
                             f"of group {g.label()!r}")
        rows.append([*map(_show, g.values), len(g.runs),
                     *(format_mean_std(stats[k], decimals, expected_n=len(g.runs)) for _, k in columns)])
        out.append({"group": dict(zip(label_by, g.values)), "runs": [str(r.path) for r in g.runs],
                    "metrics": {k: _stat_json(s) for k, s in stats.items()}})
    missing_everywhere = [k for _, k in columns if all(_lookup_or_missing(r.results, k) in (_MISSING, None)
                                                      for r in runs)]
    if missing_everywhere:
        notes.append("absent in every run (n/a): " + ", ".join(f"`{k}`" for k in missing_everywhere))
    table = markdown_table([*label_by, "n", *(t for t, _ in columns)], rows)
    intro = ("Test-set text metrics (percent), mean ± sample std over the runs of each group (ROUGE and "
             "METEOR as the run computed them: of the beam hypotheses for translation).")
    return Analysis(name, _document("Text metrics", intro, table, notes),
                    {"analysis": "text_metrics", "label_by": list(label_by), "columns": dict(columns), "rows": out})


# --------------------------------------------------------------------------- command line


def _add_output_args(p: argparse.ArgumentParser, default_name: str, decimals: int = 2) -> None:
    p.add_argument("--out", required=True, help="output folder (created)")
    p.add_argument("--name", default=default_name, help=f"file stem of the outputs (default {default_name})")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--decimals", type=int, default=decimals, help="decimals in the Markdown table")


def _emit(analysis: Analysis, args: argparse.Namespace) -> int:
    paths = write_analysis(analysis, args.out, force=args.force)
    print(analysis.markdown)
    print(f"[seqebm] wrote {', '.join(map(str, paths))}")
    return 0


def _check_output_free(args: argparse.Namespace, suffixes: Sequence[str] = (".md", ".json")) -> None:
    """Fail before a long computation when the outputs exist (write_analysis checks again)."""
    if args.force:
        return
    existing = [str(p) for s in suffixes if (p := Path(args.out) / f"{args.name}{s}").exists()]
    if existing:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass --force to overwrite, "
                              "or choose another --out / --name)")


def _cmd_summary(args: argparse.Namespace) -> int:
    _check_output_free(args)
    return _emit(summarize_runs(load_runs(args.runs), args.metrics, args.group_by or ["objective.name"],
                                decimals=args.decimals, name=args.name), args)


def _cmd_curves(args: argparse.Namespace) -> int:
    _check_output_free(args, (".md", ".json", ".png"))
    return _emit(loss_curves(load_runs(args.runs, need_results=False), args.keys or ["loss"], args.label_by or [],
                             decimals=args.decimals, name=args.name), args)


def _cmd_exposure_bias(args: argparse.Namespace) -> int:
    _check_output_free(args)
    return _emit(exposure_bias(args.baseline, args.candidate, split=args.split, n=args.n, seed=args.seed,
                               device=args.device, batch_size=args.batch_size, decimals=args.decimals,
                               name=args.name), args)


def _cmd_length_buckets(args: argparse.Namespace) -> int:
    _check_output_free(args)
    return _emit(length_bucket_table(load_runs(args.runs), args.label_by or ["objective.name"],
                                     decodings=args.decodings, decimals=args.decimals,
                                     name=args.name), args)


def _cmd_text_metrics(args: argparse.Namespace) -> int:
    _check_output_free(args)
    return _emit(text_metric_table(load_runs(args.runs), args.label_by or ["objective.name"],
                                   beam_size=args.beam_size, decimals=args.decimals, name=args.name), args)


def register_analysis_commands(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``analyze`` (summary, curves, exposure-bias, length-buckets, text-metrics) to a CLI.

    ``subparsers`` is the object returned by ``ArgumentParser.add_subparsers``; each leaf command
    sets ``func`` (``args.func(args)`` returns the exit status). Errors are ``ValueError``,
    ``FileNotFoundError`` or ``FileExistsError`` with a message for the user.
    """
    a = subparsers.add_parser("analyze", help="tables and plots across trained run folders (E-Forcing §5.3-5.4, "
                                              "App. C)")
    sub = a.add_subparsers(dest="analysis", required=True)
    multi = {"action": "extend", "nargs": "+", "default": None}

    s = sub.add_parser("summary", help="mean ± std over seeds of results.json metrics, grouped by config values")
    s.add_argument("runs", nargs="+", help="run folders")
    s.add_argument("--metrics", **multi, required=True,
                   help="dotted keys into results.json, e.g. test.ppl test.bleu_beam5 valid.loss")
    s.add_argument("--group-by", **multi, help="dotted config keys (repeatable; default objective.name)")
    _add_output_args(s, "summary")
    s.set_defaults(func=_cmd_summary)

    c = sub.add_parser("curves", help="train/valid curves of several runs on one figure (Fig. 1)")
    c.add_argument("runs", nargs="+")
    c.add_argument("--keys", **multi, help="metrics.jsonl keys (default loss)")
    c.add_argument("--label-by", **multi, help="dotted config keys for the legend (default: folder name)")
    _add_output_args(c, "curves", decimals=4)
    c.set_defaults(func=_cmd_curves)

    e = sub.add_parser("exposure-bias", help="Tab. 4: reference-token probabilities under each model's own "
                                             "greedy prefix, candidate vs baseline (translation runs)")
    e.add_argument("--baseline", required=True, help="run folder of the baseline (e.g. teacher forcing)")
    e.add_argument("--candidate", required=True, help="run folder of the candidate (e.g. E-Forcing)")
    e.add_argument("--split", default="train", choices=["train", "valid", "test"],
                   help="where the pairs come from (default train, as in the seed's §5.3)")
    e.add_argument("--n", type=int, default=1000, help="number of sampled pairs (default 1000)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--device", default="auto")
    _add_output_args(e, "exposure_bias")
    e.set_defaults(func=_cmd_exposure_bias)

    lb = sub.add_parser("length-buckets", help="Tab. 5: BLEU by target-length bucket, mean ± std")
    lb.add_argument("runs", nargs="+")
    lb.add_argument("--label-by", **multi, help="dotted config keys (default objective.name)")
    lb.add_argument("--decodings", **multi, help="suffixes of test.bleu_by_length_* (default: greedy and "
                                                 "beam<k> for the runs' eval.beam_size k, usually beam5)")
    _add_output_args(lb, "length_buckets")
    lb.set_defaults(func=_cmd_length_buckets)

    t = sub.add_parser("text-metrics", help="Tab. 12: ROUGE-1/2/L, METEOR, BLEU, mean ± std")
    t.add_argument("runs", nargs="+")
    t.add_argument("--label-by", **multi, help="dotted config keys (default objective.name)")
    t.add_argument("--beam-size", type=int, default=None,
                   help="BLEU column test.bleu_beam<k> (default: the runs' eval.beam_size, usually 5)")
    _add_output_args(t, "text_metrics")
    t.set_defaults(func=_cmd_text_metrics)
    from seqebm.eval.residual_analysis import register_residual_commands

    register_residual_commands(sub)  # residual EBM: bounds-vs-samples, unique-ngrams, ... (residual-EBM seed §4)
    return a
