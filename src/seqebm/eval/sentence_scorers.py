"""Sentence-level language-model scorers for n-best rescoring (issue #10).

A scorer maps N sentences to their whole-sentence log-scores, an (N,) tensor, higher = better
(:class:`SentenceScorer`). Energy-based LMs (TRF, GN-ELM, Electric...) plug in with their
negative energy.

* :class:`ARLMScorer`: log p(sentence) under any seqebm autoregressive LM (batched, BOS/EOS).
* :class:`NGramSentenceScorer`: interpolated Kneser–Ney word n-gram, fitted on text, saved as JSON.
* :class:`TableScorer`: precomputed scores.
* :class:`ScorerSpec`: the flat, validated choice of scorer that ``seqebm rescore`` builds.

The rescoring that uses them is :mod:`seqebm.eval.rescoring`.

Notation: N sentences given to a scorer, B a padded batch of them, T tokens.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from seqebm.data.tokenizers import BOS_ID, EOS_ID, PAD_ID
from seqebm.io import atomic_write_text

__all__ = ["ARLMScorer", "NGramSentenceScorer", "ScorerSpec", "SentenceScorer", "TableScorer"]


@runtime_checkable
class SentenceScorer(Protocol):
    """Anything that gives whole-sentence log-scores: ``scorer(texts)`` -> (N,) tensor, higher = better.

    A normalised LM returns log p(sentence) (including the end of sentence); an energy-based LM
    may return its negative energy -E(sentence): the tuned weight λ absorbs the scale, and a
    constant log-partition term does not change which hypothesis wins.
    """

    def __call__(self, texts: Sequence[str]) -> Tensor:  # N strings -> (N,)
        ...


def _check_texts(texts: Sequence[str], who: str) -> list[str]:
    if isinstance(texts, (str, bytes)):
        raise TypeError(f"{who} expects a list of sentences, not a single {type(texts).__name__}")
    out = list(texts)
    for t in out:
        if not isinstance(t, str):
            raise TypeError(f"{who} expects strings, got {type(t).__name__}: {t!r}")
    return out


class TableScorer:
    """Precomputed scores: ``table[text]`` (e.g. from an external LM, or for tests).

    A text missing from the table is a ``ValueError`` unless ``default`` is given.
    """

    def __init__(self, table: Mapping[str, float], *, default: float | None = None) -> None:
        self.table = {str(k): float(v) for k, v in table.items()}
        bad = [k for k, v in self.table.items() if not math.isfinite(v)]
        if bad or (default is not None and not math.isfinite(default)):
            raise ValueError(f"TableScorer scores must be finite; got a non-finite one for {bad[:3] or 'default'}")
        self.default = default

    def __call__(self, texts: Sequence[str]) -> Tensor:
        out = []
        for t in _check_texts(texts, "TableScorer"):
            v = self.table.get(t, self.default)
            if v is None:
                raise ValueError(f"TableScorer has no score for {t!r} (and no default)")
            out.append(v)
        return torch.tensor(out, dtype=torch.float64)

    def __repr__(self) -> str:
        return f"TableScorer({len(self.table)} sentences)"


class ARLMScorer:
    """log p(sentence) under a seqebm autoregressive LM (:class:`seqebm.models.base.AutoregressiveModel`).

    Each text is scored as ``[BOS] + tokenizer.encode(text) + [EOS]`` (``add_eos=False`` drops
    EOS): the sum of log p(token | earlier tokens) over every token after BOS, from one
    ``model(tokens[:, :-1])`` call per batch of ``batch_size`` right-padded sentences (sorted by
    length). Right padding never changes the causal logits of earlier positions, so batched
    scores equal scoring each sentence alone. A sentence longer than the model's context
    (``max_len`` + 1 tokens with BOS and EOS) is a ``ValueError``. The model is put in eval mode
    while scoring (dropout off) and restored afterwards.

    Returns float64 (N,) on the CPU.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, *, batch_size: int = 64, add_eos: bool = True) -> None:
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.add_eos = batch_size, add_eos
        self.bos_id = int(getattr(tokenizer, "bos_id", BOS_ID))
        self.eos_id = int(getattr(tokenizer, "eos_id", EOS_ID))
        self.pad_id = int(getattr(tokenizer, "pad_id", PAD_ID))
        self.description = f"{type(model).__name__} ({getattr(tokenizer, 'name', type(tokenizer).__name__)})"

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str = "auto", batch_size: int = 64,
                 add_eos: bool = True) -> ARLMScorer:
        """The best weights and tokenizer of a finished text-LM run folder
        (:func:`seqebm.training.experiment.load_base_lm`), on ``device``."""
        from seqebm.training.distributed import resolve_device
        from seqebm.training.experiment import load_base_lm

        model, tok = load_base_lm(run_dir)
        scorer = cls(model.to(resolve_device(device)), tok, batch_size=batch_size, add_eos=add_eos)
        scorer.description = f"{scorer.description}, run {run_dir}"
        return scorer

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """``[BOS] + encode(text) (+ [EOS])`` of each text."""
        texts = _check_texts(texts, "ARLMScorer")
        tail = [self.eos_id] if self.add_eos else []
        return [[self.bos_id, *ids, *tail] for ids in self.tokenizer.encode_batch(texts)]

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        from seqebm.sampling.scoring import sequence_log_prob

        texts = _check_texts(texts, "ARLMScorer")
        seqs = self.token_ids(texts)
        max_len = getattr(self.model, "max_len", None)
        if max_len is not None:
            for text, s in zip(texts, seqs):
                if len(s) - 1 > max_len:
                    raise ValueError(f"sentence of {len(s)} tokens with BOS/EOS is longer than the LM's context "
                                     f"(max_len={max_len} inputs): {text[:80]!r}")
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        out = torch.zeros(len(seqs), dtype=torch.float64)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        was = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                lengths = torch.tensor([len(seqs[i]) for i in idx])  # (B,)
                tokens = torch.full((len(idx), max(2, int(lengths.max()))), self.pad_id, dtype=torch.long)  # (B, T)
                for row, i in enumerate(idx):
                    tokens[row, : len(seqs[i])] = torch.tensor(seqs[i])
                lp = sequence_log_prob(self.model, tokens.to(device), lengths=lengths.to(device))  # (B,)
                out[torch.tensor(idx)] = lp.double().cpu()
        finally:
            self.model.train(was)
        return out

    def __repr__(self) -> str:
        return f"ARLMScorer({self.description}, add_eos={self.add_eos})"


