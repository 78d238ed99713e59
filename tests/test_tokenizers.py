"""Tests for seqebm.data.tokenizers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seqebm.data import tokenizers as tk
from seqebm.data.tokenizers import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    UNK_ID,
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    build_tokenizer,
    load_tokenizer,
    words,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Energy-based models assign a scalar energy to every sequence.",
    "Naïve café owners déjà vu — 東京 and Москва, 123 + 456 = 579!",
    "Tabs\tand\nnewlines and   runs of spaces.",
] * 20

HYPO = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer.train(TEXTS, vocab_size=400, min_frequency=2)


@pytest.fixture(scope="module")
def char() -> CharTokenizer:
    return CharTokenizer.train(TEXTS)


def test_special_constants() -> None:
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert SPECIAL_TOKENS == ["<pad>", "<s>", "</s>", "<unk>"]


@pytest.mark.parametrize("which", ["bpe", "char"])
def test_special_ids(which: str, bpe: BPETokenizer, char: CharTokenizer) -> None:
    tok: Tokenizer = bpe if which == "bpe" else char
    assert isinstance(tok, Tokenizer)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id) == (0, 1, 2, 3)
    assert tok.vocab_size == len(tok) > 4
    assert tok.name == f"{which}-{tok.vocab_size}"
    ids = tok.encode("the fox")
    assert ids and all(4 <= i < tok.vocab_size for i in ids)  # encode adds no specials


def test_bpe_specials_in_hf_vocab(bpe: BPETokenizer) -> None:
    hf = bpe.hf_tokenizer
    assert [hf.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert bpe.vocab_size <= 400


def test_bpe_learns_merges(bpe: BPETokenizer) -> None:
    text = "The quick brown fox"
    assert len(bpe.encode(text)) < len(text.encode("utf-8"))


@HYPO
@given(st.text())
def test_bpe_round_trip(bpe: BPETokenizer, text: str) -> None:
    assert bpe.decode(bpe.encode(text)) == text


@pytest.mark.parametrize("text", ["<s>", "a </s> b <pad><unk>", "", " ", "\x00\r\n\t", "🙂🙃 é"])
def test_bpe_round_trip_edge_cases(bpe: BPETokenizer, text: str) -> None:
    ids = bpe.encode(text)
    assert not set(ids) & {PAD_ID, BOS_ID, EOS_ID, UNK_ID}  # literal "<s>" is just text
    assert bpe.decode(ids) == text


def test_decode_skips_specials(bpe: BPETokenizer, char: CharTokenizer) -> None:
    for tok in (bpe, char):
        ids = tok.encode("the lazy dog")
        assert tok.decode([BOS_ID, *ids, EOS_ID, PAD_ID, PAD_ID]) == "the lazy dog"


def test_decode_accepts_tensors(bpe: BPETokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = bpe.encode("over the lazy dog")
    assert bpe.decode(torch.tensor(ids)) == "over the lazy dog"


@pytest.mark.parametrize("which", ["bpe", "char"])
def test_decode_rejects_out_of_range(which: str, bpe: BPETokenizer, char: CharTokenizer) -> None:
    tok: Tokenizer = bpe if which == "bpe" else char
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([4, tok.vocab_size])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([-1])
    with pytest.raises(TypeError, match="ints"):
        tok.decode(["a"])  # type: ignore[list-item]


@pytest.mark.parametrize("which", ["bpe", "char"])
def test_encode_batch_matches_encode(which: str, bpe: BPETokenizer, char: CharTokenizer) -> None:
    tok: Tokenizer = bpe if which == "bpe" else char
    batch = ["the fox", "", "café 東京", "dog. dog. dog."]
    assert tok.encode_batch(batch) == [tok.encode(t) for t in batch]
    assert tok.encode_batch([]) == []
    assert tok.decode_batch(tok.encode_batch(batch)) == batch
    with pytest.raises(TypeError, match="iterable of strings"):
        tok.encode_batch("not a list")


@HYPO
@given(st.data())
def test_char_round_trip(char: CharTokenizer, data: st.DataObject) -> None:
    text = data.draw(st.text(alphabet=char.chars))
    assert char.decode(char.encode(text)) == text


def test_char_unknown_maps_to_unk(char: CharTokenizer) -> None:
    assert "Ж" not in char.chars
    ids = char.encode("aЖb")
    assert ids[1] == UNK_ID and ids[0] != UNK_ID
    assert char.decode(ids) == "ab"


def test_char_constructor() -> None:
    tok = CharTokenizer(["a", "b", "c"])
    assert tok.vocab_size == 7
    assert tok.encode("cab") == [6, 4, 5]
    with pytest.raises(ValueError, match="distinct"):
        CharTokenizer(["a", "b", "a"])
    with pytest.raises(ValueError, match="single characters"):
        CharTokenizer(["ab"])
    with pytest.raises(TypeError, match="iterable of strings"):
        CharTokenizer("abc")


def test_train_validation() -> None:
    with pytest.raises(ValueError, match="at least 260"):
        BPETokenizer.train(TEXTS, vocab_size=100)
    with pytest.raises(TypeError, match="iterable of strings"):
        BPETokenizer.train("just one string")
    with pytest.raises(ValueError, match="no non-empty training texts"):
        BPETokenizer.train(["", ""], vocab_size=300)
    with pytest.raises(ValueError, match="no characters"):
        CharTokenizer.train([""])


@pytest.mark.parametrize("which", ["bpe", "char"])
def test_save_load_round_trip(
    which: str, bpe: BPETokenizer, char: CharTokenizer, tmp_path: Path
) -> None:
    tok: Tokenizer = bpe if which == "bpe" else char
    path = tok.save(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.json"
    assert [p.name for p in (tmp_path / "tok").iterdir()] == ["tokenizer.json"]
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size
    sample = TEXTS[:4] + ["<s> unseen Ж text"]
    assert loaded.encode_batch(sample) == tok.encode_batch(sample)
    assert [loaded.decode(ids) for ids in tok.encode_batch(sample)] == tok.decode_batch(
        tok.encode_batch(sample)
    )
    assert type(load_tokenizer(path)) is type(tok)  # the file path itself works too


def test_saved_formats(bpe: BPETokenizer, char: CharTokenizer, tmp_path: Path) -> None:
    hf = json.loads(bpe.save(tmp_path / "b").read_text(encoding="utf-8"))
    assert hf["model"]["type"] == "BPE"
    data = json.loads(char.save(tmp_path / "c").read_text(encoding="utf-8"))
    assert data["kind"] == "char" and data["chars"] == char.chars


def test_load_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tokenizer file not found: .*tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "nope")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ("{not json", "corrupt"),
        ("[1, 2]", "expected a JSON object"),
        ('{"kind": "wordpiece"}', "unknown tokenizer kind 'wordpiece'.*bpe, char"),
        ('{"kind": "char"}', "no 'chars' list"),
        ('{"kind": "char", "chars": ["a", "a"]}', "corrupt"),
        ('{"model": {"type": "BPE"}}', "BPE tokenizer file is corrupt"),
        ('{"hello": 1}', "unknown tokenizer format"),
    ],
)
def test_load_corrupt(tmp_path: Path, content: str, match: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        load_tokenizer(tmp_path)


def test_build_tokenizer() -> None:
    assert isinstance(build_tokenizer("bpe", TEXTS, vocab_size=300), BPETokenizer)
    assert isinstance(build_tokenizer("char", TEXTS, vocab_size=300), CharTokenizer)
    with pytest.raises(ValueError, match="unknown tokenizer kind 'wordpiece'; allowed kinds: bpe, char"):
        build_tokenizer("wordpiece", TEXTS, 300)


def test_words() -> None:
    assert words("") == 0
    assert words("  one\ttwo\nthree  ") == 3
    assert words("single") == 1
    with pytest.raises(TypeError):
        words(["a", "b"])  # type: ignore[arg-type]


def test_module_exports() -> None:
    for name in tk.__all__:
        assert hasattr(tk, name)
