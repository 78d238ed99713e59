"""Tests for the speech data layer: eSpeak NG driver, speech-mini corpus, manifests, features.

Synthesis tests skip (with the reason) only when no eSpeak NG can be found without a download.
"""

from __future__ import annotations

import hashlib
import json
import math
import stat
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from seqebm.data import espeak as espeak_mod
from seqebm.data import espeak_fetch
from seqebm.data.espeak import ESpeak, ESpeakNotFoundError, extract_espeak_wheel, find_espeak
from seqebm.data.features import (LogMelFeatures, SpecAugment, cmvn, frame_lengths, mel_filterbank,
                                  pad_waveforms)
from seqebm.data.speech import (SPEECH_SPLITS, SPEECH_UNITS, TRAIN_VARIANTS, TRAIN_VOICES, UNSEEN_VARIANTS,
                                UNSEEN_VOICES, build_speech_mini, digits_to_words, load_manifest,
                                load_speech_mini, normalize_transcript, number_to_words, read_audio,
                                speech_mini_summary, validate_transcript, write_manifest)

TINY = dict(n_train=6, n_dev=2, n_test=2, n_test_unseen=3)


@pytest.fixture(scope="module")
def espeak() -> ESpeak:
    try:
        return find_espeak(download=False, progress=False)
    except ESpeakNotFoundError as exc:
        pytest.skip(f"no eSpeak NG available (espeakng_loader, cache or espeak-ng on PATH): {exc}")


# --------------------------------------------------------------------------- eSpeak NG


def test_synthesis_is_deterministic_and_sane(espeak: ESpeak) -> None:
    """Same (text, voice, rate, pitch) -> identical samples, even with other calls in between
    (the library is reloaded per call, so no wave-generator state carries over)."""
    a, rate = espeak.synthesize("hello world, this is a test", voice="en-us+f3", rate=150, pitch=40)
    other, _ = espeak.synthesize("something else entirely", voice="en+m1", rate=300, pitch=90)
    b, rate_b = espeak.synthesize("hello world, this is a test", voice="en-us+f3", rate=150, pitch=40)
    assert a.dtype == np.int16 and a.ndim == 1 and rate == rate_b == espeak.sample_rate
    assert 8000 <= rate <= 48000
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[: len(other)], other[: len(a)])
    assert 0.8 < len(a) / rate < 5.0  # six words at 150 wpm: ~2.4 s
    assert np.abs(a.astype(np.int32)).max() > 1000  # not silence


def test_rate_and_voice_change_the_audio(espeak: ESpeak) -> None:
    slow, rate = espeak.synthesize("one two three four five six", rate=100)
    fast, _ = espeak.synthesize("one two three four five six", rate=300)
    assert len(fast) < 0.6 * len(slow)
    m1, _ = espeak.synthesize("one two three", voice="en+m1")
    f3, _ = espeak.synthesize("one two three", voice="en+f3")
    assert not np.array_equal(m1[: len(f3)], f3[: len(m1)])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(text=""), "empty text"),
        (dict(text="   "), "empty text"),
        (dict(text="hi", voice="xx-nonexistent"), "unknown eSpeak NG voice 'xx-nonexistent'"),
        (dict(text="hi", voice="en us"), "invalid voice name"),
        (dict(text="hi", rate=20), r"rate must be in \[80, 450\].*got 20"),
        (dict(text="hi", pitch=101), r"pitch must be in \[0, 100\], got 101"),
    ],
)
def test_synthesis_rejects_bad_input(espeak: ESpeak, kwargs: dict, match: str) -> None:
    text = kwargs.pop("text")
    with pytest.raises(ValueError, match=match):
        espeak.synthesize(text, **kwargs)


def test_voices_used_by_speech_mini_exist(espeak: ESpeak) -> None:
    langs = {lang for v in espeak.list_voices("en") for lang in v.languages}
    assert {"en-us", "en-gb-scotland", "en-029", "en-us-nyc"} <= langs
    assert set(TRAIN_VARIANTS) | set(UNSEEN_VARIANTS) <= set(espeak.list_variants())
    for voice in (TRAIN_VOICES[0], TRAIN_VOICES[-1], UNSEEN_VOICES[0], UNSEEN_VOICES[-1]):
        samples, _ = espeak.synthesize("ok", voice=voice)
        assert samples.size > 0


