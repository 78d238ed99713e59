"""Discrete energy-based LMs: the linear energy U_λ(x) = λᵀ f(x) over n-gram-like features.

Monograph §3.3.1 ("Linear energy using discrete features", Eq. 3.9, Tab. 3.2), following the
TRF LMs of [188], [189]: p(x) ∝ exp(U_λ(x)); f_i(x) counts the positions k where feature i
fires (position- and dimension-independent); only features observed in training are used.

Notation: B batch, T padded length, V word vocabulary size, K = C + 3 class ids
(:mod:`seqebm.data.word_classes`), d number of features, N firing positions. At the current
position k, w_o / c_o is the word / class at offset o (w0 the current word, w-1 the previous).

Feature types (Tab. 3.2; ``order`` n, default 4, bounds the local types):

* ``w`` / ``c``: word / class n-grams (w-m+1 .. w0) for m = 1 .. n.
* ``ws`` / ``cs``: skip-grams (w-3 w0), (w-3 w-2 w0), (w-3 w-1 w0), (w-2 w0), kept when their
  span (−min offset + 1) is at most n.
* ``wsh`` / ``csh``: higher-order skips (w-4 w0), (w-5 w0).
* ``cpw``: class-predicts-word (c-m .. c-1 w0) for m = 1 .. n − 1.
* ``tied``: tied long skip-bigrams (w-9:-6 w0) and (c-9:-6 c0): one parameter per pair
  (x_{k−δ}, x_k), shared over δ = 6 .. 9 (its count sums over δ); ``tied_w`` / ``tied_c`` pick
  one stream.

Sentence boundary: rows are left-aligned word ids without boundary tokens. With ``bos=True``
(default) a single ``<s>`` (word id 1, class 1) sits at position −1 as context: a pattern fires
at a real position k when all its components lie in [−1, k], so (w-1 w0) at k = 0 is (<s>, w0)
and (w-2 w-1 w0) first fires at k = 1 as (<s>, w0, w1). ``<s>`` is never a current word. No
``</s>`` is added: a GN-ELM appends the EOS id 2 itself (it is then an ordinary token with the
fixed class 2), and should append it to the training sentences given to
:meth:`DiscreteFeatures.build` too. ``<pad>`` (id 0) may not appear at real positions;
``<unk>`` is an ordinary id.

Key encoding (vectorised torch, memory O(#features)): per pattern, a trie of sorted int64
tables. Level 1 holds the ids of the first component; level j the keys
``index in table j−1`` · base_j + id_j (base V for words, K for classes). A batch is looked up
with ``torch.searchsorted`` level by level; feature index = pattern offset + index in the last
table. Keys stay below 2^63 for any vocabulary (< 2^31 ids) and corpus (< 2^32 firings).
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save as st_save
from torch import Tensor, nn

from seqebm.data.tokenizers import BOS_ID, PAD_ID
from seqebm.data.word_classes import WordClasses, flatten_sentences
from seqebm.io import atomic_write_bytes

__all__ = [
    "FEATURE_TYPES", "CLASS_FEATURE_TYPES", "DiscreteFeatures", "DiscretePotential", "FeaturePattern",
    "feature_patterns",
]

#: All feature types, in the canonical order of feature indices (Tab. 3.2 plus tied_w/tied_c).
FEATURE_TYPES = ("w", "c", "ws", "cs", "wsh", "csh", "cpw", "tied", "tied_w", "tied_c")
#: Types that need a word -> class map.
CLASS_FEATURE_TYPES = frozenset({"c", "cs", "csh", "cpw", "tied", "tied_c"})
#: Default with classes: the best set of [189] ("w+c+ws+cs+wsh+csh+tied"); without: its word part.
DEFAULT_TYPES = ("w", "c", "ws", "cs", "wsh", "csh", "tied")
DEFAULT_WORD_TYPES = ("w", "ws", "wsh", "tied_w")
MAX_ORDER = 10
_SKIPS = ((-3, 0), (-3, -2, 0), (-3, -1, 0), (-2, 0))
_FORMAT = "seqebm.elm_discrete/1"


@dataclass(frozen=True)
class FeaturePattern:
    """One feature template: component streams ("w"/"c") with offsets per variant (several
    variants share the parameters: the tied distances)."""

    type: str
    streams: tuple[str, ...]
    variants: tuple[tuple[int, ...], ...]

    @property
    def name(self) -> str:
        """E.g. ``"w-2w-1w0"``, ``"c-1w0"``, ``"w-9:-6w0"``."""
        offs = list(zip(*self.variants))
        return "".join(f"{s}{o[0]}" if len(set(o)) == 1 else f"{s}{min(o)}:{max(o)}"
                       for s, o in zip(self.streams, offs))


def _pat(t: str, streams: str | tuple[str, ...], *variants: tuple[int, ...]) -> FeaturePattern:
    n = len(variants[0])
    return FeaturePattern(t, (streams,) * n if isinstance(streams, str) else streams, tuple(variants))


def feature_patterns(feature_types: Sequence[str], order: int) -> tuple[FeaturePattern, ...]:
    """The patterns of ``feature_types`` (canonical order, see :data:`FEATURE_TYPES`)."""
    if isinstance(feature_types, str) or not isinstance(feature_types, Sequence):
        raise TypeError(f"feature_types must be a sequence of type names, got {feature_types!r}")
    unknown = sorted(set(feature_types) - set(FEATURE_TYPES))
    if unknown:
        raise ValueError(f"unknown feature types {unknown}; valid types: {list(FEATURE_TYPES)}")
    if not feature_types:
        raise ValueError("feature_types must name at least one type")
    if not isinstance(order, numbers.Integral) or not 1 <= order <= MAX_ORDER:
        raise ValueError(f"order must be an int in [1, {MAX_ORDER}], got {order!r}")
    chosen, out = set(feature_types), []
    if "tied" in chosen:
        chosen |= {"tied_w", "tied_c"}
    for s in "wc":
        if s in chosen:
            out += [_pat(s, s, tuple(range(1 - m, 1))) for m in range(1, order + 1)]
    for s in "wc":
        if s + "s" in chosen:
            out += [_pat(s + "s", s, o) for o in _SKIPS if 1 - o[0] <= order]
    for s in "wc":
        if s + "sh" in chosen:
            out += [_pat(s + "sh", s, (-4, 0)), _pat(s + "sh", s, (-5, 0))]
    if "cpw" in chosen:
        out += [_pat("cpw", ("c",) * m + ("w",), tuple(range(-m, 1))) for m in range(1, order)]
    for s in "wc":
        if "tied_" + s in chosen:
            out.append(_pat("tied_" + s, s, *[(-d, 0) for d in range(6, 10)]))
    return tuple(out)


def _search(table: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Positions of ``keys`` in the sorted ``table`` and whether they are there."""
    if table.numel() == 0:
        return torch.zeros_like(keys), torch.zeros_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(table, keys).clamp_(max=table.numel() - 1)
    return pos, table[pos] == keys


