"""N-best rescoring with sentence-level language models (issue #10).

An n-best list gives, per utterance, a reference transcript and hypotheses with an acoustic (AM)
score. Rescoring picks, per utterance, the hypothesis y maximising

    score(y) = AM(y) + λ · LM(y) + β · |y|

where LM(y) is a whole-sentence log-score from a :class:`SentenceScorer` (or the list's own ``lm``
field), |y| the hypothesis length (words by default) and λ (``lm_weight``), β (``length_bonus``)
are tuned by grid search on a dev n-best set to minimise its word error rate (:func:`tune`).
This is the sentence-level counterpart of the shallow fusion inside
:func:`seqebm.structured.ctc_decode.ctc_prefix_beam_search`: any scorer of whole sentences works,
so energy-based LMs (TRF, GN-ELM, Electric...) plug in with their negative energy as LM(y).

This module holds the rescoring itself: :func:`rescore`, :func:`tune` (:class:`TuneResult`),
:func:`wer_report` (corpus WER/CER with ``jiwer``, oracle WER, the list's own 1-best WER),
:func:`rescore_files` (a Markdown + JSON table) and the ``seqebm rescore`` command
(:func:`register_rescore_command`). The parts it builds on live in their own modules and are
re-exported here, so ``from seqebm.eval.rescoring import ...`` works for all of them:

* :mod:`seqebm.eval.nbest`: the format, :func:`read_nbest` / :func:`parse_nbest` /
  :func:`write_nbest` (one JSON object per line, as written by ``seqebm asr train`` into
  ``nbest/<split>.jsonl``), records :class:`NBestList` / :class:`NBestHypothesis`.
* :mod:`seqebm.eval.sentence_scorers`: :class:`ARLMScorer` (any seqebm autoregressive LM),
  :class:`NGramSentenceScorer` (interpolated Kneser–Ney word n-gram), :class:`TableScorer`
  (precomputed scores) and :class:`ScorerSpec` (the scorer ``seqebm rescore`` builds).

Notation: U utterances, K hypotheses per utterance (padded to the longest list), H hypotheses in
all, G grid points (λ, β), N sentences given to a scorer, B a padded batch of them, T tokens.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seqebm.eval.nbest import NBestHypothesis, NBestList, parse_nbest, read_nbest, write_nbest
from seqebm.eval.run_tables import Analysis, _document, markdown_table
from seqebm.eval.sentence_scorers import ARLMScorer, NGramSentenceScorer, ScorerSpec, SentenceScorer, TableScorer

__all__ = [
    "AM_FIELDS", "ARLMScorer", "DEFAULT_LENGTH_BONUSES", "DEFAULT_LM_WEIGHTS", "LENGTH_UNITS", "NBestHypothesis",
    "NBestList", "NGramSentenceScorer", "ScorerSpec", "SentenceScorer", "TableScorer", "TuneResult", "at_grid_edge",
    "parse_nbest", "read_nbest", "register_rescore_command", "rescore", "rescore_files", "tune", "wer_report",
    "write_nbest",
]

#: default grid of LM weights λ (0 is always searched)
DEFAULT_LM_WEIGHTS: tuple[float, ...] = tuple(round(0.1 * i, 1) for i in range(31))  # 0, 0.1, ..., 3
#: default grid of length bonuses β per length unit (0 is always searched)
DEFAULT_LENGTH_BONUSES: tuple[float, ...] = tuple(0.5 * i for i in range(-8, 21))  # -4, -3.5, ..., 10
#: what |y| counts: whitespace-separated words, or characters (spaces included)
LENGTH_UNITS: tuple[str, ...] = ("words", "chars")
#: which field of a hypothesis is AM(y): its ``acoustic`` score, or the recogniser's total ``score``
#: (for CTC-CRF lists, acoustic + the model's label n-gram, so a new LM adds to the model's own)
AM_FIELDS: tuple[str, ...] = ("acoustic", "score")


# --------------------------------------------------------------------------- scores, choices, WER


@dataclass
class _ScoreTable:
    """Padded per-hypothesis scores of U utterances (padding: mask False)."""

    am: Tensor  # (U, K) float64
    lm: Tensor  # (U, K) float64
    length: Tensor  # (U, K) float64
    mask: Tensor  # (U, K) bool


def _lengths(texts: Sequence[str], length: str) -> list[int]:
    if length == "words":
        return [len(t.split()) for t in texts]
    if length == "chars":
        return [len(t) for t in texts]
    raise ValueError(f"length must be one of {', '.join(LENGTH_UNITS)}, got {length!r}")


def _check_records(records: Sequence[NBestList], who: str) -> list[NBestList]:
    records = list(records)
    if not records:
        raise ValueError(f"{who}: no utterances")
    for r in records:
        if not isinstance(r, NBestList):
            raise TypeError(f"{who} expects NBestList records (read_nbest), got {type(r).__name__}")
    return records


def _lm_scores(records: Sequence[NBestList], scorer: SentenceScorer | None) -> list[float]:
    """LM(y) of every hypothesis, flat (H,): the scorer's, or the lists' own ``lm`` field."""
    if scorer is None:
        out = []
        for r in records:
            for k, h in enumerate(r.hypotheses, 1):
                if h.lm is None:
                    raise ValueError(f"utterance {r.id!r}, hypothesis {k} has no lm score: give a sentence scorer "
                                     "(or n-best lists whose hypotheses all carry an lm value)")
                out.append(h.lm)
        return out
    unique = list(dict.fromkeys(t for r in records for t in r.texts))
    scores = scorer(unique)
    if not isinstance(scores, Tensor) or scores.shape != (len(unique),):
        got = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"the sentence scorer must return a ({len(unique)},) tensor for {len(unique)} texts, "
                         f"got {got}")
    scores = scores.detach().double().cpu()
    if not bool(torch.isfinite(scores).all()):
        bad = unique[int((~torch.isfinite(scores)).nonzero()[0])]
        raise ValueError(f"the sentence scorer returned a non-finite score for {bad[:80]!r}")
    table = dict(zip(unique, scores.tolist()))
    return [table[t] for r in records for t in r.texts]


def _am_scores(r: NBestList, am: str) -> list[float]:
    if am == "acoustic":
        return [h.acoustic for h in r.hypotheses]
    missing = [k for k, h in enumerate(r.hypotheses, 1) if h.score is None]
    if missing:
        raise ValueError(f"utterance {r.id!r}, hypothesis {missing[0]} has no score (am='score' needs every "
                         "hypothesis's total score)")
    return [h.score for h in r.hypotheses]


def _score_table(records: Sequence[NBestList], scorer: SentenceScorer | None, length: str,
                 am_field: str = "acoustic") -> _ScoreTable:
    if am_field not in AM_FIELDS:
        raise ValueError(f"am must be one of {', '.join(AM_FIELDS)}, got {am_field!r}")
    lm_flat = _lm_scores(records, scorer)
    u, k = len(records), max(len(r.hypotheses) for r in records)
    am, lm = torch.zeros(u, k, dtype=torch.float64), torch.zeros(u, k, dtype=torch.float64)
    ln, mask = torch.zeros(u, k, dtype=torch.float64), torch.zeros(u, k, dtype=torch.bool)
    pos = 0
    for i, r in enumerate(records):
        n = len(r.hypotheses)
        am[i, :n] = torch.tensor(_am_scores(r, am_field), dtype=torch.float64)
        lm[i, :n] = torch.tensor(lm_flat[pos:pos + n], dtype=torch.float64)
        ln[i, :n] = torch.tensor(_lengths(r.texts, length), dtype=torch.float64)
        mask[i, :n] = True
        pos += n
    return _ScoreTable(am, lm, ln, mask)


def _choose(table: _ScoreTable, lm_weights: Tensor, length_bonuses: Tensor) -> Tensor:
    """argmax_k AM + λ LM + β |y| per utterance for G pairs (λ, β): (G,) + (G,) -> (G, U) long.

    Ties go to the earlier hypothesis (``torch.argmax`` returns the first maximum)."""
    u, k = table.am.shape
    step = max(1, (1 << 22) // max(1, u * k))  # bound the (G, U, K) chunk to ~4M elements
    out = []
    for s in range(0, lm_weights.numel(), step):
        lam = lm_weights[s:s + step, None, None]  # (g, 1, 1)
        beta = length_bonuses[s:s + step, None, None]
        total = table.am + lam * table.lm + beta * table.length  # (g, U, K)
        out.append(total.masked_fill(~table.mask, -math.inf).argmax(-1))
    return torch.cat(out)


def _jiwer():
    try:
        import jiwer
    except ImportError as e:  # pragma: no cover - jiwer is in the speech/dev extras
        raise ImportError("WER needs jiwer: pip install 'seqebm[speech]' (or pip install jiwer)") from e
    return jiwer


def _edits(refs: Sequence[str], hyps: Sequence[str], unit: str) -> tuple[list[int], list[int]]:
    """Per pair (reference, hypothesis): the edits S + D + I of jiwer's alignment and the reference
    length, in words (``unit="words"``) or characters. A pair whose reference is empty counts every
    hypothesis word (character) as an insertion; it never reaches jiwer (some 3.x versions reject it)."""
    jiwer = _jiwer()
    edits, lengths = [0] * len(refs), [0] * len(refs)
    keep = []
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if r.strip():
            keep.append(i)
        else:
            edits[i] = len(h.split()) if unit == "words" else len(h.strip())
    if keep:
        process = jiwer.process_words if unit == "words" else jiwer.process_characters
        out = process([refs[i] for i in keep], [hyps[i] for i in keep])
        for i, chunks, ref in zip(keep, out.alignments, out.references):
            edits[i] = sum((c.ref_end_idx - c.ref_start_idx) if c.type in ("substitute", "delete")
                           else (c.hyp_end_idx - c.hyp_start_idx) if c.type == "insert" else 0 for c in chunks)
            lengths[i] = len(ref)
    return edits, lengths


def _word_errors(records: Sequence[NBestList]) -> tuple[Tensor, Tensor]:
    """Word edits of every hypothesis against its reference, (U, K) long padded with a huge value,
    and the reference word counts (U,)."""
    flat, ref_lens = _edits([r.reference for r in records for _ in r.hypotheses],
                            [t for r in records for t in r.texts], "words")
    u, k = len(records), max(len(r.hypotheses) for r in records)
    errors = torch.full((u, k), 1 << 40, dtype=torch.long)
    ref_words = torch.zeros(u, dtype=torch.long)
    pos = 0
    for i, r in enumerate(records):
        n = len(r.hypotheses)
        errors[i, :n] = torch.tensor(flat[pos:pos + n])
        ref_words[i] = ref_lens[pos]
        pos += n
    return errors, ref_words


def _total_words(ref_words: Tensor) -> int:
    total = int(ref_words.sum())
    if total == 0:
        raise ValueError("the references have no words: WER is undefined")
    return total


def rescore(records: Sequence[NBestList], scorer: SentenceScorer | None = None, *, lm_weight: float,
            length_bonus: float, length: str = "words", am: str = "acoustic") -> list[int]:
    """Per utterance, the index of the hypothesis maximising AM + λ·LM + β·|y| (issue #10).

    LM is ``scorer(texts)`` or, when ``scorer`` is None, the hypotheses' own ``lm`` field;
    |y| counts ``length`` units (``"words"`` or ``"chars"``, spaces included); AM is each
    hypothesis's ``acoustic`` score, or its total ``score`` with ``am="score"``. Ties go to the
    earlier hypothesis of the list. Returns U indices into each record's ``hypotheses``.
    """
    records = _check_records(records, "rescore()")
    for name, v in (("lm_weight", lm_weight), ("length_bonus", length_bonus)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name} must be a finite number, got {v!r}")
    table = _score_table(records, scorer, length, am)
    return _choose(table, torch.tensor([float(lm_weight)], dtype=torch.float64),
                   torch.tensor([float(length_bonus)], dtype=torch.float64))[0].tolist()


@dataclass
class TuneResult:
    """Grid-search result: the chosen ``lm_weight`` λ and ``length_bonus`` β, the dev corpus WER
    they give (``errors`` / ``ref_words``), and the WER of every grid point
    (``grid_wer[i][j]`` for ``lm_weights[i]``, ``length_bonuses[j]``)."""

    lm_weight: float
    length_bonus: float
    wer: float
    errors: int
    ref_words: int
    lm_weights: list[float]
    length_bonuses: list[float]
    grid_wer: list[list[float]] = field(repr=False)


def _grid(values: Iterable[float], name: str) -> list[float]:
    vals = [float(v) for v in values]
    if any(not math.isfinite(v) for v in vals):
        raise ValueError(f"{name} must be finite numbers, got {vals}")
    return sorted(set(vals) | {0.0})


def _tune_table(table: _ScoreTable, errors: Tensor, ref_words: Tensor, lm_weights: Iterable[float],
                length_bonuses: Iterable[float]) -> TuneResult:
    lams, betas = _grid(lm_weights, "lm_weights"), _grid(length_bonuses, "length_bonuses")
    pairs = [(lam, beta) for lam in lams for beta in betas]
    lam_t = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    beta_t = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    choice = _choose(table, lam_t, beta_t)  # (G, U)
    errs = errors.unsqueeze(0).expand(len(pairs), -1, -1).gather(2, choice.unsqueeze(-1)).squeeze(-1).sum(1)  # (G,)
    total = _total_words(ref_words)
    errs_list = errs.tolist()
    # fewest errors; ties: smaller |λ| (λ = 0 first), then smaller |β|, then the smaller values
    best = min(range(len(pairs)), key=lambda g: (errs_list[g], abs(pairs[g][0]), abs(pairs[g][1]), *pairs[g]))
    grid = [[errs_list[i * len(betas) + j] / total for j in range(len(betas))] for i in range(len(lams))]
    return TuneResult(pairs[best][0], pairs[best][1], errs_list[best] / total, errs_list[best], total, lams, betas,
                      grid)


def tune(dev_records: Sequence[NBestList], scorer: SentenceScorer | None = None, *,
         lm_weights: Iterable[float] = DEFAULT_LM_WEIGHTS, length_bonuses: Iterable[float] = DEFAULT_LENGTH_BONUSES,
         length: str = "words", am: str = "acoustic") -> TuneResult:
    """Grid search of λ and β minimising the dev corpus WER of :func:`rescore`'s choices.

    0 is always added to both grids and ties prefer smaller |λ|, then smaller |β|, so the result
    is λ = 0 (and β = 0) whenever the LM (or the length bonus) does not lower the dev WER: the
    tuned weights never give a higher dev WER than λ = 0. The scorer runs once per distinct
    hypothesis text; every grid point is then a vectorised argmax, (G, U, K).
    """
    records = _check_records(dev_records, "tune()")
    table = _score_table(records, scorer, length, am)
    errors, ref_words = _word_errors(records)
    return _tune_table(table, errors, ref_words, lm_weights, length_bonuses)


def _report(records: Sequence[NBestList], choice: Sequence[int], errors: Tensor, ref_words: Tensor) -> dict[str, Any]:
    total = _total_words(ref_words)
    picked = torch.tensor(list(choice), dtype=torch.long)[:, None]  # (U, 1)
    char_edits, ref_chars = _edits([r.reference for r in records],
                                   [r.hypotheses[i].text for r, i in zip(records, choice)], "chars")
    return {"wer": int(errors.gather(1, picked).sum()) / total, "cer": sum(char_edits) / sum(ref_chars),
            "oracle_wer": int(errors.min(1).values.sum()) / total, "first_wer": int(errors[:, 0].sum()) / total,
            "utterances": len(records)}


def wer_report(records: Sequence[NBestList], choice: Sequence[int]) -> dict[str, Any]:
    """Corpus-level error rates (fractions) of a choice of one hypothesis per utterance.

    ``wer`` / ``cer``: of the chosen hypotheses, total edits (S + D + I of ``jiwer``'s alignment,
    with its default normalisation) / total reference words or characters, as ``jiwer.wer`` /
    ``jiwer.cer`` of the lists compute them; an empty reference counts the hypothesis's words as
    insertions. ``oracle_wer``: with the hypothesis of fewest word edits in each list;
    ``first_wer``: of each list's own 1-best (its first hypothesis); ``utterances``: U.
    """
    records = _check_records(records, "wer_report()")
    choice = list(choice)
    if len(choice) != len(records):
        raise ValueError(f"choice has {len(choice)} entries for {len(records)} utterances")
    for r, i in zip(records, choice):
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(r.hypotheses):
            raise ValueError(f"utterance {r.id!r}: choice {i!r} is not a hypothesis index in "
                             f"0..{len(r.hypotheses) - 1}")
    errors, ref_words = _word_errors(records)
    return _report(records, choice, errors, ref_words)


# --------------------------------------------------------------------------- files -> table


def _describe(scorer: SentenceScorer | None) -> str:
    if scorer is None:
        return "the n-best lists' own `lm` scores"
    return str(getattr(scorer, "description", None) or repr(scorer))


def _set_name(path: Path, paths: Sequence[Path]) -> str:
    return path.stem if [p.stem for p in paths].count(path.stem) == 1 else str(path)


def _fmt_grid(values: Sequence[float]) -> str:
    return "{" + ", ".join(f"{v:g}" for v in values) + "}"


def at_grid_edge(value: float, grid: Sequence[float]) -> bool:
    """True when a tuned weight sits on the first or last point of its grid (other than 0): the best
    value may lie outside it."""
    return len(grid) > 1 and value != 0.0 and value in (min(grid), max(grid))


def rescore_files(dev_path: str | Path, test_paths: Sequence[str | Path],
                  scorer_spec: ScorerSpec | SentenceScorer | None = None, *,
                  lm_weights: Iterable[float] = DEFAULT_LM_WEIGHTS,
                  length_bonuses: Iterable[float] = DEFAULT_LENGTH_BONUSES, length: str = "words",
                  am: str = "acoustic", decimals: int = 2, name: str = "rescore") -> Analysis:
    """Tune λ, β on the dev n-best file, apply them to each test file; a Markdown + JSON table.

    ``scorer_spec``: a :class:`ScorerSpec`, a ready :class:`SentenceScorer`, or None (the lists'
    own ``lm``). Rows: the dev set (its numbers are tuned on itself) then each test set;
    columns: WER of the list's 1-best, oracle WER, AM only (λ = 0, β tuned on dev), AM + LM
    (λ, β tuned on dev), and the tuned weights. WER in percent, corpus level. ``am``: the
    hypothesis field used as AM (``"acoustic"`` or the recogniser's total ``"score"``).
    Save it with :func:`seqebm.eval.run_tables.write_analysis`.
    """
    if not test_paths:
        raise ValueError("give at least one test n-best file")
    if length not in LENGTH_UNITS:
        raise ValueError(f"length must be one of {', '.join(LENGTH_UNITS)}, got {length!r}")
    if am not in AM_FIELDS:
        raise ValueError(f"am must be one of {', '.join(AM_FIELDS)}, got {am!r}")
    paths = [Path(dev_path), *map(Path, test_paths)]
    if len({p.resolve() for p in paths[1:]}) < len(paths) - 1:
        raise ValueError("a test n-best file is given twice")
    sets = [read_nbest(p) for p in paths]  # format errors before the (slow) scorer is built
    lm_weights, length_bonuses = list(lm_weights), list(length_bonuses)
    scorer = scorer_spec.build() if isinstance(scorer_spec, ScorerSpec) else scorer_spec
    for p, recs in zip(paths, sets):
        if not recs:
            raise ValueError(f"{p} has no utterances")
    tables = []
    for p, recs in zip(paths, sets):
        try:
            tables.append(_score_table(recs, scorer, length, am))
        except ValueError as e:
            raise ValueError(f"{p}: {e}") from None
    edits = [_word_errors(recs) for recs in sets]
    tuned = _tune_table(tables[0], *edits[0], lm_weights, length_bonuses)
    am_only = _tune_table(tables[0], *edits[0], [0.0], length_bonuses)
    both = (torch.tensor([0.0, tuned.lm_weight], dtype=torch.float64),
            torch.tensor([am_only.length_bonus, tuned.length_bonus], dtype=torch.float64))
    rows, out_sets = [], []

    def pct(x: float) -> str:
        return f"{100 * x:.{decimals}f}"

    for i, (p, recs, table, (errors, ref_words)) in enumerate(zip(paths, sets, tables, edits)):
        choice_am, choice_lm = _choose(table, *both).tolist()
        rep_am, rep_lm = _report(recs, choice_am, errors, ref_words), _report(recs, choice_lm, errors, ref_words)
        label = _set_name(p, paths) + (" (dev, tuning set)" if i == 0 else "")
        rows.append([label, len(recs), pct(rep_lm["first_wer"]), pct(rep_lm["oracle_wer"]), pct(rep_am["wer"]),
                     pct(rep_lm["wer"]), f"{tuned.lm_weight:g}", f"{tuned.length_bonus:g}",
                     f"{am_only.length_bonus:g}"])
        out_sets.append({"name": _set_name(p, paths), "path": str(p), "role": "dev" if i == 0 else "test",
                         "utterances": len(recs), "reference_words": int(ref_words.sum()),
                         "first_wer": rep_lm["first_wer"], "oracle_wer": rep_lm["oracle_wer"],
                         "am_only": {"wer": rep_am["wer"], "cer": rep_am["cer"]},
                         "rescored": {"wer": rep_lm["wer"], "cer": rep_lm["cer"]}})
    notes = []
    if tuned.lm_weight == 0.0:
        notes.append("no LM weight on the grid lowered the dev WER: λ = 0 (the AM+LM column is AM with the "
                     "tuned β)")
    edges = (("λ", tuned.lm_weight, tuned.lm_weights, "--lm-weights"),
             ("β", tuned.length_bonus, tuned.length_bonuses, "--length-bonuses"),
             ("β (AM only)", am_only.length_bonus, am_only.length_bonuses, "--length-bonuses"))
    for what, value, grid, flag in edges:
        if at_grid_edge(value, grid):
            notes.append(f"tuned {what} = {value:g} is at the edge of its grid {_fmt_grid(grid)}: "
                         f"widen {flag}")
    header = ["set", "utterances", "1-best WER (list order)", "oracle WER", "AM only WER", "AM+LM WER", "λ", "β",
              "β (AM only)"]
    unit = "word" if length == "words" else "character"
    intro = (f"score = AM + λ·LM + β·|y| (|y| in {length}; AM: the hypotheses' `{am}`); LM: {_describe(scorer)}. "
             f"λ and β minimise the corpus WER of the dev set `{paths[0]}` over the grid "
             f"λ ∈ {_fmt_grid(tuned.lm_weights)}, "
             f"β ∈ {_fmt_grid(tuned.length_bonuses)} (ties: smaller |λ|, then smaller |β|); AM only: λ = 0 "
             f"with its own tuned β. WER in percent (jiwer; total word edits / total reference words); "
             f"oracle: the hypothesis with the fewest edits in each list; β per {unit}.")
    data = {"analysis": "rescore", "scorer": _describe(scorer), "length": length, "am": am, "dev": str(paths[0]),
            "lm_weight": tuned.lm_weight, "length_bonus": tuned.length_bonus,
            "am_only_length_bonus": am_only.length_bonus, "lm_weights": tuned.lm_weights,
            "length_bonuses": tuned.length_bonuses, "dev_grid_wer": tuned.grid_wer, "sets": out_sets}
    return Analysis(name, _document("N-best rescoring", intro, markdown_table(header, rows), notes), data)


# --------------------------------------------------------------------------- command line


def _cmd_rescore(args: argparse.Namespace) -> int:
    from seqebm.eval.analysis import _check_output_free, _emit

    if args.ngram_order is not None and not args.ngram_train:
        raise ValueError("--ngram-order needs --ngram-train (the text to estimate the n-gram on)")
    if args.lm_run:
        spec = ScorerSpec("ar", lm_run=args.lm_run, device=args.device, batch_size=args.batch_size)
    elif args.elm_run:
        spec = ScorerSpec("elm", lm_run=args.elm_run, device=args.device, batch_size=args.batch_size)
    elif args.ngram_train:
        spec = ScorerSpec("ngram", ngram_train=args.ngram_train, ngram_order=args.ngram_order or 3)
    else:
        spec = ScorerSpec("list")
    _check_output_free(args)
    analysis = rescore_files(args.dev, args.test, spec, lm_weights=args.lm_weights or DEFAULT_LM_WEIGHTS,
                             length_bonuses=args.length_bonuses or DEFAULT_LENGTH_BONUSES, length=args.length,
                             am=args.am, decimals=args.decimals, name=args.name)
    return _emit(analysis, args)


def register_rescore_command(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``rescore`` to a CLI: ``subparsers`` is what ``ArgumentParser.add_subparsers`` returned.

    ``args.func(args)`` returns the exit status; errors are ``ValueError``, ``FileNotFoundError``
    or ``FileExistsError`` (existing outputs without ``--force``) with a message for the user.
    """
    from seqebm.eval.analysis import _add_output_args

    r = subparsers.add_parser(
        "rescore", help="n-best rescoring: score = AM + λ·LM + β·length, λ and β tuned on a dev n-best file",
        description="Rescore n-best JSONL files (one {id, reference, hypotheses: [{text, acoustic, lm, score}]} "
                    "per line, best first; e.g. runs/<asr-run>/nbest/<split>.jsonl) with a sentence LM; tune "
                    "λ, β on --dev by grid search; report 1-best, oracle, AM-only and AM+LM WER per test file.")
    r.add_argument("--dev", required=True, help="dev n-best JSONL (tuning set)")
    r.add_argument("--test", nargs="+", required=True, help="test n-best JSONL file(s)")
    lm = r.add_mutually_exclusive_group(required=True)
    lm.add_argument("--lm-run", help="a trained text-LM run folder (seqebm train): log p(sentence) with BOS/EOS")
    lm.add_argument("--ngram-train", help="text file (one sentence per line) for an interpolated Kneser-Ney "
                                          "word n-gram")
    lm.add_argument("--elm-run", help="a trained run folder of seqebm elm train (TRF-LM, GN-ELM, residual ELM or "
                                      "its ALM baseline): log p(sentence) with its normalisers")
    lm.add_argument("--use-list-lm", action="store_true", help="the hypotheses' own lm field")
    r.add_argument("--ngram-order", type=int, default=None, help="n-gram order with --ngram-train (default 3)")
    r.add_argument("--lm-weights", type=float, nargs="+", default=None,
                   help=f"grid of λ (0 always added; default {_fmt_grid(DEFAULT_LM_WEIGHTS)})")
    r.add_argument("--length-bonuses", type=float, nargs="+", default=None,
                   help=f"grid of β (0 always added; default {_fmt_grid(DEFAULT_LENGTH_BONUSES)})")
    r.add_argument("--length", choices=LENGTH_UNITS, default="words", help="unit of |y| for β (default words)")
    r.add_argument("--am", choices=AM_FIELDS, default="acoustic",
                   help="hypothesis field used as AM: acoustic (default) or the recogniser's total score (for "
                        "CTC-CRF lists: acoustic + its label n-gram)")
    r.add_argument("--device", default="auto", help="device of --lm-run's model (default auto)")
    r.add_argument("--batch-size", type=int, default=64, help="sentences per LM batch with --lm-run")
    _add_output_args(r, "rescore")
    r.set_defaults(func=_cmd_rescore)
    return r
