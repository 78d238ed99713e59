"""Tasks: how a kind of data becomes batches, and how a model is evaluated on it.

A task owns its vocabulary (tokenizer), its training :class:`BatchSource`, its evaluation
batches and its metrics; the trainer and the models know nothing about them.

* :class:`TextLMTask`: wiki-mini or users' text; packed LM rows; token and word perplexity.
* :class:`DigitsTask`: sklearn digits as 64-pixel sequences; bits/dim.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqebm.data.batching import Batch, PackedLMSource, lm_batch, pack_lm, sequence_batch
from seqebm.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, Tokenizer, build_tokenizer, load_tokenizer, words
from seqebm.eval.perplexity import bits_per_dim, corpus_nll, perplexity_metrics
from seqebm.sampling.sampler import sample


class TextLMTask:
    kind = "lm"

    def __init__(self, corpus: Any, tokenizer: Tokenizer, *, seq_len: int, batch_size: int, seed: int,
                 eval_batch_size: int = 64) -> None:
        self.corpus, self.tokenizer = corpus, tokenizer
        self.seq_len, self.eval_batch_size = seq_len, eval_batch_size
        self.vocab_size = tokenizer.vocab_size
        self.bos_id, self.eos_id, self.pad_id = BOS_ID, EOS_ID, PAD_ID
        self._packed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for split in ("train", "valid", "test"):
            docs = tokenizer.encode_batch(corpus.split(split))
            self._packed[split] = pack_lm(docs, seq_len, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)
        rows, lengths = self._packed["train"]
        self.train_source = PackedLMSource(rows, lengths, batch_size, seed=seed)

    @classmethod
    def build(cls, corpus: Any, *, tokenizer_kind: str, vocab_size: int, tokenizer_dir: Path | None,
              **kw: Any) -> "TextLMTask":
        """Train the tokenizer on the training split, or load it from ``tokenizer_dir``."""
        if tokenizer_dir is not None and tokenizer_dir.exists():
            tok = load_tokenizer(tokenizer_dir)
        else:
            tok = build_tokenizer(tokenizer_kind, corpus.train, vocab_size=vocab_size)
            if tokenizer_dir is not None:
                tok.save(tokenizer_dir)
        return cls(corpus, tok, **kw)

    def eval_batches(self, split: str) -> list[Batch]:
        rows, lengths = self._packed[split]
        b = self.eval_batch_size
        return [lm_batch(rows[i:i + b], lengths[i:i + b], PAD_ID) for i in range(0, rows.shape[0], b)]

    def num_words(self, split: str) -> int:
        docs = self.corpus.split(split)
        return sum(words(d) for d in docs) + len(docs)  # EOS counts as a word per document

    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        nll, tokens = corpus_nll(model, self.eval_batches(split), device)
        return perplexity_metrics(nll, tokens, words=self.num_words(split))

    def samples(self, model: nn.Module, n: int, max_new_tokens: int, *, device: torch.device | str = "cpu",
                top_k: int | None = 40, temperature: float = 1.0, seed: int = 0) -> list[str]:
        model.eval()
        out = sample(model, torch.full((1, 1), BOS_ID, dtype=torch.long, device=device), num_samples=n,
                     max_new_tokens=min(max_new_tokens, model.max_len or max_new_tokens), top_k=top_k,
                     temperature=temperature, eos_id=EOS_ID, generator=torch.Generator().manual_seed(seed))
        return self.tokenizer.decode_batch([t[:k] for t, k in zip(out.tokens.tolist(), out.lengths.tolist())])


class DigitsTask:
    """8x8 digits, 17 levels, raster order: inputs ``[BOS] + pixels[:63]``, targets all 64 pixels."""

    kind = "digits"

    def __init__(self, data: Any, *, batch_size: int, seed: int, eval_batch_size: int = 256) -> None:
        from seqebm.data.digits import DIGITS_LEVELS

        self.data, self.eval_batch_size = data, eval_batch_size
        self.vocab_size = DIGITS_LEVELS
        self.bos_id, self.eos_id, self.pad_id = DIGITS_LEVELS, None, 0
        train = data.split("train")[0]
        self.train_source = _RowSource(train, batch_size, seed, self._batch)

    def _batch(self, pixels: torch.Tensor) -> Batch:
        return sequence_batch(pixels.tolist(), bos_id=self.bos_id, eos_id=None, pad_id=0)

    def eval_batches(self, split: str) -> list[Batch]:
        x = self.data.split(split)[0]
        return [self._batch(x[i:i + self.eval_batch_size]) for i in range(0, x.shape[0], self.eval_batch_size)]

    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        nll, pixels = corpus_nll(model, self.eval_batches(split), device)
        out = perplexity_metrics(nll, pixels)
        out["bits_per_dim"] = bits_per_dim(nll, pixels)
        return out

    def samples(self, model: nn.Module, n: int, max_new_tokens: int = 64, *, device: torch.device | str = "cpu",
                top_k: int | None = None, temperature: float = 1.0, seed: int = 0) -> list[str]:
        model.eval()
        px = sample(model, torch.full((1, 1), self.bos_id, dtype=torch.long, device=device), num_samples=n,
                    max_new_tokens=64, top_k=top_k, temperature=temperature,
                    generator=torch.Generator().manual_seed(seed)).tokens
        chars = " .:-=+*#%@@@@@@@@"
        return ["\n".join("".join(chars[v] for v in row[r * 8:(r + 1) * 8]) for r in range(8)) for row in px.tolist()]


class _RowSource:
    """Shuffled fixed-size batches over the rows of a tensor, built lazily by ``make``."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int, make) -> None:
        if rows.shape[0] < batch_size:
            raise ValueError(f"only {rows.shape[0]} training rows: fewer than one batch of {batch_size}")
        self.rows, self.batch_size, self.seed, self.make = rows, batch_size, seed, make

    def num_batches(self) -> int:
        return self.rows.shape[0] // self.batch_size

    def batch(self, epoch: int, index: int) -> Batch:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.rows.shape[0], generator=g)
        return self.make(self.rows[perm[index * self.batch_size:(index + 1) * self.batch_size]])
