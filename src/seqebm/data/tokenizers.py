"""Text tokenizers with fixed special ids.

Every text tokenizer in seqebm reserves the same four special ids so that models,
collators and samplers can rely on them without looking them up::

    PAD_ID = 0   "<pad>"
    BOS_ID = 1   "<s>"
    EOS_ID = 2   "</s>"
    UNK_ID = 3   "<unk>"

Two tokenizers are provided:

* :class:`BPETokenizer`: byte-level BPE trained with HuggingFace ``tokenizers``.
  Lossless: ``decode(encode(s)) == s`` for any unicode string.
* :class:`CharTokenizer`: one id per character seen in training; unseen characters
  map to ``UNK_ID``.

Both save to a single ``tokenizer.json`` in a directory; :func:`load_tokenizer`
reads either kind back.
"""

from __future__ import annotations

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from seqebm.io import atomic_write_text

__all__ = [
    "PAD_ID",
    "BOS_ID",
    "EOS_ID",
    "UNK_ID",
    "SPECIAL_TOKENS",
    "TOKENIZER_FILE",
    "TOKENIZER_KINDS",
    "Tokenizer",
    "BPETokenizer",
    "CharTokenizer",
    "load_tokenizer",
    "build_tokenizer",
    "words",
]

PAD_ID: int = 0
BOS_ID: int = 1
EOS_ID: int = 2
UNK_ID: int = 3
SPECIAL_TOKENS: list[str] = ["<pad>", "<s>", "</s>", "<unk>"]
NUM_SPECIAL: int = len(SPECIAL_TOKENS)
TOKENIZER_FILE: str = "tokenizer.json"
TOKENIZER_KINDS: tuple[str, ...] = ("bpe", "char")

_BYTE_ALPHABET_SIZE = 256
_CHAR_FORMAT_VERSION = 1


def words(text: str) -> int:
    """Return the number of whitespace-separated words in ``text`` (for word-level perplexity)."""
    if not isinstance(text, str):
        raise TypeError(f"words() expects a str, got {type(text).__name__}")
    return len(text.split())


def _as_id_list(ids: Any) -> list[int]:
    """Accept a list/tuple of ints, a numpy array or a 1-D torch tensor and return a list of ints."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if isinstance(ids, int):
        raise TypeError("decode() expects a sequence of token ids, got a single int")
    out = list(ids)
    for i in out:
        if not isinstance(i, int) or isinstance(i, bool):
            raise TypeError(f"token ids must be ints, got {type(i).__name__}: {i!r}")
    return out


def _check_texts(texts: Iterable[str], what: str) -> None:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{what} expects an iterable of strings, not a single {type(texts).__name__}")


class Tokenizer(ABC):
    """Common interface of seqebm text tokenizers.

    Ids ``0..3`` are always ``<pad>``, ``<s>``, ``</s>``, ``<unk>``. ``encode`` never adds
    special tokens; ``decode`` skips them.
    """

    kind: str = ""
    #: Fixed special ids, identical for every text tokenizer.
    pad_id: int = PAD_ID
    bos_id: int = BOS_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included (valid ids are ``0..vocab_size-1``)."""

    @property
    def name(self) -> str:
        """Short human-readable name, e.g. ``"bpe-8000"`` or ``"char-97"``."""
        return f"{self.kind}-{self.vocab_size}"

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Encode one string into ids (no special tokens added)."""

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        """Encode many strings; returns one id list per string (no specials added)."""
        _check_texts(texts, "encode_batch()")
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        """Decode ids back into a string, skipping special ids."""

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        """Decode many id sequences (special ids skipped)."""
        return [self.decode(ids) for ids in batch]

    @abstractmethod
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``tokenizer.json`` into ``directory`` (created if needed); returns the file path."""

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if i < 0 or i >= self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is out of range for {self.name} (valid ids: 0..{self.vocab_size - 1})"
            )


