"""Many LMs x many recognisers: one n-best rescoring table with mean ± std over seeds (issue #10, item 7).

``seqebm rescore`` (:func:`seqebm.eval.rescoring.rescore_files`) rescores one recogniser's n-best
files with one LM. This module runs that for every pair of

* an **n-best run**: a folder holding ``nbest/dev.jsonl`` and one or more test lists (what
  ``seqebm asr train`` writes; ``runs/asr-compare/asr-ctc-f1-s0`` for instance; ``nbest_dir``
  picks another folder, such as the longer lists of ``seqebm asr nbest``). Runs whose
  folder names differ only in a trailing ``-s<seed>`` form one *system*; the table gives the mean
  ± sample std over its seeds;
* an **LM**, named ``NAME=SPEC`` with SPEC one of

  - ``list``: the n-best lists' own ``lm`` field (for CTC-CRF lists, the model's label n-gram);
  - ``ngram:FILE[:ORDER]``: interpolated Kneser–Ney word n-gram on a text file (one sentence per
    line). ``FILE`` may be ``speech-text``: the training text of the ``seqebm elm`` recipes
    (:func:`seqebm.data.elm_text.load_elm_sentences`), so the n-gram and the ELMs see the same words;
  - ``elm:RUN``: a ``seqebm elm train`` run folder (TRF-LM, GN-ELM, residual ELM, ALM, Electric, MLM);
  - ``ar:RUN``: a ``seqebm train`` text-LM run folder.

For each pair, λ and β are tuned on that run's dev list and applied to its test lists, exactly as
``seqebm rescore`` does. Each pair's result is kept in ``OUT/cells/<run>__<lm>.json``; a later call
with the same runs, LM spec and grids reuses it, so the table grows as runs finish and an
interrupted call loses at most the pair it was on. Each LM is built once, and only when one of its
pairs is missing.

Rows: the lists' own 1-best, the oracle, AM only (λ = 0, β tuned), then one row per LM (AM + λ·LM
+ β·|y|). Columns: WER (%) of each system on each test list.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqebm.eval.rescoring import (AM_FIELDS, DEFAULT_LENGTH_BONUSES, DEFAULT_LM_WEIGHTS, LENGTH_UNITS,
                                   NGramSentenceScorer, ScorerSpec, at_grid_edge, rescore_files)
from seqebm.eval.run_tables import Analysis, _document, format_mean_std, markdown_table, mean_std
from seqebm.io import atomic_write_text

__all__ = ["LMEntry", "compare_rescoring", "parse_lm_entry", "register_rescore_table_command"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_SEED = re.compile(r"-s(\d+)$")


@dataclass(frozen=True)
class LMEntry:
    """One LM row: a name (letters, digits, ``_.+-``) and its spec string (see the module doc)."""

    name: str
    spec: str

    def fingerprint(self) -> str | None:
        """Of the files the LM is built from (a run's results/weights, an n-gram's text); None for the rest."""
        from seqebm.training.trainer import BEST_MODEL

        kind, _, arg = self.spec.partition(":")
        if kind in ("elm", "ar"):
            return _fingerprint([p for p in (Path(arg) / "results.json", Path(arg) / BEST_MODEL) if p.is_file()])
        if kind == "ngram":
            path, _ = _ngram_source(arg)
            return None if path == "speech-text" else _fingerprint([Path(path)])
        return None

    def build(self, *, device: str = "auto", batch_size: int = 64, cache_dir: str | None = None):
        kind, _, arg = self.spec.partition(":")
        if kind == "list":
            return None
        if kind in ("elm", "ar"):
            return ScorerSpec(kind, lm_run=arg, device=device, batch_size=batch_size).build()
        path, order = _ngram_source(arg)
        if path == "speech-text":
            from seqebm.data.elm_text import load_elm_sentences

            sentences = [" ".join(s) for s in load_elm_sentences("speech-text", "train", cache_dir=cache_dir)]
            return NGramSentenceScorer.fit(sentences, order)
        return ScorerSpec("ngram", ngram_train=path, ngram_order=order).build()


def _ngram_source(arg: str) -> tuple[str, int]:
    """``FILE[:ORDER]`` of an ``ngram:`` spec -> (FILE, ORDER); the order defaults to 3."""
    m = re.fullmatch(r"(.+?)(?::(\d+))?", arg)
    if not arg or m is None:
        raise ValueError("ngram needs a text file (ngram:FILE[:ORDER])")
    return m.group(1), int(m.group(2) or 3)


def parse_lm_entry(text: str) -> LMEntry:
    """``NAME=SPEC`` -> :class:`LMEntry`, checked (run folders must exist; n-gram order >= 1)."""
    name, eq, spec = text.partition("=")
    if not eq or not _NAME.match(name):
        raise ValueError(f"--lm {text!r}: expected NAME=SPEC with NAME made of letters, digits and _.+- "
                         "(e.g. kn3=ngram:speech-text:3, trf=elm:runs/elm-trf-neural, list-lm=list)")
    kind, _, arg = spec.partition(":")
    if kind == "list":
        if arg:
            raise ValueError(f"--lm {text!r}: 'list' takes no argument")
    elif kind in ("elm", "ar"):
        if not arg:
            raise ValueError(f"--lm {text!r}: {kind} needs a run folder ({kind}:RUN)")
        if not (Path(arg) / "config.yaml").is_file():
            raise FileNotFoundError(f"--lm {text!r}: {arg} is not a run folder (no config.yaml)")
    elif kind == "ngram":
        try:
            path, order = _ngram_source(arg)
        except ValueError as e:
            raise ValueError(f"--lm {text!r}: {e}") from None
        if order < 1:
            raise ValueError(f"--lm {text!r}: the n-gram order must be >= 1")
        if path != "speech-text" and not Path(path).is_file():
            raise FileNotFoundError(f"--lm {text!r}: n-gram training text {path} not found")
    else:
        raise ValueError(f"--lm {text!r}: SPEC must start with list, ngram:, elm: or ar:")
    return LMEntry(name, spec)


def _nbest_files(run: Path, tests: Sequence[str], folder: str) -> tuple[Path, list[Path]]:
    dev = run / folder / "dev.jsonl"
    if not dev.is_file():
        raise FileNotFoundError(f"{run} has no {folder}/dev.jsonl (is it a finished seqebm asr run?"
                                + (")" if folder == "nbest" else f" run seqebm asr nbest --out-name {folder})"))
    missing = [t for t in tests if not (run / folder / f"{t}.jsonl").is_file()]
    if missing:
        raise FileNotFoundError(f"{run} has no {folder}/{missing[0]}.jsonl")
    return dev, [run / folder / f"{t}.jsonl" for t in tests]


def _fingerprint(paths: Sequence[Path]) -> str:
    """SHA-256 over the bytes of the files: a cached pair is redone when its lists or its LM change."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


