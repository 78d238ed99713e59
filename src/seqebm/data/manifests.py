"""Speech manifests and audio I/O: :class:`Utterance`, :func:`load_manifest`, :func:`write_manifest`,
:func:`read_audio`.

**Manifests** (JSON lines, one utterance each)::

    {"id": "train-00000", "audio": "audio/train/train-00000.flac", "text": "four seven zero one",
     "voice": "en-us+m3", "duration": 2.0113125, "kind": "digits", "rate": 163, "pitch": 41, "snr_db": 27.4}

``audio`` is relative to the manifest's folder (or absolute); ``text`` must be in the unit set
(:data:`~seqebm.data.transcripts.SPEECH_UNITS`); ``id``, ``voice``, ``duration``, ``kind`` are
optional, other keys are kept in ``Utterance.extra``. speech-mini (:mod:`seqebm.data.speech`)
writes this format; users' own data is the same format with WAV/FLAC files, read by
:func:`load_manifest` and :func:`read_audio` (``soundfile``).

Re-exported by :mod:`seqebm.data.speech`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from seqebm.data.transcripts import normalize_transcript, validate_transcript

__all__ = ["SPEECH_SAMPLE_RATE", "Utterance", "load_manifest", "write_manifest", "read_audio"]

#: Sample rate of speech-mini's audio and the rate :func:`read_audio` expects by default (Hz).
SPEECH_SAMPLE_RATE = 16000


@dataclass
class Utterance:
    """One manifest line: ``audio`` is an absolute path; ``duration`` in seconds (may be None for
    users' manifests); ``extra`` holds any other keys (speech-mini: ``rate``, ``pitch``, ``snr_db``)."""

    id: str
    audio: Path
    text: str
    voice: str | None = None
    duration: float | None = None
    kind: str | None = None
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def to_json(self, root: Path | None = None) -> dict[str, Any]:
        """The manifest record; ``audio`` relative to ``root`` when it lies below it."""
        audio = self.audio
        if root is not None:
            try:
                audio = self.audio.relative_to(root)
            except ValueError:
                pass
        rec: dict[str, Any] = {"id": self.id, "audio": audio.as_posix(), "text": self.text}
        for key in ("voice", "duration", "kind"):
            if getattr(self, key) is not None:
                rec[key] = getattr(self, key)
        rec.update(self.extra)
        return rec


def write_manifest(path: str | os.PathLike[str], utterances: Sequence[Utterance]) -> None:
    """Write ``utterances`` as JSON lines, audio paths relative to the manifest's folder (atomic)."""
    from seqebm.io import atomic_write_text

    path = Path(path)
    root = path.parent.resolve()
    lines = [json.dumps(u.to_json(root), ensure_ascii=False) for u in utterances]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


_KNOWN_KEYS = {"id", "audio", "text", "voice", "duration", "kind"}


def load_manifest(
    path: str | os.PathLike[str],
    *,
    normalize: bool = False,
    check_audio: bool = True,
    sample_rate: int | None = None,
) -> list[Utterance]:
    """Read and validate a JSONL manifest (see the module docstring for the format).

    Args:
        path: the ``.jsonl`` file; relative ``audio`` paths are resolved against its folder.
        normalize: apply :func:`normalize_transcript` to each ``text`` first (users' raw text);
            otherwise the text must already be in :data:`SPEECH_UNITS`.
        check_audio: require every audio file to exist.
        sample_rate: also read each file's header and require this rate (``None``: don't check).

    Raises:
        ValueError: naming the manifest file and line: not JSON / not an object, missing or
            non-string ``audio``, audio file not found, wrong sample rate, empty transcript,
            characters outside the unit set, non-positive duration, duplicate id, no utterances.
        FileNotFoundError: the manifest itself does not exist.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    root = path.parent.resolve()
    out: list[Utterance] = []
    seen: dict[str, int] = {}
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: not valid JSON ({exc.msg})") from exc
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            audio = rec.get("audio")
            if not isinstance(audio, str) or not audio:
                raise ValueError(f"{where}: missing or invalid 'audio' field ({audio!r}); expected a path")
            text = rec.get("text")
            if normalize and isinstance(text, str):
                try:
                    text = normalize_transcript(text)
                except ValueError as exc:
                    raise ValueError(f"{where}: {exc}") from None
            text = validate_transcript(text, where=where)
            audio_path = Path(audio).expanduser()
            if not audio_path.is_absolute():
                audio_path = root / audio_path
            if check_audio and not audio_path.is_file():
                raise ValueError(f"{where}: audio file not found: {audio_path}")
            if sample_rate is not None:
                _check_rate(audio_path, sample_rate, where=where)
            duration = rec.get("duration")
            if duration is not None:
                if isinstance(duration, bool) or not isinstance(duration, (int, float)) or not duration > 0:
                    raise ValueError(f"{where}: duration must be a positive number of seconds, got {duration!r}")
                duration = float(duration)
            uid = rec.get("id", f"{path.stem}-{lineno}")
            if not isinstance(uid, str) or not uid:
                raise ValueError(f"{where}: id must be a non-empty string, got {uid!r}")
            if uid in seen:
                raise ValueError(f"{where}: duplicate id {uid!r} (first on line {seen[uid]})")
            seen[uid] = lineno
            voice, kind = rec.get("voice"), rec.get("kind")
            out.append(Utterance(
                id=uid, audio=audio_path, text=text,
                voice=None if voice is None else str(voice), duration=duration,
                kind=None if kind is None else str(kind),
                extra={k: v for k, v in rec.items() if k not in _KNOWN_KEYS},
            ))
    if not out:
        raise ValueError(f"{path}: no utterances (empty manifest)")
    return out


def _check_rate(path: Path, sample_rate: int, *, where: str) -> None:
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise ValueError(f"{where}: cannot read audio {path}: {exc}") from exc
    if info.samplerate != sample_rate:
        raise ValueError(f"{where}: {path} has sample rate {info.samplerate} Hz, expected {sample_rate} Hz")


def read_audio(
    path: str | os.PathLike[str],
    *,
    sample_rate: int | None = SPEECH_SAMPLE_RATE,
    resample: bool = False,
    downmix: bool = False,
) -> np.ndarray:
    """Read a WAV/FLAC/... file with ``soundfile``; returns float32 samples in [-1, 1], shape ``(S,)``.

    Args:
        sample_rate: the rate the caller expects (``None``: accept any, see the file's own).
        resample: resample another rate to ``sample_rate`` (``scipy.signal.resample_poly``) instead
            of raising; off by default so that a wrong rate is never converted silently.
        downmix: average several channels to mono instead of raising.

    Raises:
        ValueError: unreadable file, wrong sample rate, several channels, no samples.
    """
    import soundfile as sf

    path = Path(path)
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise ValueError(f"cannot read audio {path}: {exc}") from exc
    if data.shape[1] != 1:
        if not downmix:
            raise ValueError(
                f"{path}: expected mono audio, got {data.shape[1]} channels (pass downmix=True to average)")
        data = data.mean(axis=1, keepdims=True)
    samples = np.ascontiguousarray(data[:, 0])
    if samples.size == 0:
        raise ValueError(f"{path}: no audio samples")
    if sample_rate is not None and rate != sample_rate:
        if not resample:
            raise ValueError(f"{path}: sample rate {rate} Hz, expected {sample_rate} Hz "
                             f"(pass resample=True to convert with scipy.signal.resample_poly)")
        samples = _resample(samples, rate, sample_rate)
    return samples


def _resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling ``rate_in`` -> ``rate_out`` (float32 in, float32 out)."""
    from scipy.signal import resample_poly

    ratio = Fraction(rate_out, rate_in)
    return resample_poly(x, ratio.numerator, ratio.denominator).astype(np.float32)