class DiscreteFeatures:
    """The feature extractor f(x) of Eq. 3.9 (monograph §3.3.1, Tab. 3.2): feature tables built
    from training sentences (:meth:`build`), vectorised sparse extraction (:meth:`extract`).

    Construct with :meth:`build` (or :meth:`load`); the constructor takes ready tables.
    """

    def __init__(self, vocab_size: int, *, feature_types: Sequence[str] | None = None, order: int = 4,
                 classes: WordClasses | None = None, bos: bool = True,
                 tables: Sequence[Sequence[Tensor]] | None = None) -> None:
        if not isinstance(vocab_size, numbers.Integral) or not BOS_ID < vocab_size < 2**31:
            raise ValueError(f"vocab_size must be an int in [2, 2^31), got {vocab_size!r}")
        if classes is not None and not isinstance(classes, WordClasses):
            raise TypeError(f"classes must be a WordClasses, got {type(classes).__name__}")
        if feature_types is None:
            feature_types = DEFAULT_TYPES if classes is not None else DEFAULT_WORD_TYPES
        self.patterns = feature_patterns(feature_types, order)
        needs = sorted(set(feature_types) & CLASS_FEATURE_TYPES)
        if needs and classes is None:
            raise ValueError(f"feature types {needs} need word classes: pass classes=WordClasses "
                             "(seqebm.data.word_classes.exchange_clustering) or use word types only")
        if classes is not None and classes.vocab_size != vocab_size:
            raise ValueError(f"classes cover {classes.vocab_size} word ids, the vocabulary has {vocab_size}")
        self.vocab_size, self.order, self.bos = int(vocab_size), int(order), bool(bos)
        self.feature_types = tuple(t for t in FEATURE_TYPES if t in set(feature_types))
        self.classes = classes
        w2c = classes.word_to_class if classes is not None else torch.zeros(vocab_size, dtype=torch.long)
        self._w2c = {torch.device("cpu"): w2c}
        self.bases = [tuple(self.vocab_size if s == "w" else self.class_vocab_size for s in p.streams)
                      for p in self.patterns]
        if tables is None:
            tables = [[torch.zeros(0, dtype=torch.long)] * len(p.streams) for p in self.patterns]
        if len(tables) != len(self.patterns) or any(len(t) != len(p.streams) for t, p in zip(tables, self.patterns)):
            raise ValueError("tables do not match the feature patterns (one sorted table per component)")
        self.tables = [[t.long().cpu().contiguous() for t in ts] for ts in tables]
        self._dev_tables = {torch.device("cpu"): self.tables}
        sizes = torch.tensor([0] + [ts[-1].numel() for ts in self.tables])
        self.offsets = sizes.cumsum(0)  # (P + 1,) feature index range of each pattern

    @property
    def class_vocab_size(self) -> int:
        return self.classes.class_vocab_size if self.classes is not None else 1

    @property
    def num_features(self) -> int:
        return int(self.offsets[-1])

    def __repr__(self) -> str:
        return (f"DiscreteFeatures({self.num_features} features, types={list(self.feature_types)}, "
                f"order={self.order}, V={self.vocab_size}, bos={self.bos})")

    # ------------------------------------------------------------------------------- layout
    def _on(self, device: torch.device) -> tuple[list[list[Tensor]], Tensor]:
        if device not in self._dev_tables:
            self._dev_tables[device] = [[t.to(device) for t in ts] for ts in self.tables]
            self._w2c[device] = self._w2c[torch.device("cpu")].to(device)
        return self._dev_tables[device], self._w2c[device]

    def _layout(self, flat: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Sentences laid out flat as [<s>] w_1 .. w_n: ``(word stream, class stream, index of each
        real token in the streams (N,), its sentence (N,), its position k in the sentence (N,))``."""
        dev = flat.device
        sent = torch.repeat_interleave(torch.arange(lengths.numel(), device=dev), lengths)
        starts = lengths.cumsum(0) - lengths
        pos = torch.arange(flat.numel(), device=dev) - starts[sent]
        if self.bos:
            cur = torch.arange(flat.numel(), device=dev) + sent + 1
            words = torch.full((flat.numel() + lengths.numel(),), BOS_ID, dtype=torch.long, device=dev)
            words[cur] = flat
        else:
            cur, words = torch.arange(flat.numel(), device=dev), flat
        return words, self._on(dev)[1][words], cur, sent, pos

    def _firings(self, layout: tuple[Tensor, ...], p: FeaturePattern) -> tuple[list[Tensor], Tensor]:
        """Component ids (one (N_p,) tensor per component) and sentence of every firing of p."""
        words, cls, cur, sent, pos = layout
        cols: list[list[Tensor]] = [[] for _ in p.streams]
        rows = []
        for offs in p.variants:
            ok = pos >= -min(offs) - int(self.bos)
            at = cur[ok]
            rows.append(sent[ok])
            for j, (s, o) in enumerate(zip(p.streams, offs)):
                cols[j].append((words if s == "w" else cls)[at + o])
        return [torch.cat(c) for c in cols], torch.cat(rows)

    # -------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, sentences: Iterable[Sequence[int]], vocab_size: int, *,
              feature_types: Sequence[str] | None = None, order: int = 4,
              classes: WordClasses | None = None, min_count: int = 1, bos: bool = True) -> DiscreteFeatures:
        """Keep every feature firing at least ``min_count`` times in ``sentences`` (word-id lists
        without boundary tokens; ids in ``[1, vocab_size)``). ``feature_types`` default: the
        [189] set "w+c+ws+cs+wsh+csh+tied" with ``classes``, ("w", "ws", "wsh", "tied_w")
        without."""
        if not isinstance(min_count, numbers.Integral) or min_count < 1:
            raise ValueError(f"min_count must be an int >= 1, got {min_count!r}")
        empty = cls(vocab_size, feature_types=feature_types, order=order, classes=classes, bos=bos)
        flat, lengths = flatten_sentences(sentences, vocab_size, min_id=PAD_ID + 1)
        layout = empty._layout(torch.from_numpy(flat), torch.from_numpy(lengths))
        tables = [_build_trie(empty._firings(layout, p)[0], b, int(min_count))
                  for p, b in zip(empty.patterns, empty.bases)]
        return cls(vocab_size, feature_types=empty.feature_types, order=order, classes=classes, bos=bos,
                   tables=tables)

    # ------------------------------------------------------------------------------ extract
    def check_batch(self, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """Validate ``tokens (B, T)`` / ``mask (B, T)`` (bool, right padding; None = all real)
        and return the mask. Raises ``TypeError``/``ValueError`` naming the offending values."""
        if not isinstance(tokens, Tensor):
            raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (B, T), got {tuple(tokens.shape)}")
        if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab_size):
            raise ValueError(f"tokens contain ids outside [0, {self.vocab_size}): min={int(tokens.min())}, "
                             f"max={int(tokens.max())}")
        if mask is None:
            mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.shape != tokens.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True at real tokens), got {mask.dtype}")
        mask = mask.to(tokens.device)
        holes = mask[:, 1:] & ~mask[:, :-1]
        if bool(holes.any()):
            bad = int(holes.any(1).nonzero()[0, 0])
            raise ValueError(f"mask must be right padding (True then False), row {bad} is not")
        pads = mask & (tokens == PAD_ID)
        if bool(pads.any()):
            r, c = pads.nonzero()[0].tolist()
            raise ValueError(f"pad id {PAD_ID} at the real position ({r}, {c}): mask it out")
        return mask

    def extract_pairs(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Every firing as ``(row (M,), feature index (M,))`` LongTensors, repeats uncoalesced;
        firings of features unseen in training are dropped (they contribute 0)."""
        mask = self.check_batch(tokens, mask)
        lengths = mask.sum(1)
        layout = self._layout(tokens[mask].long(), lengths)
        tables = self._on(tokens.device)[0]
        rows, feats = [], []
        for i, (p, b) in enumerate(zip(self.patterns, self.bases)):
            cols, r = self._firings(layout, p)
            idx, pos = _lookup(tables[i], b, cols)
            rows.append(r[idx])
            feats.append(pos + int(self.offsets[i]))
        if not rows:
            return (torch.zeros(0, dtype=torch.long, device=tokens.device),) * 2
        return torch.cat(rows), torch.cat(feats)

    def extract(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """f(x) per row as a coalesced sparse COO float32 tensor ``(B, d)`` of counts."""
        rows, feats = self.extract_pairs(tokens, mask)
        vals = torch.ones(rows.numel(), dtype=torch.float32, device=tokens.device)
        return torch.sparse_coo_tensor(torch.stack([rows, feats]), vals, (tokens.shape[0], self.num_features),
                                       check_invariants=False).coalesce()

    def dense(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """f(x) per row as a dense float32 ``(B, d)`` matrix (tests, tiny models)."""
        rows, feats = self.extract_pairs(tokens, mask)
        out = torch.zeros(tokens.shape[0], self.num_features, device=tokens.device)
        return out.index_put_((rows, feats), torch.ones_like(rows, dtype=out.dtype), accumulate=True)

    def expected_counts(self, tokens: Tensor, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        """Σ_b weights[b] f(x_b) as a dense ``(d,)`` vector (weights default 1/B): E_data[f] or a
        (self-normalised) E_model[f] estimate for the gradient E_data[f] − E_model[f]."""
        rows, feats = self.extract_pairs(tokens, mask)
        b = tokens.shape[0]
        if weights is None:
            weights = torch.full((b,), 1.0 / max(b, 1), device=tokens.device)
        if not isinstance(weights, Tensor) or weights.shape != (b,):
            raise ValueError(f"weights must be a ({b},) tensor, got {getattr(weights, 'shape', weights)!r}")
        out = torch.zeros(self.num_features, dtype=weights.dtype, device=tokens.device)
        return out.index_add_(0, feats, weights[rows])

    # ---------------------------------------------------------------------------- introspect
    def feature_key(self, index: int) -> tuple[str, tuple[int, ...]]:
        """Feature index -> ``(pattern name, component ids)``, e.g. ``("w-1w0", (1, 7))``."""
        if not 0 <= index < self.num_features:
            raise ValueError(f"feature index {index} outside [0, {self.num_features})")
        i = int(torch.searchsorted(self.offsets, torch.tensor(index), right=True)) - 1
        key, ids = int(self.tables[i][-1][index - int(self.offsets[i])]), []
        for j in range(len(self.bases[i]) - 1, 0, -1):
            ids.append(key % self.bases[i][j])
            key = int(self.tables[i][j - 1][key // self.bases[i][j]])
        return self.patterns[i].name, tuple([key] + ids[::-1])

    def feature_index(self, name: str, ids: Sequence[int]) -> int | None:
        """``(pattern name, component ids)`` -> feature index, or None when not a feature."""
        names = [p.name for p in self.patterns]
        if name not in names:
            raise ValueError(f"no pattern {name!r}; patterns: {names}")
        i = names.index(name)
        if len(ids) != len(self.bases[i]):
            raise ValueError(f"pattern {name!r} has {len(self.bases[i])} components, got ids {tuple(ids)}")
        idx, pos = _lookup(self.tables[i], self.bases[i], [torch.tensor([int(v)]) for v in ids])
        return int(pos[0]) + int(self.offsets[i]) if idx.numel() else None

    def counts_by_key(self, tokens: Tensor, mask: Tensor | None = None) -> list[dict[tuple[str, tuple[int, ...]], int]]:
        """Per row, ``{(pattern name, ids): count}`` of the features that fire (slow; debugging)."""
        c = self.extract(tokens, mask)
        out: list[dict[tuple[str, tuple[int, ...]], int]] = [{} for _ in range(tokens.shape[0])]
        for (r, f), v in zip(c.indices().t().tolist(), c.values().tolist()):
            out[r][self.feature_key(f)] = int(v)
        return out

    # ------------------------------------------------------------------------------ save/load
    def _state(self) -> tuple[dict[str, Tensor], dict[str, str]]:
        tensors = {f"table.{i}.{j}": t for i, ts in enumerate(self.tables) for j, t in enumerate(ts)}
        if self.classes is not None:
            tensors["word_to_class"] = self.classes.word_to_class.contiguous()
        cfg = {"format": _FORMAT, "vocab_size": self.vocab_size, "feature_types": list(self.feature_types),
               "order": self.order, "bos": self.bos,
               "num_classes": self.classes.num_classes if self.classes is not None else None}
        return tensors, {"config": json.dumps(cfg)}

    @classmethod
    def _from_state(cls, tensors: dict[str, Tensor], meta: dict[str, str] | None) -> DiscreteFeatures:
        try:
            cfg = json.loads((meta or {})["config"])
        except (KeyError, ValueError) as e:
            raise ValueError("not a seqebm discrete-ELM file (no config metadata)") from e
        if cfg.get("format") != _FORMAT:
            raise ValueError(f"unsupported discrete-ELM format {cfg.get('format')!r}, expected {_FORMAT!r}")
        classes = None
        if cfg["num_classes"] is not None:
            classes = WordClasses(tensors["word_to_class"], cfg["num_classes"])
        pats = feature_patterns(cfg["feature_types"], cfg["order"])
        tables = [[tensors[f"table.{i}.{j}"] for j in range(len(p.streams))] for i, p in enumerate(pats)]
        return cls(cfg["vocab_size"], feature_types=cfg["feature_types"], order=cfg["order"], classes=classes,
                   bos=cfg["bos"], tables=tables)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the feature tables (and word classes) as safetensors, atomically."""
        tensors, meta = self._state()
        atomic_write_bytes(path, st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DiscreteFeatures:
        return cls._from_state(*_read(path))


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, Tensor], dict[str, str] | None]:
    with safe_open(os.fspath(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _lookup(tables: Sequence[Tensor], bases: Sequence[int], cols: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Trie lookup: ``(indices of the firings that are features, their index in the last table)``."""
    pos, found = _search(tables[0], cols[0])
    idx = found.nonzero().squeeze(1)
    pos = pos[idx]
    for j in range(1, len(cols)):
        pos, found = _search(tables[j], pos * bases[j] + cols[j][idx])
        idx, pos = idx[found], pos[found]
    return idx, pos


def _build_trie(cols: Sequence[Tensor], bases: Sequence[int], min_count: int) -> list[Tensor]:
    """Sorted key tables of every trie level, keeping full keys seen >= min_count times and only
    the prefixes they use."""
    tables, inv = [], torch.zeros(0, dtype=torch.long)
    for j, col in enumerate(cols):
        key = col if j == 0 else inv * bases[j] + col
        table, inv, cnt = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
        tables.append(table)
    tables[-1] = tables[-1][cnt >= min_count]
    for j in range(len(tables) - 1, 0, -1):  # prune prefixes, re-key the children
        parent = tables[j] // bases[j]
        used = torch.unique(parent, sorted=True)
        tables[j] = torch.searchsorted(used, parent) * bases[j] + tables[j] % bases[j]
        tables[j - 1] = tables[j - 1][used]
    return tables


class DiscretePotential(nn.Module):
    """U_λ(x) = λᵀ f(x) (monograph §3.3.1, Eq. 3.9, Tab. 3.2): ``forward(tokens (B, T), mask
    (B, T)) -> (B,)``, computed sparsely; λ (``weight``, size d) starts at 0.

    A TRF/GN-ELM uses p(x) ∝ exp(U_λ(x)); the log-likelihood gradient is E_data[f] − E_model[f],
    see :meth:`counts` and :meth:`expected_counts`.
    """

    def __init__(self, features: DiscreteFeatures) -> None:
        super().__init__()
        if not isinstance(features, DiscreteFeatures):
            raise TypeError(f"features must be a DiscreteFeatures, got {type(features).__name__}")
        self.features = features
        self.weight = nn.Parameter(torch.zeros(features.num_features))

    @property
    def num_features(self) -> int:
        return self.features.num_features

    def extra_repr(self) -> str:
        return repr(self.features)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        rows, feats = self.features.extract_pairs(tokens, mask)
        out = torch.zeros(tokens.shape[0], dtype=self.weight.dtype, device=self.weight.device)
        return out.index_add(0, rows.to(out.device), self.weight[feats.to(out.device)])

    def dense_forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """The same U via the dense (B, d) feature matrix (reference path for tests)."""
        return self.features.dense(tokens, mask).to(self.weight) @ self.weight

    def counts(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """f(x) as a sparse COO ``(B, d)`` tensor."""
        return self.features.extract(tokens, mask)

    def expected_counts(self, tokens: Tensor, mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
        """Σ_b weights[b] f(x_b), dense ``(d,)`` (see :meth:`DiscreteFeatures.expected_counts`)."""
        return self.features.expected_counts(tokens, mask, weights)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Feature tables, classes and λ in one safetensors file, written atomically."""
        tensors, meta = self.features._state()
        tensors["weight"] = self.weight.detach().cpu().contiguous()
        atomic_write_bytes(path, st_save(tensors, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DiscretePotential:
        tensors, meta = _read(path)
        features = DiscreteFeatures._from_state(tensors, meta)
        weight = tensors.get("weight")
        if weight is None:
            raise ValueError(f"{path} holds no weight (a DiscreteFeatures file?)")
        if weight.shape != (features.num_features,):
            raise ValueError(f"weight {tuple(weight.shape)} does not match {features.num_features} features")
        pot = cls(features)
        with torch.no_grad():
            pot.weight.copy_(weight)
        return pot