def _system(run: Path) -> tuple[str, int | None]:
    m = _SEED.search(run.name)
    return (run.name[: m.start()], int(m.group(1))) if m else (run.name, None)


def compare_rescoring(nbest_runs: Sequence[str | Path], lms: Sequence[LMEntry], out_dir: str | Path, *,
                      tests: Sequence[str] = ("test", "test_unseen"), nbest_dir: str = "nbest",
                      lm_weights: Iterable[float] = DEFAULT_LM_WEIGHTS,
                      length_bonuses: Iterable[float] = DEFAULT_LENGTH_BONUSES, length: str = "words",
                      am: str = "acoustic", device: str = "auto", batch_size: int = 64, cache_dir: str | None = None,
                      decimals: int = 2, name: str = "rescore-table", log=print) -> Analysis:
    """Rescore every n-best run with every LM; the WER table (see the module doc). Pairs are cached."""
    runs = [Path(r) for r in nbest_runs]
    if not runs or not lms:
        raise ValueError("give at least one n-best run and one LM")
    if len({r.name for r in runs}) < len(runs):
        raise ValueError("two n-best runs share a folder name: the table names runs by folder")
    if len({e.name for e in lms}) < len(lms):
        raise ValueError("two LMs share a name")
    if length not in LENGTH_UNITS:
        raise ValueError(f"length must be one of {', '.join(LENGTH_UNITS)}, got {length!r}")
    if am not in AM_FIELDS:
        raise ValueError(f"am must be one of {', '.join(AM_FIELDS)}, got {am!r}")
    tests = list(tests)
    if not tests:
        raise ValueError("give at least one test list name")
    files = {r: _nbest_files(r, tests, nbest_dir) for r in runs}  # every input checked before any LM is built
    lm_weights, length_bonuses = [float(x) for x in lm_weights], [float(x) for x in length_bonuses]
    out = Path(out_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)

    lists = {r: _fingerprint([files[r][0], *files[r][1]]) for r in runs}
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for lm in lms:
        scorer, built, lm_files = None, False, lm.fingerprint()
        for run in runs:
            path = out / "cells" / f"{run.name}__{lm.name}.json"
            key = {"run": str(run / nbest_dir), "lists": lists[run], "lm": lm.spec, "lm_files": lm_files,
                   "tests": tests, "lm_weights": lm_weights, "length_bonuses": length_bonuses, "length": length,
                   "am": am}  # what a cached pair must match to be reused
            if path.is_file():
                cached = json.loads(path.read_text(encoding="utf-8"))
                if cached.get("key") == key:
                    cells[run.name, lm.name] = cached["data"]
                    continue
            if not built:
                log(f"[seqebm] building LM {lm.name} ({lm.spec})")
                scorer, built = lm.build(device=device, batch_size=batch_size, cache_dir=cache_dir), True
            log(f"[seqebm] rescoring {run.name} with {lm.name}")
            dev, test_paths = files[run]
            data = rescore_files(dev, test_paths, scorer, lm_weights=lm_weights, length_bonuses=length_bonuses,
                                 length=length, am=am).data
            atomic_write_text(path, json.dumps({"key": key, "data": data}, indent=2, allow_nan=False) + "\n")
            cells[run.name, lm.name] = data

    systems: dict[str, list[Path]] = {}
    for run in runs:
        systems.setdefault(_system(run)[0], []).append(run)

    def test_set(data: dict[str, Any], test: str) -> dict[str, Any]:
        return next(s for s in data["sets"] if s["role"] == "test" and Path(s["path"]).stem == test)

    def stat(system: str, test: str, lm_name: str, pick) -> Any:
        return mean_std([100 * pick(test_set(cells[r.name, lm_name], test)) for r in systems[system]])

    columns = [(s, t) for s in systems for t in tests]
    header = ["rescoring", *(f"{s} {t} WER (%)" for s, t in columns), "λ (mean)"]
    rows, summary = [], {}
    # these three do not depend on the LM (AM only tunes β with λ = 0): read them from the first LM's cells
    baselines = (("lists' 1-best", lambda s: s["first_wer"]), ("oracle", lambda s: s["oracle_wer"]),
                 ("AM only (β tuned)", lambda s: s["am_only"]["wer"]))
    for label, pick in [*baselines, *((lm, lambda s: s["rescored"]["wer"]) for lm in lms)]:
        lm_name = label.name if isinstance(label, LMEntry) else lms[0].name
        stats = [stat(s, t, lm_name, pick) for s, t in columns]
        entry = {f"{s}/{t}": {"mean": x.mean, "std": x.std, "values": x.values} for (s, t), x in zip(columns, stats)}
        key, lam = label, ""
        if isinstance(label, LMEntry):
            weights = [cells[r.name, lm_name]["lm_weight"] for r in runs]
            entry["lm_weight"], lam = weights, f"{sum(weights) / len(weights):.2f}"
            key, label = label.name, f"{label.name} ({label.spec})"
        rows.append([label, *(format_mean_std(x, decimals) for x in stats), lam])
        summary[key] = entry
    notes = []
    for what, field, grid_field, flag in (("λ", "lm_weight", "lm_weights", "--lm-weights"),
                                          ("β", "length_bonus", "length_bonuses", "--length-bonuses")):
        edge = sorted(f"{r}/{m}" for (r, m), d in cells.items() if at_grid_edge(d[field], d[grid_field]))
        if edge:
            note = (f"tuned {what} is at the edge of its grid in {len(edge)} of {len(cells)} (run, LM) pairs "
                    f"({', '.join(edge[:4])}{', ...' if len(edge) > 4 else ''}): widen {flag}")
            notes.append(note)
            log(f"[seqebm] warning: {note}")
    seeds = {s: [_system(r)[1] for r in rs] for s, rs in systems.items()}
    intro = (f"score = AM + λ·LM + β·|y| (|y| in {length}; AM: the hypotheses' `{am}`); λ, β tuned per "
             "recogniser run on its own dev list (corpus WER), then applied to its test lists. Mean ± sample std "
             f"over the runs of each system (seeds: {'; '.join(f'{s}: {v}' for s, v in seeds.items())}). "
             "The first three rows need no LM; 'AM only' tunes β alone.")
    data = {"analysis": "rescore-table", "nbest_dir": nbest_dir, "tests": tests, "length": length, "am": am,
            "lm_weights": lm_weights, "length_bonuses": length_bonuses,
            "systems": {s: [str(r) for r in rs] for s, rs in systems.items()},
            "lms": {e.name: e.spec for e in lms}, "summary": summary}
    return Analysis(name, _document("N-best rescoring: LMs x recognisers", intro, markdown_table(header, rows), notes),
                    data)


