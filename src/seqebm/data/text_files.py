"""Readers for users' own text data: plain text, JSON lines and line-aligned parallel files."""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["load_text_file", "load_jsonl", "load_lines", "load_parallel"]


def _existing_file(path: str | os.PathLike[str], what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{what} not found: {p}")
    if not p.is_file():
        raise ValueError(f"{what} is not a regular file: {p}")
    return p


def _read_lines(path: Path, what: str) -> list[str]:
    """All lines of a UTF-8 file without their line endings (a leading BOM is dropped)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        line_no = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise ValueError(f"{what} is not valid UTF-8 (line {line_no}): {path}") from exc
    # Split on \n only (after normalising \r\n): str.splitlines would also split on
    # unicode separators such as U+2028 that may legitimately occur inside a sentence.
    lines = text.replace("\r\n", "\n").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def load_text_file(path: str | os.PathLike[str]) -> list[str]:
    """Read one document/sentence per line; surrounding whitespace is stripped, blank lines skipped.

    Raises ``FileNotFoundError`` if the file does not exist and ``ValueError`` if it has no
    non-blank lines or is not UTF-8.
    """
    p = _existing_file(path, "text file")
    docs = [line.strip() for line in _read_lines(p, "text file")]
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"text file is empty (no non-blank lines): {p}")
    return docs


def load_jsonl(path: str | os.PathLike[str], field: str = "text") -> list[str]:
    """Read the string ``field`` of every JSON object in a JSON-lines file (blank lines skipped).

    Raises ``ValueError`` naming the line number if a line is not valid JSON, is not an object,
    lacks ``field`` or has a non-string value; records whose text is blank are skipped.
    """
    if not isinstance(field, str) or not field:
        raise TypeError(f"field must be a non-empty str, got {field!r}")
    p = _existing_file(path, "JSONL file")
    docs: list[str] = []
    n_records = 0
    for line_no, line in enumerate(_read_lines(p, "JSONL file"), start=1):
        if not line.strip():
            continue
        n_records += 1
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{p}: line {line_no} is not valid JSON ({exc.msg}); expected an object with "
                f"field {field!r}"
            ) from exc
        if not isinstance(record, dict):
            raise ValueError(
                f"{p}: line {line_no} is a JSON {type(record).__name__}, expected an object with "
                f"field {field!r}"
            )
        if field not in record:
            keys = ", ".join(map(repr, list(record)[:10])) or "none"
            raise ValueError(f"{p}: line {line_no} has no field {field!r} (fields: {keys})")
        value = record[field]
        if not isinstance(value, str):
            raise ValueError(
                f"{p}: line {line_no} field {field!r} must be a string, got {type(value).__name__}"
            )
        value = value.strip()
        if value:
            docs.append(value)
    if not docs:
        detail = "no records" if n_records == 0 else f"no non-blank {field!r} values"
        raise ValueError(f"JSONL file is empty ({detail}): {p}")
    return docs


def load_lines(path: str | os.PathLike[str], field: str = "text") -> list[str]:
    """Dispatch on the suffix: ``.jsonl`` -> :func:`load_jsonl`, anything else -> :func:`load_text_file`."""
    if Path(path).suffix.lower() == ".jsonl":
        return load_jsonl(path, field=field)
    return load_text_file(path)


def load_parallel(
    source_path: str | os.PathLike[str], target_path: str | os.PathLike[str]
) -> list[tuple[str, str]]:
    """Read two line-aligned text files into ``[(source, target), ...]``.

    Both files must have the same number of lines (``ValueError`` with both counts otherwise).
    Pairs where either side is blank are skipped; ``ValueError`` if no pair remains.
    """
    src = _existing_file(source_path, "source file")
    tgt = _existing_file(target_path, "target file")
    src_lines = _read_lines(src, "source file")
    tgt_lines = _read_lines(tgt, "target file")
    if len(src_lines) != len(tgt_lines):
        raise ValueError(
            f"parallel files have different line counts: source has {len(src_lines)} lines "
            f"({src}), target has {len(tgt_lines)} lines ({tgt})"
        )
    pairs = [(s.strip(), t.strip()) for s, t in zip(src_lines, tgt_lines)]
    pairs = [(s, t) for s, t in pairs if s and t]
    if not pairs:
        raise ValueError(f"parallel files are empty (no line pair with text on both sides): {src}, {tgt}")
    return pairs
