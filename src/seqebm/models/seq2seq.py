"""Encoder-decoder Transformer for translation (pre-LN, shared source/target vocabulary).

Notation: B batch, S source length, T target length, V vocabulary, D model width.
Context keywords: ``source`` (B, S) token ids and optional ``source_mask`` (B, S) bool, True at
real tokens (default: ``source != pad_id``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from seqebm.models.attention import KVCache
from seqebm.models.base import check_tokens
from seqebm.models.transformer import DecoderBlock, _init_weights


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.inner = DecoderBlock(d_model, n_heads, d_ff, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # mask (B, 1, 1, S)
        b = self.inner
        h = b.ln1(x)
        k, v = b.attn.project_kv(h)
        x = x + b.drop(b.attn(h, k, v, attn_mask=mask))
        return x + b.drop(b.ff(b.ln2(x)))


class EncoderDecoderTransformer(nn.Module):
    """Vaswani et al. (2017) encoder-decoder with pre-LN and all embeddings tied."""

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 256,
        n_layers: int = 3,
        n_decoder_layers: int | None = None,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.1,
        max_len: int = 256,
        pad_id: int = 0,
    ) -> None:
        super().__init__()
        d_ff = d_ff or 4 * d_model
        self.vocab_size, self.max_len, self.pad_id = vocab_size, max_len, pad_id
        self.n_heads, self.d_model = n_heads, d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.ModuleList(EncoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.ln_enc = nn.LayerNorm(d_model)
        n_dec = n_decoder_layers or n_layers
        self.decoder = nn.ModuleList(
            DecoderBlock(d_model, n_heads, d_ff, dropout, cross=True) for _ in range(n_dec)
        )
        self.ln_dec = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embed.weight
        self.apply(_init_weights)
        for name, p in self.named_parameters():
            if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * (n_layers + n_dec)))

    def _embed(self, tokens: Tensor, offset: int) -> Tensor:
        pos = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        return self.drop(self.embed(tokens) + self.pos(pos))

    def _source_mask(self, source: Tensor, source_mask: Tensor | None) -> Tensor:
        if source_mask is None:
            source_mask = source != self.pad_id
        if source_mask.shape != source.shape:
            raise ValueError(f"source_mask shape {tuple(source_mask.shape)} != source shape {tuple(source.shape)}")
        return source_mask.bool()

    def encode(self, source: Tensor, source_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encoder states (B, S, D) and the attention mask (B, 1, 1, S)."""
        check_tokens(source, self.vocab_size, self.max_len, name="source")
        mask = self._source_mask(source, source_mask)[:, None, None, :]
        x = self._embed(source, 0)
        for block in self.encoder:
            x = block(x, mask)
        return self.ln_enc(x), mask

    def _memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [blk.cross.project_kv(memory) for blk in self.decoder]

    def forward(self, tokens: Tensor, *, source: Tensor | None = None,
                source_mask: Tensor | None = None, **context: Tensor) -> Tensor:
        if source is None:
            raise ValueError("EncoderDecoderTransformer needs a `source` tensor (B, S)")
        check_tokens(tokens, self.vocab_size, self.max_len)
        if source.shape[0] != tokens.shape[0]:
            raise ValueError(f"source batch {source.shape[0]} != target batch {tokens.shape[0]}")
        memory, mask = self.encode(source, source_mask)
        x = self._embed(tokens, 0)
        for blk, kv in zip(self.decoder, self._memory_kv(memory)):
            x = blk(x, memory_kv=kv, memory_mask=mask)
        return self.head(self.ln_dec(x))

    def init_state(self, batch_size: int, device: torch.device | str, *, source: Tensor | None = None,
                   source_mask: Tensor | None = None, capacity: int | None = None,
                   **context: Tensor) -> dict:
        """Encode the source once and cache the cross-attention keys/values."""
        if source is None:
            raise ValueError("EncoderDecoderTransformer.init_state needs `source`")
        if source.shape[0] != batch_size:
            raise ValueError(f"source batch {source.shape[0]} != batch_size {batch_size}")
        memory, mask = self.encode(source.to(device), None if source_mask is None else source_mask.to(device))
        cache = KVCache.empty(len(self.decoder), batch_size, self.n_heads,
                              min(capacity or self.max_len, self.max_len),
                              self.d_model // self.n_heads, device, self.embed.weight.dtype)
        return {"cache": cache, "memory_kv": self._memory_kv(memory), "memory_mask": mask}

    def step(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict]:
        cache: KVCache = state["cache"]
        if tokens.shape[1] + cache.length > self.max_len:
            raise ValueError(
                f"sequence of length {tokens.shape[1] + cache.length} is longer than the model's "
                f"context max_len={self.max_len}"
            )
        x = self._embed(tokens, cache.length)
        for i, (blk, kv) in enumerate(zip(self.decoder, state["memory_kv"])):
            x = blk(x, cache=cache, layer=i, memory_kv=kv, memory_mask=state["memory_mask"])
        cache.length += tokens.shape[1]
        return self.head(self.ln_dec(x)), state

    def select_state(self, state: dict, index: Tensor) -> dict:
        index = index.to(state["memory_mask"].device)
        return {
            "cache": state["cache"].select(index),
            "memory_kv": [(k.index_select(0, index), v.index_select(0, index)) for k, v in state["memory_kv"]],
            "memory_mask": state["memory_mask"].index_select(0, index),
        }
