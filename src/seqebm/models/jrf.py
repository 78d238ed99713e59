"""Joint random fields (JRFs): a CRF upgraded to a joint distribution over lengths, words and tags.

Monograph §5.3 (Eqs. 5.5-5.11). Notation: B sentences, T padded length, K tags, V word ids,
m the maximum length, l a sentence's length, x = x_1..x_l word ids, y = y_1..y_l tag ids.

A linear-chain CRF scores a tag path with φ_θ(x, y) = Σ_i node_i(y_i, x) + Σ_i edge(y_{i-1}, y_i)
(Eq. 5.6, here :meth:`LinearChainCRF.score`: emissions from an *emitter* network plus the
CRF's start/transition/end tables). The JRF borrows φ to define the joint (Eq. 5.7)

    p(l, x, y) = π_l exp(φ_θ(x, y) − ζ_l),   ζ_l ≈ log Z_θ(l) = log Σ_{x, y of length l} e^{φ_θ(x, y)}

so that (i) p(y | x) is exactly the CRF, e^φ / Z_θ(x), and (ii) the marginal over y is a TRF
language model (Eq. 3.5) p(l, x) = π_l exp(U_θ(x) − ζ_l) whose potential is the CRF's log
partition function U_θ(x) = log Z_θ(x) = log Σ_y e^{φ_θ(x, y)} (the forward algorithm).

* :class:`CRFLogPartitionPotential` is that potential U_θ(x) in the ELM *potential* protocol of
  :mod:`seqebm.models.elm` (``forward(tokens, mask) -> (B,)``), so everything written for TRF-LMs
  (exact normalisers by enumeration, DNCE, AugSA) applies to it unchanged.
* :class:`JRF` holds a :class:`~seqebm.models.elm.TRFLM` over that potential (ζ, π and
  log p(l, x) come from there) and adds the conditional, the joint and Viterbi decoding. The
  CRF and the TRF share *all* parameters θ (the emitter and the CRF tables).

Emitters map word-id rows to emissions: ``emitter(tokens (B, T) long, mask (B, T) bool) ->
(B, T, K)``. :class:`WordEmitter` (embedding, optional BiLSTM, linear) is self-contained.
:class:`CharTableEmitter` reuses a :class:`~seqebm.models.taggers.WordCharEncoder` (word
embedding + char CNN + BiLSTM): because U_θ(x) must be a function of the *word ids* alone (the
noise LM of DNCE samples word ids, and p(l, x) normalises over word-id sequences), the
characters of each id are looked up in a fixed table built from the vocabulary strings
(:func:`char_table`), not taken from the raw text. Words outside the vocabulary are therefore
all ``<unk>`` with no characters (the encoder's zero character feature), on labelled and
unlabelled data alike; a tagger that reads the characters of unknown words is a plain
:class:`~seqebm.models.taggers.CRFTagger`, not a JRF.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqebm.models.elm import TRFLM, check_sentences
from seqebm.structured.crf import LinearChainCRF

__all__ = ["WordEmitter", "CharTableEmitter", "char_table", "CRFLogPartitionPotential", "JRF", "labeled_batch"]


# ----------------------------------------------------------------------------- emitters


class WordEmitter(nn.Module):
    """Emissions from word ids: embedding -> (optional BiLSTM) -> linear to K tags.

    Args:
        vocab_size: V (id 0 is padding).
        num_tags: K.
        dim: embedding width.
        hidden: BiLSTM width per direction; 0 = no LSTM (emissions depend on the word alone).
        dropout: on the embeddings and the LSTM output. Dropout makes U(x) random in training
            mode, which DNCE tolerates but exact checks do not; tests use 0.
    """

    def __init__(self, vocab_size: int, num_tags: int, *, dim: int = 64, hidden: int = 0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        for name, v in (("vocab_size", vocab_size), ("num_tags", num_tags), ("dim", dim)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if hidden < 0 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"need hidden >= 0 and 0 <= dropout < 1, got {hidden}, {dropout}")
        self.vocab_size, self.num_tags = vocab_size, num_tags
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True, bidirectional=True) if hidden else None
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(2 * hidden if hidden else dim, num_tags)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        h = self.drop(self.embed(tokens))
        if self.lstm is not None:
            lengths = mask.sum(1).cpu().clamp_min(1)
            packed = pack_padded_sequence(h, lengths, batch_first=True, enforce_sorted=False)
            h, _ = self.lstm(packed)
            h, _ = pad_packed_sequence(h, batch_first=True, total_length=tokens.shape[1])
            h = self.drop(h)
        return self.proj(h)


def char_table(words: Any, chars: Any, *, max_word_chars: int = 20) -> Tensor:
    """(V, C) long: the character ids of every word id, as :class:`~seqebm.data.tag_batching.TagEncoder`
    encodes them (first ``max_word_chars`` characters, 0-padded).

    ``words`` and ``chars`` are :class:`~seqebm.data.tagged.WordVocabulary` objects (the tag
    encoder's ``.words`` and ``.chars``). The four specials (<pad>, <s>, </s>, <unk>) get no
    characters. With a lower-casing word vocabulary the stored (lower-cased) strings are spelled.
    """
    from seqebm.data.tokenizers import SPECIAL_TOKENS

    if max_word_chars < 1:
        raise ValueError(f"max_word_chars must be >= 1, got {max_word_chars}")
    rows = [[] if i < len(SPECIAL_TOKENS) else chars.encode(list(w[:max_word_chars]))
            for i, w in enumerate(words.tokens)]
    table = torch.zeros(len(rows), max(1, max((len(r) for r in rows), default=1)), dtype=torch.long)
    for i, r in enumerate(rows):
        if r:
            table[i, :len(r)] = torch.tensor(r)
    return table


class CharTableEmitter(nn.Module):
    """A batch encoder (e.g. :class:`~seqebm.models.taggers.WordCharEncoder`) as a word-id emitter.

    ``encoder(batch) -> (B, T, D)`` reads ``batch.words``, ``batch.chars`` and ``batch.mask``;
    here the characters come from ``table`` (:func:`char_table`), so emissions are a function of
    the word ids only (see the module docstring). A linear layer maps D = ``encoder.out_dim`` to K.
    """

    def __init__(self, encoder: nn.Module, num_tags: int, table: Tensor) -> None:
        super().__init__()
        table = torch.as_tensor(table)
        if table.dim() != 2 or table.dtype != torch.long:
            raise ValueError(f"table must be a (V, C) long tensor, got {table.dtype} {tuple(table.shape)}")
        if not hasattr(encoder, "out_dim"):
            raise TypeError("encoder must expose out_dim (e.g. WordCharEncoder)")
        self.encoder, self.num_tags, self.vocab_size = encoder, num_tags, int(table.shape[0])
        self.register_buffer("table", table, persistent=False)
        self.proj = nn.Linear(encoder.out_dim, num_tags)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        chars = self.table[tokens].masked_fill(~mask.unsqueeze(-1), 0)
        return self.proj(self.encoder(SimpleNamespace(words=tokens, chars=chars, mask=mask)))


# ----------------------------------------------------------------------------- potential and model


class CRFLogPartitionPotential(nn.Module):
    """U_θ(x) = log Z_θ(x) = log Σ_y exp φ_θ(x, y) (B,), by the CRF's forward algorithm (§5.3).

    A TRF *potential* (:mod:`seqebm.models.elm`): left-aligned word-id rows, no BOS/EOS.
    """

    def __init__(self, emitter: nn.Module, crf: LinearChainCRF) -> None:
        super().__init__()
        if not isinstance(crf, LinearChainCRF):
            raise TypeError(f"crf must be a LinearChainCRF, got {type(crf).__name__}")
        self.emitter, self.crf = emitter, crf

    def emissions(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Node potentials (B, T, K), checked against the CRF's tag count."""
        em = self.emitter(tokens, mask)
        if not isinstance(em, Tensor) or em.dim() != 3 or tuple(em.shape[:2]) != tuple(tokens.shape):
            raise ValueError(f"the emitter must return (B, T, K) = ({tokens.shape[0]}, {tokens.shape[1]}, K), got "
                             f"{tuple(getattr(em, 'shape', ()))}")
        if em.shape[-1] != self.crf.num_tags:
            raise ValueError(f"the emitter returns {em.shape[-1]} tags, the CRF has {self.crf.num_tags}")
        return em

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.crf.log_partition(self.emissions(tokens, mask), mask)


def labeled_batch(batch: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, mask, tags) from a triple or from a :class:`~seqebm.data.tag_batching.TagBatch`
    (``.words``/``.mask``/``.tags``) or any object with ``.tokens``/``.mask``/``.tags``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 3:
        return batch[0], batch[1], batch[2]
    for name in ("words", "tokens"):
        if hasattr(batch, name) and hasattr(batch, "mask") and hasattr(batch, "tags"):
            return getattr(batch, name), batch.mask, batch.tags
    raise TypeError(f"a labelled batch is (tokens, mask, tags) or has .words/.mask/.tags, got {type(batch).__name__}")


class JRF(nn.Module):
    """Joint random field p(l, x, y) = π_l exp(φ_θ(x, y) − ζ_l) (monograph §5.3, Eq. 5.7).

    Args:
        emitter: ``emitter(tokens, mask) -> (B, T, K)`` node potentials (e.g. :class:`WordEmitter`).
        crf: the :class:`~seqebm.structured.crf.LinearChainCRF` with the edge potentials.
        length_probs: (m + 1,) π_l with π_0 = 0 (:func:`~seqebm.models.elm.length_prior`).

    Attributes:
        trf: the marginal p(l, x), a :class:`~seqebm.models.elm.TRFLM` over
            :class:`CRFLogPartitionPotential`; train it with
            :class:`~seqebm.objectives.trf.TRFDNCELoss` (or :class:`~seqebm.objectives.jrf.JRFLoss`).
        zeta, length_probs, max_length, potential, emitter, crf: views into ``trf``.

    :meth:`conditional_log_prob` and :meth:`decode` (the CRF) accept sentences of any length;
    :meth:`joint_log_prob` and :meth:`marginal_log_prob` need l <= m.
    """

    def __init__(self, emitter: nn.Module, crf: LinearChainCRF, length_probs: Tensor) -> None:
        super().__init__()
        self.trf = TRFLM(CRFLogPartitionPotential(emitter, crf), length_probs)

    # -- views -------------------------------------------------------------------------------------

    @property
    def potential(self) -> CRFLogPartitionPotential:
        return self.trf.potential

    @property
    def emitter(self) -> nn.Module:
        return self.trf.potential.emitter

    @property
    def crf(self) -> LinearChainCRF:
        return self.trf.potential.crf

    @property
    def zeta(self) -> nn.Parameter:
        return self.trf.zeta

    @property
    def length_probs(self) -> Tensor:
        return self.trf.length_probs

    @property
    def max_length(self) -> int:
        return self.trf.max_length

    @property
    def num_tags(self) -> int:
        return self.crf.num_tags

    # -- checks ------------------------------------------------------------------------------------

    def _check(self, tokens: Tensor, mask: Tensor, *, bounded: bool, who: str) -> Tensor:
        return check_sentences(tokens, mask, max_length=self.max_length if bounded else None,
                               vocab_size=getattr(self.emitter, "vocab_size", None), who=who)

    def _check_tags(self, tags: Tensor, mask: Tensor, who: str) -> Tensor:
        if not isinstance(tags, Tensor):
            raise TypeError(f"{who}: tags must be a tensor, got {type(tags).__name__}")
        if tuple(tags.shape) != tuple(mask.shape):
            raise ValueError(f"{who}: tags {tuple(tags.shape)} must have the shape of tokens/mask {tuple(mask.shape)}")
        if tags.dtype.is_floating_point or tags.dtype == torch.bool:
            raise TypeError(f"{who}: tags must be integer ids, got {tags.dtype}")
        real = tags[mask]
        if real.numel() and (int(real.min()) < 0 or int(real.max()) >= self.num_tags):
            raise ValueError(f"{who}: tag ids must lie in [0, {self.num_tags}) (the tag set), got "
                             f"[{int(real.min())}, {int(real.max())}]")
        return tags.masked_fill(~mask, 0).long()

    # -- distributions -----------------------------------------------------------------------------

    def emissions(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Node potentials (B, T, K) of the CRF."""
        self._check(tokens, mask, bounded=False, who="JRF")
        return self.potential.emissions(tokens, mask)

    def log_potential(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """U_θ(x) = log Z_θ(x), (B,) (the marginal's potential)."""
        return self.trf.log_unnormalized(tokens, mask)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.log_potential(tokens, mask)

    def score(self, tokens: Tensor, mask: Tensor, tags: Tensor) -> Tensor:
        """φ_θ(x, y) (B,) of the given tag paths (Eq. 5.6)."""
        tags = self._check_tags(tags, mask, "JRF.score")
        return self.crf.score(self.emissions(tokens, mask), tags, mask)

    def conditional_log_prob(self, tokens: Tensor, mask: Tensor, tags: Tensor) -> Tensor:
        """log p(y | x) = φ_θ(x, y) − log Z_θ(x) (B,): the CRF (Eq. 5.5), any length."""
        tags = self._check_tags(tags, mask, "JRF.conditional_log_prob")
        return self.crf.log_likelihood(self.emissions(tokens, mask), tags, mask, reduction="none")

    def joint_log_prob(self, tokens: Tensor, mask: Tensor, tags: Tensor, *, zeta: Tensor | None = None) -> Tensor:
        """log p(l, x, y) = log π_l + φ_θ(x, y) − ζ_l (B,) float64 (Eq. 5.7); ``zeta`` overrides ζ."""
        lengths = self._check(tokens, mask, bounded=True, who="JRF.joint_log_prob")
        tags = self._check_tags(tags, mask, "JRF.joint_log_prob")
        z = self.zeta if zeta is None else zeta.to(self.zeta)
        phi = self.crf.score(self.potential.emissions(tokens, mask), tags, mask)
        return self.trf.log_length_probs[lengths] - z[lengths] + phi.double()

    def marginal_log_prob(self, tokens: Tensor, mask: Tensor, *, zeta: Tensor | None = None) -> Tensor:
        """log p(l, x) = log π_l + log Z_θ(x) − ζ_l (B,) float64: the TRF marginal."""
        self._check(tokens, mask, bounded=True, who="JRF.marginal_log_prob")
        return self.trf.log_prob(tokens, mask, zeta=zeta)

    @torch.no_grad()
    def decode(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Viterbi tags argmax_y p(y | x) (B, T), -1 at padding."""
        return self.crf.viterbi(self.emissions(tokens, mask), mask)[0]

    @torch.no_grad()
    def init_zeta(self, num_words: int) -> None:
        """ζ_l = l · log(num_words · K): the exact log Z_θ(l) when every potential is zero and the
        sentences range over ``num_words`` ids — a start for DNCE that is of the right scale
        (log Z_θ(l) grows linearly in l, and ζ = 0 is far off for large vocabularies)."""
        if num_words < 1:
            raise ValueError(f"num_words must be >= 1, got {num_words}")
        lengths = torch.arange(self.max_length + 1, dtype=torch.float64, device=self.zeta.device)
        self.zeta.copy_(lengths * math.log(num_words * self.num_tags))