def _cmd(args: argparse.Namespace) -> int:
    from seqebm.eval.analysis import _check_output_free, _emit

    lms = [parse_lm_entry(x) for x in args.lm]
    _check_output_free(args)
    analysis = compare_rescoring(args.nbest_runs, lms, args.out, tests=args.tests, nbest_dir=args.nbest_dir,
                                 lm_weights=args.lm_weights or DEFAULT_LM_WEIGHTS,
                                 length_bonuses=args.length_bonuses or DEFAULT_LENGTH_BONUSES, length=args.length,
                                 am=args.am, device=args.device, batch_size=args.batch_size, decimals=args.decimals,
                                 name=args.name)
    return _emit(analysis, args)


def register_rescore_table_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``rescore-table`` to a CLI (``subparsers`` from ``ArgumentParser.add_subparsers``)."""
    from seqebm.eval.analysis import _add_output_args

    r = subparsers.add_parser(
        "rescore-table", help="rescore several recognisers' n-best lists with several LMs: one WER table",
        description="For every n-best run folder (nbest/dev.jsonl + test lists) and every --lm NAME=SPEC, tune λ, β "
                    "on the run's dev list and rescore its test lists; runs differing only in -s<seed> are averaged "
                    "(mean ± std). SPEC: list | ngram:FILE[:ORDER] (FILE may be speech-text) | elm:RUN | ar:RUN. "
                    "Finished pairs are kept in OUT/cells and reused.")
    r.add_argument("--nbest-runs", nargs="+", required=True, help="run folders with nbest/dev.jsonl and test lists")
    r.add_argument("--lm", nargs="+", required=True, help="NAME=SPEC, one per LM row")
    r.add_argument("--tests", nargs="+", default=["test", "test_unseen"],
                   help="test list names under nbest/ (default: test test_unseen)")
    r.add_argument("--nbest-dir", default="nbest",
                   help="the lists' folder inside each run (default nbest; nbest-wide after seqebm asr nbest)")
    r.add_argument("--lm-weights", type=float, nargs="+", default=None, help="grid of λ (0 always added)")
    r.add_argument("--length-bonuses", type=float, nargs="+", default=None, help="grid of β (0 always added)")
    r.add_argument("--length", choices=LENGTH_UNITS, default="words", help="unit of |y| for β (default words)")
    r.add_argument("--am", choices=AM_FIELDS, default="acoustic",
                   help="hypothesis field used as AM: acoustic (default) or the recogniser's total score")
    r.add_argument("--device", default="auto")
    r.add_argument("--batch-size", type=int, default=64)
    _add_output_args(r, "rescore-table")
    r.set_defaults(func=_cmd)
    return r
