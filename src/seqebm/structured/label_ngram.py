"""Smoothed n-gram language model over label ids, the edge potential of CTC-CRF (monograph Eq. 4.22).

Labels are ids ``1..V`` (0 is the CTC blank and never appears in a label sequence); ``<s>``
begins and ``</s>`` ends every sequence. The model is Witten-Bell interpolated (Witten & Bell
1991; Chen & Goodman 1998, §2.6): for a history h of the last n-1 labels,

    p(k | h) = (c(h, k) + N1+(h .) · p(k | h')) / (c(h) + N1+(h .))

with h' the history shortened by its oldest label, ending in a uniform distribution over the
V labels and ``</s>``; every p(k | h) is therefore positive. Short histories at the start of a
sequence are padded with ``<s>``.

Storage is JSON (no pickle): the counts are kept and :meth:`LabelNGram.log_prob_table` builds the
dense table of log p(k | h) over all histories, (V+1)^(n-1) x (V+1) (columns: ``</s>`` at 0,
labels 1..V), which the CTC-CRF denominator graph consumes.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

from seqebm.io import atomic_write_text

__all__ = ["LabelNGram"]

BOS = 0  # <s> in histories (labels are 1..V, so id 0 is free)
EOS = 0  # </s> as a predicted symbol (column 0 of the table)


class LabelNGram:
    """Witten-Bell interpolated n-gram over labels ``1..num_labels`` (``order`` >= 1).

    Args:
        num_labels: V.
        order: n (1 = unigram, 2 = bigram, 3 = trigram, ...).
    """

    def __init__(self, num_labels: int, order: int = 2) -> None:
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
        if not isinstance(order, int) or order < 1:
            raise ValueError(f"order must be a positive int, got {order!r}")
        self.num_labels, self.order = num_labels, order
        # counts[m][history tuple of length m][next symbol] for m = 0..n-1 (next symbol 0 = </s>)
        self.counts: list[dict[tuple[int, ...], Counter[int]]] = [defaultdict(Counter) for _ in range(order)]

    # ------------------------------------------------------------------------------ estimation

    @classmethod
    def fit(cls, sequences: Iterable[Sequence[int]], num_labels: int, order: int = 2) -> LabelNGram:
        """Count the n-grams of ``sequences`` (each a list of label ids in ``1..num_labels``)."""
        lm = cls(num_labels, order)
        n_seq = 0
        for i, seq in enumerate(sequences):
            seq = [int(x) for x in seq]
            bad = [x for x in seq if not 1 <= x <= num_labels]
            if bad:
                raise ValueError(f"sequence {i}: label ids must be in 1..{num_labels}, got {sorted(set(bad))[:10]}")
            padded = [BOS] * (order - 1) + seq
            for j, nxt in enumerate(seq + [EOS]):
                full = tuple(padded[j:j + order - 1])
                for m in range(order):
                    lm.counts[m][full[len(full) - m:] if m else ()][nxt] += 1
            n_seq += 1
        if n_seq == 0:
            raise ValueError("cannot estimate a label n-gram from no sequences")
        return lm

    def prob(self, nxt: int, history: Sequence[int]) -> float:
        """p(nxt | history) (``nxt`` 0 = ``</s>``; ``history`` the preceding labels, ``<s>`` = 0 allowed)."""
        hist = (tuple([BOS] * (self.order - 1)) + tuple(int(h) for h in history))[-(self.order - 1):] \
            if self.order > 1 else ()
        p = 1.0 / (self.num_labels + 1)  # uniform over V labels + </s>
        for m in range(0, self.order):
            h = hist[len(hist) - m:] if m else ()
            c = self.counts[m].get(h)
            if not c:
                continue
            total, types = sum(c.values()), len(c)
            p = (c.get(nxt, 0) + types * p) / (total + types)
        return p

    def log_prob(self, sequence: Sequence[int]) -> float:
        """log p(y) including ``</s>``."""
        seq = [int(x) for x in sequence]
        hist = [BOS] * max(self.order - 1, 0)
        out = 0.0
        for nxt in seq + [EOS]:
            out += math.log(self.prob(nxt, hist[len(hist) - (self.order - 1):] if self.order > 1 else []))
            hist.append(nxt)
        return out

    def log_prob_table(self, context: int | None = None) -> Tensor:
        """Dense log p(k | h) (H, V+1), float64: rows = histories of ``context`` labels (default n-1,
        at least 1) in row-major order over ``{<s>=0, 1..V}``; columns = ``</s>`` (0) then labels 1..V.

        With ``context`` larger than n-1 the extra (oldest) labels are ignored, which lets a unigram
        or bigram LM live on a graph whose states remember more labels.
        """
        ctx = max(self.order - 1, 1) if context is None else context
        if ctx < max(self.order - 1, 0) or ctx < 1:
            raise ValueError(f"context must be >= max(order - 1, 1) = {max(self.order - 1, 1)}, got {ctx}")
        V = self.num_labels
        rows = []
        for hist in itertools.product(range(V + 1), repeat=ctx):
            rows.append([math.log(self.prob(k, hist)) for k in range(V + 1)])
        return torch.tensor(rows, dtype=torch.float64)

    # ----------------------------------------------------------------------------- persistence

    def to_dict(self) -> dict:
        return {"num_labels": self.num_labels, "order": self.order,
                "counts": [[[list(h), {str(k): v for k, v in c.items()}] for h, c in level.items()]
                           for level in self.counts]}

    @classmethod
    def from_dict(cls, data: dict) -> LabelNGram:
        lm = cls(int(data["num_labels"]), int(data["order"]))
        for m, level in enumerate(data["counts"]):
            for h, c in level:
                lm.counts[m][tuple(h)] = Counter({int(k): int(v) for k, v in c.items()})
        return lm

    def save(self, path: str | Path) -> None:
        atomic_write_text(Path(path), json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> LabelNGram:
        return cls.from_dict(json.loads(Path(path).read_text()))