BOS_WORD, EOS_WORD, UNK_WORD = "<s>", "</s>", "<unk>"
_NGRAM_FORMAT = "seqebm-kneser-ney-ngram"
_CACHE_LIMIT = 1 << 20  # memoised p_m(w | h) entries


class NGramSentenceScorer:
    """Interpolated Kneser–Ney word n-gram (Chen & Goodman 1998, §3.5 / Eq. 16; one discount per order).

    Words are the whitespace-separated tokens of a sentence, compared exactly (normalise the
    training text like the n-best lists). Every sentence is padded on the left with n-1 ``<s>``
    and ends with ``</s>``. For a history h of m-1 words (m = n, ..., 1),

        p_m(w | h) = max(a(h w) - D_m, 0) / a(h ·)  +  D_m · N1+(h ·) / a(h ·) · p_{m-1}(w | h')

    with h' = h without its oldest word, a(h ·) = Σ_w a(h w), N1+(h ·) the number of w with
    a(h w) > 0, and p_m = p_{m-1} when a(h ·) = 0 (unseen history). The counts a are the raw
    counts at the highest order and for m-grams starting with ``<s>``, and otherwise the
    continuation counts N1+(· g), the number of distinct words seen before g (as in KenLM).
    D_m = n1 / (n1 + 2 n2) from the numbers n1, n2 of m-grams with a = 1 and a = 2 (0.5 when
    n1 = 0, which only happens on degenerate tiny corpora). p_0 is uniform over the training
    words and ``</s>``, so every p_m sums to 1 over them and is positive.

    Unseen words: every word outside the training vocabulary is ``<unk>``, which gets a fixed
    probability ``unk_prob`` in every context (default 1e-4, about the weight of a rare word in
    a small corpus); the known words and ``</s>`` share the remaining 1 - ``unk_prob``, so
    p(w | h) = (1 - unk_prob) · p_n(w | h) sums to 1 with p(<unk> | h) over the vocabulary.
    ``<unk>`` in a history has no counts, so such a history backs off to the shorter one.

    ``scorer(texts)`` returns log p(sentence) (all words and ``</s>``), float64 (N,).
    Storage is JSON (:meth:`save` / :meth:`load`), no pickle.
    """

    def __init__(self, order: int, words: Iterable[str],
                 counts: Sequence[Mapping[tuple[str, ...], Mapping[str, int]]], discounts: Sequence[float], *,
                 unk_prob: float = 1e-4) -> None:
        """From estimated parts (use :meth:`fit` or :meth:`load`); ``counts[m-1][h][w]`` = a(h w)."""
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise ValueError(f"order must be a positive int, got {order!r}")
        if not 0.0 < unk_prob < 1.0:
            raise ValueError(f"unk_prob must be in (0, 1), got {unk_prob!r}")
        if len(counts) != order or len(discounts) != order:
            raise ValueError(f"need {order} count levels and discounts, got {len(counts)} and {len(discounts)}")
        if not all(0.0 < d <= 1.0 for d in discounts):
            raise ValueError(f"discounts must be in (0, 1], got {list(discounts)}")
        self.order, self.unk_prob = order, float(unk_prob)
        self.words = frozenset(words)
        reserved = self.words & {BOS_WORD, EOS_WORD, UNK_WORD}
        if reserved:
            raise ValueError(f"the vocabulary cannot contain the reserved words {sorted(reserved)}")
        self.counts = [{tuple(h): dict(c) for h, c in level.items()} for level in counts]
        self.discounts = [float(d) for d in discounts]
        # per history: (a(h ·), N1+(h ·))
        self._totals = [{h: (sum(c.values()), sum(1 for v in c.values() if v > 0)) for h, c in level.items()}
                        for level in self.counts]
        self._uniform = 1.0 / (len(self.words) + 1)
        self._cache: dict[tuple[tuple[str, ...], str], float] = {}
        self.description = f"{order}-gram interpolated Kneser-Ney ({len(self.words)} words)"

    # ----------------------------------------------------------------------------- estimation

    @classmethod
    def fit(cls, sentences: Iterable[str], order: int = 3, *, unk_prob: float = 1e-4) -> NGramSentenceScorer:
        """Estimate from training sentences (one string each, words split on whitespace)."""
        if not isinstance(order, int) or isinstance(order, bool) or order < 1:
            raise ValueError(f"order must be a positive int, got {order!r}")
        sentences = _check_texts(sentences, "NGramSentenceScorer.fit()")
        if not sentences:
            raise ValueError("cannot estimate an n-gram from no sentences")
        n = order
        raw: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(n)]  # raw[m-1][m-gram]
        words: set[str] = set()
        for i, s in enumerate(sentences):
            toks = s.split()
            bad = {BOS_WORD, EOS_WORD, UNK_WORD} & set(toks)
            if bad:
                raise ValueError(f"training sentence {i} contains the reserved word(s) {sorted(bad)}: {s[:80]!r}")
            words.update(toks)
            seq = [BOS_WORD] * (n - 1) + toks + [EOS_WORD]
            for j in range(n - 1, len(seq)):
                gram = tuple(seq[j - n + 1: j + 1])
                for m in range(1, n + 1):
                    raw[m - 1][gram[n - m:]] += 1
        adjusted: list[dict[tuple[str, ...], int]] = [dict(raw[n - 1])]
        for m in range(n - 1, 0, -1):  # continuation counts from the distinct left extensions
            left = Counter(g[1:] for g in raw[m])
            adjusted.insert(0, {g: (c if g[0] == BOS_WORD else left[g]) for g, c in raw[m - 1].items()})
        counts: list[dict[tuple[str, ...], dict[str, int]]] = []
        discounts = []
        for level in adjusted:
            by_hist: dict[tuple[str, ...], dict[str, int]] = defaultdict(dict)
            for g, a in level.items():
                by_hist[g[:-1]][g[-1]] = a
            counts.append(dict(by_hist))
            n1 = sum(1 for a in level.values() if a == 1)
            n2 = sum(1 for a in level.values() if a == 2)
            discounts.append(n1 / (n1 + 2 * n2) if n1 > 0 else 0.5)
        return cls(order, sorted(words), counts, discounts, unk_prob=unk_prob)

    # ----------------------------------------------------------------------------- probabilities

    def _p(self, m: int, hist: tuple[str, ...], w: str) -> float:
        """p_m(w | last m-1 words of hist) for a known word or </s>."""
        if m == 0:
            return self._uniform
        h = hist[len(hist) - (m - 1):] if m > 1 else ()
        key = (h, w)
        hit = self._cache.get(key)
        if hit is not None:
            return hit
        lower = self._p(m - 1, h, w)
        total = self._totals[m - 1].get(h)
        if not total or total[0] == 0:
            p = lower
        else:
            a_hw = self.counts[m - 1][h].get(w, 0)
            d = self.discounts[m - 1]
            p = max(a_hw - d, 0.0) / total[0] + d * total[1] / total[0] * lower
        if len(self._cache) >= _CACHE_LIMIT:  # bound the memory on huge n-best sets
            self._cache.clear()
        self._cache[key] = p
        return p

    def _map(self, w: str) -> str:
        return w if w in self.words or w == EOS_WORD else UNK_WORD

    def prob(self, word: str, history: Sequence[str] = ()) -> float:
        """p(word | history): ``word`` a word, ``</s>`` or ``<unk>`` (any unknown word is ``<unk>``);
        ``history`` the preceding words, oldest first (``<s>`` padding added on the left)."""
        hist = tuple(h if h == BOS_WORD else self._map(h) for h in history)
        hist = ((BOS_WORD,) * (self.order - 1) + hist)[len(hist):] if self.order > 1 else ()
        w = self._map(word)
        if w == UNK_WORD:
            return self.unk_prob
        return (1.0 - self.unk_prob) * self._p(self.order, hist, w)

    def vocabulary(self) -> list[str]:
        """Every predicted symbol: the training words, ``</s>`` and ``<unk>``."""
        return [*sorted(self.words), EOS_WORD, UNK_WORD]

    def sentence_log_prob(self, text: str) -> float:
        """log p(words of text, </s>), in nats."""
        hist = [BOS_WORD] * (self.order - 1)
        total = 0.0
        for w in [*text.split(), EOS_WORD]:
            w = self._map(w)
            total += math.log(self.unk_prob if w == UNK_WORD
                              else (1.0 - self.unk_prob) * self._p(self.order, tuple(hist), w))
            if self.order > 1:
                hist = [*hist[1:], w]
        return total

    def __call__(self, texts: Sequence[str]) -> Tensor:
        return torch.tensor([self.sentence_log_prob(t) for t in _check_texts(texts, "NGramSentenceScorer")],
                            dtype=torch.float64)

    # ----------------------------------------------------------------------------- persistence

    def to_dict(self) -> dict[str, Any]:
        return {"format": _NGRAM_FORMAT, "version": 1, "order": self.order, "unk_prob": self.unk_prob,
                "discounts": self.discounts, "words": sorted(self.words),
                "counts": [[[list(h), w, a] for h, c in level.items() for w, a in c.items()] for level in self.counts]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NGramSentenceScorer:
        if not isinstance(data, Mapping) or data.get("format") != _NGRAM_FORMAT:
            raise ValueError(f"not a saved NGramSentenceScorer (expected format {_NGRAM_FORMAT!r})")
        if data.get("version") != 1:
            raise ValueError(f"unsupported NGramSentenceScorer format version {data.get('version')!r}")
        counts: list[dict[tuple[str, ...], dict[str, int]]] = []
        for level in data["counts"]:
            by_hist: dict[tuple[str, ...], dict[str, int]] = defaultdict(dict)
            for h, w, a in level:
                by_hist[tuple(h)][w] = int(a)
            counts.append(dict(by_hist))
        return cls(int(data["order"]), data["words"], counts, data["discounts"], unk_prob=float(data["unk_prob"]))

    def save(self, path: str | Path) -> None:
        """Write JSON (atomically)."""
        atomic_write_text(Path(path), json.dumps(self.to_dict(), ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> NGramSentenceScorer:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def __repr__(self) -> str:
        return f"NGramSentenceScorer({self.description}, unk_prob={self.unk_prob:g})"


# --------------------------------------------------------------------------- which scorer to build


@dataclass(frozen=True)
class ScorerSpec:
    """Which sentence scorer ``seqebm rescore`` builds (flat arguments, validated here).

    ``kind``: ``"list"`` (the n-best lists' own ``lm`` field), ``"ar"`` (the LM of the text-LM run
    folder ``lm_run``, :meth:`ARLMScorer.from_run`), ``"elm"`` (the ``seqebm elm train`` run folder
    ``lm_run``, :class:`seqebm.training.elm.ELMScorer`) or ``"ngram"`` (:class:`NGramSentenceScorer`
    of ``ngram_order`` fitted on the text file ``ngram_train``, one sentence per line).
    """

    kind: str = "list"
    lm_run: str | None = None
    ngram_train: str | None = None
    ngram_order: int = 3
    device: str = "auto"
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.kind not in ("list", "ar", "elm", "ngram"):
            raise ValueError(f"scorer kind must be list, ar, elm or ngram, got {self.kind!r}")
        if self.kind in ("ar", "elm") and not self.lm_run:
            raise ValueError(f"an {self.kind} scorer needs lm_run (a run folder)")
        if self.kind == "ngram" and not self.ngram_train:
            raise ValueError("an n-gram scorer needs ngram_train (a text file, one sentence per line)")
        if not isinstance(self.ngram_order, int) or self.ngram_order < 1:
            raise ValueError(f"ngram_order must be a positive int, got {self.ngram_order!r}")

    def build(self) -> SentenceScorer | None:
        if self.kind == "ar":
            return ARLMScorer.from_run(self.lm_run, device=self.device, batch_size=self.batch_size)
        if self.kind == "elm":
            from seqebm.training.elm import ELMScorer

            return ELMScorer(self.lm_run, device=self.device, batch_size=self.batch_size)
        if self.kind == "ngram":
            path = Path(self.ngram_train)
            if not path.is_file():
                raise FileNotFoundError(f"n-gram training text not found: {path}")
            lines = [s.strip() for s in path.read_text(encoding="utf-8").split("\n")]
            return NGramSentenceScorer.fit([s for s in lines if s], self.ngram_order)
        return None
