"""Acoustic models for CTC, CTC-CRF and RNN-T (monograph §4.2, §4.3.1).

Notation: B utterances, N feature frames, F feature dims (log-mel bins), T = encoder frames after
subsampling, D model width, C = V + 1 output symbols (blank = 0, labels 1..V), U labels.

* :class:`ConvSubsampling`: two 3x3 stride-2 convolutions over (time, frequency): T = ((N-1)//2 - 1)//2.
  No padding in time, so an output frame only reads real input frames (batching never changes it).
* :class:`AcousticEncoder`: subsampling + a BiLSTM stack (default) or a small Conformer stack.
* :class:`CTCAcousticModel`: encoder + linear + log_softmax -> frame log-probabilities (B, T, C),
  the node potentials log p(pi_t | x) of CTC and CTC-CRF (Eq. 4.22).
* :class:`RNNTAcousticModel`: encoder (transcription network) + a label LSTM (prediction network)
  + a joint network, log p(k | t, y_<=u) (B, T, U + 1, C).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

__all__ = ["ConvSubsampling", "ConformerBlock", "AcousticEncoder", "CTCAcousticModel", "RNNTAcousticModel",
           "subsampled_lengths"]


def subsampled_lengths(lengths: Tensor) -> Tensor:
    """Frames after :class:`ConvSubsampling` (two kernel-3 stride-2 convolutions, no padding)."""
    return torch.div(torch.div(lengths - 1, 2, rounding_mode="floor") - 1, 2, rounding_mode="floor")


class ConvSubsampling(nn.Module):
    """(B, N, F) -> (B, T, D), T = ((N - 1) // 2 - 1) // 2 (4x fewer frames)."""

    def __init__(self, num_features: int, d_model: int, channels: int = 32) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"conv channels must be >= 1, got {channels}")
        self.conv = nn.Sequential(nn.Conv2d(1, channels, 3, stride=2), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 3, stride=2), nn.ReLU())
        f = ((num_features - 1) // 2 - 1) // 2
        if f < 1:
            raise ValueError(f"num_features={num_features} is too small for 4x subsampling (need >= 7)")
        self.out = nn.Linear(channels * f, d_model)

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv(x.unsqueeze(1))  # (B, ch, T, f)
        B, ch, T, f = h.shape
        return self.out(h.permute(0, 2, 1, 3).reshape(B, T, ch * f)), subsampled_lengths(lengths).clamp_min(0)


class ConformerBlock(nn.Module):
    """Macaron feed-forward, self-attention, depthwise-conv module, feed-forward, LayerNorm (Gulati et al. 2020)."""

    def __init__(self, d_model: int, n_heads: int = 4, kernel: int = 15, dropout: float = 0.1) -> None:
        super().__init__()

        def ffn() -> nn.Sequential:
            return nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, 4 * d_model), nn.SiLU(),
                                 nn.Dropout(dropout), nn.Linear(4 * d_model, d_model), nn.Dropout(dropout))

        self.ff1, self.ff2 = ffn(), ffn()
        self.attn_norm = nn.LayerNorm(d_model)
        self.attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.conv_norm = nn.LayerNorm(d_model)
        self.pw1 = nn.Conv1d(d_model, 2 * d_model, 1)
        self.dw = nn.Conv1d(d_model, d_model, kernel, padding=kernel // 2, groups=d_model)
        self.conv_out_norm = nn.LayerNorm(d_model)  # per frame (batch norm would mix in the padding)
        self.pw2 = nn.Conv1d(d_model, d_model, 1)
        self.drop = nn.Dropout(dropout)
        self.out_norm = nn.LayerNorm(d_model)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        x = x + 0.5 * self.ff1(x)
        h = self.attn_norm(x)
        x = x + self.drop(self.attn(h, h, h, key_padding_mask=~mask, need_weights=False)[0])
        h = F.glu(self.pw1(self.conv_norm(x).transpose(1, 2)), dim=1)
        h = h.masked_fill(~mask.unsqueeze(1), 0.0)  # the depthwise conv must see zeros past the end
        h = self.pw2(F.silu(self.conv_out_norm(self.dw(h).transpose(1, 2)).transpose(1, 2)))
        x = x + self.drop(h.transpose(1, 2))
        x = x + 0.5 * self.ff2(x)
        return self.out_norm(x).masked_fill(~mask.unsqueeze(-1), 0.0)


class AcousticEncoder(nn.Module):
    """Subsampling + BiLSTM (``arch="blstm"``, hidden per direction = d_model // 2) or Conformer blocks."""

    ARCHS = ("blstm", "conformer")

    def __init__(self, num_features: int = 80, *, d_model: int = 256, num_layers: int = 3, arch: str = "blstm",
                 n_heads: int = 4, dropout: float = 0.1, conv_channels: int = 32) -> None:
        super().__init__()
        if arch not in self.ARCHS:
            raise ValueError(f"encoder arch must be one of {self.ARCHS}, got {arch!r}")
        if d_model % 2 or num_layers < 1:
            raise ValueError(f"d_model must be even and num_layers >= 1, got {d_model}, {num_layers}")
        self.arch, self.out_dim = arch, d_model
        self.subsample = ConvSubsampling(num_features, d_model, channels=conv_channels)
        self.drop = nn.Dropout(dropout)
        if arch == "blstm":
            self.rnn = nn.LSTM(d_model, d_model // 2, num_layers, batch_first=True, bidirectional=True,
                               dropout=dropout if num_layers > 1 else 0.0)
        else:
            self.blocks = nn.ModuleList(ConformerBlock(d_model, n_heads, dropout=dropout) for _ in range(num_layers))

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, F) features + (B,) lengths -> (B, T, D) encodings + (B,) encoder lengths."""
        if features.dim() != 3:
            raise ValueError(f"features must be (B, N, F), got shape {tuple(features.shape)}")
        x, out_lengths = self.subsample(features, lengths)
        if int(out_lengths.min()) < 1:
            short = int(lengths[out_lengths < 1][0])
            raise ValueError(f"an utterance of {short} frames is too short for 4x subsampling (needs >= 7 frames)")
        x = self.drop(x)
        T = x.shape[1]
        mask = torch.arange(T, device=x.device).unsqueeze(0) < out_lengths.unsqueeze(1)
        if self.arch == "blstm":
            packed = pack_padded_sequence(x, out_lengths.cpu(), batch_first=True, enforce_sorted=False)
            out, _ = self.rnn(packed)
            x, _ = pad_packed_sequence(out, batch_first=True, total_length=T)
        else:
            for block in self.blocks:
                x = block(x, mask)
        return self.drop(x).masked_fill(~mask.unsqueeze(-1), 0.0), out_lengths


def _augment(module: nn.Module | None, training: bool, features: Tensor, lengths: Tensor) -> Tensor:
    return module(features, lengths) if module is not None and training else features


class CTCAcousticModel(nn.Module):
    """Frame log-probabilities log p(pi_t | x) (B, T, C) for CTC and CTC-CRF.

    ``augment``: an optional module ``(features, lengths) -> features`` applied in training mode
    only (e.g. :class:`seqebm.data.features.SpecAugment`).
    """

    def __init__(self, encoder: AcousticEncoder, num_symbols: int, *, augment: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder, self.num_symbols, self.augment = encoder, num_symbols, augment
        self.out = nn.Linear(encoder.out_dim, num_symbols)

    def forward(self, features: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        features = _augment(self.augment, self.training, features, lengths)
        h, out_lengths = self.encoder(features, lengths)
        return self.out(h).float().log_softmax(-1), out_lengths


class RNNTAcousticModel(nn.Module):
    """RNN-T: transcription network (the encoder), prediction network (label LSTM), joint network.

    joint(f_t, g_u) = W_o tanh(W_f f_t + W_g g_u) -> log_softmax over C (Graves 2012).
    """

    def __init__(self, encoder: AcousticEncoder, num_symbols: int, *, pred_dim: int = 256, joint_dim: int = 256,
                 dropout: float = 0.1, augment: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder, self.num_symbols, self.augment = encoder, num_symbols, augment
        self.embed = nn.Embedding(num_symbols, pred_dim)  # id 0 (blank) doubles as the start symbol
        self.pred = nn.LSTM(pred_dim, pred_dim, batch_first=True)
        self.f_proj = nn.Linear(encoder.out_dim, joint_dim)
        self.g_proj = nn.Linear(pred_dim, joint_dim)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(joint_dim, num_symbols)

    def predict(self, labels: Tensor, state=None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(N, L) previous labels (start = 0) -> prediction vectors (N, L, pred_dim) and state."""
        out, state = self.pred(self.embed(labels), state)
        return out, state

    def joint(self, f: Tensor, g: Tensor) -> Tensor:
        """Broadcastable f (..., joint_dim-able encoder vectors) and g -> log-probs (..., C)."""
        return self.out(self.drop(torch.tanh(self.f_proj(f) + self.g_proj(g)))).float().log_softmax(-1)

    def forward(self, features: Tensor, lengths: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Joint log-probs (B, T, U + 1, C) for padded targets (B, U), and the encoder lengths."""
        features = _augment(self.augment, self.training, features, lengths)
        f, out_lengths = self.encoder(features, lengths)
        start = targets.new_zeros(targets.shape[0], 1)
        g, _ = self.predict(torch.cat([start, targets.clamp_min(0)], 1))  # (B, U+1, P)
        return self.joint(f.unsqueeze(2), g.unsqueeze(1)), out_lengths
