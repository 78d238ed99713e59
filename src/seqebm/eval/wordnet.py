"""Local-only WordNet discovery for METEOR (no downloads, ever).

NLTK's METEOR needs WordNet for its synonym-matching stage. This module finds WordNet data
that is already on the machine, in this order:

1. NLTK's own ``wordnet`` corpus (``nltk.data.find("corpora/wordnet")``, which also finds
   ``wordnet.zip``), searched along ``nltk.data.path`` — including ``$NLTK_DATA``.
2. A classic WordNet 3.0 database directory (``data.noun``, ``index.noun``, ``noun.exc``, ...
   for the four parts of speech): ``$WNSEARCHDIR``, ``$WNHOME/dict`` (the variables the
   WordNet C tools use), then ``/usr/share/wordnet`` (Debian/Ubuntu package ``wordnet-base``:
   ``apt-get install wordnet-base``), ``/usr/local/share/wordnet`` and
   ``/usr/local/WordNet-3.0/dict`` (Princeton's default install prefix).

A database directory is read with NLTK's :class:`~nltk.corpus.reader.wordnet.WordNetCorpusReader`
through a small subclass, because Debian's ``wordnet-base`` omits two files NLTK expects:

* ``lexnames`` (the 45 lexicographer-file names; Debian's README calls it a remnant the C
  library has compiled in). The subclass serves the fixed WordNet 3.0 list from
  ``lexnames(5WN)`` when the file is absent; METEOR never uses lexicographer names anyway.
* ``index.sense`` (package ``wordnet-sense-index``), which NLTK only reads to map between
  WordNet versions for the multilingual (OMW) functions; the subclass skips that mapping.

NLTK >= 3.10 sandboxes corpus readers to the directories on ``nltk.data.path``; a database
directory is therefore registered there only for the duration of :func:`wordnet_session`
and removed again afterwards (unless it was already there).
"""

from __future__ import annotations

import functools
import io
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

__all__ = ["WordNetSource", "find_wordnet", "wordnet_session", "WORDNET_HELP"]

#: Standard locations of a WordNet 3.0 database directory (after $WNSEARCHDIR / $WNHOME/dict).
WORDNET_DIRS: tuple[str, ...] = (
    "/usr/share/wordnet",  # Debian/Ubuntu: wordnet-base
    "/usr/local/share/wordnet",
    "/usr/local/WordNet-3.0/dict",  # Princeton's `make install` default
)

#: Files a database directory must contain to be used.
_REQUIRED_FILES: tuple[str, ...] = tuple(
    f"{kind}.{pos}" for pos in ("noun", "verb", "adj", "adv") for kind in ("data", "index")
) + tuple(f"{pos}.exc" for pos in ("noun", "verb", "adj", "adv"))

#: How to make METEOR available; used in the "METEOR skipped" warning.
WORDNET_HELP = (
    "install WordNet 3.0 locally, e.g. `apt-get install wordnet-base` (Debian/Ubuntu, "
    "installs /usr/share/wordnet), or point $WNSEARCHDIR at a WordNet 3.0 dict directory, "
    "or put NLTK's `wordnet` corpus under $NLTK_DATA/corpora/ (seqebm never downloads it)"
)

# lexnames(5WN), WordNet 3.0: "<file number> <lexicographer file> <syntactic category>".
_LEXNAMES = (
    [("adj.all", 3), ("adj.pert", 3), ("adv.all", 4)]
    + [(f"noun.{name}", 1) for name in (
        "Tops act animal artifact attribute body cognition communication event feeling food "
        "group location motive object person phenomenon plant possession process quantity "
        "relation shape state substance time").split()]
    + [(f"verb.{name}", 2) for name in (
        "body change cognition communication competition consumption contact creation emotion "
        "motion perception possession social stative weather").split()]
    + [("adj.ppl", 3)]
)
_LEXNAMES_TEXT = "".join(f"{i:02d}\t{name}\t{cat}\n" for i, (name, cat) in enumerate(_LEXNAMES))


