"""Batches, LM packing and token-budget batching.

Notation: B batch, T target length, S source length, N rows.
A :class:`Batch` always holds ``inputs`` (starting with BOS) and ``targets`` (inputs shifted
left by one), with ``mask`` True at positions that count in the loss.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class TensorFields:
    """Row-wise operations shared by the batch dataclasses: every field is a tensor whose first
    dimension is the batch (or None). Subclasses define ``__len__``."""

    def _map(self, fn):
        return type(self)(**{f.name: (None if (v := getattr(self, f.name)) is None else fn(v))
                             for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str):
        return self._map(lambda v: v.to(device, non_blocking=True))

    def rows(self, index: slice | Tensor):
        return self._map(lambda v: v[index])

    def shard(self, rank: int, world_size: int):
        """Contiguous slice of rows for one data-parallel rank (B must divide evenly)."""
        if len(self) % world_size:
            raise ValueError(f"batch of {len(self)} rows cannot be split evenly over {world_size} ranks")
        per = len(self) // world_size
        return self.rows(slice(rank * per, (rank + 1) * per))


@dataclass
class Batch(TensorFields):
    inputs: Tensor  # (B, T) long, inputs[:, 0] = BOS
    targets: Tensor  # (B, T) long, PAD where mask is False
    mask: Tensor  # (B, T) bool
    source: Tensor | None = None  # (B, S) long, for conditional models
    source_mask: Tensor | None = None  # (B, S) bool

    def __len__(self) -> int:
        return self.inputs.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())

    def model_kwargs(self) -> dict[str, Tensor]:
        """Context keywords for ``model(inputs, **kwargs)`` (the source for seq2seq)."""
        if self.source is None:
            return {}
        return {"source": self.source, "source_mask": self.source_mask}


def pack_lm(docs: Sequence[Sequence[int]], seq_len: int, *, bos_id: int, eos_id: int,
            pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Concatenate documents (each followed by EOS) and cut the stream into rows.

    Returns ``(rows, lengths)``: rows (N, seq_len + 1) = ``[BOS] + seq_len stream tokens``,
    the last row right-padded with ``pad_id``; ``lengths[i]`` counts the real stream tokens of
    row i. Every stream token is a target exactly once, so summing the NLL over rows gives the
    exact log-likelihood of the stream under chunked context (used for perplexity).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream: list[int] = []
    for d in docs:
        stream.extend(d)
        stream.append(eos_id)
    if not docs or not stream:
        raise ValueError("cannot pack an empty list of documents")
    n = math.ceil(len(stream) / seq_len)
    flat = torch.full((n * seq_len,), pad_id, dtype=torch.long)
    flat[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    rows = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), flat.view(n, seq_len)], 1)
    lengths = torch.full((n,), seq_len, dtype=torch.long)
    lengths[-1] = len(stream) - (n - 1) * seq_len
    return rows, lengths


def lm_batch(rows: Tensor, lengths: Tensor, pad_id: int = 0) -> Batch:
    """Batch from packed rows (B, T + 1) and their real lengths (B,)."""
    inputs, targets = rows[:, :-1], rows[:, 1:].clone()
    mask = torch.arange(targets.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
    targets[~mask] = pad_id
    return Batch(inputs, targets, mask)


def sequence_batch(seqs: Sequence[Sequence[int]], *, bos_id: int, eos_id: int | None, pad_id: int = 0,
                   sources: Sequence[Sequence[int]] | None = None) -> Batch:
    """Batch of separate sequences: inputs ``[BOS] + x``, targets ``x + [EOS]`` (EOS optional).

    With ``sources`` the batch also carries a right-padded source and its mask.
    """
    ext = [list(s) + ([eos_id] if eos_id is not None else []) for s in seqs]
    t = max(len(s) for s in ext)
    b = len(ext)
    inputs = torch.full((b, t), pad_id, dtype=torch.long)
    targets = torch.full((b, t), pad_id, dtype=torch.long)
    for i, s in enumerate(ext):
        full = [bos_id] + s
        inputs[i, : len(s)] = torch.tensor(full[:-1], dtype=torch.long)
        targets[i, : len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in ext])
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    batch = Batch(inputs, targets, mask)
    if sources is not None:
        if len(sources) != b:
            raise ValueError(f"{len(sources)} sources for {b} targets")
        s_len = max(len(s) for s in sources)
        if s_len == 0:
            raise ValueError("every source must have at least one token")
        src = torch.full((b, s_len), pad_id, dtype=torch.long)
        for i, s in enumerate(sources):
            if not s:
                raise ValueError(f"source {i} is empty")
            src[i, : len(s)] = torch.tensor(list(s), dtype=torch.long)
        batch.source = src
        batch.source_mask = torch.arange(s_len).unsqueeze(0) < torch.tensor([len(s) for s in sources]).unsqueeze(1)
    return batch


def token_budget_batches(lengths: Sequence[int], max_tokens: int, *, max_rows: int | None = None,
                         multiple_of: int = 1) -> list[list[int]]:
    """Group example indices into batches of at most ``max_tokens`` padded tokens (fairseq-style).

    Examples are sorted by length so that padding is small; a batch's cost is
    ``rows * longest``. The row count is rounded down to ``multiple_of`` (e.g. the data-parallel
    world size) when possible. The order of the returned batches is by length; shuffle it per
    epoch with :class:`BatchSchedule`.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        n = lengths[i]
        if n > max_tokens:
            raise ValueError(f"example {i} has {n} tokens, more than max_tokens={max_tokens}")
        # sorted by length, so adding i makes n the longest: cost (rows + 1) * n
        while cur and ((len(cur) + 1) * n > max_tokens or (max_rows is not None and len(cur) >= max_rows)):
            keep = len(cur) - len(cur) % multiple_of or len(cur)
            batches.append(cur[:keep])
            cur = cur[keep:]
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class BatchSchedule:
    """A deterministic order of batch ids per epoch: a pure function of (seed, epoch).

    Knowing (epoch, position) is enough to resume exactly where a run stopped.
    """

    def __init__(self, num_batches: int, *, seed: int, shuffle: bool = True) -> None:
        if num_batches <= 0:
            raise ValueError("no training batches: the training data is empty or shorter than one batch")
        self.num_batches, self.seed, self.shuffle = num_batches, seed, shuffle

    def order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_batches))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_batches, generator=g).tolist()

    def iterate(self, epoch: int, start: int = 0) -> Iterator[tuple[int, int]]:
        """Yield ``(position, batch_id)`` from ``start`` to the end of ``epoch``."""
        for pos, b in enumerate(self.order(epoch)[start:], start):
            yield pos, b


