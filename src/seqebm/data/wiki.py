"""The ``wiki-mini`` corpus: ~100 English Wikipedia articles shipped with gensim's test data.

The raw dump is parsed with :func:`gensim.corpora.wikicorpus.extract_pages` and stripped of
most markup with :func:`gensim.corpora.wikicorpus.filter_wiki`; :func:`clean_wiki_text` then
removes what ``filter_wiki`` leaves behind (quote runs, headings, list and table debris, html
tags and entities) and returns one paragraph per item.
"""

from __future__ import annotations

import bz2
import html
import os
import re
import warnings
from pathlib import Path

__all__ = [
    "WIKI_MINI_FILE",
    "wiki_mini_source",
    "clean_wiki_text",
    "build_wiki_articles",
]

WIKI_MINI_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"

# A page is kept only if its cleaned paragraphs hold at least this many words.
MIN_ARTICLE_WORDS = 20
# A paragraph is kept only if it has at least this many words ...
MIN_PARAGRAPH_WORDS = 4
# ... and at least this fraction of its non-space characters are letters.
MIN_ALPHA_FRACTION = 0.5

_DEBRIS_PREFIXES = ("*", "#", "|", "!", "{", "}", ";", ":", "=")
_DEBRIS_SUBSTRINGS = ("[[", "]]", "{{", "}}", "|")
_QUOTE_RUN = re.compile(r"'{2,}")
_HTML_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
_HTML_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_ENTITY = re.compile(r"&(?:[A-Za-z]+|#[0-9]+|#x[0-9A-Fa-f]+);")
_EMPTY_PARENS = re.compile(r"\(\s*[,;:]?\s*\)")
_PAREN_LEAD_PUNCT = re.compile(r"\(\s*[,;:]\s*")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([,.;:!?)])")
_SPACE_AFTER_OPEN = re.compile(r"\(\s+")


def wiki_mini_source() -> Path:
    """Path of the bz2 Wikipedia extract inside the installed gensim package."""
    import gensim

    path = Path(os.path.dirname(gensim.__file__)) / "test" / "test_data" / WIKI_MINI_FILE
    if not path.is_file():
        raise FileNotFoundError(f"gensim's Wikipedia test extract not found: {path}")
    return path


def _clean_line(line: str) -> str | None:
    """Clean one line of ``filter_wiki`` output; ``None`` if it is not prose."""
    line = line.strip()
    if not line or line.startswith(_DEBRIS_PREFIXES):
        return None
    line = _QUOTE_RUN.sub("", line)
    line = _HTML_COMMENT.sub(" ", line)
    # Unescape first so that escaped tags (&lt;ref&gt;) are removed too; remaining
    # entities (double-escaped ones) are dropped.
    line = html.unescape(line)
    line = _HTML_TAG.sub(" ", line)
    line = _ENTITY.sub(" ", line)
    if any(s in line for s in _DEBRIS_SUBSTRINGS):
        return None
    line = " ".join(line.split())
    # Templates removed by filter_wiki leave "( ; born 1947)" and "()" behind.
    line = _EMPTY_PARENS.sub("", line)
    line = _PAREN_LEAD_PUNCT.sub("(", line)
    line = _SPACE_AFTER_OPEN.sub("(", line)
    line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
    line = " ".join(line.split())
    if "''" in line or line.startswith(_DEBRIS_PREFIXES):
        return None
    if len(line.split()) < MIN_PARAGRAPH_WORDS:
        return None
    if not any(w.isalpha() and w.islower() and len(w) > 1 for w in line.split()):
        return None  # name lists glued together by filter_wiki ("Hans DreierRaoul Pene")
    visible = [c for c in line if not c.isspace()]
    if sum(c.isalpha() for c in visible) < MIN_ALPHA_FRACTION * len(visible):
        return None
    return line


def clean_wiki_text(text: str) -> list[str]:
    """Turn ``filter_wiki`` output into a list of clean prose paragraphs (one line each)."""
    out: list[str] = []
    for raw in text.splitlines():
        cleaned = _clean_line(raw)
        if cleaned is not None:
            out.append(cleaned)
    return out


def build_wiki_articles(source: str | os.PathLike[str] | None = None) -> list[tuple[str, list[str]]]:
    """Parse and clean the wiki-mini dump into ``[(title, paragraphs), ...]`` in dump order.

    Redirects and pages with fewer than ``MIN_ARTICLE_WORDS`` words after cleaning are dropped.
    """
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    path = Path(source) if source is not None else wiki_mini_source()
    if not path.is_file():
        raise FileNotFoundError(f"Wikipedia dump not found: {path}")
    articles: list[tuple[str, list[str]]] = []
    seen: set[str] = set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with bz2.open(path, "rb") as fh:
            for title, text, _pageid in extract_pages(fh, filter_namespaces=("0",)):
                if not text or text.lstrip()[:9].lower() == "#redirect":
                    continue
                if title in seen:
                    continue
                paragraphs = clean_wiki_text(filter_wiki(text))
                if sum(len(p.split()) for p in paragraphs) < MIN_ARTICLE_WORDS:
                    continue
                seen.add(title)
                articles.append((title, paragraphs))
    return articles
