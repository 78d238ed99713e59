"""Run folders as tables: loading runs, dotted config/result lookups, grouping, mean ± std,
and atomic Markdown/JSON/PNG outputs (shared by :mod:`seqebm.eval.analysis` and
:mod:`seqebm.eval.residual_analysis`)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from seqebm.config import deep_merge, read_yaml, to_dict
from seqebm.io import atomic_write_bytes

#: config keys that may differ between the seeds of one group without a note
SEED_LIKE_KEYS = frozenset({"name", "train.seed", "train.device", "train.progress", "data.cache_dir",
                            "model.init_from"})
_MISSING = object()


# --------------------------------------------------------------------------- run folders


@dataclass
class RunInfo:
    """A run folder's ``config.yaml`` (defaults filled in) and ``results.json`` (None if not loaded)."""

    path: Path
    config: dict[str, Any]
    results: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name


def load_runs(paths: Sequence[str | Path], *, need_results: bool = True, unique: bool = True) -> list[RunInfo]:
    """Read the config (and ``results.json`` if ``need_results``) of each run folder.

    The config is the run's YAML merged over today's defaults, without validation, so runs
    written by older versions still load. Raises ``FileNotFoundError`` naming the missing path.
    """
    from seqebm.training.experiment import ExperimentConfig

    if not paths:
        raise ValueError("no run folders given")
    defaults = to_dict(ExperimentConfig())
    runs, seen = [], set()
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"run folder not found: {p}")
        if unique and p.resolve() in seen:
            raise ValueError(f"run folder given twice: {p}")
        seen.add(p.resolve())
        if not (p / "config.yaml").is_file():
            raise FileNotFoundError(f"not a run folder (no config.yaml): {p}")
        results = None
        if need_results:
            if not (p / "results.json").is_file():
                raise FileNotFoundError(f"no results.json in run folder {p} (did the run finish?)")
            try:
                results = json.loads((p / "results.json").read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{p / 'results.json'} is not valid JSON: {e}") from None
        runs.append(RunInfo(p, deep_merge(defaults, read_yaml(p / "config.yaml")), results))
    return runs


def task_kind(config: dict[str, Any]) -> str:
    """The task a config selects, with :func:`~seqebm.training.experiment.build_task`'s precedence."""
    data = config.get("data", {})
    corpus = data.get("corpus")
    if corpus in ("digits", "oracle"):
        return corpus
    if corpus == "synthetic-translation" or data.get("source_file") is not None:
        return "translation"
    return "lm"


# --------------------------------------------------------------------------- dotted keys


def _lookup_or_missing(tree: Any, key: str) -> Any:
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def lookup(tree: dict[str, Any], key: str, *, where: str) -> Any:
    """``tree["a"]["b"]`` for ``key = "a.b"``; a ``ValueError`` names the keys available instead.

    ``where`` says what ``tree`` is (e.g. ``"results.json of run r1"``) for the message.
    """
    node: Any = tree
    done: list[str] = []
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            here = ".".join(done) or "the top level"
            avail = (", ".join(sorted(map(str, node))) if isinstance(node, dict)
                     else f"a value ({node!r}), not a section")
            raise ValueError(f"unknown key {key!r} in {where}: {here} has {avail}; "
                             f"top-level keys: {', '.join(sorted(map(str, tree)))}")
        node = node[part]
        done.append(part)
    return node


def _number(value: Any, key: str, run: RunInfo) -> float | None:
    """A metric as float; None when absent/null; ``ValueError`` for non-numbers."""
    if value is _MISSING or value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} in results.json of run {run.path} is not a number: {value!r}")
    return float(value)


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# --------------------------------------------------------------------------- mean ± std


@dataclass
class MeanStd:
    """Mean and *sample* standard deviation (n − 1; None for n < 2) of ``values``."""

    mean: float | None
    std: float | None
    n: int
    values: list[float] = field(default_factory=list)


def mean_std(values: Sequence[float]) -> MeanStd:
    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return MeanStd(None, None, 0, [])
    mean = sum(vals) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (n - 1)) if n > 1 else None
    return MeanStd(mean, std, n, vals)


