"""Batches of speech features and transcripts for CTC, CTC-CRF and RNN-T training.

Notation: B utterances, N feature frames, F feature dims, U transcript labels.

Transcripts use :data:`seqebm.data.speech.SPEECH_UNITS`; unit i is label ``i + 1`` (0 is the
CTC/RNN-T blank). :func:`featurize` turns utterances into log-mel features once (per-utterance
mean/variance normalised, kept in memory as float16); :class:`SpeechBatchSource` draws shuffled,
length-bucketed batches as a pure function of (seed, epoch, index), so runs resume exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from seqebm.data.batching import TensorFields

__all__ = ["SpeechBatch", "encode_transcript", "decode_labels", "featurize", "SpeechBatchSource", "collate"]


@dataclass
class SpeechBatch(TensorFields):
    features: Tensor  # (B, N, F) float
    feature_lengths: Tensor  # (B,) long
    targets: Tensor  # (B, U) long, labels 1..V, 0 past target_lengths
    target_lengths: Tensor  # (B,) long

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_tokens(self) -> int:
        return int(self.target_lengths.sum())


def encode_transcript(text: str, units: Sequence[str]) -> list[int]:
    """Text -> labels 1..V (unit i -> i + 1); characters outside ``units`` raise ``ValueError``."""
    index = {u: i + 1 for i, u in enumerate(units)}
    bad = sorted({c for c in text if c not in index})
    if bad:
        raise ValueError(f"transcript {text[:60]!r} has characters outside the unit set: {bad}")
    if not text:
        raise ValueError("empty transcript")
    return [index[c] for c in text]


def decode_labels(labels: Sequence[int], units: Sequence[str]) -> str:
    return "".join(units[i - 1] for i in labels if 1 <= i <= len(units))


def featurize(waveforms: Sequence[Tensor], featurizer: torch.nn.Module, *, batch_size: int = 32,
              progress: bool = False) -> list[Tensor]:
    """Log-mel features (N_i, F) per waveform, CMVN-normalised per utterance, stored as float16."""
    from tqdm.auto import tqdm

    from seqebm.data.features import cmvn

    out: list[Tensor] = []
    with torch.no_grad():
        for i in tqdm(range(0, len(waveforms), batch_size), disable=not progress, desc="features", leave=False):
            chunk = waveforms[i:i + batch_size]
            lengths = torch.tensor([w.shape[0] for w in chunk])
            wav = torch.zeros(len(chunk), int(lengths.max()))
            for j, w in enumerate(chunk):
                wav[j, : w.shape[0]] = w
            feats, flen = featurizer(wav, lengths)
            feats = cmvn(feats, flen)
            out += [feats[j, : int(flen[j])].to(torch.float16) for j in range(len(chunk))]
    return out


def collate(features: Sequence[Tensor], targets: Sequence[Sequence[int]]) -> SpeechBatch:
    """Pad per-utterance features (N_i, F) and label lists into a :class:`SpeechBatch` (float32)."""
    B, F = len(features), features[0].shape[1]
    fl = torch.tensor([f.shape[0] for f in features])
    tl = torch.tensor([len(t) for t in targets])
    x = torch.zeros(B, int(fl.max()), F)
    y = torch.zeros(B, max(int(tl.max()), 1), dtype=torch.long)
    for i, (f, t) in enumerate(zip(features, targets)):
        x[i, : f.shape[0]] = f.float()
        y[i, : len(t)] = torch.tensor(t, dtype=torch.long)
    return SpeechBatch(x, fl, y, tl)


class SpeechBatchSource:
    """Shuffled batches of ``batch_size`` utterances, sorted by length inside windows of ``bucket`` batches."""

    def __init__(self, features: Sequence[Tensor], targets: Sequence[Sequence[int]], batch_size: int, *,
                 seed: int = 0, bucket: int = 20) -> None:
        if len(features) != len(targets):
            raise ValueError(f"{len(features)} feature sequences but {len(targets)} transcripts")
        if batch_size < 1 or bucket < 1:
            raise ValueError(f"batch_size and bucket must be >= 1, got {batch_size}, {bucket}")
        if len(features) < batch_size:
            raise ValueError(f"only {len(features)} training utterances: fewer than one batch of {batch_size}")
        self.features, self.targets = list(features), [list(t) for t in targets]
        self.batch_size, self.seed, self.bucket = batch_size, seed, bucket
        self._order: tuple[int, list[int]] | None = None

    def num_batches(self) -> int:
        return len(self.features) // self.batch_size

    def _epoch_order(self, epoch: int) -> list[int]:
        if self._order is None or self._order[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.features), generator=g).tolist()[: self.num_batches() * self.batch_size]
            win = self.bucket * self.batch_size
            order: list[int] = []
            for s in range(0, len(perm), win):
                order += sorted(perm[s:s + win], key=lambda i: self.features[i].shape[0])
            chunks = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            self._order = (epoch, [i for c in torch.randperm(len(chunks), generator=g).tolist() for i in chunks[c]])
        return self._order[1]

    def batch(self, epoch: int, index: int) -> SpeechBatch:
        if not 0 <= index < self.num_batches():
            raise IndexError(f"batch index {index} out of range: an epoch has {self.num_batches()} batches")
        ids = self._epoch_order(epoch)[index * self.batch_size:(index + 1) * self.batch_size]
        return collate([self.features[i] for i in ids], [self.targets[i] for i in ids])
