"""Multi-head attention with a preallocated KV cache, shared by the decoder-only and
encoder-decoder Transformers.

Notation: B batch, T query length, C cache capacity, H heads, Dh head width, D model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MultiHeadAttention(nn.Module):
    """Scaled dot-product attention (``F.scaled_dot_product_attention``) with optional cache."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, 2 * d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.dropout = dropout

    def _split(self, x: Tensor) -> Tensor:  # (B, T, D) -> (B, H, T, Dh)
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def project_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values of ``memory`` (B, S, D) as (B, H, S, Dh) each."""
        k, v = self.kv_proj(memory).chunk(2, dim=-1)
        return self._split(k), self._split(v)

    def forward(
        self,
        x: Tensor,  # (B, T, D) queries
        k: Tensor,  # (B, H, S, Dh)
        v: Tensor,  # (B, H, S, Dh)
        attn_mask: Tensor | None = None,  # bool, broadcastable to (B, H, T, S); True = attend
        is_causal: bool = False,
    ) -> Tensor:
        q = self._split(self.q_proj(x))
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
        )  # (B, H, T, Dh)
        b, _, t, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(b, t, -1))


class KVCache:
    """Per-layer key/value buffers, batch-first: ``keys[l]`` is (B, H, C, Dh).

    ``length`` is the number of filled positions (shared by all rows) and ``limit`` the most
    positions the cache may hold. Inference writes into preallocated buffers in place; when
    autograd needs the keys/values (training through ``step``), the buffers grow out of place
    instead, so that earlier steps' tensors are never modified.
    """

    def __init__(self, keys: list[Tensor], values: list[Tensor], length: int = 0, limit: int | None = None) -> None:
        self.keys = keys
        self.values = values
        self.length = length
        self.limit = limit if limit is not None else keys[0].shape[2]

    @classmethod
    def empty(
        cls, n_layers: int, batch_size: int, n_heads: int, capacity: int, head_dim: int,
        device: torch.device | str, dtype: torch.dtype,
    ) -> "KVCache":
        shape = (batch_size, n_heads, capacity, head_dim)
        keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        return cls(keys, values, 0, capacity)

    @property
    def capacity(self) -> int:
        return self.limit

    def write(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store new keys/values (B, H, S, Dh) after ``length``; return the filled views."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.limit:
            raise ValueError(
                f"KV cache overflow: {end} positions requested, capacity is {self.limit} "
                "(sequence longer than the model's context?)"
            )
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            self.keys[layer] = torch.cat([self.keys[layer][:, :, :start], k], 2)
            self.values[layer] = torch.cat([self.values[layer][:, :, :start], v], 2)
            return self.keys[layer], self.values[layer]
        if self.keys[layer].shape[2] < end:  # a grown (out-of-place) buffer: keep growing
            self.keys[layer] = torch.cat([self.keys[layer][:, :, :start], k], 2)
            self.values[layer] = torch.cat([self.values[layer][:, :, :start], v], 2)
        else:
            self.keys[layer][:, :, start:end] = k
            self.values[layer][:, :, start:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def select(self, index: Tensor) -> "KVCache":
        """A new cache holding rows ``index`` (repeats allowed)."""
        index = index.to(self.keys[0].device)
        keys = [k.index_select(0, index) for k in self.keys]
        values = [v.index_select(0, index) for v in self.values]
        return KVCache(keys, values, self.length, self.limit)


def chunk_causal_mask(query_len: int, past_len: int, device: torch.device) -> Tensor | None:
    """Bool mask (T, past+T) letting query i see keys ``<= past + i``; None when T == 1."""
    if query_len == 1:
        return None
    q = torch.arange(query_len, device=device).unsqueeze(1) + past_len
    kpos = torch.arange(past_len + query_len, device=device).unsqueeze(0)
    return kpos <= q


class SharedPrefixCache:
    """KV cache for K samples per prefix that stores each prefix's keys/values once.

    Rows are grouped: row r continues prefix ``r // group``. ``prefix_keys[l]`` is
    (B, H, P, Dh) and the per-row suffix lives in an ordinary :class:`KVCache` of N = B·K rows.
    Attention scores the prefix as one GEMM per prefix group, (B, H, K·T, Dh) @ (B, H, Dh, P),
    instead of reading K copies of the same cache: decoding many samples of one long prefix is
    bound by memory traffic, and this removes most of it.
    """

    def __init__(self, prefix_keys: list[Tensor], prefix_values: list[Tensor], suffix: KVCache, group: int) -> None:
        self.prefix_keys, self.prefix_values, self.suffix, self.group = prefix_keys, prefix_values, suffix, group

    @property
    def prefix_len(self) -> int:
        return self.prefix_keys[0].shape[2]

    @property
    def length(self) -> int:
        return self.prefix_len + self.suffix.length

    @length.setter
    def length(self, value: int) -> None:
        self.suffix.length = value - self.prefix_len

    @property
    def limit(self) -> int:
        return self.prefix_len + self.suffix.limit

    @classmethod
    def from_cache(cls, cache: KVCache, group: int) -> "SharedPrefixCache":
        """Share ``cache`` (B rows, filled up to ``length``) among ``group`` samples per row."""
        n_layers = len(cache.keys)
        b, h, _, dh = cache.keys[0].shape
        keys = [k[:, :, : cache.length] for k in cache.keys]
        values = [v[:, :, : cache.length] for v in cache.values]
        suffix = KVCache.empty(n_layers, b * group, h, cache.limit - cache.length, dh, cache.keys[0].device,
                               cache.keys[0].dtype)
        return cls(keys, values, suffix, group)

    def materialize(self) -> KVCache:
        """The equivalent plain cache (prefix copied into every row)."""
        rows = torch.arange(self.suffix.keys[0].shape[0], device=self.suffix.keys[0].device) // self.group
        keys = [torch.cat([pk.index_select(0, rows), sk[:, :, : self.suffix.length]], 2)
                for pk, sk in zip(self.prefix_keys, self.suffix.keys)]
        values = [torch.cat([pv.index_select(0, rows), sv[:, :, : self.suffix.length]], 2)
                  for pv, sv in zip(self.prefix_values, self.suffix.values)]
        return KVCache(keys, values, self.length, self.limit)

    def select(self, index: Tensor) -> KVCache:
        """Arbitrary row selection breaks the grouping: fall back to a plain cache."""
        return self.materialize().select(index)

    def attend(self, attn: "MultiHeadAttention", x: Tensor, layer: int, k: Tensor, v: Tensor) -> Tensor:
        """Self-attention of queries ``x`` (N, T, D) over prefix + suffix (new k, v appended)."""
        past = self.suffix.length
        sk, sv = self.suffix.write(layer, k, v)  # (N, H, S, Dh)
        q = attn._split(attn.q_proj(x))  # (N, H, T, Dh)
        n, h, t, dh = q.shape
        pk, pv = self.prefix_keys[layer], self.prefix_values[layer]  # (B, H, P, Dh)
        b, p, g = pk.shape[0], pk.shape[2], self.group
        scale = dh ** -0.5
        qg = q.view(b, g, h, t, dh).transpose(1, 2).reshape(b, h, g * t, dh)
        s_prefix = (qg @ pk.transpose(-1, -2)).view(b, h, g, t, p).transpose(1, 2).reshape(n, h, t, p)
        s_suffix = q @ sk.transpose(-1, -2)  # (N, H, T, S)
        mask = chunk_causal_mask(t, past, x.device)
        if mask is not None:
            s_suffix = s_suffix.masked_fill(~mask, float("-inf"))
        w = torch.softmax(torch.cat([s_prefix, s_suffix], -1) * scale, -1)
        wp = w[..., :p].reshape(b, g, h, t, p).transpose(1, 2).reshape(b, h, g * t, p)
        out = (wp @ pv).view(b, h, g, t, dh).transpose(1, 2).reshape(n, h, t, dh) + w[..., p:] @ sv
        return attn.out_proj(out.transpose(1, 2).reshape(n, t, -1))
