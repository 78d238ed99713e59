"""Sentences for energy-based LMs: word lists, word-id batches and a resumable batch source.

Notation: B sentences, T padded length, m the maximum sentence length (words).

Corpora:

* ``speech-text``: the text side of speech-mini. Train = every wiki-mini *train* paragraph split
  into sentences and normalised to the speech units (lower-case words, numbers spelled out; see
  :func:`seqebm.data.transcripts.normalize_transcript`) plus the speech-mini training transcripts
  (which add the connected-digit strings). Valid/test = wiki-mini's valid/test sentences. The
  speech-mini dev/test utterances read wiki-mini valid/test sentences, so an LM trained here has
  never seen the sentences of the n-best lists it rescores.
* ``files``: the user's own text, one sentence per line, whitespace-separated words.

:class:`SentenceBatch` rows are left-aligned word ids (padding 0, no ⟨s⟩/⟨/s⟩), the convention of
:mod:`seqebm.models.elm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from seqebm.data.batching import TensorFields
from seqebm.data.tagged import WordVocabulary

__all__ = ["SentenceBatch", "SentenceBatchSource", "encode_sentences", "load_elm_sentences", "read_sentence_file"]


@dataclass
class SentenceBatch(TensorFields):
    tokens: Tensor  # (B, T) long word ids, 0 where mask is False
    mask: Tensor  # (B, T) bool

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def num_tokens(self) -> int:  # objectives average per sentence: the trainer weighs by sentences
        return len(self)


def encode_sentences(sentences: Sequence[Sequence[str]], vocab: WordVocabulary) -> SentenceBatch:
    """Word lists -> one padded :class:`SentenceBatch` (unknown words -> ``<unk>``)."""
    if not sentences:
        raise ValueError("cannot encode an empty list of sentences")
    empty = [i for i, s in enumerate(sentences) if not s]
    if empty:
        raise ValueError(f"sentences {empty[:5]} are empty: every sentence needs at least one word")
    t = max(len(s) for s in sentences)
    tokens = torch.zeros(len(sentences), t, dtype=torch.long)
    for i, s in enumerate(sentences):
        tokens[i, : len(s)] = torch.tensor(vocab.encode(list(s)))
    mask = torch.arange(t)[None] < torch.tensor([len(s) for s in sentences])[:, None]
    return SentenceBatch(tokens, mask)


def read_sentence_file(path: str | Path) -> list[list[str]]:
    """One sentence per line, whitespace-separated words; blank lines are skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"sentence file {p} does not exist")
    return [line.split() for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def _speech_text(split: str, cache_dir: str | None) -> list[list[str]]:
    from seqebm.data.corpora import load_corpus
    from seqebm.data.transcripts import normalize_transcript
    from seqebm.data.truecasing import split_sentences

    corpus = load_corpus("wiki-mini", cache_dir=cache_dir)
    out: list[list[str]] = []
    for paragraph in corpus.split(split):
        for sentence in split_sentences(paragraph):
            try:
                words = normalize_transcript(sentence).split()
            except ValueError:
                continue
            if words:
                out.append(words)
    if split == "train":  # add speech-mini's training transcripts when that corpus is built (never builds it)
        from seqebm.data.corpora import _resolve_cache_dir
        from seqebm.data.manifests import load_manifest

        manifest = _resolve_cache_dir(cache_dir) / "speech-mini" / "train.jsonl"
        seen = {" ".join(s) for s in out}
        if manifest.is_file():
            out.extend(u.text.split() for u in load_manifest(manifest) if u.text and u.text not in seen)
    return out


def load_elm_sentences(corpus: str, split: str, *, files: dict[str, str | None] | None = None,
                       cache_dir: str | None = None) -> list[list[str]]:
    """Sentences (word lists) of ``split`` in {train, valid, test} for ``corpus`` (see the module docstring)."""
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
    if corpus == "speech-text":
        return _speech_text(split, cache_dir)
    if corpus == "files":
        path = (files or {}).get(split)
        if path is None:
            raise ValueError(f"corpus=files needs a {split} file")
        return read_sentence_file(path)
    raise ValueError(f"unknown ELM corpus {corpus!r}: use speech-text or files")


class SentenceBatchSource:
    """Shuffled batches of ``batch_size`` sentences; ``batch(epoch, i)`` depends on (seed, epoch, i) only,
    so runs resume exactly. Sentences are length-sorted inside windows of ``bucket`` batches."""

    def __init__(self, sentences: Sequence[Sequence[str]], vocab: WordVocabulary, batch_size: int, *,
                 seed: int = 0, bucket: int = 20) -> None:
        if batch_size < 1 or bucket < 1:
            raise ValueError(f"batch_size and bucket must be >= 1, got {batch_size}, {bucket}")
        if len(sentences) < batch_size:
            raise ValueError(f"only {len(sentences)} training sentences: fewer than one batch of {batch_size}")
        self.sentences, self.vocab, self.batch_size = [list(s) for s in sentences], vocab, batch_size
        self.seed, self.bucket = seed, bucket
        self._order: tuple[int, list[int]] | None = None

    def num_batches(self) -> int:
        return len(self.sentences) // self.batch_size

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.sentences), generator=g).tolist()[: self.num_batches() * self.batch_size]
            win = self.bucket * self.batch_size
            order: list[int] = []
            for s in range(0, len(perm), win):
                order.extend(sorted(perm[s:s + win], key=lambda i: len(self.sentences[i])))
            chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            shuffle = torch.randperm(len(chunks), generator=g).tolist()
            self._order = (epoch, [i for c in shuffle for i in chunks[c]])
        return self._order[1]

    def batch(self, epoch: int, index: int) -> SentenceBatch:
        if not 0 <= index < self.num_batches():
            raise IndexError(f"batch index {index} out of range: an epoch has {self.num_batches()} batches")
        ids = self._epoch_order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return encode_sentences([self.sentences[i] for i in ids], self.vocab)
