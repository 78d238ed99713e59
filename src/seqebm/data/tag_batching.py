"""Batches for sequence labelling: word ids, character ids, tags, masks and sub-word alignments.

Notation: B sentences, T words (padded), C characters per word (padded), S sub-words (padded).

:class:`TagEncoder` turns ``(tokens, tags)`` sentences (:data:`seqebm.data.tagged.Sentence`) into a
:class:`TagBatch`; it owns the word, character and tag vocabularies (built from the training split)
and, for encoders taken from a pretrained Hugging Face model, that model's tokenizer, from which it
records the first sub-word of every word (first-subword pooling). :class:`TagBatchSource` gives
the trainer shuffled fixed-size batches, a pure function of (seed, epoch, index), so runs resume
exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from seqebm.data.batching import TensorFields
from seqebm.data.tagged import Sentence, TagVocabulary, WordVocabulary
from seqebm.io import atomic_write_text

__all__ = ["TagBatch", "TagEncoder", "TagBatchSource"]


@dataclass
class TagBatch(TensorFields):
    """One batch of labelled sentences (left-aligned, right-padded)."""

    words: Tensor  # (B, T) long, WordVocabulary ids, 0 = <pad>
    chars: Tensor  # (B, T, C) long, character ids, 0 = <pad>
    tags: Tensor  # (B, T) long, tag ids 0..K-1, 0 where mask is False
    mask: Tensor  # (B, T) bool
    subwords: Tensor | None = None  # (B, S) long, HF tokenizer ids ([CLS] ... [SEP])
    subword_mask: Tensor | None = None  # (B, S) bool
    first_subword: Tensor | None = None  # (B, T) long, index in S of each word's first sub-word

    def __len__(self) -> int:
        return self.words.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    @property
    def lengths(self) -> Tensor:
        return self.mask.sum(1)


class TagEncoder:
    """Sentences -> :class:`TagBatch` with fixed word/character/tag vocabularies.

    Args:
        words: word vocabulary (unseen words -> ``<unk>``).
        chars: character vocabulary (a :class:`WordVocabulary` over single characters).
        tags: tag vocabulary (unseen tags raise, see :class:`TagVocabulary`).
        max_word_chars: longer words keep their first ``max_word_chars`` characters.
        hf_tokenizer: a Hugging Face fast tokenizer; when given, batches carry sub-word ids and the
            first sub-word of each word (words beyond ``hf_max_length`` sub-words point at the last
            kept sub-word).
    """

    def __init__(self, words: WordVocabulary, chars: WordVocabulary, tags: TagVocabulary, *,
                 max_word_chars: int = 20, hf_tokenizer: Any = None, hf_max_length: int = 256) -> None:
        if max_word_chars < 1:
            raise ValueError(f"max_word_chars must be >= 1, got {max_word_chars}")
        self.words, self.chars, self.tags = words, chars, tags
        self.max_word_chars, self.hf_tokenizer, self.hf_max_length = max_word_chars, hf_tokenizer, hf_max_length

    @classmethod
    def build(cls, train: Sequence[Sentence], *, min_count: int = 1, max_words: int | None = None,
              lowercase: bool = False, **kw: Any) -> TagEncoder:
        """Vocabularies from the training sentences (words seen ``min_count`` times; every character)."""
        if not train:
            raise ValueError("cannot build tagging vocabularies from an empty training split")
        words = WordVocabulary.build((w for w, _ in train), min_count=min_count, max_size=max_words,
                                     lowercase=lowercase)
        chars = WordVocabulary.build(([c for tok in w for c in tok] for w, _ in train))
        tags = TagVocabulary.from_sequences(t for _, t in train)
        return cls(words, chars, tags, **kw)

    @property
    def num_tags(self) -> int:
        return len(self.tags)

    def encode(self, sentences: Sequence[Sentence]) -> TagBatch:
        """Pad ``sentences`` into one :class:`TagBatch`; empty sentences raise ``ValueError``."""
        if not sentences:
            raise ValueError("cannot encode an empty list of sentences")
        for i, (toks, tags) in enumerate(sentences):
            if not toks:
                raise ValueError(f"sentence {i} is empty: every sentence needs at least one token")
            if len(toks) != len(tags):
                raise ValueError(f"sentence {i} has {len(toks)} tokens but {len(tags)} tags")
        B, T = len(sentences), max(len(s[0]) for s in sentences)
        C = min(self.max_word_chars, max(len(w) for s, _ in sentences for w in s))
        words = torch.zeros(B, T, dtype=torch.long)
        chars = torch.zeros(B, T, max(C, 1), dtype=torch.long)
        tags = torch.zeros(B, T, dtype=torch.long)
        mask = torch.zeros(B, T, dtype=torch.bool)
        for b, (toks, tg) in enumerate(sentences):
            n = len(toks)
            words[b, :n] = torch.tensor(self.words.encode(toks))
            tags[b, :n] = torch.tensor(self.tags.encode(tg))
            mask[b, :n] = True
            for t, w in enumerate(toks):
                ids = self.chars.encode(list(w[: self.max_word_chars]))
                if ids:
                    chars[b, t, : len(ids)] = torch.tensor(ids)
        batch = TagBatch(words, chars, tags, mask)
        if self.hf_tokenizer is not None:
            self._add_subwords(batch, [s[0] for s in sentences])
        return batch

    def _add_subwords(self, batch: TagBatch, tokens: list[list[str]]) -> None:
        enc = self.hf_tokenizer(tokens, is_split_into_words=True, truncation=True, max_length=self.hf_max_length,
                                padding=True, return_tensors="pt")
        first = torch.zeros(batch.words.shape, dtype=torch.long)
        for b, toks in enumerate(tokens):
            seen: dict[int, int] = {}
            for pos, w in enumerate(enc.word_ids(b)):
                if w is not None and w not in seen:
                    seen[w] = pos
            last = 0
            for t in range(len(toks)):
                # a word with no sub-word (truncated, or one the tokenizer drops) reuses the last one
                last = seen.get(t, last)
                first[b, t] = last
        batch.subwords, batch.subword_mask = enc["input_ids"], enc["attention_mask"].bool()
        batch.first_subword = first

    def decode_tags(self, ids: Tensor, mask: Tensor) -> list[list[str]]:
        """(B, T) tag ids -> tag names per sentence (masked positions dropped)."""
        return [self.tags.decode(row[m].tolist()) for row, m in zip(ids, mask)]

    # -- persistence (JSON, no pickle) ---------------------------------------------------------

    def save(self, path: str | Path) -> None:
        data = {"words": self.words.to_dict(), "chars": self.chars.to_dict(), "tags": self.tags.to_dict(),
                "max_word_chars": self.max_word_chars, "hf_max_length": self.hf_max_length}
        atomic_write_text(Path(path), json.dumps(data))

    @classmethod
    def load(cls, path: str | Path, *, hf_tokenizer: Any = None) -> TagEncoder:
        data = json.loads(Path(path).read_text())
        return cls(WordVocabulary.from_dict(data["words"]), WordVocabulary.from_dict(data["chars"]),
                   TagVocabulary.from_dict(data["tags"]), max_word_chars=int(data["max_word_chars"]),
                   hf_tokenizer=hf_tokenizer, hf_max_length=int(data.get("hf_max_length", 256)))


class TagBatchSource:
    """Shuffled batches of ``batch_size`` sentences; ``batch(epoch, i)`` depends on (seed, epoch, i) only.

    Sentences of similar length are batched together (sorted by length inside windows of ``bucket``
    batches of the epoch's shuffle), which cuts padding; the batches change from epoch to epoch as
    long as the corpus is larger than one window (with a single window, the same sentences meet
    every epoch, in a new order: pass ``bucket=1`` for fully random batches).
    """

    def __init__(self, sentences: Sequence[Sentence], encoder: TagEncoder, batch_size: int, *, seed: int = 0,
                 bucket: int = 50) -> None:
        if batch_size < 1 or bucket < 1:
            raise ValueError(f"batch_size and bucket must be >= 1, got {batch_size}, {bucket}")
        if len(sentences) < batch_size:
            raise ValueError(f"only {len(sentences)} training sentences: fewer than one batch of {batch_size}")
        self.sentences, self.encoder, self.batch_size = list(sentences), encoder, batch_size
        self.seed, self.bucket = seed, bucket
        self._order: tuple[int, list[int]] | None = None

    def num_batches(self) -> int:
        return len(self.sentences) // self.batch_size

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.sentences), generator=g).tolist()
            perm = perm[: self.num_batches() * self.batch_size]
            win = self.bucket * self.batch_size
            order: list[int] = []
            for s in range(0, len(perm), win):
                order.extend(sorted(perm[s:s + win], key=lambda i: len(self.sentences[i][0])))
            chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            shuffle = torch.randperm(len(chunks), generator=g).tolist()
            self._order = (epoch, [i for c in shuffle for i in chunks[c]])
        return self._order[1]

    def batch(self, epoch: int, index: int) -> TagBatch:
        if not 0 <= index < self.num_batches():
            raise IndexError(f"batch index {index} out of range: an epoch has {self.num_batches()} batches")
        order = self._epoch_order(epoch)
        ids = order[index * self.batch_size:(index + 1) * self.batch_size]
        return self.encoder.encode([self.sentences[i] for i in ids])
