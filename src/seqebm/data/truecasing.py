"""The truecasing task on wiki-mini: lower-cased words labelled with their case class."""

from __future__ import annotations

import os
import re

from seqebm.data.corpora import SPLITS
from seqebm.data.tagged import Sentence, TaggedCorpus

#: Per-word case classes of the truecasing task (input: the lower-cased word).
#: ``lower``: the word equals its lower-case form (includes punctuation and numbers);
#: ``upper_first``: first cased letter upper, the rest lower ("Paris", "I", "'Tis");
#: ``all_upper``: two or more cased letters, all upper ("NASA", "U.S");
#: ``mixed``: anything else ("McDonald", "iPhone"); not restorable by :func:`apply_case`.
CASE_CLASSES: tuple[str, str, str, str] = ("lower", "upper_first", "all_upper", "mixed")

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr prof rev gen col lt sgt capt mt ft vs etc e.g i.e cf al ca approx "
    "no nos fig figs vol pp inc ltd co corp bros dept est jan feb mar apr jun jul aug sep sept "
    "oct nov dec".split()
)
_BOUNDARY = re.compile(r"[.!?]+[\"'\u201d\u2019)\]]*\s+")
_WORD = re.compile(r"\w+(?:[-'\u2019.]\w+)*|[^\w\s]")


def case_class(token: str) -> str:
    """The :data:`CASE_CLASSES` label of ``token``, judged on its cased characters."""
    cased = [c for c in token if c.lower() != c.upper()]
    if all(c == c.lower() for c in cased):
        return "lower"
    if len(cased) >= 2 and all(c == c.upper() for c in cased):
        return "all_upper"
    if cased[0] == cased[0].upper() and all(c == c.lower() for c in cased[1:]):
        return "upper_first"
    return "mixed"


def apply_case(token: str, label: str) -> str:
    """Re-case a lower-cased ``token`` by ``label``; ``mixed`` (unknown pattern) stays as is."""
    if label in ("lower", "mixed"):
        return token
    if label == "all_upper":
        return token.upper()
    if label == "upper_first":
        for i, c in enumerate(token):
            if c.lower() != c.upper():
                return token[:i] + c.upper() + token[i + 1 :]
        return token
    raise ValueError(f"unknown case class {label!r}; expected one of {', '.join(CASE_CLASSES)}")


def split_sentences(text: str) -> list[str]:
    """Rule-based sentence split: after ``.``/``!``/``?`` (and closing quotes/brackets) plus
    whitespace, when the next character is upper-case, a digit or an opening quote/bracket, and
    the word before a ``.`` is not a known abbreviation or a single-letter initial."""
    sentences: list[str] = []
    start = 0
    for m in _BOUNDARY.finditer(text):
        nxt = text[m.end() : m.end() + 1]
        if not nxt or not (nxt.isupper() or nxt.isdigit() or nxt in "\"'\u201c\u2018(["):
            continue
        if text[m.start()] == ".":
            before = text[start : m.start()].split()
            word = before[-1].lstrip("\"'(\u201c\u2018[").lower() if before else ""
            if word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha()):
                continue
        piece = text[start : m.end()].strip()
        if piece:
            sentences.append(piece)
        start = m.end()
    rest = text[start:].strip()
    if rest:
        sentences.append(rest)
    return sentences


def word_tokenize(text: str) -> list[str]:
    """Words (with inner ``-``, ``'``, ``.``: "don't", "U.S", "3.5") and single punctuation marks."""
    return _WORD.findall(text)


def truecasing_corpus(
    cache_dir: str | os.PathLike[str] | None = None,
    max_sentences: int | None = None,
    *,
    seed: int = 0,
) -> TaggedCorpus:
    """The truecasing task on wiki-mini: lower-cased words labelled with :data:`CASE_CLASSES`.

    Paragraphs of ``load_corpus("wiki-mini")`` are cut by :func:`split_sentences` and
    :func:`word_tokenize`; the splits are wiki-mini's article-level splits (``seed``), so no
    article contributes to two splits. ``max_sentences`` keeps the first N sentences per split.
    """
    from seqebm.data.corpora import load_corpus

    if max_sentences is not None and max_sentences < 1:
        raise ValueError(f"max_sentences must be >= 1 or None, got {max_sentences}")
    corpus = load_corpus("wiki-mini", cache_dir=cache_dir, seed=seed)
    splits: dict[str, list[Sentence]] = {}
    for name in SPLITS:
        out: list[Sentence] = []
        for paragraph in corpus.split(name):
            for sentence in split_sentences(paragraph):
                tokens = word_tokenize(sentence)
                if tokens:
                    out.append(([t.lower() for t in tokens], [case_class(t) for t in tokens]))
            if max_sentences is not None and len(out) >= max_sentences:
                break
        splits[name] = out[:max_sentences] if max_sentences is not None else out
    meta = {"source": "wiki-mini", "seed": seed, "classes": list(CASE_CLASSES)}
    return TaggedCorpus("truecase-wiki-mini", splits["train"], splits["valid"], splits["test"], meta=meta)