def _prepare_dir(directory: str | os.PathLike[str]) -> Path:
    path = Path(directory)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"tokenizer save path exists and is not a directory: {path}")
    path.mkdir(parents=True, exist_ok=True)
    return path


class BPETokenizer(Tokenizer):
    """Byte-level BPE tokenizer (HuggingFace ``tokenizers``) with seqebm's fixed special ids.

    Text that happens to contain the literal strings ``"<s>"`` etc. is encoded as ordinary
    bytes, never as special ids, so the round trip is exact for any input.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any) -> None:
        """Wrap a trained ``tokenizers.Tokenizer``; its ids 0..3 must be the seqebm specials."""
        from tokenizers import Tokenizer as HFTokenizer

        if not isinstance(hf_tokenizer, HFTokenizer):
            raise TypeError(
                f"BPETokenizer wraps a tokenizers.Tokenizer, got {type(hf_tokenizer).__name__}"
            )
        for idx, tok in enumerate(SPECIAL_TOKENS):
            got = hf_tokenizer.token_to_id(tok)
            if got != idx:
                raise ValueError(f"special token {tok!r} must have id {idx}, found {got}")
        hf_tokenizer.encode_special_tokens = True
        self._tok = hf_tokenizer

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2) -> BPETokenizer:
        """Train a byte-level BPE on ``texts``.

        ``vocab_size`` counts the 4 specials and the 256-symbol byte alphabet, so it must be at
        least 260; the result may be smaller if the corpus has too few merges to learn.
        """
        _check_texts(texts, "BPETokenizer.train()")
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        min_vocab = NUM_SPECIAL + _BYTE_ALPHABET_SIZE
        if vocab_size < min_vocab:
            raise ValueError(
                f"vocab_size={vocab_size} is too small for byte-level BPE: need at least {min_vocab} "
                f"({NUM_SPECIAL} specials + {_BYTE_ALPHABET_SIZE} bytes)"
            )
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise ValueError(f"min_frequency must be a positive int, got {min_frequency!r}")
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
        )
        seen = [0]

        def _iter() -> Iterator[str]:
            for t in texts:
                if not isinstance(t, str):
                    raise TypeError(f"training texts must be str, got {type(t).__name__}")
                if t:
                    seen[0] += 1
                    yield t

        hf.train_from_iterator(_iter(), trainer=trainer)
        if seen[0] == 0:
            raise ValueError("BPETokenizer.train() got no non-empty training texts")
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        _check_texts(texts, "encode_batch()")
        batch = list(texts)
        for t in batch:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch() expects strings, got {type(t).__name__}")
        if not batch:
            return []
        fast = getattr(self._tok, "encode_batch_fast", self._tok.encode_batch)
        return [list(e.ids) for e in fast(batch, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        id_list = _as_id_list(ids)
        self._check_ids(id_list)
        return str(self._tok.decode(id_list, skip_special_tokens=True))

    def decode_batch(self, batch: Iterable[Sequence[int]]) -> list[str]:
        lists = [_as_id_list(ids) for ids in batch]
        for ids in lists:
            self._check_ids(ids)
        return list(self._tok.decode_batch(lists, skip_special_tokens=True))

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = _prepare_dir(directory) / TOKENIZER_FILE
        atomic_write_text(path, self._tok.to_str(pretty=True))
        return path

    @classmethod
    def from_json(cls, text: str) -> BPETokenizer:
        """Build from the text of a HuggingFace ``tokenizer.json``."""
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(text))


class CharTokenizer(Tokenizer):
    """Character-level tokenizer: character ``chars[i]`` has id ``4 + i``; unknown chars -> UNK."""

    kind = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        """Create from an ordered collection of distinct single characters."""
        _check_texts(chars, "CharTokenizer()")
        self._chars: list[str] = []
        for c in chars:
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"CharTokenizer chars must be single characters, got {c!r}")
            self._chars.append(c)
        if len(set(self._chars)) != len(self._chars):
            dup = next(c for c in self._chars if self._chars.count(c) > 1)
            raise ValueError(f"CharTokenizer chars must be distinct; {dup!r} appears more than once")
        self._stoi = {c: NUM_SPECIAL + i for i, c in enumerate(self._chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """Collect every character of ``texts`` (sorted by code point) into a vocabulary."""
        _check_texts(texts, "CharTokenizer.train()")
        seen: set[str] = set()
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"training texts must be str, got {type(t).__name__}")
            seen.update(t)
        if not seen:
            raise ValueError("CharTokenizer.train() got no characters (empty training texts)")
        return cls(sorted(seen))

    @property
    def chars(self) -> list[str]:
        """The vocabulary characters in id order (ids start at 4)."""
        return list(self._chars)

    @property
    def vocab_size(self) -> int:
        return NUM_SPECIAL + len(self._chars)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() expects a str, got {type(text).__name__}")
        get = self._stoi.get
        return [get(c, UNK_ID) for c in text]

    def decode(self, ids: Sequence[int]) -> str:
        id_list = _as_id_list(ids)
        self._check_ids(id_list)
        chars = self._chars
        return "".join(chars[i - NUM_SPECIAL] for i in id_list if i >= NUM_SPECIAL)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        path = _prepare_dir(directory) / TOKENIZER_FILE
        payload = {"kind": "char", "version": _CHAR_FORMAT_VERSION,
                   "special_tokens": SPECIAL_TOKENS, "chars": self._chars}
        atomic_write_text(path, json.dumps(payload, ensure_ascii=False, indent=1))
        return path


def load_tokenizer(directory: str | os.PathLike[str]) -> Tokenizer:
    """Load a tokenizer saved with :meth:`Tokenizer.save`.

    ``directory`` is the save directory (or the ``tokenizer.json`` file itself). Raises
    ``FileNotFoundError`` if there is no tokenizer file and ``ValueError`` if it is corrupt or
    of an unknown kind.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / TOKENIZER_FILE
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"tokenizer file is corrupt (not valid JSON): {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer file is corrupt (expected a JSON object): {path}")
    if "kind" in data:
        kind = data["kind"]
        if kind == "char":
            chars = data.get("chars")
            if not isinstance(chars, list):
                raise ValueError(f"char tokenizer file has no 'chars' list: {path}")
            try:
                return CharTokenizer(chars)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"char tokenizer file is corrupt: {path}: {exc}") from exc
        if kind != "bpe":
            raise ValueError(
                f"unknown tokenizer kind {kind!r} in {path}; known kinds: {', '.join(TOKENIZER_KINDS)}"
            )
    model = data.get("model")
    if isinstance(model, dict) and model.get("type") == "BPE":
        try:
            return BPETokenizer.from_json(text)
        except Exception as exc:  # tokenizers raises its own Exception subclass
            raise ValueError(f"BPE tokenizer file is corrupt: {path}: {exc}") from exc
    raise ValueError(
        f"unknown tokenizer format in {path}: expected a HuggingFace BPE tokenizer.json or a "
        f"seqebm file with 'kind' in {{{', '.join(TOKENIZER_KINDS)}}}"
    )


def build_tokenizer(
    kind: str, texts: Iterable[str], vocab_size: int = 8000, min_frequency: int = 2
) -> Tokenizer:
    """Train a tokenizer of the given ``kind`` ("bpe" or "char") on ``texts``.

    ``vocab_size`` and ``min_frequency`` apply to BPE only; a char tokenizer's vocabulary is
    every character seen in ``texts``.
    """
    if kind == "bpe":
        return BPETokenizer.train(texts, vocab_size=vocab_size, min_frequency=min_frequency)
    if kind == "char":
        return CharTokenizer.train(texts)
    raise ValueError(f"unknown tokenizer kind {kind!r}; allowed kinds: {', '.join(TOKENIZER_KINDS)}")
