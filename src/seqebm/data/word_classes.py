"""Word classes by the exchange algorithm (Kneser & Ney 1993; Martin, Liermann & Ney 1998).

Monograph §3.3.1, Tab. 3.2: the class features ("c", "cs", "csh", "cpw", "tied") of a discrete
TRF LM need a deterministic word -> class map, obtained "by running the automatic clustering
algorithm proposed in [96] on the training dataset". [96] is the exchange algorithm: start from
an initial assignment, then repeatedly move single words to the class that most increases the
log-likelihood of the training text under the class-bigram model
p(w | v) = p(c(w) | c(v)) · p(w | c(w)).

Notation: V vocabulary size (word ids, specials included), C number of word classes,
K = C + 3 class ids, N(c, c') class-bigram counts, N_L(c) = Σ_c' N(c, c') (class c as the
predecessor), N_R(c') = Σ_c N(c, c') (as the successor), N_R(w) the word's successor count,
h(n) = n log n.

Every sentence is wrapped as ``<s> w_1 .. w_n </s>`` and contributes its n + 1 bigrams. The
maximum-likelihood log-likelihood of the text is then

    LL = Σ_{c,c'} h(N(c, c')) − Σ_c h(N_L(c)) − Σ_c' h(N_R(c')) + Σ_w h(N_R(w)),

exactly; the last sum does not depend on the classes. (Without sentence boundaries
N_L = N_R = N(c) and this is the textbook Σ h(N(c,c')) − 2 Σ h(N(c)) form.)

Special ids (``seqebm.data.tokenizers``): class ids mirror the word-id specials. Class 0 is
``<pad>`` (never in text), class 1 is ``<s>``, class 2 is ``</s>``: these three are fixed and
never exchanged. Ordinary words get classes 3 .. C + 2; ``<unk>`` (id 3) is clustered like any
other word from its counts. Words of the vocabulary that never occur in the text keep their
initial class (they do not change the objective).

Speed: counts are sparse (per-word successor/predecessor lists); moving a word costs
O(K · #neighbour classes) numpy work via the incremental gain of every candidate class at once,
so ~20k word types and ~1M tokens take seconds per iteration on one core.
"""

from __future__ import annotations

import itertools
import json
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from seqebm.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from seqebm.io import atomic_write_text

__all__ = [
    "NUM_FIXED_CLASSES", "WordClasses", "class_bigram_log_likelihood", "exchange_clustering",
    "flatten_sentences",
]

#: Class ids 0 (``<pad>``), 1 (``<s>``) and 2 (``</s>``) are fixed; word classes start at 3.
NUM_FIXED_CLASSES = 3


def flatten_sentences(
    sentences: Iterable[Sequence[int]], vocab_size: int, *, min_id: int = 1, name: str = "sentences"
) -> tuple[np.ndarray, np.ndarray]:
    """Word-id sentences -> ``(flat ids (N,), lengths (S,))`` int64 numpy arrays.

    Every id must lie in ``[min_id, vocab_size)`` (``min_id=1`` forbids ``<pad>``). Sentences
    may be lists, tuples, 1-D arrays or tensors of ints; raises ``TypeError``/``ValueError``
    naming the offending sentence.
    """
    if isinstance(sentences, (str, bytes, Tensor, np.ndarray)):
        raise TypeError(f"{name} must be a list of word-id sequences, got {type(sentences).__name__}")
    seqs: list[Sequence[int]] = []
    for i, s in enumerate(sentences):
        if hasattr(s, "tolist"):
            s = s.tolist()
        if isinstance(s, (str, bytes)) or not isinstance(s, Sequence):
            raise TypeError(f"{name}[{i}] must be a sequence of int word ids, got {type(s).__name__}")
        if len(s) and not isinstance(s[0], numbers.Integral):
            raise TypeError(f"{name}[{i}] must hold int word ids, got {type(s[0]).__name__}")
        seqs.append(s)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    bad = np.flatnonzero((flat < min_id) | (flat >= vocab_size))
    if bad.size:
        sent = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
        raise ValueError(
            f"{name}[{sent}] holds word id {int(flat[bad[0]])} outside [{min_id}, {vocab_size})"
            + (" (pad/<s>/</s> are reserved: sentences carry no boundary tokens)" if min_id > 1 else "")
        )
    return flat, lengths


