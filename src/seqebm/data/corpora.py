"""Text corpora: the built-in ``wiki-mini`` corpus and users' own files.

:func:`load_corpus` accepts a registered name (see :func:`list_corpora`), a directory holding
``train``/``valid``/``test`` files (``.txt`` or ``.jsonl``), or a single ``.txt``/``.jsonl`` file
that is split 90/5/5 by line. Splits are deterministic: items are ranked by a SHA-256 hash of
``(seed, key)``, so they do not depend on Python's or NumPy's random number generators.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqebm.data.text_files import load_lines, load_parallel
from seqebm.data.wiki import build_wiki_articles
from seqebm.io import atomic_write_bytes

__all__ = [
    "TextCorpus",
    "ParallelCorpus",
    "load_corpus",
    "list_corpora",
    "load_parallel_corpus",
    "default_cache_dir",
    "split_keys",
    "SPLITS",
]

SPLITS: tuple[str, str, str] = ("train", "valid", "test")
_SPLIT_ALIASES: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "valid": ("valid", "validation", "dev"),
    "test": ("test",),
}
_SUFFIXES = (".txt", ".jsonl")
_WIKI_CACHE_FORMAT = "seqebm/wiki-mini"
_WIKI_CACHE_VERSION = 1


def _split_stats(docs: Sequence[str]) -> dict[str, int]:
    return {
        "documents": len(docs),
        "characters": sum(len(d) for d in docs),
        "words": sum(len(d.split()) for d in docs),
    }


@dataclass
class TextCorpus:
    """A text corpus: lists of documents (one paragraph/sentence each) per split.

    ``meta`` holds optional provenance, e.g. for ``wiki-mini`` the article titles per split
    under ``meta["articles"]``.
    """

    name: str
    train: list[str]
    valid: list[str]
    test: list[str]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def split(self, name: str) -> list[str]:
        """Return the split called ``name`` ("train", "valid" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        docs: list[str] = getattr(self, name)
        return docs

    def summary(self) -> dict[str, dict[str, int]]:
        """Documents, characters and words per split, e.g. ``{"train": {"documents": ...}}``."""
        return {s: _split_stats(self.split(s)) for s in SPLITS}


@dataclass
class ParallelCorpus:
    """A corpus of ``(source, target)`` pairs per split (translation, summarisation, ...)."""

    name: str
    train: list[tuple[str, str]]
    valid: list[tuple[str, str]]
    test: list[tuple[str, str]]

    def summary(self) -> dict[str, dict[str, int]]:
        """Pairs plus source/target words per split."""
        out: dict[str, dict[str, int]] = {}
        for s in SPLITS:
            pairs: list[tuple[str, str]] = getattr(self, s)
            out[s] = {
                "pairs": len(pairs),
                "source_words": sum(len(a.split()) for a, _ in pairs),
                "target_words": sum(len(b.split()) for _, b in pairs),
            }
        return out


# --------------------------------------------------------------------------- splitting


def split_keys(
    keys: Sequence[str],
    *,
    seed: int = 0,
    valid_fraction: float = 0.05,
    test_fraction: float = 0.05,
) -> tuple[list[int], list[int], list[int]]:
    """Deterministically split ``keys`` into train/valid/test index lists.

    Items are ranked by ``sha256(f"{seed}:{key}")``; the first ``round(n * test_fraction)``
    (at least 1) go to test, the next ``round(n * valid_fraction)`` (at least 1) to valid,
    the rest to train. Each returned list is in the original order of ``keys``.
    """
    n = len(keys)
    if len(set(keys)) != n:
        raise ValueError("split keys must be unique")
    for what, frac in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < frac < 1.0:
            raise ValueError(f"{what} must be in (0, 1), got {frac}")
    n_test = max(1, round(n * test_fraction))
    n_valid = max(1, round(n * valid_fraction))
    if n - n_test - n_valid < 1:
        raise ValueError(f"need at least 3 items to make non-empty train/valid/test splits, got {n}")
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{keys[i]}".encode()).digest())
    test = sorted(order[:n_test])
    valid = sorted(order[n_test : n_test + n_valid])
    train = sorted(order[n_test + n_valid :])
    return train, valid, test


# --------------------------------------------------------------------------- caching


def default_cache_dir() -> Path:
    """``$SEQEBM_CACHE`` if set, else ``~/.cache/seqebm``."""
    env = os.environ.get("SEQEBM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "seqebm"


def _resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _try_cache_write(path: Path, data: bytes) -> None:
    try:
        atomic_write_bytes(path, data)
    except OSError as exc:
        warnings.warn(f"could not write cache file {path}: {exc}", RuntimeWarning, stacklevel=3)


# --------------------------------------------------------------------------- wiki-mini


def _read_wiki_cache(path: Path) -> list[tuple[str, list[str]]] | None:
    """Articles from a cache file, or ``None`` if it is missing, corrupt or stale."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict) or data.get("format") != _WIKI_CACHE_FORMAT:
        return None
    if data.get("version") != _WIKI_CACHE_VERSION or not isinstance(data.get("articles"), list):
        return None
    articles: list[tuple[str, list[str]]] = []
    for item in data["articles"]:
        if not isinstance(item, dict):
            return None
        title, paragraphs = item.get("title"), item.get("paragraphs")
        if not isinstance(title, str) or not isinstance(paragraphs, list):
            return None
        if not all(isinstance(p, str) for p in paragraphs):
            return None
        articles.append((title, paragraphs))
    if len(articles) < 3:
        return None
    return articles


def _wiki_mini_articles(cache_dir: Path, rebuild: bool) -> list[tuple[str, list[str]]]:
    path = cache_dir / "corpora" / f"wiki-mini.v{_WIKI_CACHE_VERSION}.json"
    if not rebuild:
        cached = _read_wiki_cache(path)
        if cached is not None:
            return cached
    articles = build_wiki_articles()
    payload = {
        "format": _WIKI_CACHE_FORMAT,
        "version": _WIKI_CACHE_VERSION,
        "articles": [{"title": t, "paragraphs": p} for t, p in articles],
    }
    _try_cache_write(path, json.dumps(payload, ensure_ascii=False).encode("utf-8"))
    return articles


def _load_wiki_mini(cache_dir: Path, seed: int, rebuild: bool) -> TextCorpus:
    articles = _wiki_mini_articles(cache_dir, rebuild)
    titles = [t for t, _ in articles]
    parts = split_keys(titles, seed=seed)
    splits = [[p for i in idx for p in articles[i][1]] for idx in parts]
    meta = {
        "source": "gensim test data (English Wikipedia extract)",
        "seed": seed,
        "articles": {s: [titles[i] for i in idx] for s, idx in zip(SPLITS, parts)},
    }
    return TextCorpus("wiki-mini", splits[0], splits[1], splits[2], meta=meta)


_REGISTRY: dict[str, tuple[str, Callable[[Path, int, bool], TextCorpus]]] = {
    "wiki-mini": (
        "~100 cleaned English Wikipedia articles (~0.4M words) from gensim's test data; "
        "one paragraph per item, split 90/5/5 by article",
        _load_wiki_mini,
    ),
}


def list_corpora() -> dict[str, str]:
    """Built-in corpus names mapped to one-line descriptions."""
    return {name: desc for name, (desc, _) in _REGISTRY.items()}


# --------------------------------------------------------------------------- user data


def _find_split_file(directory: Path, split: str) -> Path:
    candidates = [directory / f"{stem}{suf}" for stem in _SPLIT_ALIASES[split] for suf in _SUFFIXES]
    found = [c for c in candidates if c.is_file()]
    if not found:
        tried = ", ".join(c.name for c in candidates)
        raise FileNotFoundError(
            f"{split} split file not found: {directory / (split + '.txt')} (looked for {tried})"
        )
    if len(found) > 1:
        names = ", ".join(f.name for f in found)
        raise ValueError(f"ambiguous {split} split in {directory}: found {names}; keep only one")
    return found[0]


def _load_directory(directory: Path, field_name: str) -> TextCorpus:
    paths = {s: _find_split_file(directory, s) for s in SPLITS}
    docs = {s: load_lines(p, field=field_name) for s, p in paths.items()}
    meta = {"source": str(directory), "files": {s: str(p) for s, p in paths.items()}}
    return TextCorpus(directory.name, docs["train"], docs["valid"], docs["test"], meta=meta)


def _load_single_file(path: Path, field_name: str, seed: int) -> TextCorpus:
    docs = load_lines(path, field=field_name)
    if len(docs) < 3:
        raise ValueError(
            f"need at least 3 non-blank lines to split a single file into train/valid/test, "
            f"got {len(docs)}: {path}"
        )
    train, valid, test = split_keys([str(i) for i in range(len(docs))], seed=seed)
    meta = {"source": str(path), "seed": seed}
    return TextCorpus(
        path.stem,
        [docs[i] for i in train],
        [docs[i] for i in valid],
        [docs[i] for i in test],
        meta=meta,
    )


def load_corpus(
    name_or_path: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    field: str = "text",
    rebuild: bool = False,
) -> TextCorpus:
    """Load a built-in corpus by name, or users' data from a directory or a single file.

    Args:
        name_or_path: a name from :func:`list_corpora` (e.g. ``"wiki-mini"``); a directory with
            ``train``/``valid``/``test`` files (``.txt``, one document per line, or ``.jsonl``;
            ``validation``/``dev`` are accepted for valid); or a single ``.txt``/``.jsonl`` file,
            split 90/5/5 by line.
        cache_dir: where built corpora are cached (default ``$SEQEBM_CACHE`` or
            ``~/.cache/seqebm``). Only used for built-in corpora.
        seed: seed of the deterministic split (built-in corpora and single files).
        field: the JSON field holding the text in ``.jsonl`` files.
        rebuild: ignore an existing cache and rebuild the built-in corpus.
    """
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"load_corpus() expects a name or a path, got {type(name_or_path).__name__}")
    key = os.fspath(name_or_path)
    if isinstance(name_or_path, str) and key in _REGISTRY:
        return _REGISTRY[key][1](_resolve_cache_dir(cache_dir), seed, rebuild)
    path = Path(key).expanduser()
    if path.is_dir():
        return _load_directory(path, field)
    if path.is_file():
        return _load_single_file(path, field, seed)
    known = ", ".join(sorted(_REGISTRY))
    hint = " (digits is an image data set: use load_digits_dataset())" if key == "digits" else ""
    raise ValueError(
        f"unknown corpus {key!r}: not a built-in name and no such file or directory; "
        f"known corpora: {known}{hint}"
    )


def load_parallel_corpus(
    source_path: str | os.PathLike[str],
    target_path: str | os.PathLike[str],
    *,
    name: str | None = None,
    seed: int = 0,
) -> ParallelCorpus:
    """Read line-aligned source/target files and split the pairs 90/5/5 deterministically."""
    pairs = load_parallel(source_path, target_path)
    if len(pairs) < 3:
        raise ValueError(f"need at least 3 line pairs to split into train/valid/test, got {len(pairs)}")
    train, valid, test = split_keys([str(i) for i in range(len(pairs))], seed=seed)
    return ParallelCorpus(
        name or Path(source_path).stem,
        [pairs[i] for i in train],
        [pairs[i] for i in valid],
        [pairs[i] for i in test],
    )