@dataclass(frozen=True)
class WordNetSource:
    """Where WordNet was found: NLTK's corpus (``kind="nltk"``) or a database dir (``"wndb"``)."""

    kind: Literal["nltk", "wndb"]
    path: str


def _is_wordnet_dir(path: str | os.PathLike[str]) -> bool:
    root = Path(path)
    return root.is_dir() and all((root / name).is_file() for name in _REQUIRED_FILES)


def _candidate_dirs() -> list[str]:
    dirs = []
    if os.environ.get("WNSEARCHDIR"):
        dirs.append(os.environ["WNSEARCHDIR"])
    if os.environ.get("WNHOME"):
        dirs.append(os.path.join(os.environ["WNHOME"], "dict"))
    return dirs + list(WORDNET_DIRS)


def find_wordnet() -> WordNetSource | None:
    """Locate WordNet data on this machine without loading or downloading anything.

    Returns ``None`` when nothing is found or NLTK is not installed. Cheap: only checks
    that files exist (see the module docstring for the search order).
    """
    try:
        import nltk.data
    except ImportError:
        return None
    try:
        found = nltk.data.find("corpora/wordnet")
        return WordNetSource("nltk", str(getattr(found, "path", found)))
    except (LookupError, OSError, ValueError):
        pass
    for directory in _candidate_dirs():
        if _is_wordnet_dir(directory):
            return WordNetSource("wndb", str(Path(directory).resolve()))
    return None


@contextmanager
def _nltk_root(directory: str) -> Iterator[None]:
    """Temporarily register ``directory`` on ``nltk.data.path`` (NLTK's reader sandbox)."""
    import nltk.data

    added = directory not in nltk.data.path
    if added:
        nltk.data.path.append(directory)
    try:
        yield
    finally:
        if added:
            try:
                nltk.data.path.remove(directory)
            except ValueError:
                pass


@functools.lru_cache(maxsize=4)
def _load(source: WordNetSource) -> Any:
    """Load (and cache) a WordNet reader; for ``"wndb"`` the dir must be registered already."""
    if source.kind == "nltk":
        from nltk.corpus import wordnet

        wordnet.ensure_loaded()
        return wordnet

    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    class _WordNetDirReader(WordNetCorpusReader):
        """WordNet 3.0 database dir reader tolerant of Debian's missing ``lexnames``."""

        def open(self, file: str) -> Any:
            if file == "lexnames" and not os.path.isfile(os.path.join(source.path, file)):
                return io.StringIO(_LEXNAMES_TEXT)
            return super().open(file)

        def map_wn(self, version: str = "wordnet") -> None:
            # Only needed to map OMW (multilingual) data between WordNet versions; it would
            # read index.sense, which wordnet-base does not ship.
            return None

    with warnings.catch_warnings():
        # "The multilingual functions are not available with this Wordnet version"
        warnings.simplefilter("ignore", UserWarning)
        return _WordNetDirReader(source.path, None)


@contextmanager
def wordnet_session() -> Iterator[Any | None]:
    """Yield a loaded WordNet reader (``None`` if none is available locally).

    Use the reader only inside the ``with`` block: for a database directory NLTK's sandbox
    must allow that directory while files are opened. Readers are cached across sessions
    (the first load of WordNet 3.0 takes a few seconds). A source that is found but fails
    to load is reported as ``None`` with a warning giving the error.
    """
    source = find_wordnet()
    if source is None:
        yield None
        return
    if source.kind == "nltk":
        try:
            reader = _load(source)
        except (LookupError, OSError, ValueError) as err:
            warnings.warn(f"WordNet at {source.path} could not be loaded: {err}", stacklevel=3)
            reader = None
        yield reader
        return
    with _nltk_root(source.path):
        try:
            reader = _load(source)
        except (LookupError, OSError, ValueError, AssertionError) as err:
            warnings.warn(f"WordNet at {source.path} could not be loaded: {err}", stacklevel=3)
            reader = None
        yield reader