def _fake_program(tmp_path: Path, body: str) -> Path:
    prog = tmp_path / "bin" / "espeak-ng"
    prog.parent.mkdir()
    prog.write_text(f"#!{sys.executable}\nimport sys, struct\n{body}\n")
    prog.chmod(prog.stat().st_mode | stat.S_IXUSR)
    return prog


FAKE_ESPEAK = r'''
args = sys.argv[1:]
if "--version" in args:
    print("eSpeak NG text-to-speech: 9.99  Data at: /nowhere"); sys.exit(0)
if any(a.startswith("--voices") for a in args):
    print("Pty Language       Age/Gender VoiceName          File                 Other Languages")
    print(" 2  en-gb           --/M      English_(Great_Britain) gmw/en             (en 2)")
    print(" 5  en-us           --/F      English_(America)  gmw/en-US            (en 3)")
    sys.exit(0)
voice = args[args.index("-v") + 1]
if voice == "bad":
    print("Error: voice 'bad' not found", file=sys.stderr); sys.exit(1)
text = sys.stdin.buffer.read().decode("utf-8")
pcm = struct.pack("<%dh" % len(text), *[ord(c) for c in text])
# streamed WAV as eSpeak NG writes it: placeholder chunk sizes
sys.stdout.buffer.write(b"RIFF" + struct.pack("<I", 0x7FFFFFFF) + b"WAVE"
    + b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, 22050, 44100, 2, 16)
    + b"data" + struct.pack("<I", 0x7FFFFFFF) + pcm)
'''


def test_program_fallback_reads_streamed_wav(tmp_path: Path) -> None:
    """The ``espeak-ng`` CLI path: text goes on stdin, WAV with placeholder sizes comes back."""
    prog = _fake_program(tmp_path, FAKE_ESPEAK)
    tts = ESpeak(program=prog)
    assert tts.backend == "program" and tts.sample_rate == 22050 and "9.99" in tts.version
    samples, rate = tts.synthesize("-v hi", voice="en-us", rate=120, pitch=30)  # text that looks like an option
    assert rate == 22050
    np.testing.assert_array_equal(samples, [ord(c) for c in "-v hi"])
    assert [v.languages for v in tts.list_voices("en")] == [("en-gb", "en"), ("en-us", "en")]
    with pytest.raises(ValueError, match="unknown eSpeak NG voice 'bad'"):
        tts.synthesize("x", voice="bad")


def test_find_espeak_falls_back_to_the_program_and_explains_failure(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(espeak_mod, "_from_espeakng_loader", lambda: None)
    monkeypatch.setattr(espeak_mod, "_FOUND", {})
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ESpeakNotFoundError) as info:
        find_espeak(tmp_path / "cache", download=False, progress=False)
    msg = str(info.value)
    assert "pip install espeakng-loader" in msg and "wheel=" in msg and "download=False" in msg
    assert str(tmp_path / "cache" / "espeak-ng") in msg
    prog = _fake_program(tmp_path, FAKE_ESPEAK)
    monkeypatch.setenv("PATH", str(prog.parent))
    found = find_espeak(tmp_path / "cache", download=False, progress=False)
    assert found.backend == "program" and found.source == "path"


