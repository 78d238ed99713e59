"""Tests for seqebm.data corpora: wiki-mini, digits and users' text files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from seqebm.data import corpora
from seqebm.data.corpora import (
    ParallelCorpus,
    TextCorpus,
    default_cache_dir,
    list_corpora,
    load_corpus,
    load_parallel_corpus,
    split_keys,
)
from seqebm.data.digits import DIGITS_LEVELS, DIGITS_SIDE, DigitsDataset, load_digits_dataset
from seqebm.data.text_files import load_jsonl, load_parallel, load_text_file
from seqebm.data.wiki import clean_wiki_text

WIKI_CACHE = Path("corpora") / "wiki-mini.v1.json"
FAKE_ARTICLES = [(f"Art {i}", [f"This is paragraph {j} of article {i}." for j in range(3)]) for i in range(40)]


@pytest.fixture(scope="module")
def wiki_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def wiki(wiki_cache: Path) -> TextCorpus:
    return load_corpus("wiki-mini", cache_dir=wiki_cache)


def _cached_articles(cache_dir: Path) -> list[tuple[str, list[str]]]:
    data = json.loads((cache_dir / WIKI_CACHE).read_text(encoding="utf-8"))
    return [(a["title"], a["paragraphs"]) for a in data["articles"]]


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- wiki-mini


def test_list_corpora() -> None:
    names = list_corpora()
    assert "wiki-mini" in names
    assert all(isinstance(d, str) and d and "\n" not in d for d in names.values())


def test_wiki_mini_size(wiki: TextCorpus) -> None:
    assert wiki.name == "wiki-mini"
    articles = wiki.meta["articles"]
    assert sum(len(t) for t in articles.values()) >= 90
    summary = wiki.summary()
    assert set(summary) == {"train", "valid", "test"}
    assert all(summary[s]["documents"] > 0 for s in summary)
    assert sum(s["words"] for s in summary.values()) > 300_000
    assert summary["train"]["documents"] > 3000
    assert summary["train"]["characters"] == sum(len(p) for p in wiki.train)


BAD_SUBSTRINGS = ["'''", "''", "==", "[[", "]]", "{{", "}}", "&nbsp;", "<ref", "</", "\n", "  "]


def test_wiki_mini_is_clean(wiki: TextCorpus) -> None:
    for para in wiki.train + wiki.valid + wiki.test:
        assert para == para.strip()
        for bad in BAD_SUBSTRINGS:
            assert bad not in para, (bad, para)
        assert not para.startswith(("*", "|", "#", "!", "{", "}", ";", ":", "="))
        assert len(para.split()) >= 4


def test_clean_wiki_text_unit() -> None:
    raw = "\n".join(
        [
            "'''Anarchism''' is a ''political'' philosophy that advocates self-governed societies.",
            "==History==",
            "=== Origins ===",
            "* a list item with several words in it",
            "| table cell | with | pipes and words",
            "{{Infobox debris with words}}",
            "A line with [[leftover link]] markup in it.",
            "Short line",
            "1995 2000 2005 2010 2015 42",
            "Text&nbsp;with an entity and <ref>a tag</ref> here.",
            "",
            "   Spaces    collapse    in   this   line ( ; born 1947 ) too.",
        ]
    )
    assert clean_wiki_text(raw) == [
        "Anarchism is a political philosophy that advocates self-governed societies.",
        "Text with an entity and a tag here.",
        "Spaces collapse in this line (born 1947) too.",
    ]


def test_wiki_mini_splits_disjoint_by_article(wiki: TextCorpus, wiki_cache: Path) -> None:
    titles = wiki.meta["articles"]
    train, valid, test = (set(titles[s]) for s in ("train", "valid", "test"))
    assert train and valid and test
    assert not (train & valid or train & test or valid & test)
    articles = _cached_articles(wiki_cache)
    assert train | valid | test == {t for t, _ in articles}
    by_title = dict(articles)
    for split in ("train", "valid", "test"):
        expected = [p for t in titles[split] for p in by_title[t]]
        assert wiki.split(split) == expected
    n = len(articles)
    assert len(valid) == len(test) == round(0.05 * n)


def test_wiki_mini_deterministic(wiki: TextCorpus, tmp_path: Path) -> None:
    again = load_corpus("wiki-mini", cache_dir=tmp_path, rebuild=True)
    assert again == wiki
    assert again.meta["articles"] == wiki.meta["articles"]
    other_seed = load_corpus("wiki-mini", cache_dir=tmp_path, seed=1)
    assert other_seed.meta["articles"]["test"] != wiki.meta["articles"]["test"]


def test_wiki_mini_uses_cache(
    wiki: TextCorpus, wiki_cache: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("builder called although the cache is valid")

    monkeypatch.setattr(corpora, "build_wiki_articles", boom)
    assert load_corpus("wiki-mini", cache_dir=wiki_cache) == wiki
    assert capsys.readouterr() == ("", "")
    assert not [p for p in (wiki_cache / "corpora").iterdir() if p.name != WIKI_CACHE.name]


@pytest.mark.parametrize(
    "content",
    [b"\x00garbage{", b"", b'{"format": "seqebm/wiki-mini", "version": 1}', b'{"articles": []}', b"[1]"],
)
def test_wiki_mini_corrupt_cache_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: bytes
) -> None:
    calls: list[int] = []

    def fake_builder() -> list[tuple[str, list[str]]]:
        calls.append(1)
        return FAKE_ARTICLES

    monkeypatch.setattr(corpora, "build_wiki_articles", fake_builder)
    cache_file = tmp_path / WIKI_CACHE
    cache_file.parent.mkdir(parents=True)
    cache_file.write_bytes(content)
    corpus = load_corpus("wiki-mini", cache_dir=tmp_path)
    assert calls == [1]
    assert len(corpus.train) + len(corpus.valid) + len(corpus.test) == 120
    assert _cached_articles(tmp_path) == FAKE_ARTICLES  # cache was rewritten
    load_corpus("wiki-mini", cache_dir=tmp_path)
    assert calls == [1]
    assert sorted(p.name for p in cache_file.parent.iterdir()) == [WIKI_CACHE.name]


def test_default_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SEQEBM_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("SEQEBM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "seqebm"


def test_unknown_corpus_name() -> None:
    with pytest.raises(ValueError, match="unknown corpus 'no-such-corpus'.*known corpora: wiki-mini"):
        load_corpus("no-such-corpus")
    with pytest.raises(ValueError, match="load_digits_dataset"):
        load_corpus("digits")


def test_split_keys() -> None:
    keys = [str(i) for i in range(100)]
    train, valid, test = split_keys(keys, seed=3)
    assert (len(train), len(valid), len(test)) == (90, 5, 5)
    assert sorted(train + valid + test) == list(range(100))
    assert split_keys(keys, seed=3) == (train, valid, test)
    assert split_keys(keys, seed=4) != (train, valid, test)
    assert split_keys(["a", "b", "c"]) is not None
    with pytest.raises(ValueError, match="at least 3 items"):
        split_keys(["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        split_keys(["a", "a", "b"])


# --------------------------------------------------------------------------- digits


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsDataset:
    return load_digits_dataset(tmp_path_factory.mktemp("digits"))


def test_digits_shapes_and_ranges(digits: DigitsDataset) -> None:
    assert DIGITS_LEVELS == 17 and DIGITS_SIDE == 8
    assert digits.summary() == {"train": 1437, "valid": 180, "test": 180}
    for split in ("train", "valid", "test"):
        x, y = digits.split(split)
        assert x.dtype == torch.long and y.dtype == torch.long
        assert x.shape == (len(y), DIGITS_SIDE * DIGITS_SIDE)
        assert int(x.min()) >= 0 and int(x.max()) <= 16
        assert set(y.tolist()) == set(range(10))
    assert int(digits.train.max()) == 16


def test_digits_matches_sklearn_and_is_a_partition(digits: DigitsDataset) -> None:
    from sklearn.datasets import load_digits

    raw = load_digits()
    full = torch.cat([digits.train, digits.valid, digits.test])
    labels = torch.cat([digits.train_labels, digits.valid_labels, digits.test_labels])
    ref = torch.from_numpy(raw.data.astype("int64"))
    # same multiset of (image, label) rows: every image lands in exactly one split
    key = lambda x, y: sorted(map(tuple, torch.cat([x, y[:, None]], 1).tolist()))  # noqa: E731
    assert key(full, labels) == key(ref, torch.from_numpy(raw.target.astype("int64")))
    # raster order: row r of the 8x8 image is items 8r..8r+7
    assert torch.equal(ref[0].view(8, 8), torch.from_numpy(raw.images[0].astype("int64")))


def test_digits_deterministic_and_cached(
    digits: DigitsDataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from seqebm.data import digits as digits_mod

    first = load_digits_dataset(tmp_path)
    assert torch.equal(first.train, digits.train) and torch.equal(first.test_labels, digits.test_labels)

    monkeypatch.setattr(digits_mod, "_from_sklearn", None)  # calling it would raise TypeError
    second = load_digits_dataset(tmp_path)
    assert torch.equal(second.valid, first.valid) and torch.equal(second.train_labels, first.train_labels)
    other = load_digits_dataset(tmp_path, seed=1)
    assert not torch.equal(other.test, first.test)


def test_digits_corrupt_cache_is_rebuilt(digits: DigitsDataset, tmp_path: Path) -> None:
    cache = tmp_path / "datasets" / "digits.v1.npz"
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not an npz file")
    again = load_digits_dataset(tmp_path)
    assert torch.equal(again.test, digits.test)
    assert cache.stat().st_size > 1000


# --------------------------------------------------------------------------- users' files


def test_load_text_file(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.txt", "first line\n\n   \n  second line  \r\nthird\n")
    assert load_text_file(path) == ["first line", "second line", "third"]


def test_load_jsonl(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "a.jsonl",
        '{"text": "hello world", "id": 1}\n\n{"text": "  second  "}\n{"body": "x", "text": ""}\n',
    )
    assert load_jsonl(path) == ["hello world", "second"]
    path2 = _write(tmp_path / "b.jsonl", '{"body": "other field"}\n')
    assert load_jsonl(path2, field="body") == ["other field"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_load_corpus_directory(tmp_path: Path, suffix: str) -> None:
    data = tmp_path / "mydata"
    data.mkdir()
    for split in ("train", "valid", "test"):
        lines = [f"{split} document number {i}" for i in range(3)]
        if suffix == ".jsonl":
            body = "".join(json.dumps({"text": line}) + "\n" for line in lines)
        else:
            body = "\n".join(lines) + "\n"
        _write(data / f"{split}{suffix}", body)
    corpus = load_corpus(data)
    assert corpus.name == "mydata"
    assert corpus.valid == [f"valid document number {i}" for i in range(3)]
    assert corpus.summary()["test"] == {"documents": 3, "characters": 3 * 22, "words": 12}


def test_load_corpus_directory_validation_alias(tmp_path: Path) -> None:
    for name in ("train.txt", "validation.txt", "test.txt"):
        _write(tmp_path / name, f"some text in {name}\n")
    assert load_corpus(tmp_path).valid == ["some text in validation.txt"]


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_load_corpus_single_file(tmp_path: Path, suffix: str) -> None:
    lines = [f"sentence number {i} of the file" for i in range(200)]
    if suffix == ".jsonl":
        body = "".join(json.dumps({"text": line}) + "\n" for line in lines)
    else:
        body = "\n".join(lines)
    path = _write(tmp_path / f"corpus{suffix}", body)
    corpus = load_corpus(str(path))
    assert corpus.name == "corpus"
    assert (len(corpus.train), len(corpus.valid), len(corpus.test)) == (180, 10, 10)
    assert sorted(corpus.train + corpus.valid + corpus.test) == sorted(lines)
    assert load_corpus(path) == corpus
    assert load_corpus(path, seed=1).test != corpus.test


def test_parallel(tmp_path: Path) -> None:
    src = _write(tmp_path / "src.txt", "ein Haus\n\nzwei Katzen\ndrei\nvier\n")
    tgt = _write(tmp_path / "tgt.txt", "a house\nblank source\ntwo cats\n\nfour\n")
    assert load_parallel(src, tgt) == [("ein Haus", "a house"), ("zwei Katzen", "two cats"), ("vier", "four")]
    corpus = load_parallel_corpus(src, tgt)
    assert isinstance(corpus, ParallelCorpus)
    assert len(corpus.train) == len(corpus.valid) == len(corpus.test) == 1
    assert corpus.summary()["train"]["pairs"] == 1


# --------------------------------------------------------------------------- bad input


def test_missing_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    with pytest.raises(FileNotFoundError, match=f"text file not found: {re.escape(str(missing))}"):
        load_text_file(missing)
    with pytest.raises(FileNotFoundError, match="JSONL file not found: .*missing.jsonl"):
        load_jsonl(tmp_path / "missing.jsonl")
    ok = _write(tmp_path / "ok.txt", "x\n")
    with pytest.raises(FileNotFoundError, match="source file not found: .*missing.txt"):
        load_parallel(missing, ok)
    with pytest.raises(FileNotFoundError, match="target file not found: .*missing.txt"):
        load_parallel(ok, missing)


def test_directory_missing_split(tmp_path: Path) -> None:
    _write(tmp_path / "train.txt", "some training text\n")
    _write(tmp_path / "test.txt", "some test text\n")
    with pytest.raises(FileNotFoundError, match="valid split file not found: .*valid.txt"):
        load_corpus(tmp_path)
    _write(tmp_path / "valid.txt", "a\n")
    _write(tmp_path / "valid.jsonl", '{"text": "a"}\n')
    with pytest.raises(ValueError, match="ambiguous valid split"):
        load_corpus(tmp_path)


def test_empty_files(tmp_path: Path) -> None:
    empty = _write(tmp_path / "empty.txt", "\n   \n\t\n")
    with pytest.raises(ValueError, match=f"text file is empty.*: {re.escape(str(empty))}"):
        load_text_file(empty)
    with pytest.raises(ValueError, match="is empty"):
        load_corpus(empty)
    empty_jsonl = _write(tmp_path / "empty.jsonl", "")
    with pytest.raises(ValueError, match="JSONL file is empty.*empty.jsonl"):
        load_jsonl(empty_jsonl)
    blank_values = _write(tmp_path / "blank.jsonl", '{"text": "  "}\n')
    with pytest.raises(ValueError, match="JSONL file is empty"):
        load_jsonl(blank_values)


def test_too_few_lines_to_split(tmp_path: Path) -> None:
    path = _write(tmp_path / "two.txt", "one line\nanother line\n")
    with pytest.raises(ValueError, match="at least 3 non-blank lines.*got 2"):
        load_corpus(path)


@pytest.mark.parametrize(
    ("body", "field", "match"),
    [
        ('{"text": "ok"}\n{"text": broken\n', "text", "line 2 is not valid JSON.*'text'"),
        ('{"text": "ok"}\n\n{"title": "no text"}\n', "text", "line 3 has no field 'text'"),
        ('{"text": "x"}\n', "body", "line 1 has no field 'body'"),
        ('["a list"]\n', "text", "line 1 is a JSON list"),
        ('{"text": 5}\n', "text", "line 1 field 'text' must be a string"),
    ],
)
def test_bad_jsonl(tmp_path: Path, body: str, field: str, match: str) -> None:
    path = _write(tmp_path / "bad.jsonl", body)
    with pytest.raises(ValueError, match=match):
        load_jsonl(path, field=field)
    with pytest.raises(ValueError, match=match):
        load_corpus(path, field=field)


def test_parallel_line_count_mismatch(tmp_path: Path) -> None:
    src = _write(tmp_path / "src.txt", "a\nb\nc\n")
    tgt = _write(tmp_path / "tgt.txt", "x\ny\n")
    with pytest.raises(ValueError, match="source has 3 lines.*target has 2 lines"):
        load_parallel(src, tgt)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("fine\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="not valid UTF-8 \\(line 2\\)"):
        load_text_file(path)
