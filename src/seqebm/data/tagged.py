"""Labelled sentences, tagged corpora and tag/word vocabularies for sequence labelling."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from seqebm.data.corpora import SPLITS
from seqebm.data.tokenizers import SPECIAL_TOKENS, UNK_ID

#: One labelled sentence: ``(tokens, tags)`` with ``len(tokens) == len(tags)``.
Sentence = tuple[list[str], list[str]]


@dataclass
class TaggedCorpus:
    """Labelled sentences per split; ``meta`` holds provenance (source files, seed, ...)."""

    name: str
    train: list[Sentence]
    valid: list[Sentence]
    test: list[Sentence]
    meta: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def split(self, name: str) -> list[Sentence]:
        """Return the split called ``name`` ("train", "valid" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        sentences: list[Sentence] = getattr(self, name)
        return sentences

    def tag_counts(self, split: str | None = None) -> Counter[str]:
        """Tag frequencies in one split, or in all splits when ``split`` is None."""
        names = SPLITS if split is None else (split,)
        return Counter(t for s in names for _, tags in self.split(s) for t in tags)

    def summary(self) -> dict[str, Any]:
        """Sentences and tokens per split plus the tag set, e.g. ``{"train": {"sentences": ...}}``."""
        out: dict[str, Any] = {
            s: {"sentences": len(self.split(s)), "tokens": sum(len(w) for w, _ in self.split(s))}
            for s in SPLITS
        }
        train_tags = set(self.tag_counts("train"))
        out["tags"] = sorted(self.tag_counts())
        out["tags_not_in_train"] = sorted(set(out["tags"]) - train_tags)
        return out


# ============================================================================ vocabularies


class TagVocabulary:
    """Tags <-> ids ``0..K-1`` (no padding id; batch with a mask).

    ``unk`` policy: with ``unk=None`` (default) an unseen tag raises ``ValueError`` (for POS
    tagging a test tag missing from training is a data problem, not something to hide); with
    ``unk="<unk>"`` (or any name) unseen tags map to that tag's id, appended last if new.
    """

    def __init__(self, tags: Iterable[str], *, unk: str | None = None) -> None:
        tags = list(tags)
        if not all(isinstance(t, str) and t for t in tags):
            raise TypeError("tags must be non-empty strings")
        dupes = sorted(t for t, c in Counter(tags).items() if c > 1)
        if dupes:
            raise ValueError(f"duplicate tags in a tag vocabulary: {dupes}")
        if unk is not None and unk not in tags:
            tags.append(unk)
        self.tags: list[str] = tags
        self.unk: str | None = unk
        self._ids = {t: i for i, t in enumerate(tags)}
        if not tags:
            raise ValueError("a tag vocabulary needs at least one tag")

    @classmethod
    def from_sequences(
        cls, tag_sequences: Iterable[Sequence[str]], *, unk: str | None = None
    ) -> TagVocabulary:
        """All tags seen in ``tag_sequences`` (e.g. the training split), sorted by name."""
        seen = {t for seq in tag_sequences for t in seq}
        return cls(sorted(seen), unk=unk)

    @property
    def unk_id(self) -> int | None:
        """Id of the ``unk`` tag, or ``None`` when unseen tags raise."""
        return None if self.unk is None else self._ids[self.unk]

    def __len__(self) -> int:
        return len(self.tags)

    def __contains__(self, tag: object) -> bool:
        return tag in self._ids

    def __repr__(self) -> str:
        return f"TagVocabulary({len(self)} tags, unk={self.unk!r})"

    def index(self, tag: str) -> int:
        """Id of ``tag``; unseen tags follow the ``unk`` policy."""
        i = self._ids.get(tag)
        if i is not None:
            return i
        if self.unk is not None:
            return self._ids[self.unk]
        shown = ", ".join(self.tags[:20]) + (" ..." if len(self.tags) > 20 else "")
        raise ValueError(
            f"tag {tag!r} is not in the tag vocabulary ({len(self)} tags: {shown}); "
            "build the vocabulary from data that contains it, or pass unk= to map unseen tags"
        )

    def encode(self, tags: Sequence[str]) -> list[int]:
        """Tag names -> ids, shape (T,)."""
        if isinstance(tags, str):
            raise TypeError("encode() expects a sequence of tags, not a single string")
        return [self.index(t) for t in tags]

    def decode(self, ids: Sequence[int]) -> list[str]:
        """Ids -> tag names; an id outside ``0..K-1`` raises ``ValueError``."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.tags):
                raise ValueError(f"tag id {i!r} is out of range (valid ids: 0..{len(self.tags) - 1})")
            out.append(self.tags[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; :meth:`from_dict` reads it back."""
        return {"tags": list(self.tags), "unk": self.unk}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TagVocabulary:
        return cls(data["tags"], unk=data.get("unk"))


class WordVocabulary:
    """Words <-> ids with the tokenizers' specials first (``<pad>`` 0, ``<s>`` 1, ``</s>`` 2,
    ``<unk>`` 3); unseen words map to ``UNK_ID``. ``lowercase=True`` lower-cases on lookup."""

    def __init__(self, words: Iterable[str], *, lowercase: bool = False) -> None:
        words = list(words)
        clash = sorted(set(words) & set(SPECIAL_TOKENS))
        if clash:
            raise ValueError(f"words may not be special tokens: {clash}")
        if len(set(words)) != len(words):
            raise ValueError("duplicate words in a word vocabulary")
        self.tokens: list[str] = list(SPECIAL_TOKENS) + words
        self.lowercase = lowercase
        self._ids = {w: i for i, w in enumerate(self.tokens)}

    @classmethod
    def build(
        cls,
        sentences: Iterable[Sequence[str]],
        *,
        min_count: int = 1,
        max_size: int | None = None,
        lowercase: bool = False,
    ) -> WordVocabulary:
        """Words seen at least ``min_count`` times, most frequent first (ties by word), at most
        ``max_size`` of them (specials not counted)."""
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        if max_size is not None and max_size < 0:
            raise ValueError(f"max_size must be >= 0, got {max_size}")
        counts = Counter(w.lower() if lowercase else w for s in sentences for w in s)
        for special in SPECIAL_TOKENS:
            counts.pop(special, None)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(kept[:max_size] if max_size is not None else kept, lowercase=lowercase)

    pad_id: int = SPECIAL_TOKENS.index("<pad>")
    unk_id: int = UNK_ID

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, word: object) -> bool:
        if isinstance(word, str) and self.lowercase:
            word = word.lower()
        return word in self._ids

    def __repr__(self) -> str:
        return f"WordVocabulary({len(self)} ids incl. {len(SPECIAL_TOKENS)} specials)"

    def encode(self, words: Sequence[str]) -> list[int]:
        """Words -> ids, shape (T,); unseen words -> ``UNK_ID``."""
        if isinstance(words, str):
            raise TypeError("encode() expects a sequence of words, not a single string")
        low = self.lowercase
        return [self._ids.get(w.lower() if low else w, UNK_ID) for w in words]

    def decode(self, ids: Sequence[int]) -> list[str]:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        out = []
        for i in ids:
            if not isinstance(i, int) or not 0 <= i < len(self.tokens):
                raise ValueError(f"word id {i!r} is out of range (valid ids: 0..{len(self.tokens) - 1})")
            out.append(self.tokens[i])
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"words": self.tokens[len(SPECIAL_TOKENS) :], "lowercase": self.lowercase}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WordVocabulary:
        return cls(data["words"], lowercase=bool(data.get("lowercase", False)))