def _write_wheel(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extract_wheel_takes_only_the_library_and_data(tmp_path: Path) -> None:
    lib = espeak_fetch._library_name()
    wheel = _write_wheel(tmp_path / "espeakng_loader-0.0-py3-none-any.whl", {
        f"espeakng_loader/{lib}": b"ELF",
        "espeakng_loader/__init__.py": b"print('not extracted')",
        "espeakng_loader/espeak-ng-data/phontab": b"p",
        "espeakng_loader/espeak-ng-data/voices/!v/m1": b"name male1",
        "espeakng_loader/espeak-ng-data/../../escape": b"x",
        "../escape2": b"x",
        "/abs/escape3": b"x",
    })
    dest = tmp_path / "cache" / "espeak-ng"
    library, data = extract_espeak_wheel(wheel, dest)
    assert library == dest / lib and library.read_bytes() == b"ELF"
    assert (data / "voices" / "!v" / "m1").read_bytes() == b"name male1"
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file())
    assert files == sorted([f"cache/espeak-ng/{lib}", "cache/espeak-ng/espeak-ng-data/phontab",
                            "cache/espeak-ng/espeak-ng-data/voices/!v/m1", "cache/espeak-ng/source.json",
                            wheel.name])
    assert espeak_mod._cached(dest) == (library, data)
    bad = _write_wheel(tmp_path / "other.whl", {"espeakng_loader/espeak-ng-data/phontab": b"p"})
    with pytest.raises(ESpeakNotFoundError, match="does not hold"):
        extract_espeak_wheel(bad, tmp_path / "cache2")
    (tmp_path / "notzip.whl").write_bytes(b"nope")
    with pytest.raises(ESpeakNotFoundError, match="cannot read"):
        extract_espeak_wheel(tmp_path / "notzip.whl", tmp_path / "cache3")
    assert not (tmp_path / "cache2").exists() and not (tmp_path / "cache3").exists()


