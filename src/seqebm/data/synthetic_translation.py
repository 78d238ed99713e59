"""A synthetic translation task: oracle sources and a rule-based target language.

Notation: N number of sentence pairs, n source length (words), m target length.

Sources are sampled from a variable-length :class:`~seqebm.data.synthetic_oracle.OracleLM`
(``min_length=5``, ``length=60``, an EOS bias of ``log(n_words) - 1.9`` so that lengths spread
over the whole range: for the default seed, mean 22, median 18, 10th/90th percentiles 6/47,
5% of sentences at the cap of 60). Targets are a deterministic transduction of the source, so BLEU by
target-length bucket measures how well a model carries the rules over long outputs.

Rules (all tables are drawn once from ``seed``):

1. **Word classes.** Every source word ``"w{i}"`` has a class in ``ADJ, NOUN, VERB, OTHER``
   (proportions ``class_probs``) and every noun a number in ``markers`` (default ``sg``/``pl``).
2. **Local reordering.** Scanning left to right, an ``ADJ`` immediately followed by a
   ``NOUN`` becomes ``NOUN ADJ`` (pairs do not overlap: ``ADJ ADJ NOUN -> ADJ NOUN ADJ``).
3. **Word substitution.** Each source word maps through a seeded lexicon to a target word
   ``"t{j}"`` (a random bijection). A fraction ``p_double`` of the vocabulary (drawn among
   ``OTHER`` words) maps to two target words ``"t{j} t{k}"`` and a fraction ``p_delete``
   (also ``OTHER``) maps to nothing. ADJ, NOUN and VERB words always map to one word.
4. **Long-range agreement.** The number of the *first* noun of the source sentence is
   attached as a suffix to the translation of the *last* verb: ``"t42_pl"``. If the sentence
   has a noun but no verb, the sentence-final token ``"agr_pl"`` is appended instead; a
   sentence without nouns carries no marker. Since the first noun is usually early and the
   last verb late, the decoder must carry the marker across the whole sentence.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

from seqebm.data.synthetic_oracle import OracleLM

__all__ = ["SyntheticTranslation", "WORD_CLASSES"]

WORD_CLASSES: tuple[str, ...] = ("ADJ", "NOUN", "VERB", "OTHER")
AGREEMENT_PREFIX = "agr_"
_EOS_OFFSET = -1.9  # eos_bias = log(n_words) + offset keeps the length spread vocabulary-free


class SyntheticTranslation:
    """Seeded synthetic source->target task; see the module docstring for the rules.

    ``generate(n_train, n_valid, n_test)`` returns ``{"train": [(src, tgt), ...], ...}`` with
    space-separated strings; ``translate(words)`` applies the rules to one sentence.
    """

    def __init__(
        self,
        *,
        n_words: int = 1000,
        min_length: int = 5,
        max_length: int = 60,
        seed: int = 0,
        arch: str = "lstm",
        temperature: float = 1.0,
        eos_bias: float | None = None,
        class_probs: Sequence[float] = (0.15, 0.3, 0.2, 0.35),
        markers: Sequence[str] = ("sg", "pl"),
        p_double: float = 0.05,
        p_delete: float = 0.03,
    ) -> None:
        if n_words <= 0:
            raise ValueError(f"n_words must be positive, got {n_words}")
        if not 1 <= min_length <= max_length:
            raise ValueError(
                f"need 1 <= min_length <= max_length, got min_length={min_length}, "
                f"max_length={max_length}"
            )
        if len(class_probs) != len(WORD_CLASSES) or any(p < 0 for p in class_probs) \
                or not math.isclose(sum(class_probs), 1.0, abs_tol=1e-6):
            raise ValueError(
                f"class_probs must be {len(WORD_CLASSES)} non-negative numbers summing to 1 "
                f"(for {WORD_CLASSES}), got {tuple(class_probs)}"
            )
        if len(markers) < 1 or len(set(markers)) != len(markers) \
                or not all(m and m.isalnum() for m in markers):
            raise ValueError(f"markers must be distinct non-empty alphanumeric strings, got {markers}")
        if not (0 <= p_double and 0 <= p_delete and p_double + p_delete <= class_probs[3]):
            raise ValueError(
                f"need p_double, p_delete >= 0 and p_double + p_delete <= P(OTHER)="
                f"{class_probs[3]}, got {p_double}, {p_delete}"
            )
        self.n_words, self.seed = n_words, seed
        self.markers = tuple(markers)
        if eos_bias is None:
            eos_bias = math.log(n_words) + _EOS_OFFSET
        self.oracle = OracleLM(
            n_words=n_words, length=max_length, variable_length=True, min_length=min_length,
            temperature=temperature, eos_bias=eos_bias, seed=seed, arch=arch,
        )
        rng = random.Random(seed)
        vocab = [f"w{i}" for i in range(n_words)]
        # classes: exact proportions (rounded), randomly placed
        counts = [round(p * n_words) for p in class_probs]
        counts[-1] = n_words - sum(counts[:-1])
        labels = [c for c, k in zip(WORD_CLASSES, counts) for _ in range(max(k, 0))]
        labels = labels[:n_words] + ["OTHER"] * (n_words - len(labels))
        rng.shuffle(labels)
        self.word_class: dict[str, str] = dict(zip(vocab, labels))
        self.noun_number: dict[str, str] = {
            w: rng.choice(self.markers) for w in vocab if self.word_class[w] == "NOUN"
        }
        # lexicon: bijection onto t0..t{n-1}; doubles get extra words t{n}..; deletions map to ()
        perm = list(range(n_words))
        rng.shuffle(perm)
        others = [w for w in vocab if self.word_class[w] == "OTHER"]
        rng.shuffle(others)
        n_double, n_delete = round(p_double * n_words), round(p_delete * n_words)
        doubles, deletes = set(others[:n_double]), set(others[n_double:n_double + n_delete])
        self.lexicon: dict[str, tuple[str, ...]] = {}
        extra = n_words
        for w, j in zip(vocab, perm):
            if w in deletes:
                self.lexicon[w] = ()
            elif w in doubles:
                self.lexicon[w] = (f"t{j}", f"t{extra}")
                extra += 1
            else:
                self.lexicon[w] = (f"t{j}",)

    # ------------------------------------------------------------------ rules
    def words_of_class(self, cls: str) -> list[str]:
        """Source words of class ``cls`` (one of :data:`WORD_CLASSES`), in id order."""
        if cls not in WORD_CLASSES:
            raise ValueError(f"unknown word class {cls!r}; expected one of {WORD_CLASSES}")
        return [w for w, c in self.word_class.items() if c == cls]

    def translate(self, source_words: Sequence[str]) -> list[str]:
        """Apply rules 1-4 (module docstring) to a tokenised source sentence."""
        for w in source_words:
            if w not in self.word_class:
                raise ValueError(f"{w!r} is not a source word (expected w0..w{self.n_words - 1})")
        cls = [self.word_class[w] for w in source_words]
        # 2. local reordering ADJ NOUN -> NOUN ADJ
        order: list[int] = []
        i = 0
        while i < len(source_words):
            if cls[i] == "ADJ" and i + 1 < len(source_words) and cls[i + 1] == "NOUN":
                order += [i + 1, i]
                i += 2
            else:
                order.append(i)
                i += 1
        # 4. agreement: number of the first noun, marked on the last verb (source positions)
        nouns = [k for k, c in enumerate(cls) if c == "NOUN"]
        verbs = [k for k, c in enumerate(cls) if c == "VERB"]
        marker = self.noun_number[source_words[nouns[0]]] if nouns else None
        marked_verb = verbs[-1] if (verbs and marker is not None) else None
        # 3. substitution
        out: list[str] = []
        for k in order:
            tgt = self.lexicon[source_words[k]]
            if k == marked_verb:
                tgt = (f"{tgt[0]}_{marker}",) + tgt[1:]
            out.extend(tgt)
        if marker is not None and marked_verb is None:
            out.append(f"{AGREEMENT_PREFIX}{marker}")
        return out

    def translate_text(self, source: str) -> str:
        """String form of :meth:`translate`: ``"w3 w17" -> "t40 t9_sg"``."""
        return " ".join(self.translate(source.split()))

    # ------------------------------------------------------------------ data
    def generate(
        self, n_train: int, n_valid: int, n_test: int
    ) -> dict[str, list[tuple[str, str]]]:
        """Sentence pairs for ``train`` / ``valid`` / ``test`` (deterministic for ``seed``)."""
        splits = self.oracle.make_splits(n_train, n_valid, n_test, seed=self.seed + 1)
        out: dict[str, list[tuple[str, str]]] = {}
        for name, seqs in splits.items():
            sources = self.oracle.as_text(seqs)
            out[name] = [(s, self.translate_text(s)) for s in sources]
        return out

    def sample_sources(self, n: int, *, generator: torch.Generator) -> list[list[str]]:
        """``n`` tokenised source sentences drawn from the source oracle."""
        return [s.split() for s in self.oracle.as_text(self.oracle.sample(n, generator=generator))]

    def target_vocab(self) -> list[str]:
        """Every target word the rules can emit (lexicon words, marked verbs, agreement tokens)."""
        words = sorted({t for tgt in self.lexicon.values() for t in tgt}, key=_target_key)
        verbs = [self.lexicon[w][0] for w in self.words_of_class("VERB")]
        marked = [f"{v}_{m}" for v in sorted(verbs, key=_target_key) for m in self.markers]
        return words + marked + [f"{AGREEMENT_PREFIX}{m}" for m in self.markers]


def _target_key(word: str) -> int:
    return int(word[1:].split("_")[0])
