"""Decoder-only Transformer language model with a KV cache (pre-LN, tied embeddings).

Notation: B batch, T length, V vocabulary, D model width, L layers, H heads.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.models.attention import KVCache, MultiHeadAttention, SharedPrefixCache, chunk_causal_mask
from seqebm.models.base import check_tokens


class FeedForward(nn.Module):
    def __init__(self, d_model: int, d_ff: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x))))


class DecoderBlock(nn.Module):
    """Pre-LN block: x + SelfAttn(LN(x)) [+ CrossAttn(LN(x), memory)] + FFN(LN(x))."""

    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, cross: bool = False) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = MultiHeadAttention(d_model, n_heads, dropout)
        self.cross = MultiHeadAttention(d_model, n_heads, dropout) if cross else None
        self.ln_cross = nn.LayerNorm(d_model) if cross else None
        self.ln2 = nn.LayerNorm(d_model)
        self.ff = FeedForward(d_model, d_ff, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(
        self,
        x: Tensor,  # (B, T, D)
        *,
        cache: KVCache | None = None,
        layer: int = 0,
        memory_kv: tuple[Tensor, Tensor] | None = None,
        memory_mask: Tensor | None = None,  # (B, 1, 1, S) bool
    ) -> Tensor:
        h = self.ln1(x)
        k, v = self.attn.project_kv(h)
        if cache is None:
            a = self.attn(h, k, v, is_causal=x.shape[1] > 1)
        elif isinstance(cache, SharedPrefixCache):
            a = cache.attend(self.attn, h, layer, k, v)
        else:
            past = cache.length
            k, v = cache.write(layer, k, v)
            a = self.attn(h, k, v, attn_mask=chunk_causal_mask(x.shape[1], past, x.device))
        x = x + self.drop(a)
        if self.cross is not None:
            assert memory_kv is not None
            x = x + self.drop(self.cross(self.ln_cross(x), *memory_kv, attn_mask=memory_mask))
        return x + self.drop(self.ff(self.ln2(x)))


class TransformerLM(nn.Module):
    """GPT-style decoder-only LM: learned positions, pre-LN blocks, final LN, tied output.

    ``forward(tokens (B, T)) -> logits (B, T, V)``; ``step`` uses a preallocated KV cache
    (see :mod:`seqebm.models.base` for the protocol).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        d_model: int = 256,
        n_layers: int = 4,
        n_heads: int = 4,
        d_ff: int | None = None,
        dropout: float = 0.1,
        max_len: int = 512,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if vocab_size <= 0 or max_len <= 0:
            raise ValueError(f"vocab_size and max_len must be positive, got {vocab_size}, {max_len}")
        self.vocab_size = vocab_size
        self.max_len = max_len
        self.n_layers, self.n_heads, self.d_model = n_layers, n_heads, d_model
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            DecoderBlock(d_model, n_heads, d_ff or 4 * d_model, dropout) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        self.apply(_init_weights)
        for name, p in self.named_parameters():  # GPT-2 scaled init of residual projections
            if name.endswith("out_proj.weight") or name.endswith("fc2.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * n_layers))

    def _embed(self, tokens: Tensor, offset: int) -> Tensor:
        pos = torch.arange(offset, offset + tokens.shape[1], device=tokens.device)
        return self.drop(self.embed(tokens) + self.pos(pos))

    def forward(self, tokens: Tensor, **context: Tensor) -> Tensor:
        check_tokens(tokens, self.vocab_size, self.max_len)
        x = self._embed(tokens, 0)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def features(self, tokens: Tensor, **context: Tensor) -> Tensor:
        """Top hidden states ``(B, T, D)`` after the final LayerNorm: ``head(features) == forward``.

        Row ``t`` summarises ``tokens[:, : t + 1]`` (causal), so right padding never changes the
        states of earlier positions. Used by energy networks built on the LM (residual-EBM
        seed §4.1, UniT).
        """
        check_tokens(tokens, self.vocab_size, self.max_len)
        x = self._embed(tokens, 0)
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x)

    def init_state(self, batch_size: int, device: torch.device | str, *, capacity: int | None = None,
                   **context: Tensor) -> KVCache:
        """An empty KV cache for ``batch_size`` rows and ``capacity`` positions (default max_len)."""
        capacity = min(capacity or self.max_len, self.max_len)
        dtype = self.embed.weight.dtype
        return KVCache.empty(self.n_layers, batch_size, self.n_heads, capacity,
                             self.d_model // self.n_heads, device, dtype)

    def step(self, tokens: Tensor, state: KVCache | SharedPrefixCache, *, last_only: bool = False
             ) -> tuple[Tensor, KVCache | SharedPrefixCache]:
        """Logits (B, S, V) for ``tokens`` (B, S) appended after the cached positions.

        The cache is updated in place and returned. With ``last_only`` only the last position's
        logits (B, 1, V) are projected (samplers that feed a whole prefix need no others).
        """
        h, state = self.step_features(tokens, state)
        if last_only:
            h = h[:, -1:]
        return self.head(h), state

    def step_features(self, tokens: Tensor, state: KVCache | SharedPrefixCache
                      ) -> tuple[Tensor, KVCache | SharedPrefixCache]:
        """Top hidden states (B, S, D) (what :meth:`features` returns) for ``tokens`` after the cache."""
        if tokens.shape[1] + state.length > self.max_len:
            raise ValueError(
                f"sequence of length {tokens.shape[1] + state.length} is longer than the model's "
                f"context max_len={self.max_len}"
            )
        x = self._embed(tokens, state.length)
        for i, block in enumerate(self.blocks):
            x = block(x, cache=state, layer=i)
        state.length += tokens.shape[1]
        return self.ln_f(x), state

    def select_state(self, state: KVCache | SharedPrefixCache, index: Tensor) -> KVCache:
        return state.select(index)

    def share_state(self, state: KVCache, group: int) -> SharedPrefixCache:
        """Continue each of the B cached rows ``group`` times without copying its keys/values.

        Row r of the result continues row ``r // group`` of ``state`` (see
        :class:`~seqebm.models.attention.SharedPrefixCache`); ``step`` accepts it like a cache.
        """
        return SharedPrefixCache.from_cache(state, group)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
