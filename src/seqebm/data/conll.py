"""Users' CoNLL-style column files and BIO span helpers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from seqebm.data.tagged import Sentence

def load_conll(
    path: str | os.PathLike[str],
    *,
    token_col: int = 0,
    tag_col: int = -1,
    sep: str | None = None,
    comment_prefix: str | None = "#",
    skip_docstart: bool = True,
) -> list[Sentence]:
    """Read a CoNLL-style file: one token per line, a blank line between sentences.

    Args:
        token_col, tag_col: column indices of the token and the tag (negative counts from the end).
        sep: column separator; ``None`` splits on any whitespace (use ``"\\t"`` for CoNLL-U, whose
            tokens may hold spaces).
        comment_prefix: lines starting with it *between sentences* are skipped (CoNLL-U's
            ``# text = ...``); inside a sentence they are token lines, so a ``#`` token survives.
            ``None`` disables comments.
        skip_docstart: drop CoNLL-2003's ``-DOCSTART-`` pseudo-sentences.

    Every token line must have the same number of columns as the file's first token line.
    A malformed line raises ``ValueError("<file>:<line>: ...")``.
    """
    path = Path(path)
    sentences: list[Sentence] = []
    words: list[str] = []
    tags: list[str] = []
    n_cols: int | None = None

    def flush() -> None:
        if words and not (skip_docstart and words[0] == "-DOCSTART-"):
            sentences.append((list(words), list(tags)))
        words.clear()
        tags.clear()

    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc})") from exc
    for lineno, raw in enumerate(lines, 1):
        line = raw.rstrip("\r\n")
        if not line.strip():
            flush()
            continue
        if comment_prefix and not words and line.startswith(comment_prefix):
            continue
        cols = line.split(sep) if sep is not None else line.split()
        if n_cols is None:
            n_cols = len(cols)
        where = f"{path}:{lineno}"
        if len(cols) != n_cols:
            raise ValueError(f"{where}: {len(cols)} columns, but the first token line has {n_cols}: {line!r}")
        for what, col in (("token_col", token_col), ("tag_col", tag_col)):
            if not -len(cols) <= col < len(cols):
                raise ValueError(f"{where}: {what}={col} is out of range for a line with {len(cols)} columns: {line!r}")
        token, tag = cols[token_col].strip(), cols[tag_col].strip()
        if not token or not tag:
            raise ValueError(f"{where}: empty token or tag: {line!r}")
        words.append(token)
        tags.append(tag)
    flush()
    return sentences


# ============================================================================ BIO


def split_bio_tag(tag: str) -> tuple[str, str | None]:
    """``"O"`` -> ``("O", None)``, ``"B-PER"`` -> ``("B", "PER")``; anything else -> ValueError."""
    if tag == "O":
        return "O", None
    if len(tag) > 2 and tag[:2] in ("B-", "I-"):
        return tag[0], tag[2:]
    raise ValueError(f"not a BIO tag: {tag!r} (expected 'O', 'B-<type>' or 'I-<type>')")


def validate_bio(tags: Sequence[str]) -> None:
    """Raise ``ValueError`` unless every ``I-X`` continues a ``B-X``/``I-X`` (same rule as
    :func:`seqebm.structured.bio_constraints`)."""
    prev_type: str | None = None
    for i, tag in enumerate(tags):
        prefix, typ = split_bio_tag(tag)
        if prefix == "I" and typ != prev_type:
            before = f"follows {tags[i - 1]!r}" if i else "starts the sequence"
            raise ValueError(
                f"invalid BIO sequence at position {i}: {tag!r} {before} (an I-{typ} must continue "
                f"B-{typ} or I-{typ}); use repair_bio() or bio_spans(..., repair=True)"
            )
        prev_type = typ


def repair_bio(tags: Sequence[str]) -> list[str]:
    """Turn every orphan ``I-X`` into ``B-X`` (the conlleval reading: it starts a new chunk)."""
    out: list[str] = []
    prev_type: str | None = None
    for tag in tags:
        prefix, typ = split_bio_tag(tag)
        out.append(f"B-{typ}" if prefix == "I" and typ != prev_type else tag)
        prev_type = typ
    return out


def bio_spans(tags: Sequence[str], *, repair: bool = False) -> list[tuple[str, int, int]]:
    """Chunks of a BIO sequence as ``(type, start, end)`` with ``end`` exclusive.

    Invalid sequences raise ``ValueError`` unless ``repair=True`` (then :func:`repair_bio` first).
    """
    if repair:
        tags = repair_bio(tags)
    else:
        validate_bio(tags)
    spans: list[tuple[str, int, int]] = []
    start, cur = 0, None
    for i, tag in enumerate(tags):
        prefix, typ = split_bio_tag(tag)
        if prefix != "I" and cur is not None:
            spans.append((cur, start, i))
            cur = None
        if prefix == "B":
            start, cur = i, typ
    if cur is not None:
        spans.append((cur, start, len(tags)))
    return spans
