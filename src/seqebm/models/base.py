"""The one protocol every autoregressive model in seqebm satisfies.

Conventions (shared by models, objectives, samplers and estimators):

* ``tokens`` are the *inputs*: ``tokens[:, 0]`` is the BOS symbol and ``tokens[:, t]`` is the
  t-th generated symbol. ``forward(tokens)`` returns logits ``(B, T, V)`` where
  ``logits[:, t]`` scores the symbol that follows ``tokens[:, : t + 1]``. Teacher forcing
  therefore compares ``logits`` with ``targets = tokens shifted left by one``.
* ``vocab_size`` is the size of the *output* distribution. Input vocabularies may be larger
  (PixelCNN adds a BOS symbol that is never predicted).
* Incremental decoding: ``state = model.init_state(B, device, **context)`` then repeatedly
  ``logits, state = model.step(new_tokens, state)`` with ``new_tokens`` of shape ``(B, S)``
  (``S >= 1``: a whole prefix can be fed at once). The logits of ``step`` equal the matching
  slice of ``forward`` over the concatenated tokens.
* ``select_state(state, index)`` gathers batch rows of a state (``index`` is a LongTensor of
  row ids, repeats allowed): this is how a prefix encoded once is shared by K samples, and how
  beam search reorders hypotheses.
* Conditional models (encoder-decoder) take their context as keyword arguments
  (``source``, ``source_mask``) in ``forward`` and ``init_state``; unconditional models accept
  and ignore no context.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

State = Any


@runtime_checkable
class AutoregressiveModel(Protocol):
    """Anything that gives next-token logits, in full and incrementally."""

    vocab_size: int
    max_len: int | None

    def forward(self, tokens: Tensor, **context: Tensor) -> Tensor:  # (B, T) -> (B, T, V)
        ...

    def init_state(self, batch_size: int, device: torch.device | str, **context: Tensor) -> State:
        ...

    def step(self, tokens: Tensor, state: State) -> tuple[Tensor, State]:  # (B, S) -> (B, S, V)
        ...

    def select_state(self, state: State, index: Tensor) -> State:
        ...


def map_batch_tensors(obj: Any, fn, batch_dim: int = 0) -> Any:
    """Apply ``fn`` to every tensor in a nested tuple/list/dict whose ``batch_dim`` is the batch.

    Non-tensor leaves (ints, None, strings) are returned unchanged. Models whose state is a
    plain container of batch-first tensors use this to implement ``select_state``.
    """
    if isinstance(obj, Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: map_batch_tensors(v, fn, batch_dim) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [map_batch_tensors(v, fn, batch_dim) for v in obj]
        return type(obj)(out) if not hasattr(obj, "_fields") else type(obj)(*out)
    return obj


def select_batch_rows(state: Any, index: Tensor) -> Any:
    """Gather rows ``index`` (dim 0) of every tensor in a nested state container."""
    return map_batch_tensors(state, lambda t: t.index_select(0, index.to(t.device)))


def check_tokens(tokens: Tensor, vocab_size: int, max_len: int | None, name: str = "tokens") -> None:
    """Validate an input token tensor at a public entry point (clear messages, no asserts)."""
    if not isinstance(tokens, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"{name} must have shape (B, T), got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer tensor, got {tokens.dtype}")
    if max_len is not None and tokens.shape[1] > max_len:
        raise ValueError(
            f"sequence of length {tokens.shape[1]} is longer than the model's context "
            f"max_len={max_len}"
        )
    if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= vocab_size):
        raise ValueError(
            f"{name} contain ids outside [0, {vocab_size}): min={int(tokens.min())}, "
            f"max={int(tokens.max())} (tokenizer/model vocabulary mismatch?)"
        )