def _xlogx(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return np.where(x > 0, x * np.log(np.maximum(x, 1.0)), 0.0)


def _bigram_counts(flat: np.ndarray, lengths: np.ndarray, vocab_size: int) -> tuple[np.ndarray, ...]:
    """Distinct bigrams of ``<s> w_1 .. w_n </s>`` over all sentences: ``(prev, next, count)``
    int64 arrays sorted by (prev, next)."""
    size = lengths + 2
    starts = np.cumsum(size) - size
    seq = np.empty(int(size.sum()), dtype=np.int64)
    words = np.ones(seq.size, dtype=bool)
    words[starts] = False
    words[starts + lengths + 1] = False
    seq[starts], seq[starts + lengths + 1], seq[words] = BOS_ID, EOS_ID, flat
    prev, nxt = seq[:-1], seq[1:]
    keep = prev != EOS_ID  # drop the pairs that straddle two sentences
    keys, counts = np.unique(prev[keep] * vocab_size + nxt[keep], return_counts=True)
    return keys // vocab_size, keys % vocab_size, counts.astype(np.int64)


def _log_likelihood(prev: np.ndarray, nxt: np.ndarray, cnt: np.ndarray, w2c: np.ndarray, k: int) -> float:
    m = np.zeros((k, k), dtype=np.int64)
    np.add.at(m, (w2c[prev], w2c[nxt]), cnt)
    n_r = np.bincount(nxt, weights=cnt, minlength=w2c.size)
    return float(_xlogx(m).sum() - _xlogx(m.sum(1)).sum() - _xlogx(m.sum(0)).sum() + _xlogx(n_r).sum())


@dataclass
class WordClasses:
    """A deterministic word -> class map (monograph §3.3.1, Tab. 3.2, clustering of [96]).

    ``word_to_class`` (V,) int64 maps every word id to a class id in ``[0, C + 3)``: ``<pad>``,
    ``<s>``, ``</s>`` to their fixed classes 0, 1, 2 and every other id to a word class
    ``3 .. C + 2``. ``log_likelihood`` is the clustering's objective history (entry 0: initial
    assignment, then one per exchange iteration); empty when not produced by clustering.
    """

    word_to_class: Tensor
    num_classes: int
    log_likelihood: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        w2c = self.word_to_class
        if not isinstance(w2c, Tensor):
            w2c = torch.as_tensor(w2c)
        if w2c.dim() != 1 or w2c.dtype.is_floating_point or w2c.dtype == torch.bool:
            raise TypeError(f"word_to_class must be a 1-D integer tensor, got {w2c.dtype} {tuple(w2c.shape)}")
        if not isinstance(self.num_classes, numbers.Integral) or self.num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {self.num_classes!r}")
        if w2c.numel() <= UNK_ID:
            raise ValueError(f"word_to_class must cover the 4 special ids at least, got {w2c.numel()} entries")
        w2c = w2c.long().cpu()
        fixed = w2c[: NUM_FIXED_CLASSES].tolist()
        if fixed != [PAD_ID, BOS_ID, EOS_ID]:
            raise ValueError(f"<pad>, <s>, </s> must map to their fixed classes [0, 1, 2], got {fixed}")
        rest = w2c[NUM_FIXED_CLASSES:]
        if bool(((rest < NUM_FIXED_CLASSES) | (rest >= self.class_vocab_size)).any()):
            raise ValueError(
                f"word classes must lie in [{NUM_FIXED_CLASSES}, {self.class_vocab_size}) for "
                f"num_classes={self.num_classes}, got min {int(rest.min())}, max {int(rest.max())}"
            )
        self.word_to_class = w2c
        self.num_classes = int(self.num_classes)
        self.log_likelihood = [float(v) for v in self.log_likelihood]

    @property
    def vocab_size(self) -> int:
        return int(self.word_to_class.numel())

    @property
    def class_vocab_size(self) -> int:
        """Number of class ids K = C + 3 (the fixed classes included)."""
        return self.num_classes + NUM_FIXED_CLASSES

    def members(self, class_id: int) -> list[int]:
        """Word ids of class ``class_id``, ascending."""
        if not 0 <= class_id < self.class_vocab_size:
            raise ValueError(f"class id {class_id} outside [0, {self.class_vocab_size})")
        return (self.word_to_class == class_id).nonzero().squeeze(1).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "word_to_class": self.word_to_class.tolist(),
                "log_likelihood": list(self.log_likelihood)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordClasses:
        missing = {"num_classes", "word_to_class"} - set(data)
        if missing:
            raise ValueError(f"word-class dict lacks {sorted(missing)}")
        return cls(torch.tensor(data["word_to_class"], dtype=torch.long), int(data["num_classes"]),
                   list(data.get("log_likelihood", [])))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write JSON atomically."""
        atomic_write_text(path, json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> WordClasses:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


class _Exchange:
    """Sparse counts and the incremental exchange move (internal; tested directly)."""

    def __init__(self, prev: np.ndarray, nxt: np.ndarray, cnt: np.ndarray, w2c: np.ndarray, k: int) -> None:
        v = w2c.size
        self.k, self.w2c = k, w2c.copy()
        loop = prev == nxt
        self.s = np.zeros(v, dtype=np.int64)
        self.s[prev[loop]] = cnt[loop]
        p, n, c = prev[~loop], nxt[~loop], cnt[~loop]  # sorted by prev already
        self.succ_ptr = np.concatenate([[0], np.cumsum(np.bincount(p, minlength=v))])
        self.succ_w, self.succ_c = n, c
        order = np.argsort(n, kind="stable")
        self.pred_ptr = np.concatenate([[0], np.cumsum(np.bincount(n, minlength=v))])
        self.pred_w, self.pred_c = p[order], c[order]
        self.n_l = np.bincount(prev, weights=cnt, minlength=v).astype(np.int64)
        self.n_r = np.bincount(nxt, weights=cnt, minlength=v).astype(np.int64)
        self.h = _xlogx(np.arange(int(cnt.sum()) + 1))
        self.m = np.zeros((k, k), dtype=np.int64)
        np.add.at(self.m, (w2c[prev], w2c[nxt]), cnt)
        self.row, self.col = self.m.sum(1), self.m.sum(0)
        self.const = float(_xlogx(self.n_r).sum())
        self.f = float(_xlogx(self.m).sum() - _xlogx(self.row).sum() - _xlogx(self.col).sum())
        self.tol = 1e-10 * float(self.h[-1]) + 1e-12

    def objective(self) -> float:
        return self.f + self.const

    def _neighbours(self, w: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.succ_ptr[w], self.succ_ptr[w + 1]
        r = np.bincount(self.w2c[self.succ_w[a:b]], weights=self.succ_c[a:b], minlength=self.k)
        a, b = self.pred_ptr[w], self.pred_ptr[w + 1]
        left = np.bincount(self.w2c[self.pred_w[a:b]], weights=self.pred_c[a:b], minlength=self.k)
        return r.astype(np.int64), left.astype(np.int64)

    def _shift(self, w: int, c: int, r: np.ndarray, left: np.ndarray, sign: int) -> None:
        self.m[c, :] += sign * r
        self.m[:, c] += sign * left
        self.m[c, c] += sign * self.s[w]
        self.row[c] += sign * self.n_l[w]
        self.col[c] += sign * self.n_r[w]

    def _gains(self, w: int, r: np.ndarray, left: np.ndarray) -> np.ndarray:
        """Objective change of adding (removed) word w to each word class 3..K-1."""
        h, m, f0 = self.h, self.m, NUM_FIXED_CLASSES
        g = np.zeros(self.k - f0)
        jr, il = np.flatnonzero(r), np.flatnonzero(left)
        if jr.size:
            a = m[f0:, jr]
            g += (h[a + r[jr]] - h[a]).sum(1)
        if il.size:
            b = m[il, f0:]
            g += (h[b + left[il, None]] - h[b]).sum(0)
        d, rk, lk = np.diagonal(m)[f0:], r[f0:], left[f0:]
        g += h[d + rk + lk + self.s[w]] - h[d + rk] - h[d + lk] + h[d]  # cell (k, k) gets all three
        rows, cols = self.row[f0:], self.col[f0:]
        g -= h[rows + self.n_l[w]] - h[rows] + h[cols + self.n_r[w]] - h[cols]
        return g

    def move(self, w: int, target: int | None = None) -> bool:
        """Move w to ``target`` (or to its best class when None); True when its class changed."""
        r, left = self._neighbours(w)
        old = int(self.w2c[w])
        self._shift(w, old, r, left, -1)
        g = self._gains(w, r, left)
        stay = g[old - NUM_FIXED_CLASSES]
        if target is None:
            best = int(np.argmax(g))
            target = best + NUM_FIXED_CLASSES if g[best] > stay + self.tol else old
        self._shift(w, target, r, left, 1)
        self.f += float(g[target - NUM_FIXED_CLASSES] - stay)
        self.w2c[w] = target
        return target != old


def _initial_assignment(counts: np.ndarray, num_classes: int) -> np.ndarray:
    """Frequency-ordered round-robin: the k-th most frequent ordinary word (ties by id) gets
    class 3 + k mod C; <pad>, <s>, </s> keep their fixed classes 0, 1, 2."""
    w2c = np.arange(counts.size, dtype=np.int64)
    ids = np.arange(NUM_FIXED_CLASSES, counts.size)
    order = ids[np.lexsort((ids, -counts[NUM_FIXED_CLASSES:]))]
    w2c[order] = NUM_FIXED_CLASSES + np.arange(order.size) % num_classes
    return w2c


def _check_args(vocab_size: int, num_classes: int) -> None:
    if not isinstance(vocab_size, numbers.Integral) or vocab_size <= UNK_ID:
        raise ValueError(f"vocab_size must be an int > {UNK_ID} (4 specials + words), got {vocab_size!r}")
    if not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")


def class_bigram_log_likelihood(sentences: Iterable[Sequence[int]], classes: WordClasses) -> float:
    """LL of the text under the ML class-bigram model of ``classes`` (module docstring), recomputed
    from scratch; sentences are word-id lists without boundary tokens."""
    flat, lengths = flatten_sentences(sentences, classes.vocab_size, min_id=UNK_ID)
    prev, nxt, cnt = _bigram_counts(flat, lengths, classes.vocab_size)
    return _log_likelihood(prev, nxt, cnt, classes.word_to_class.numpy(), classes.class_vocab_size)


def exchange_clustering(
    sentences: Iterable[Sequence[int]],
    vocab_size: int,
    num_classes: int,
    *,
    max_iterations: int = 20,
    seed: int | None = None,
    progress: bool = False,
) -> WordClasses:
    """Cluster words into ``num_classes`` classes by the exchange algorithm ([96] of monograph
    §3.3.1, Tab. 3.2).

    ``sentences`` are word-id lists (ids in ``[3, vocab_size)``: no pad and no boundary tokens;
    ``<s>``/``</s>`` are added here with fixed classes). Starts from the frequency-ordered
    round-robin assignment and, per iteration, moves every word seen in the text (in frequency
    order, or in an order shuffled with ``seed`` when given) to the class maximising the
    class-bigram log-likelihood; stops after an iteration without moves or after
    ``max_iterations``. The objective never decreases; its history is ``log_likelihood``.
    Deterministic for given inputs and ``seed``.
    """
    _check_args(vocab_size, num_classes)
    if not isinstance(max_iterations, numbers.Integral) or max_iterations < 0:
        raise ValueError(f"max_iterations must be an int >= 0, got {max_iterations!r}")
    flat, lengths = flatten_sentences(sentences, vocab_size, min_id=UNK_ID)
    prev, nxt, cnt = _bigram_counts(flat, lengths, vocab_size)
    counts = np.bincount(nxt, weights=cnt, minlength=vocab_size).astype(np.int64)
    w2c = _initial_assignment(counts, num_classes)
    ex = _Exchange(prev, nxt, cnt, w2c, num_classes + NUM_FIXED_CLASSES)
    ids = np.arange(NUM_FIXED_CLASSES, vocab_size)
    active = ids[np.lexsort((ids, -counts[NUM_FIXED_CLASSES:]))]
    active = active[counts[active] > 0].tolist()
    rng = np.random.default_rng(seed) if seed is not None else None
    history = [ex.objective()]
    bar = tqdm(range(max_iterations), desc="exchange", disable=not progress)
    for _ in bar:
        order = active if rng is None else [active[i] for i in rng.permutation(len(active))]
        moves = sum(ex.move(w) for w in order)
        history.append(ex.objective())
        bar.set_postfix(moves=moves, ll=f"{history[-1]:.1f}")
        if moves == 0:
            break
    bar.close()
    return WordClasses(torch.from_numpy(ex.w2c.copy()), num_classes, history)
