"""The n-best JSONL format of the rescoring experiments (issue #10).

One JSON object per line, as written by ``seqebm asr train`` into ``nbest/<split>.jsonl``:
``{"id": str|int, "reference": str, "hypotheses": [{"text", "acoustic", "lm", "score"}, ...]}``
with the hypotheses best first.

* Records: :class:`NBestHypothesis` (one hypothesis and its scores) and :class:`NBestList` (one
  utterance), both validated on construction.
* :func:`parse_nbest` (lines), :func:`read_nbest` (a UTF-8 file) and :func:`write_nbest` (atomic),
  with errors that name the source and line number.

Rescoring itself is :mod:`seqebm.eval.rescoring`; the sentence scorers are
:mod:`seqebm.eval.sentence_scorers`.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seqebm.io import atomic_write_text

__all__ = ["NBestHypothesis", "NBestList", "parse_nbest", "read_nbest", "write_nbest"]

_NBEST_KEYS = ("id", "reference", "hypotheses")


@dataclass(frozen=True)
class NBestHypothesis:
    """One hypothesis: its ``text``, acoustic score ``acoustic`` (log domain, higher = better), and
    the list's own ``lm`` and total ``score`` when it has them (None otherwise)."""

    text: str
    acoustic: float
    lm: float | None = None
    score: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"hypothesis text must be a str, got {type(self.text).__name__}: {self.text!r}")
        for name in ("acoustic", "lm", "score"):
            v = getattr(self, name)
            if v is None and name != "acoustic":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"hypothesis {self.text!r}: {name} must be a finite number, got {v!r}")
            object.__setattr__(self, name, float(v))


@dataclass(frozen=True)
class NBestList:
    """One utterance: ``id`` (str or int, unique in a file), ``reference`` transcript and
    ``hypotheses`` (at least one; list order = the recogniser's ranking, best first)."""

    id: str | int
    reference: str
    hypotheses: tuple[NBestHypothesis, ...]

    def __post_init__(self) -> None:
        if isinstance(self.id, bool) or not isinstance(self.id, (str, int)):
            raise TypeError(f"utterance id must be a str or an int, got {self.id!r}")
        if not isinstance(self.reference, str):
            raise TypeError(f"utterance {self.id!r}: reference must be a str, got {self.reference!r}")
        hyps = tuple(self.hypotheses)
        if not hyps:
            raise ValueError(f"utterance {self.id!r} has an empty hypotheses list")
        if not all(isinstance(h, NBestHypothesis) for h in hyps):
            raise TypeError(f"utterance {self.id!r}: hypotheses must be NBestHypothesis objects")
        object.__setattr__(self, "hypotheses", hyps)

    @property
    def texts(self) -> list[str]:
        return [h.text for h in self.hypotheses]


def _finite_or_none(value: Any, what: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: {what} must be a number or null, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{where}: {what} must be finite, got {value!r}")
    return float(value)


def _parse_line(text: str, where: str) -> NBestList:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with keys id, reference, hypotheses; "
                         f"got {type(obj).__name__}")
    missing = [k for k in _NBEST_KEYS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)} (an n-best line needs "
                         f"{', '.join(_NBEST_KEYS)}; it has {', '.join(map(str, obj)) or 'none'})")
    uid, ref, hyps = obj["id"], obj["reference"], obj["hypotheses"]
    if isinstance(uid, bool) or not isinstance(uid, (str, int)):
        raise ValueError(f"{where}: id must be a string or an integer, got {uid!r}")
    if not isinstance(ref, str):
        raise ValueError(f"{where}: reference must be a string, got {ref!r}")
    if not isinstance(hyps, list):
        raise ValueError(f"{where}: hypotheses must be a list, got {type(hyps).__name__}")
    if not hyps:
        raise ValueError(f"{where}: utterance {uid!r} has an empty hypotheses list")
    out = []
    for k, h in enumerate(hyps, 1):
        at = f"{where}: hypothesis {k}"
        if not isinstance(h, dict):
            raise ValueError(f"{at} must be a JSON object, got {h!r}")
        if "text" not in h:
            raise ValueError(f"{at} has no text")
        if not isinstance(h["text"], str):
            raise ValueError(f"{at}: text must be a string, got {h['text']!r}")
        acoustic = _finite_or_none(h.get("acoustic"), "acoustic", at)
        lm = _finite_or_none(h.get("lm"), "lm", at)
        score = _finite_or_none(h.get("score"), "score", at)
        if acoustic is None:
            if score is None:
                raise ValueError(f"{at} has neither an acoustic score nor a score (one of them must be a number; "
                                 "acoustic falls back to score)")
            acoustic = score
        out.append(NBestHypothesis(h["text"], acoustic, lm, score))
    return NBestList(uid, ref, tuple(out))


def _parse_lines(lines: Iterable[tuple[int, str]], source: str) -> list[NBestList]:
    records: list[NBestList] = []
    first_line: dict[str | int, int] = {}
    for n, line in lines:
        if not line.strip():
            continue
        where = f"{source}, line {n}"
        rec = _parse_line(line, where)
        if rec.id in first_line:
            raise ValueError(f"{where}: duplicate utterance id {rec.id!r} (first on line {first_line[rec.id]})")
        first_line[rec.id] = n
        records.append(rec)
    return records


def parse_nbest(lines: Iterable[str], *, source: str = "<n-best>") -> list[NBestList]:
    """Parse n-best JSON lines (an iterable of strings, one record each; blank lines skipped).

    Each line is ``{"id": str|int, "reference": str, "hypotheses": [{"text": str, "acoustic":
    float|null, "lm": float|null, "score": float|null}, ...]}`` with the hypotheses best first.
    ``lm`` and ``score`` may be missing; ``acoustic`` may be missing or null only when ``score`` is
    a number, and then AM := ``score``. Extra keys are ignored. A ``ValueError`` names ``source``
    and the line number of the first problem (not JSON, missing keys, empty hypotheses, a
    hypothesis without text, non-numeric or non-finite scores, a duplicate id).
    """
    if isinstance(lines, (str, bytes)):
        raise TypeError("parse_nbest() expects an iterable of lines, e.g. text.split('\\n'), not one string")
    return _parse_lines(enumerate(lines, 1), source)


def read_nbest(path: str | Path) -> list[NBestList]:
    """Read an n-best JSONL file (format and errors: :func:`parse_nbest`; the file is UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"n-best file not found: {path}")

    def lines() -> Iterable[tuple[int, str]]:
        # bytes.splitlines splits on \n and \r only (str.splitlines would also split inside JSON strings)
        for n, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                yield n, raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}, line {n}: not UTF-8 ({e.reason} at byte {e.start})") from None

    return _parse_lines(lines(), str(path))


def write_nbest(path: str | Path, records: Sequence[NBestList]) -> None:
    """Write records as n-best JSONL (atomically); :func:`read_nbest` reads them back equal."""
    ids = Counter(r.id for r in records)
    dup = [i for i, c in ids.items() if c > 1]
    if dup:
        raise ValueError(f"duplicate utterance id(s) {dup[:5]!r}: ids must be unique in an n-best file")
    lines = []
    for r in records:
        if not isinstance(r, NBestList):
            raise TypeError(f"write_nbest() expects NBestList records, got {type(r).__name__}")
        hyps = [{"text": h.text, "acoustic": h.acoustic, "lm": h.lm, "score": h.score} for h in r.hypotheses]
        lines.append(json.dumps({"id": r.id, "reference": r.reference, "hypotheses": hyps}, ensure_ascii=False,
                                allow_nan=False))
    atomic_write_text(path, "".join(line + "\n" for line in lines))
