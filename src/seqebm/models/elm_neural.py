"""Neural potentials U_θ(x) for energy-based language models (monograph §3.3.1).

Notation: B batch, T padded sentence length, V word vocabulary, D hidden width, L HF sub-word
length, N number of (row, position) pairs masked by :class:`SumMaskedLogit`.

A TRF / GN-ELM defines p_θ(x) ∝ exp(U_θ(x)). Every class here is a *potential*: an ``nn.Module``
with ``forward(tokens (B, T) long, mask (B, T) bool) -> (B,) float32`` returning U_θ(x) per
sentence, **higher = more likely** (the residual EBMs of :mod:`seqebm.models.energy` return
energies E = −U instead). Sentences are left-aligned, right-padded rows of word ids
(:class:`~seqebm.data.tagged.WordVocabulary`: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3) with no
BOS/EOS added by the caller; an EOS a GN-ELM appends is an ordinary token here. ``mask`` is True at
real words (default: all True); padded positions may hold any in-vocabulary id and never change U.

Architectures (monograph §3.3.1, "Non-linear energy"):

* :class:`Hidden2Scalar` (Eq. 3.10): U = Linear(Σ_i enc(x)[i]) with a CNN (Fig. 3.2), a BiLSTM on
  a CNN (Fig. 3.3) or a bidirectional Transformer encoder; :class:`HFHidden2Scalar` uses a
  pretrained Hugging Face encoder (BERT-like) on the detokenised text.
* :class:`SumInnerProduct` (Eq. 3.11): inner products of forward/backward LSTM states with the
  next/previous word embeddings.
* :class:`SumTargetLogit` (Eq. 3.12): summed raw next-word logits of a seqebm autoregressive LM.
* :class:`SumMaskedLogit` (Eq. 3.13) / :class:`SumTokenLogit` (Eq. 3.14): summed logits of a
  masked LM at masked / unmasked positions.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqebm.models.base import check_tokens
from seqebm.models.seq2seq import EncoderBlock
from seqebm.models.transformer import _init_weights

__all__ = [
    "HFHidden2Scalar", "Hidden2Scalar", "SumInnerProduct", "SumMaskedLogit", "SumTargetLogit",
    "SumTokenLogit", "check_potential_input",
]

BOS_ID = 1  # ``<s>`` of WordVocabulary


# ---------------------------------------------------------------------------------- helpers
def check_potential_input(tokens: Tensor, mask: Tensor | None, vocab_size: int,
                    max_len: int | None = None) -> Tensor:
    """Validate a batch of right-padded sentences; returns the (B, T) bool mask.

    Raises ``TypeError``/``ValueError`` naming the offending shapes or values when ``tokens`` is
    not a 2-D integer tensor with ids in ``[0, vocab_size)`` and length ``<= max_len``, or when
    ``mask`` is not a bool tensor of the same shape, holds an empty row (all False) or is not
    right padding (True then False). ``mask=None`` means every position is real.
    """
    check_tokens(tokens, vocab_size, max_len)
    if mask is None:
        mask = torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != tokens.shape:
        raise ValueError(f"mask {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor (True at real words), got {mask.dtype}")
    mask = mask.to(tokens.device)
    if tokens.shape[0] and tokens.shape[1] == 0:
        raise ValueError(f"every sentence needs >= 1 word, got tokens of shape {tuple(tokens.shape)}")
    if tokens.shape[0]:
        empty = ~mask.any(1)
        if bool(empty.any()):
            raise ValueError(f"row {int(empty.nonzero()[0, 0])} is empty (mask all False); every "
                             f"sentence needs >= 1 real word (tokens {tuple(tokens.shape)})")
        gaps = (mask[:, 1:] & ~mask[:, :-1]).any(1)
        if bool(gaps.any()):
            raise ValueError(f"mask must be right padding (True then False), row {int(gaps.nonzero()[0, 0])} is not")
    return mask


def _zeros_at_padding(h: Tensor, mask: Tensor) -> Tensor:
    """``h (B, T, D)`` with exact zeros at padded positions (``torch.where``: NaN-safe)."""
    return torch.where(mask.unsqueeze(-1), h, h.new_zeros(()))


def _masked_sum(h: Tensor, mask: Tensor) -> Tensor:
    """Σ over real positions: ``(B, T, ...)`` with ``mask (B, T)`` -> ``(B, ...)``."""
    m = mask.view(*mask.shape, *([1] * (h.dim() - 2)))
    return torch.where(m, h, h.new_zeros(())).sum(1)


def _same_pad(x: Tensor, k: int) -> Tensor:
    """Zero-pad ``x (B, D, T)`` so that a width-``k`` convolution keeps length T (Fig. 3.2's shadow)."""
    return F.pad(x, ((k - 1) // 2, k // 2))


def _positive(**values: int) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


class _Potential(nn.Module):
    """Shared validation, empty batches and float32 output: subclasses implement ``_potential``."""

    vocab_size: int
    max_len: int | None = None

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """U_θ(x) per sentence: ``tokens (B, T)`` ids, ``mask (B, T)`` bool -> ``(B,)`` float32."""
        mask = check_potential_input(tokens, mask, self.vocab_size, self.max_len)
        if tokens.shape[0] == 0:
            return torch.zeros(0, device=tokens.device)
        out = self._potential(tokens.long(), mask)
        assert out.shape == (tokens.shape[0],), out.shape
        return out.float()

    def _potential(self, tokens: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError


# ---------------------------------------------------------------------------------- Hidden2Scalar
class _CNNEncoder(nn.Module):
    """Embedding -> conv bank (several widths, concatenated, 1×1-projected) -> residual convs.

    Fig. 3.2 of the monograph ([184]); after every layer the padded positions are reset to zero,
    so a sentence sees exactly the zero padding it would see alone.
    """

    def __init__(self, vocab_size: int, d_model: int, kernel_sizes: Sequence[int], n_layers: int,
                 kernel_size: int, dropout: float) -> None:
        super().__init__()
        self.kernel_sizes, self.kernel_size = tuple(kernel_sizes), kernel_size
        self.embed = nn.Embedding(vocab_size, d_model)
        nn.init.normal_(self.embed.weight, std=0.1)
        self.bank = nn.ModuleList(nn.Conv1d(d_model, d_model, k) for k in self.kernel_sizes)
        self.bank_proj = nn.Conv1d(len(self.kernel_sizes) * d_model, d_model, 1)
        self.layers = nn.ModuleList(nn.Conv1d(d_model, d_model, kernel_size) for _ in range(n_layers))
        self.drop = nn.Dropout(dropout)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:  # -> (B, T, D), zeros at padding
        m = mask.unsqueeze(1)  # (B, 1, T)
        zero = torch.zeros((), device=tokens.device)
        x = torch.where(m, self.drop(self.embed(tokens)).transpose(1, 2), zero)  # (B, D, T)
        bank = torch.cat([F.relu(conv(_same_pad(x, k))) for conv, k in zip(self.bank, self.kernel_sizes)], 1)
        h = torch.where(m, F.relu(self.bank_proj(torch.where(m, bank, zero))), zero)  # (B, D, T)
        for conv in self.layers:
            h = torch.where(m, h + self.drop(F.relu(conv(_same_pad(h, self.kernel_size)))), zero)
        return h.transpose(1, 2)


class _BLSTMCNNEncoder(nn.Module):
    """Fig. 3.3 ([186]): a bidirectional LSTM (packed sequences) over :class:`_CNNEncoder` features."""

    def __init__(self, cnn: _CNNEncoder, d_model: int, hidden: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        self.cnn = cnn
        self.lstm = nn.LSTM(d_model, hidden, n_layers, batch_first=True, bidirectional=True,
                            dropout=dropout if n_layers > 1 else 0.0)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:  # -> (B, T, 2·hidden)
        h = self.cnn(tokens, mask)
        packed = pack_padded_sequence(h, mask.sum(1).cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return out


class _TransformerEncoder(nn.Module):
    """Token + learned position embeddings, pre-LN :class:`EncoderBlock` s, final LayerNorm."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 max_len: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.apply(_init_weights)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:  # -> (B, T, D)
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.embed(tokens) + self.pos(pos))
        attn_mask = mask[:, None, None, :]  # (B, 1, 1, T): padded keys are never attended
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)


class Hidden2Scalar(_Potential):
    """Hidden2Scalar (monograph §3.3.1, Eq. 3.10): U_θ(x) = Linear(Σ_{i=1}^{|x|} enc_θ(x)[i]).

    Args:
        vocab_size: V (word ids lie in ``[0, V)``).
        encoder: ``"cnn"`` (Fig. 3.2: embedding, a bank of 1-D convolutions of widths
            ``kernel_sizes`` concatenated and projected back to ``d_model``, then ``n_layers``
            residual convolutions of width ``kernel_size``, ReLU, padded positions zeroed after every
            layer); ``"blstm_cnn"`` (Fig. 3.3: a ``lstm_layers``-layer BiLSTM of width
            ``lstm_hidden`` per direction, default ``d_model // 2``, on packed CNN features);
            ``"transformer"`` (BERT-like: learned positions, ``n_layers`` pre-LN encoder blocks with
            padded keys masked, final LayerNorm). A pretrained HF encoder is :class:`HFHidden2Scalar`.
        d_model: D, the width of embeddings and CNN/Transformer states.
        n_heads, d_ff, max_len: Transformer only (``d_ff`` default ``4·d_model``; ``max_len``
            bounds T for the learned positions).
        dropout: applied in training mode only (default 0: a noisy potential hampers MCMC/NCE).

    The sum (not mean) over real positions follows Eq. 3.10. ``encode`` exposes enc_θ(x).
    """

    ENCODERS = ("cnn", "blstm_cnn", "transformer")

    def __init__(self, vocab_size: int, *, encoder: str = "cnn", d_model: int = 128, n_layers: int = 2,
                 kernel_sizes: Sequence[int] = (1, 2, 3, 4, 5), kernel_size: int = 3,
                 lstm_hidden: int | None = None, lstm_layers: int = 1, n_heads: int = 4,
                 d_ff: int | None = None, max_len: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        if encoder not in self.ENCODERS:
            hint = " (use HFHidden2Scalar for a pretrained Hugging Face encoder)" if encoder == "hf" else ""
            raise ValueError(f"encoder must be one of {self.ENCODERS}, got {encoder!r}{hint}")
        _positive(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, kernel_size=kernel_size,
                  lstm_layers=lstm_layers, n_heads=n_heads, max_len=max_len)
        if not kernel_sizes or any(not isinstance(k, int) or k <= 0 for k in kernel_sizes):
            raise ValueError(f"kernel_sizes must be a non-empty sequence of positive ints, got {kernel_sizes!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.vocab_size, self.encoder_name, self.d_model = vocab_size, encoder, d_model
        if encoder == "transformer":
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
            self.max_len = max_len
            self.encoder = _TransformerEncoder(vocab_size, d_model, n_layers, n_heads, d_ff or 4 * d_model,
                                               max_len, dropout)
            out_dim = d_model
        else:
            cnn = _CNNEncoder(vocab_size, d_model, kernel_sizes, n_layers, kernel_size, dropout)
            if encoder == "cnn":
                self.encoder, out_dim = cnn, d_model
            else:
                hidden = lstm_hidden if lstm_hidden is not None else max(1, d_model // 2)
                _positive(lstm_hidden=hidden)
                self.encoder = _BLSTMCNNEncoder(cnn, d_model, hidden, lstm_layers, dropout)
                out_dim = 2 * hidden
        self.out_dim = out_dim
        self.out = nn.Linear(out_dim, 1)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)

    def encode(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """enc_θ(x): hidden states ``(B, T, out_dim)`` with exact zeros at padded positions."""
        mask = check_potential_input(tokens, mask, self.vocab_size, self.max_len)
        return _zeros_at_padding(self.encoder(tokens.long(), mask), mask)

    def _potential(self, tokens: Tensor, mask: Tensor) -> Tensor:
        h = self.encoder(tokens, mask)  # (B, T, out_dim)
        return self.out(_masked_sum(h, mask)).squeeze(-1)


class HFHidden2Scalar(_Potential):
    """Hidden2Scalar (Eq. 3.10) with a pretrained Hugging Face encoder (BERT-like, monograph [39], [60], [86]).

    Each row's real word ids are mapped to words through ``vocab``, ids in ``drop_ids`` (default
    ``<pad>``, ``<s>``, ``</s>``) are dropped, ``<unk>`` becomes the HF tokenizer's unknown token,
    and the words are joined by single spaces and re-tokenised by the encoder's own tokenizer
    (``[CLS] ... [SEP]``, truncated to ``max_length`` sub-words). U = Linear(Σ of the last hidden
    states of the real sub-words) — the HF specials and padding are excluded; a row with no word
    left gives the bias alone.

    Args:
        vocab: a :class:`~seqebm.data.tagged.WordVocabulary` (its ``tokens``) or the id -> word list.
        encoder_path: a local folder loadable by ``transformers.AutoModel``/``AutoTokenizer`` (never
            downloads); ``None`` = the packaged all-MiniLM-L6-v2
            (:func:`seqebm.models.energy.default_encoder_path`).
        max_length: sub-word budget per sentence, specials included.
        freeze: keep the encoder fixed (eval mode, no gradient): only the linear head trains.
        drop_ids: word ids never shown to the encoder.
        unk_id: the vocabulary's ``<unk>`` id, shown as the HF tokenizer's ``unk_token``.
    """

    def __init__(self, vocab: Any, encoder_path: str | Path | None = None, *, max_length: int = 128,
                 freeze: bool = False, drop_ids: Sequence[int] = (0, 1, 2), unk_id: int = 3) -> None:
        super().__init__()
        words = list(vocab.tokens) if hasattr(vocab, "tokens") else list(vocab)
        if not words or not all(isinstance(w, str) for w in words):
            raise TypeError(f"vocab must be a WordVocabulary or a non-empty list of str, got {type(vocab).__name__}")
        from seqebm.models.energy import default_encoder_path

        folder = default_encoder_path() if encoder_path is None else Path(encoder_path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a local Hugging Face model folder (no config.json)")
        from transformers import AutoModel, AutoTokenizer

        self.encoder = AutoModel.from_pretrained(str(folder), local_files_only=True)
        self.hf_tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        limit = getattr(self.encoder.config, "max_position_embeddings", None)
        if not isinstance(max_length, int) or max_length < 2 or (limit is not None and max_length > limit):
            raise ValueError(f"max_length must be an int in [2, {limit}], got {max_length!r}")
        self.words, self.vocab_size, self.max_length, self.freeze = words, len(words), max_length, freeze
        self.drop_ids = frozenset(int(i) for i in drop_ids)
        self.unk_id, self.encoder_path = unk_id, str(folder)
        self.out = nn.Linear(int(self.encoder.config.hidden_size), 1)
        nn.init.normal_(self.out.weight, std=0.02)
        nn.init.zeros_(self.out.bias)
        if freeze:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def train(self, mode: bool = True) -> "HFHidden2Scalar":
        super().train(mode)
        if self.freeze:
            self.encoder.eval()
        return self

    def texts(self, tokens: Tensor, mask: Tensor | None = None) -> list[str]:
        """The space-joined strings the encoder reads, one per row."""
        mask = check_potential_input(tokens, mask, self.vocab_size)
        unk = self.hf_tokenizer.unk_token or self.words[self.unk_id]
        return [" ".join(unk if i == self.unk_id else self.words[i]
                         for i in row[m].tolist() if i not in self.drop_ids)
                for row, m in zip(tokens.cpu(), mask.cpu())]

    def _potential(self, tokens: Tensor, mask: Tensor) -> Tensor:
        enc = self.hf_tokenizer(self.texts(tokens, mask), padding=True, truncation=True,
                                max_length=self.max_length, return_tensors="pt",
                                return_special_tokens_mask=True)
        special = enc.pop("special_tokens_mask").bool()
        dev = self.out.weight.device
        enc = {k: v.to(dev) for k, v in enc.items()}
        real = enc["attention_mask"].bool() & ~special.to(dev)  # (B, L)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            h = self.encoder(**enc).last_hidden_state  # (B, L, D)
        return self.out(_masked_sum(h.to(self.out.weight.dtype), real)).squeeze(-1).to(tokens.device)


# ---------------------------------------------------------------------------------- SumInnerProduct
class SumInnerProduct(_Potential):
    """SumInnerProduct (monograph §3.3.1, Eq. 3.11; [185]).

    U_θ(x) = Σ_{i=1}^{|x|-1} h_{f,i}ᵀ e_{i+1} + Σ_{i=2}^{|x|} h_{b,i}ᵀ e_{i−1}, where e_i is the
    embedding of x_i and h_{f,i} / h_{b,i} are the top states of a forward LSTM over e_1..e_i and
    of a backward LSTM over e_{|x|}..e_i. The two directions are *separate* ``n_layers``-deep
    LSTMs (a stacked ``bidirectional=True`` LSTM would let h_{f,i} see x_{i+1} from layer 2 on).
    When ``hidden != d_emb`` the states are projected to the embedding size by bias-free linear
    maps (one per direction). Both LSTMs run on packed sequences; the backward one reads each row
    reversed within its own length, so padding never reaches it. A one-word sentence has U = 0.

    Args:
        vocab_size: V; d_emb: embedding size d; hidden: LSTM width (default ``d_emb``);
        n_layers: LSTM depth per direction; dropout: between LSTM layers, training mode only.
    """

    def __init__(self, vocab_size: int, *, d_emb: int = 128, hidden: int | None = None, n_layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        hidden = d_emb if hidden is None else hidden
        _positive(vocab_size=vocab_size, d_emb=d_emb, hidden=hidden, n_layers=n_layers)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.vocab_size, self.d_emb, self.hidden = vocab_size, d_emb, hidden
        self.embed = nn.Embedding(vocab_size, d_emb)
        nn.init.normal_(self.embed.weight, std=0.1)
        lstm_drop = dropout if n_layers > 1 else 0.0
        self.fwd = nn.LSTM(d_emb, hidden, n_layers, batch_first=True, dropout=lstm_drop)
        self.bwd = nn.LSTM(d_emb, hidden, n_layers, batch_first=True, dropout=lstm_drop)
        same = hidden == d_emb
        self.proj_f = nn.Identity() if same else nn.Linear(hidden, d_emb, bias=False)
        self.proj_b = nn.Identity() if same else nn.Linear(hidden, d_emb, bias=False)

    @staticmethod
    def _reverse_index(mask: Tensor) -> Tensor:
        """``(B, T)`` gather index reversing each row within its length (padding stays put)."""
        t = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        lengths = mask.sum(1, keepdim=True)
        return torch.where(t < lengths, lengths - 1 - t, t)

    def _run(self, lstm: nn.LSTM, x: Tensor, lengths: Tensor) -> Tensor:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = lstm(packed)
        return pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])[0]

    def states(self, tokens: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(e, h_f, h_b)``, each ``(B, T, d_emb)`` (states projected), zeros at padding."""
        mask = check_potential_input(tokens, mask, self.vocab_size)
        tokens, lengths = tokens.long(), mask.sum(1)
        e = _zeros_at_padding(self.embed(tokens), mask)  # (B, T, d)
        h_f = self._run(self.fwd, e, lengths)  # (B, T, H)
        rev = self._reverse_index(mask).unsqueeze(-1)  # (B, T, 1)
        e_rev = e.gather(1, rev.expand_as(e))
        h_b = self._run(self.bwd, e_rev, lengths)
        h_b = h_b.gather(1, rev.expand_as(h_b))  # back to the original order
        return e, _zeros_at_padding(self.proj_f(h_f), mask), _zeros_at_padding(self.proj_b(h_b), mask)

    def _potential(self, tokens: Tensor, mask: Tensor) -> Tensor:
        e, h_f, h_b = self.states(tokens, mask)
        fwd = (h_f[:, :-1] * e[:, 1:]).sum(-1)  # (B, T-1): h_{f,i}ᵀ e_{i+1}
        bwd = (h_b[:, 1:] * e[:, :-1]).sum(-1)  # (B, T-1): h_{b,i+1}ᵀ e_i
        pair = mask[:, 1:]  # both words of the pair are real
        return _masked_sum(fwd + bwd, pair)


# ---------------------------------------------------------------------------------- SumTargetLogit
class SumTargetLogit(_Potential):
    """SumTargetLogit (monograph §3.3.1, Eq. 3.12; [86]): U_θ(x) = Σ_{i=1}^{|x|} z_θ(x_{1:i−1})[x_i].

    ``lm`` is any seqebm autoregressive model (:mod:`seqebm.models.base` protocol: ``vocab_size``,
    optional ``max_len``, ``forward(tokens (B, T)) -> (B, T, V)`` with ``tokens[:, 0]`` = BOS),
    e.g. :class:`~seqebm.models.TransformerLM` or :class:`~seqebm.models.RNNLM`, whose vocabulary
    is the ELM's word vocabulary. The input ``[BOS, x_1, ..., x_{T−1}]`` is fed once and the raw
    logits (no softmax) of the actual next words are summed over real positions. Word-level ELMs
    use seqebm LMs: a sub-word HF causal LM (:class:`~seqebm.models.hf.HFCausalLM`) does not share
    the word ids and is not adapted here.

    Args:
        lm: the AR model; it is registered as a submodule and trained with the potential (pass
            ``copy_lm=True`` to work on a deep copy, e.g. when ``lm`` is also the proposal).
        normalize: use log-softmax instead of raw logits. Then U(x) = Σ_i log q(x_i | BOS, x_{<i})
            = log q(x_1..x_{|x|}), the AR model's log-probability of x as a *prefix* (no end-of-
            sentence term). If x ends with ``</s>`` (as GN-ELMs append), this is the log-probability
            of the complete sentence and exp(U) is normalised over ``</s>``-terminated sentences
            (log Z = 0) — a sanity check for ELM training and estimators.
        bos_id: the BOS id prepended (``<s>`` = 1).
    """

    def __init__(self, lm: nn.Module, *, normalize: bool = False, bos_id: int = BOS_ID,
                 copy_lm: bool = False) -> None:
        super().__init__()
        vocab = getattr(lm, "vocab_size", None)
        if not isinstance(lm, nn.Module) or not isinstance(vocab, int) or vocab <= 0:
            raise TypeError(f"lm must be a seqebm AR nn.Module with an int vocab_size, got {type(lm).__name__}")
        if not 0 <= bos_id < vocab:
            raise ValueError(f"bos_id={bos_id} is outside the LM vocabulary [0, {vocab})")
        self.lm = copy.deepcopy(lm) if copy_lm else lm
        self.vocab_size, self.normalize, self.bos_id = vocab, normalize, bos_id
        self.max_len = getattr(lm, "max_len", None)

    def _potential(self, tokens: Tensor, mask: Tensor) -> Tensor:
        bos = torch.full_like(tokens[:, :1], self.bos_id)
        logits = self.lm(torch.cat([bos, tokens[:, :-1]], 1))  # (B, T, V): logits[:, i] scores x_{i+1}
        if logits.shape != (*tokens.shape, self.vocab_size):
            raise ValueError(f"lm returned logits {tuple(logits.shape)}, expected {(*tokens.shape, self.vocab_size)}")
        if self.normalize:
            logits = torch.log_softmax(logits.float(), -1)
        z = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return _masked_sum(z, mask)


# ---------------------------------------------------------------------------------- MLM potentials
class _MLMPotential(_Potential):
    """Shared checks for potentials on a masked LM ``mlm(tokens (B, T), mask (B, T)) -> (B, T, V)``."""

    def __init__(self, mlm: nn.Module, vocab_size: int | None, need_mask_id: bool) -> None:
        super().__init__()
        if not isinstance(mlm, nn.Module):
            raise TypeError(f"mlm must be an nn.Module, got {type(mlm).__name__}")
        vocab = vocab_size if vocab_size is not None else getattr(mlm, "vocab_size", None)
        if not isinstance(vocab, int) or isinstance(vocab, bool) or vocab <= 0:
            raise TypeError(f"pass vocab_size (positive int) or give mlm an int vocab_size attribute, got {vocab!r}")
        mask_id = getattr(mlm, "mask_id", None)
        if need_mask_id and (not isinstance(mask_id, int) or isinstance(mask_id, bool) or mask_id < 0):
            raise TypeError(f"mlm needs a non-negative int attribute mask_id (the [MASK] id), got {mask_id!r}")
        self.mlm, self.vocab_size, self.mask_id = mlm, vocab, mask_id
        self.max_len = getattr(mlm, "max_len", None)

    def _logits(self, tokens: Tensor, mask: Tensor) -> Tensor:
        logits = self.mlm(tokens, mask)
        if logits.dim() != 3 or logits.shape[:2] != tokens.shape or logits.shape[2] < self.vocab_size:
            raise ValueError(f"mlm returned logits {tuple(logits.shape)} for tokens {tuple(tokens.shape)}; "
                             f"expected (B, T, V >= {self.vocab_size})")
        return logits


class SumTokenLogit(_MLMPotential):
    """SumTokenLogit (monograph §3.3.1, Eq. 3.14; [86]): U_θ(x) = Σ_{i=1}^{|x|} g_θ(x)[i][x_i].

    One forward pass of the masked LM on the *unmasked* sentence; the raw logits of the actual
    words are summed over real positions.

    Args:
        mlm: ``forward(tokens (B, T), mask (B, T) bool) -> logits (B, T, V)`` (padded keys must be
            ignored for padding invariance); trained with the potential.
        vocab_size: V (default ``mlm.vocab_size``).
    """

    def __init__(self, mlm: nn.Module, *, vocab_size: int | None = None) -> None:
        super().__init__(mlm, vocab_size, need_mask_id=False)

    def _potential(self, tokens: Tensor, mask: Tensor) -> Tensor:
        z = self._logits(tokens, mask).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)  # (B, T)
        return _masked_sum(z, mask)


class SumMaskedLogit(_MLMPotential):
    """SumMaskedLogit (monograph §3.3.1, Eq. 3.13; [86]): U_θ(x) = Σ_{i=1}^{|x|} g_θ(mask(x, i))[i][x_i].

    |x| forward passes per sentence, pass i with x_i replaced by ``mlm.mask_id`` (a pseudo-log-
    likelihood with raw logits). Batched: the N = Σ_b |x_b| masked copies of the real positions
    only are built as rows of a ``(N, T)`` batch and run in chunks of at most ``max_batch`` rows
    (each chunk trimmed to its longest sentence); the picked logits are scattered back per sentence.

    Args:
        mlm: as for :class:`SumTokenLogit`, plus an int attribute ``mask_id`` (may be >= V).
        vocab_size: V (default ``mlm.vocab_size``).
        max_batch: the most masked copies per MLM call (memory ∝ max_batch · T · V).
    """

    def __init__(self, mlm: nn.Module, *, vocab_size: int | None = None, max_batch: int = 256) -> None:
        super().__init__(mlm, vocab_size, need_mask_id=True)
        _positive(max_batch=max_batch)
        self.max_batch = max_batch

    def _potential(self, tokens: Tensor, mask: Tensor) -> Tensor:
        rows, pos = mask.nonzero(as_tuple=True)  # (N,), (N,): every real (sentence, position)
        lengths = mask.sum(1)
        pieces = []
        for start in range(0, rows.numel(), self.max_batch):
            r, p = rows[start:start + self.max_batch], pos[start:start + self.max_batch]
            width = int(lengths[r].max())
            inputs = tokens[r, :width].clone()  # (n, width)
            targets = inputs[torch.arange(r.numel(), device=r.device), p]  # (n,)
            inputs[torch.arange(r.numel(), device=r.device), p] = self.mask_id
            logits = self._logits(inputs, mask[r, :width])  # (n, width, V)
            pieces.append(logits[torch.arange(r.numel(), device=r.device), p].gather(-1, targets[:, None])[:, 0])
        picked = torch.cat(pieces)  # (N,)
        return picked.new_zeros(tokens.shape[0]).index_add(0, rows, picked)