class PackedLMSource:
    """Training batches of packed LM rows; the row order is reshuffled every epoch.

    ``batch(epoch, i)`` is a pure function of (seed, epoch, i), which makes resumption exact.
    """

    def __init__(self, rows: Tensor, lengths: Tensor, batch_size: int, *, seed: int = 0,
                 shuffle: bool = True, pad_id: int = 0, drop_last: bool = True) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.rows, self.lengths, self.batch_size = rows, lengths, batch_size
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        n = rows.shape[0]
        self._num = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self._num == 0:
            raise ValueError(f"only {n} packed rows: fewer than one batch of {batch_size} "
                             "(use more data, a smaller batch_size or a shorter seq_len)")
        self._perm_epoch, self._perm = -1, torch.arange(n)

    def num_batches(self) -> int:
        return self._num

    def _order(self, epoch: int) -> Tensor:
        if not self.shuffle:
            return torch.arange(self.rows.shape[0])
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.rows.shape[0], generator=g), epoch
        return self._perm

    def batch(self, epoch: int, index: int) -> Batch:
        idx = self._order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return lm_batch(self.rows[idx], self.lengths[idx], self.pad_id)


class ListSource:
    """Fixed batches (e.g. from :func:`token_budget_batches`) visited in a per-epoch order."""

    def __init__(self, batches: Sequence[Batch], *, seed: int = 0, shuffle: bool = True) -> None:
        self.batches = list(batches)
        self.schedule = BatchSchedule(len(self.batches), seed=seed, shuffle=shuffle)
        self._cache: tuple[int, list[int]] = (-1, [])

    def num_batches(self) -> int:
        return len(self.batches)

    def batch(self, epoch: int, index: int) -> Batch:
        if self._cache[0] != epoch:
            self._cache = (epoch, self.schedule.order(epoch))
        return self.batches[self._cache[1][index]]


def ebm_batch(x: Tensor) -> Batch:
    """A :class:`Batch` whose rows are whole configurations for energy objectives.

    ``inputs`` = ``targets`` = x (N, ...) (tokens or floats); ``mask`` is (N, 1) all True, so
    the trainer weights micro-batches by their number of configurations.
    """
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"x must have at least one row, got shape {tuple(x.shape)}")
    return Batch(inputs=x, targets=x, mask=torch.ones((x.shape[0], 1), dtype=torch.bool, device=x.device))


class TensorSource:
    """Minibatches of configurations from a tensor (N, ...), reshuffled every epoch.

    For energy models trained on fixed-size data (token sequences of one length, vectors,
    images): ``batch(epoch, i)`` is an :func:`ebm_batch` and a pure function of
    (seed, epoch, i), so runs resume exactly.
    """

    def __init__(self, data: Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True) -> None:
        if not isinstance(data, Tensor) or data.dim() < 1:
            raise ValueError(f"data must be a Tensor (N, ...), got {type(data).__name__}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        n = data.shape[0]
        self.data, self.batch_size, self.seed, self.shuffle = data, batch_size, seed, shuffle
        self._num = n // batch_size if drop_last else math.ceil(n / batch_size)
        if self._num == 0:
            raise ValueError(f"only {n} rows: fewer than one batch of {batch_size}")
        self._perm_epoch, self._perm = -1, torch.arange(n)

    def num_batches(self) -> int:
        return self._num

    def batch(self, epoch: int, index: int) -> Batch:
        if self.shuffle and epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm, self._perm_epoch = torch.randperm(self.data.shape[0], generator=g), epoch
        idx = self._perm[index * self.batch_size:(index + 1) * self.batch_size]
        return ebm_batch(self.data[idx])


@dataclass
class PairBatch(TensorFields):
    """Real sequences and model samples for the same prefixes (residual-EBM conditional NCE).

    Row i of ``positive`` (B, T) is a real sequence and row i of ``negative`` (B, T') an LM
    sample continuing the same prefix; masks are True at real tokens (BOS included). The
    trainer weights micro-batches by ``num_tokens`` = the number of pairs.
    """

    positive: Tensor
    positive_mask: Tensor
    negative: Tensor
    negative_mask: Tensor

    def __post_init__(self) -> None:
        if self.positive.shape[0] != self.negative.shape[0]:
            raise ValueError(f"positive ({self.positive.shape[0]}) and negative ({self.negative.shape[0]}) rows differ")
        if self.positive_mask.shape != self.positive.shape or self.negative_mask.shape != self.negative.shape:
            raise ValueError("masks must match their token tensors")

    def __len__(self) -> int:
        return self.positive.shape[0]

    @property
    def num_tokens(self) -> int:
        return len(self)