def format_mean_std(stat: MeanStd, decimals: int = 2, *, expected_n: int | None = None) -> str:
    """``"30.12 ± 0.06"``; ``"n/a"`` without values; ``" (n=k)"`` when k differs from ``expected_n``."""
    if stat.n == 0 or stat.mean is None:
        return "n/a"
    text = f"{stat.mean:.{decimals}f}"
    if stat.std is not None:
        text += f" ± {stat.std:.{decimals}f}"
    if expected_n is not None and stat.n != expected_n:
        text += f" (n={stat.n})"
    return text


def _json_float(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


def _stat_json(stat: MeanStd) -> dict[str, Any]:
    return {"mean": _json_float(stat.mean), "std": _json_float(stat.std), "n": stat.n,
            "values": [_json_float(v) for v in stat.values]}


# --------------------------------------------------------------------------- grouping


@dataclass
class RunGroup:
    """Runs sharing the values of the group-by keys (``values`` aligned with those keys)."""

    values: tuple[Any, ...]
    runs: list[RunInfo]

    def label(self) -> str:
        return " / ".join(_show(v) for v in self.values) if self.values else "all runs"


def _show(value: Any) -> str:
    return "none" if value is None else str(value)


def _sort_key(values: tuple[Any, ...]) -> tuple:
    def one(v: Any) -> tuple:
        if v is None:
            return (0, 0.0, "")
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return (1, float(v), "")
        return (2, 0.0, str(v))
    return tuple(one(v) for v in values)


def group_runs(runs: Sequence[RunInfo], keys: Sequence[str]) -> list[RunGroup]:
    """Group runs by the config values at dotted ``keys``; groups sorted by value (None first)."""
    groups: dict[tuple, list[RunInfo]] = {}
    for run in runs:
        values = []
        for key in keys:
            v = lookup(run.config, key, where=f"config.yaml of run {run.path}")
            if isinstance(v, dict):
                raise ValueError(f"config key {key!r} is a section, not a value; choose one of its keys: "
                                 f"{', '.join(sorted(v))}")
            values.append(tuple(v) if isinstance(v, list) else v)
        groups.setdefault(tuple(values), []).append(run)
    return [RunGroup(k, v) for k, v in sorted(groups.items(), key=lambda kv: _sort_key(kv[0]))]


def _group_notes(group: RunGroup, keys: Sequence[str]) -> list[str]:
    """Warnings: repeated seeds in a group, and config keys (besides seeds) that differ inside it."""
    notes = []
    seeds = [_lookup_or_missing(r.config, "train.seed") for r in group.runs]
    if len(set(map(str, seeds))) < len(seeds):
        notes.append(f"group {group.label()!r}: train.seed repeats ({', '.join(map(str, seeds))}): "
                     "the std is not over independent seeds")
    flat = [_flatten(r.config) for r in group.runs]
    ignore = SEED_LIKE_KEYS | set(keys)
    differ = sorted(k for k in set().union(*flat) if k not in ignore
                    and len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1)
    if differ:
        notes.append(f"group {group.label()!r}: runs also differ in {', '.join(differ)}")
    return notes


# --------------------------------------------------------------------------- output


@dataclass
class Analysis:
    """One analysis: ``<name>.md``, ``<name>.json`` and, when ``png`` is set, ``<name>.png``."""

    name: str
    markdown: str
    data: dict[str, Any]
    png: bytes | None = None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def _document(title: str, intro: str, table: str, notes: Sequence[str]) -> str:
    parts = [f"# {title}", "", intro, "", table, ""]
    if notes:
        parts += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(parts)


def write_analysis(analysis: Analysis, out_dir: str | Path, *, force: bool = False) -> list[Path]:
    """Write the analysis atomically into ``out_dir`` (created).

    Existing files are never overwritten silently: without ``force`` a ``FileExistsError``
    names them and nothing is written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a folder")
    payload: dict[Path, bytes] = {
        out / f"{analysis.name}.md": analysis.markdown.encode("utf-8"),
        out / f"{analysis.name}.json": (json.dumps(analysis.data, indent=2, allow_nan=False) + "\n").encode(),
    }
    if analysis.png is not None:
        payload[out / f"{analysis.name}.png"] = analysis.png
    existing = [str(p) for p in payload if p.exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass --force to overwrite, "
                              "or choose another --out / --name)")
    out.mkdir(parents=True, exist_ok=True)
    for path, data in payload.items():
        atomic_write_bytes(path, data)
    return list(payload)