def test_a_wheel_extracted_into_the_cache_speaks_like_the_package(espeak: ESpeak, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The offline route (wheel=, as after ``pip download``) gives the same samples as the package."""
    if espeak.backend != "ctypes":
        pytest.skip("needs libespeak-ng, not the espeak-ng program")
    members = {f"espeakng_loader/{espeak_fetch._library_name()}": espeak.library.read_bytes()}
    for p in espeak.data_dir.rglob("*"):
        if p.is_file():
            members[f"espeakng_loader/espeak-ng-data/{p.relative_to(espeak.data_dir).as_posix()}"] = p.read_bytes()
    wheel = _write_wheel(tmp_path / "espeakng_loader-0.2.4-py3-none-any.whl", members)
    monkeypatch.setattr(espeak_mod, "_FOUND", {})
    from_wheel = find_espeak(tmp_path / "cache", wheel=wheel, download=False, progress=False)
    assert from_wheel.source == "wheel" and from_wheel.library == (tmp_path / "cache" / "espeak-ng" / espeak_fetch._library_name())
    ref, _ = espeak.synthesize("seven eight nine", voice="en+m3")
    got, _ = from_wheel.synthesize("seven eight nine", voice="en+m3")
    np.testing.assert_array_equal(got, ref)
    # next time it is found in the cache, without the wheel
    monkeypatch.setattr(espeak_mod, "_from_espeakng_loader", lambda: None)
    monkeypatch.setattr(espeak_mod, "_FOUND", {})
    assert find_espeak(tmp_path / "cache", download=False, progress=False).source == "cache"


def test_broken_installations_raise_instead_of_exiting(espeak: ESpeak, tmp_path: Path) -> None:
    """eSpeak NG calls exit() on unreadable data unless told not to; we must get an exception."""
    if espeak.backend != "ctypes":
        pytest.skip("needs libespeak-ng, not the espeak-ng program")
    data = tmp_path / "espeak-ng-data"
    data.mkdir()
    (data / "phontab").write_bytes(b"x")  # looks like data, is not
    with pytest.raises(ESpeakNotFoundError, match="espeak_Initialize failed"):
        ESpeak(espeak.library, data)
    (tmp_path / "libespeak-ng.so").write_bytes(b"not a library")
    with pytest.raises(ESpeakNotFoundError, match="cannot load"):
        ESpeak(tmp_path / "libespeak-ng.so", espeak.data_dir)
    with pytest.raises(ESpeakNotFoundError, match="no phontab"):
        ESpeak(espeak.library, tmp_path)
    samples, _ = espeak.synthesize("still working")
    assert samples.size > 0


# --------------------------------------------------------------------------- transcripts


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Hello, World!", "hello world"),
        ("In 1947 the army's budget rose 3.5%.", "in nineteen forty seven the army's budget rose three point five percent"),
        ("the 21st-century café & bar", "the twenty first century cafe and bar"),
        ("1,200 people; 1905; 2005", "one thousand two hundred people nineteen oh five two thousand five"),
        ("\u201cquoted\u201d \u2018text\u2019 don\u2019t", "quoted text don't"),
        ("agent 007", "agent zero zero seven"),
        ("Straße", "strasse"),
        ("...", ""),
    ],
)
def test_normalize_transcript(raw: str, expected: str) -> None:
    out = normalize_transcript(raw)
    assert out == expected
    assert set(out) <= set(SPEECH_UNITS)


def test_normalize_transcript_names_unmappable_characters() -> None:
    with pytest.raises(ValueError, match=r"'ж' \(U\+0436\).*'я' \(U\+044F\)"):
        normalize_transcript("жя ok")


def test_number_words() -> None:
    assert number_to_words(0) == "zero"
    assert number_to_words(115) == "one hundred fifteen"
    assert number_to_words(2_000_019) == "two million nineteen"
    assert number_to_words(90, ordinal=True) == "ninetieth"
    assert number_to_words(12, ordinal=True) == "twelfth"
    assert digits_to_words("4701") == "four seven zero one"
    with pytest.raises(ValueError, match="got '4a'"):
        digits_to_words("4a")


def test_speech_units() -> None:
    assert len(SPEECH_UNITS) == 28 and len(set(SPEECH_UNITS)) == 28
    assert validate_transcript("a  b'c ") == "a b'c"
    with pytest.raises(ValueError, match=r"m.jsonl:4: empty transcript ''"):
        validate_transcript("", where="m.jsonl:4")
    with pytest.raises(ValueError, match=r"'H' \(U\+0048\), '!' \(U\+0021\)"):
        validate_transcript("Hi there!")


# --------------------------------------------------------------------------- manifests and audio


def _write_audio(path: Path, seconds: float = 0.2, rate: int = 16000, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    data = np.stack([x] * channels, axis=1) if channels > 1 else x
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), data, rate, subtype="PCM_16")
    return x


def _manifest(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_users_manifest_round_trip(tmp_path: Path) -> None:
    _write_audio(tmp_path / "wav" / "a.wav")
    _write_audio(tmp_path / "wav" / "b.wav")
    m = _manifest(tmp_path / "mine.jsonl", [
        {"audio": "wav/a.wav", "text": "hello there"},
        {"id": "u2", "audio": str(tmp_path / "wav" / "b.wav"), "text": "it's", "voice": "me", "duration": 0.2,
         "speaker_age": 40},
    ])
    utts = load_manifest(m, sample_rate=16000)
    assert [u.id for u in utts] == ["mine-1", "u2"]
    assert utts[0].audio == tmp_path / "wav" / "a.wav" and utts[0].voice is None
    assert utts[1].extra == {"speaker_age": 40} and utts[1].duration == 0.2
    write_manifest(tmp_path / "copy.jsonl", utts)
    first = json.loads((tmp_path / "copy.jsonl").read_text().splitlines()[0])
    assert first["audio"] == "wav/a.wav"  # relative to the manifest's folder
    assert load_manifest(tmp_path / "copy.jsonl") == utts


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"audio": "a.wav", "text": ""}, "bad.jsonl:2: empty transcript"),
        ({"audio": "a.wav", "text": "   "}, "bad.jsonl:2: empty transcript"),
        ({"audio": "a.wav"}, "bad.jsonl:2: transcript must be a string"),
        ({"audio": "a.wav", "text": "Hello 2 you"}, r"bad.jsonl:2: characters outside the unit set.*'H'.*'2'"),
        ({"audio": "missing.wav", "text": "hi"}, r"bad.jsonl:2: audio file not found: .*missing.wav"),
        ({"text": "hi"}, "bad.jsonl:2: missing or invalid 'audio'"),
        ({"audio": "a.wav", "text": "hi", "duration": -1}, "bad.jsonl:2: duration must be a positive"),
        ({"id": "x", "audio": "a.wav", "text": "hi"}, r"bad.jsonl:2: duplicate id 'x' \(first on line 1\)"),
        ({"audio": "r8k.wav", "text": "hi"}, "bad.jsonl:2: .*r8k.wav has sample rate 8000 Hz, expected 16000 Hz"),
    ],
)
def test_manifest_errors_name_file_and_line(tmp_path: Path, record: dict, match: str) -> None:
    _write_audio(tmp_path / "a.wav")
    _write_audio(tmp_path / "r8k.wav", rate=8000)
    m = _manifest(tmp_path / "bad.jsonl", [{"id": "x", "audio": "a.wav", "text": "fine"}, record])
    with pytest.raises(ValueError, match=match):
        load_manifest(m, sample_rate=16000)


def test_manifest_other_errors(tmp_path: Path) -> None:
    _write_audio(tmp_path / "a.wav")
    (tmp_path / "junk.jsonl").write_text('{"audio": "a.wav", "text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match="junk.jsonl:2: not valid JSON"):
        load_manifest(tmp_path / "junk.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match="no utterances"):
        load_manifest(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="manifest not found"):
        load_manifest(tmp_path / "nope.jsonl")
    raw = _manifest(tmp_path / "raw.jsonl", [{"audio": "a.wav", "text": "Hello, 2 worlds!"}])
    assert load_manifest(raw, normalize=True)[0].text == "hello two worlds"
    bad = _manifest(tmp_path / "raw2.jsonl", [{"audio": "a.wav", "text": "ok"}, {"audio": "a.wav", "text": "日本"}])
    with pytest.raises(ValueError, match=r"raw2.jsonl:2: .*'日' \(U\+65E5\)"):
        load_manifest(bad, normalize=True)


def test_read_audio(tmp_path: Path) -> None:
    x = _write_audio(tmp_path / "a.wav")
    got = read_audio(tmp_path / "a.wav")
    assert got.dtype == np.float32 and got.shape == x.shape
    np.testing.assert_allclose(got, x, atol=1 / 32768)
    _write_audio(tmp_path / "b.wav", seconds=0.5, rate=22050)
    with pytest.raises(ValueError, match=r"b.wav: sample rate 22050 Hz, expected 16000 Hz \(pass resample=True"):
        read_audio(tmp_path / "b.wav")
    assert read_audio(tmp_path / "b.wav", resample=True).shape == (8000,)
    assert read_audio(tmp_path / "b.wav", sample_rate=None).shape == (11025,)
    _write_audio(tmp_path / "st.wav", channels=2)
    with pytest.raises(ValueError, match="expected mono audio, got 2 channels"):
        read_audio(tmp_path / "st.wav")
    assert read_audio(tmp_path / "st.wav", downmix=True).shape == x.shape
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    with pytest.raises(ValueError, match="cannot read audio"):
        read_audio(tmp_path / "junk.wav")


# --------------------------------------------------------------------------- speech-mini


@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("wiki")


@pytest.fixture(scope="module")
def tiny_builds(espeak: ESpeak, wiki_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    a = build_speech_mini(tmp_path_factory.mktemp("a"), **TINY, progress=False, download=False, wiki_cache_dir=wiki_cache)
    b = build_speech_mini(tmp_path_factory.mktemp("b"), **TINY, progress=False, download=False, wiki_cache_dir=wiki_cache)
    return a, b


def test_speech_mini_manifests_and_splits(tiny_builds: tuple[Path, Path]) -> None:
    root = tiny_builds[0]
    splits = {s: load_manifest(root / f"{s}.jsonl", sample_rate=16000) for s in SPEECH_SPLITS}
    assert {s: len(u) for s, u in splits.items()} == {"train": 6, "dev": 2, "test": 2, "test_unseen": 3}
    texts = {s: {u.text for u in utts} for s, utts in splits.items()}
    assert not texts["train"] & texts["dev"] and not texts["train"] & texts["test"] and not texts["dev"] & texts["test"]
    test = splits["test"]
    assert [u.text for u in splits["test_unseen"]] == [test[i % len(test)].text for i in range(3)]
    seen = {u.voice for s in ("train", "dev", "test") for u in splits[s]}
    unseen = {u.voice for u in splits["test_unseen"]}
    assert seen <= set(TRAIN_VOICES) and unseen <= set(UNSEEN_VOICES) and not seen & unseen
    assert not {v.split("+")[1] for v in unseen} & {v.split("+")[1] for v in TRAIN_VOICES}
    assert [u.kind for u in splits["train"]].count("digits") == 2  # round(0.3 * 6)
    for utts in splits.values():
        for u in utts:
            assert u.audio.suffix == ".flac" and u.audio.parent.parent == root / "audio"
            assert 3 <= len(u.text.split()) <= 15
            audio = read_audio(u.audio)
            assert abs(audio.shape[0] - u.duration * 16000) < 1e-6  # duration = samples / 16000, unrounded
            assert 0.05 < np.abs(audio).max() < 1.0
            assert set(u.extra) == {"rate", "pitch", "snr_db"} and 20 <= u.extra["snr_db"] <= 40
    meta = json.loads((root / "meta.json").read_text())
    assert meta["counts"] == {"train": 6, "dev": 2, "test": 2, "test_unseen": 3}
    assert meta["size_bytes"] > 0 and meta["hours"]["total"] > 0 and meta["espeak"]["version"]


def test_speech_mini_is_deterministic(tiny_builds: tuple[Path, Path]) -> None:
    """Two builds with the same seed: identical manifests and audio files (byte for byte)."""
    def digest(root: Path) -> dict[str, str]:
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file() and p.name != "meta.json"}
    a, b = (digest(r) for r in tiny_builds)
    assert a == b and len(a) == 4 + 13


def test_speech_mini_reuses_a_build_and_rebuilds_on_new_parameters(
        tiny_builds: tuple[Path, Path], wiki_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tiny_builds[1]
    before = (root / "train.jsonl").read_text()

    def no_synthesis(*args, **kwargs):
        raise AssertionError("a cached build must not synthesize")

    monkeypatch.setattr(espeak_mod, "find_espeak", no_synthesis)
    assert build_speech_mini(root.parent, **TINY, progress=False, wiki_cache_dir=wiki_cache) == root
    summary = speech_mini_summary(root.parent, **TINY, progress=False, wiki_cache_dir=wiki_cache)
    unseen = load_manifest(root / "test_unseen.jsonl")
    assert summary["splits"]["train"]["utterances"] == 6
    assert summary["splits"]["test_unseen"]["digits"] == sum(u.kind == "digits" for u in unseen)
    assert summary["hours"] == pytest.approx(sum(u.duration for s in SPEECH_SPLITS
                                                 for u in load_manifest(root / f"{s}.jsonl")) / 3600, abs=1e-4)
    json.dumps(summary)
    monkeypatch.undo()
    build_speech_mini(root.parent, **{**TINY, "n_test_unseen": 0}, seed=1, progress=False, wiki_cache_dir=wiki_cache)
    assert (root / "train.jsonl").read_text() != before
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".")]  # no temporary folders left
    loaded = load_speech_mini(root.parent, **{**TINY, "n_test_unseen": 0}, seed=1, progress=False,
                              wiki_cache_dir=wiki_cache)
    assert loaded["test_unseen"] == [] and len(loaded["train"]) == 6


def test_speech_mini_rejects_bad_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="n_dev must be an int >= 0, got -1"):
        build_speech_mini(tmp_path, n_dev=-1)
    with pytest.raises(ValueError, match="n_train must be >= 1, got 0"):
        build_speech_mini(tmp_path, n_train=0)


# --------------------------------------------------------------------------- features


def _mel_reference(n_freqs: int, n_mels: int, rate: int, fmin: float, fmax: float) -> np.ndarray:
    """HTK triangles from the formulas, one bin and one band at a time (float64)."""
    mel = lambda f: 2595.0 * math.log10(1.0 + f / 700.0)  # noqa: E731
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)  # noqa: E731
    lo, hi = mel(fmin), mel(fmax)
    edges = [hz(lo + (hi - lo) * i / (n_mels + 1)) for i in range(n_mels + 2)]
    fb = np.zeros((n_freqs, n_mels))
    for k in range(n_freqs):
        f = k * (rate / 2) / (n_freqs - 1)
        for m in range(n_mels):
            left, centre, right = edges[m], edges[m + 1], edges[m + 2]
            if left < f <= centre:
                fb[k, m] = (f - left) / (centre - left)
            elif centre < f < right:
                fb[k, m] = (right - f) / (right - centre)
    return fb


def _logmel_reference(x: np.ndarray, rate: int, n_fft: int, win: int, hop: int, n_mels: int,
                      fmin: float, fmax: float) -> np.ndarray:
    """Frame by frame in float64: periodic Hann window, zero-pad to n_fft, |rfft|^2, mel, log."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(win) / win)
    fb = _mel_reference(n_fft // 2 + 1, n_mels, rate, fmin, fmax)
    n_frames = 1 + (len(x) - win) // hop
    out = np.empty((n_frames, n_mels))
    for t in range(n_frames):
        frame = np.zeros(n_fft)
        frame[:win] = x[t * hop : t * hop + win] * window
        power = np.abs(np.fft.rfft(frame)) ** 2
        out[t] = np.log(power @ fb + 1e-6)
    return out


def test_mel_filterbank_matches_the_formulas() -> None:
    fb = mel_filterbank(201, 40, 16000, fmin=20.0, fmax=7600.0, dtype=torch.float64)
    np.testing.assert_allclose(fb.numpy(), _mel_reference(201, 40, 16000, 20.0, 7600.0), atol=1e-12)
    assert fb.shape == (201, 40) and float(fb.max()) <= 1.0
    with pytest.raises(ValueError, match="fmax=9000"):
        mel_filterbank(201, 40, 16000, fmax=9000)


@pytest.mark.parametrize(("n_fft", "n_mels", "fmin", "fmax"), [(400, 80, 0.0, 8000.0), (512, 40, 20.0, 7600.0)])
def test_logmel_matches_a_float64_reference(n_fft: int, n_mels: int, fmin: float, fmax: float) -> None:
    rng = np.random.default_rng(0)
    t = np.arange(5000) / 16000
    x = 0.5 * np.sin(2 * np.pi * 300 * t) + 0.1 * rng.standard_normal(t.size)
    ref = _logmel_reference(x, 16000, n_fft, 400, 160, n_mels, fmin, fmax)
    for dtype, atol in ((torch.float64, 1e-9), (torch.float32, 2e-3)):
        fe = LogMelFeatures(n_fft=n_fft, n_mels=n_mels, fmin=fmin, fmax=fmax)
        feats, frames = fe(torch.tensor(x, dtype=dtype)[None])
        assert feats.dtype == dtype and feats.shape == (1, 1 + (5000 - 400) // 160, n_mels)
        assert frames.tolist() == [feats.shape[1]]
        np.testing.assert_allclose(feats[0].double().numpy(), ref, atol=atol, rtol=0)


def test_logmel_padded_batch_equals_one_by_one() -> None:
    torch.manual_seed(0)
    waves = [torch.randn(n) for n in (1600, 399, 400, 4321)]
    batch, lengths = pad_waveforms(waves)
    assert batch.shape == (4, 4321) and lengths.tolist() == [1600, 399, 400, 4321]
    fe = LogMelFeatures()
    feats, frames = fe(batch, lengths)
    assert frames.tolist() == [1 + (1600 - 400) // 160, 0, 1, 1 + (4321 - 400) // 160]
    assert frames.tolist() == frame_lengths(lengths, 400, 160).tolist()
    for i, w in enumerate(waves):
        if frames[i] == 0:
            assert bool((feats[i] == 0).all())
            continue
        alone, _ = fe(w[None])
        torch.testing.assert_close(feats[i, : frames[i]], alone[0], rtol=1e-5, atol=1e-5)
        assert bool((feats[i, frames[i]:] == 0).all())
    with pytest.raises(ValueError, match=r"waveforms must be \(B, S\), got shape \(10,\)"):
        fe(torch.zeros(10))
    with pytest.raises(ValueError, match="lengths must be"):
        fe(batch, torch.tensor([1, 2, 3, 5000]))


def test_cmvn_uses_real_frames_only() -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 50, 8, dtype=torch.float64) * 3 + 5
    lengths = torch.tensor([50, 17, 2])
    out = cmvn(x, lengths)
    garbage = x.clone()
    garbage[1, 17:] = 1e6
    garbage[2, 2:] = -1e6
    torch.testing.assert_close(cmvn(garbage, lengths), out)  # padding does not leak in
    for i, n in enumerate(lengths.tolist()):
        real = out[i, :n]
        torch.testing.assert_close(real.mean(0), torch.zeros(8, dtype=torch.float64), atol=1e-12, rtol=0)
        torch.testing.assert_close(real.var(0, unbiased=False), torch.ones(8, dtype=torch.float64), atol=1e-10, rtol=0)
        assert bool((out[i, n:] == 0).all())
    means_only = cmvn(x, lengths, variance=False)
    torch.testing.assert_close(means_only[1, :17], x[1, :17] - x[1, :17].mean(0))
    assert bool((cmvn(x, torch.tensor([50, 1, 0]))[1:] == 0).all())  # one frame -> 0, no NaN


def _oracle_masks(aug: SpecAugment, lengths: list[int], t: int, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The documented sampling, redone with Python loops over the same random stream."""
    g = torch.Generator().manual_seed(seed)
    uf = torch.rand(len(lengths), aug.freq_masks, 2, generator=g, dtype=torch.float64)
    ut = torch.rand(len(lengths), aug.time_masks, 2, generator=g, dtype=torch.float64)
    freq, time = np.zeros((len(lengths), m), bool), np.zeros((len(lengths), t), bool)
    for b, n in enumerate(lengths):
        for j in range(aug.freq_masks):
            w = min(math.floor(float(uf[b, j, 0]) * (aug.freq_width + 1)), m)
            s = math.floor(float(uf[b, j, 1]) * (m - w + 1))
            freq[b, s : s + w] = True
        cap = min(math.floor(aug.max_time_proportion * n), aug.time_width)
        for j in range(aug.time_masks):
            w = min(math.floor(float(ut[b, j, 0]) * (cap + 1)), n)
            s = math.floor(float(ut[b, j, 1]) * (n - w + 1))
            time[b, s : s + w] = True
    return freq, time


def test_specaugment_masks_match_the_oracle_and_respect_lengths() -> None:
    aug = SpecAugment(freq_masks=2, freq_width=10, time_masks=3, time_width=30, max_time_proportion=0.5)
    lengths = [120, 40, 7, 0]
    x = torch.randn(4, 120, 24) + 10.0  # no real value equals the mask value 0
    out = aug(x, torch.tensor(lengths), generator=torch.Generator().manual_seed(3))
    freq, time = _oracle_masks(aug, lengths, 120, 24, seed=3)
    expected = freq[:, None, :] | time[:, :, None]
    np.testing.assert_array_equal((out == 0).numpy(), expected)
    torch.testing.assert_close(out[~torch.from_numpy(expected)], x[~torch.from_numpy(expected)])
    for b, n in enumerate(lengths):
        assert freq[b].sum() <= 2 * 10
        assert not time[b, n:].any()  # never in padding
        assert time[b].sum() <= 3 * min(30, math.floor(0.5 * n))
    again = aug(x, torch.tensor(lengths), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(again, out)


def test_specaugment_eval_and_zero_width_are_identity() -> None:
    x = torch.randn(2, 30, 16)
    aug = SpecAugment()
    aug.eval()
    assert aug(x) is x
    assert torch.equal(SpecAugment(freq_width=0, time_width=0)(x), x)
    assert torch.equal(SpecAugment(max_time_proportion=0.0, freq_masks=0)(x), x)
    with pytest.raises(ValueError, match="max_time_proportion must be in"):
        SpecAugment(max_time_proportion=1.5)


def test_features_pipeline_on_speech(espeak: ESpeak) -> None:
    """Real synthesized speech through features + CMVN + SpecAugment: finite, right shapes."""
    from seqebm.data.speech import _resample

    samples, rate = espeak.synthesize("seven three one", voice="en-us+m2")
    wave = _resample(samples.astype(np.float32) / 32768, rate, 16000)
    batch, lengths = pad_waveforms([wave, wave[:8000]])
    feats, frames = LogMelFeatures()(batch, lengths)
    normed = cmvn(feats, frames)
    masked = SpecAugment()(normed, frames, generator=torch.Generator().manual_seed(0))
    assert masked.shape == (2, frames.max(), 80) and bool(torch.isfinite(masked).all())
    assert frames.tolist() == [1 + (len(wave) - 400) // 160, 1 + (8000 - 400) // 160]
