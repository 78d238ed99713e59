"""Speech features in plain PyTorch: log-mel filterbanks, per-utterance CMVN, SpecAugment masking.

Notation: B batch, S samples, T frames, F FFT bins (``n_fft // 2 + 1``), M mel bands.

Framing follows Kaldi's ``snip_edges`` convention: frame ``t`` covers samples
``[t * hop, t * hop + win)``, so an utterance of ``S >= win`` samples has ``1 + (S - win) // hop``
frames and no padding is ever read: a padded batch gives exactly the per-utterance features.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "hz_to_mel",
    "mel_to_hz",
    "mel_filterbank",
    "frame_lengths",
    "LogMelFeatures",
    "cmvn",
    "SpecAugment",
    "pad_waveforms",
]


def hz_to_mel(hz: Tensor | float) -> Tensor | float:
    """HTK mel scale: ``2595 * log10(1 + hz / 700)``."""
    if isinstance(hz, Tensor):
        return 2595.0 * torch.log10(1.0 + hz / 700.0)
    return 2595.0 * math.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: Tensor | float) -> Tensor | float:
    """Inverse of :func:`hz_to_mel`: ``700 * (10 ** (mel / 2595) - 1)``."""
    if isinstance(mel, Tensor):
        return 700.0 * (torch.pow(10.0, mel / 2595.0) - 1.0)
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(
    n_freqs: int,
    n_mels: int,
    sample_rate: int,
    *,
    fmin: float = 0.0,
    fmax: float | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Triangular HTK-mel filters over the FFT bins, shape ``(F, M)`` (no area normalisation).

    Band ``m`` rises linearly from ``f[m]`` to a peak of 1 at ``f[m + 1]`` and falls to 0 at
    ``f[m + 2]``, where ``f`` are ``M + 2`` points equally spaced on the mel scale between ``fmin``
    and ``fmax`` (default Nyquist); bin ``k`` sits at ``k * sample_rate / (2 * (F - 1))`` Hz.
    Same construction as ``torchaudio.functional.melscale_fbanks(norm=None, mel_scale="htk")``.
    """
    fmax = sample_rate / 2 if fmax is None else fmax
    if n_freqs < 2 or n_mels < 1:
        raise ValueError(f"need n_freqs >= 2 and n_mels >= 1, got n_freqs={n_freqs}, n_mels={n_mels}")
    if not 0.0 <= fmin < fmax <= sample_rate / 2:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2 = {sample_rate / 2}, got fmin={fmin}, fmax={fmax}")
    freqs = torch.linspace(0.0, sample_rate / 2, n_freqs, dtype=torch.float64)  # (F,)
    mels = torch.linspace(hz_to_mel(float(fmin)), hz_to_mel(float(fmax)), n_mels + 2, dtype=torch.float64)
    edges = mel_to_hz(mels)  # (M + 2,)
    lower, centre, upper = edges[:-2], edges[1:-1], edges[2:]  # (M,) each
    rising = (freqs[:, None] - lower) / (centre - lower)  # (F, M)
    falling = (upper - freqs[:, None]) / (upper - centre)  # (F, M)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).to(dtype)


def frame_lengths(lengths: Tensor, win_length: int, hop_length: int) -> Tensor:
    """Frames per utterance, ``(B,)``: ``1 + (S - win) // hop`` for ``S >= win``, else 0."""
    return torch.where(lengths >= win_length, 1 + (lengths - win_length).div(hop_length, rounding_mode="floor"),
                       torch.zeros_like(lengths))


class LogMelFeatures(nn.Module):
    """Log-mel filterbank features: ``log(mel_fb^T |rfft(window * frame)|^2 + floor)``.

    Args:
        sample_rate: Hz of the input (16 kHz).
        n_fft: FFT size; frames are zero-padded at their end from ``win_length`` to ``n_fft``.
        win_length, hop_length: in samples (default 25 ms and 10 ms at ``sample_rate``).
        n_mels, fmin, fmax: the HTK mel filterbank (:func:`mel_filterbank`; fmax default Nyquist).
        window: ``"hann"`` (periodic, as ``torch.hann_window``) or ``"hamming"``.
        log_floor: added before the log (``1e-6``).

    Shapes: ``forward(waveforms (B, S), lengths (B,) | None) -> (features (B, T, M), frames (B,))``;
    frames past an utterance's own length are set to 0. ``lengths=None`` means every row is full.
    Computed in the waveform's dtype (float32, or float64 for references).
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 400,
        win_length: int | None = None,
        hop_length: int | None = None,
        n_mels: int = 80,
        fmin: float = 0.0,
        fmax: float | None = 8000.0,
        *,
        window: str = "hann",
        log_floor: float = 1e-6,
    ) -> None:
        super().__init__()
        win_length = round(0.025 * sample_rate) if win_length is None else win_length
        hop_length = round(0.010 * sample_rate) if hop_length is None else hop_length
        if not 0 < win_length <= n_fft:
            raise ValueError(f"need 0 < win_length <= n_fft, got win_length={win_length}, n_fft={n_fft}")
        if hop_length < 1:
            raise ValueError(f"hop_length must be >= 1, got {hop_length}")
        if log_floor <= 0:
            raise ValueError(f"log_floor must be > 0, got {log_floor}")
        if window == "hann":
            win = torch.hann_window(win_length, periodic=True, dtype=torch.float64)
        elif window == "hamming":
            win = torch.hamming_window(win_length, periodic=True, dtype=torch.float64)
        else:
            raise ValueError(f"unknown window {window!r}; expected 'hann' or 'hamming'")
        self.sample_rate, self.n_fft = sample_rate, n_fft
        self.win_length, self.hop_length, self.n_mels = win_length, hop_length, n_mels
        self.log_floor = log_floor
        fb = mel_filterbank(n_fft // 2 + 1, n_mels, sample_rate, fmin=fmin, fmax=fmax, dtype=torch.float64)
        self.register_buffer("window", win, persistent=False)  # (win,)
        self.register_buffer("filterbank", fb, persistent=False)  # (F, M)

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        """Frames for ``lengths`` samples, ``(B,)``."""
        return frame_lengths(lengths, self.win_length, self.hop_length)

    def forward(self, waveforms: Tensor, lengths: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be (B, S), got shape {tuple(waveforms.shape)}")
        if not waveforms.is_floating_point():
            raise ValueError(f"waveforms must be floating point, got {waveforms.dtype}")
        b, s = waveforms.shape
        if lengths is None:
            lengths = torch.full((b,), s, dtype=torch.long, device=waveforms.device)
        lengths = lengths.to(device=waveforms.device, dtype=torch.long)
        if lengths.shape != (b,) or bool((lengths < 0).any()) or bool((lengths > s).any()):
            raise ValueError(f"lengths must be (B,) = ({b},) with 0 <= length <= S = {s}, got {lengths.tolist()}")
        frames = self.frame_lengths(lengths)  # (B,)
        if s < self.win_length:
            return waveforms.new_zeros(b, 0, self.n_mels), frames
        dtype = waveforms.dtype
        chunks = waveforms.unfold(-1, self.win_length, self.hop_length)  # (B, T, win)
        spec = torch.fft.rfft(chunks * self.window.to(dtype), n=self.n_fft)  # (B, T, F)
        power = spec.real.square() + spec.imag.square()  # (B, T, F)
        feats = torch.log(power @ self.filterbank.to(dtype) + self.log_floor)  # (B, T, M)
        valid = torch.arange(feats.shape[1], device=feats.device) < frames[:, None]  # (B, T)
        return feats.masked_fill(~valid[..., None], 0.0), frames


def cmvn(features: Tensor, lengths: Tensor | None = None, *, variance: bool = True, eps: float = 1e-5) -> Tensor:
    """Per-utterance cepstral mean (and variance) normalisation over the real frames only.

    ``features (B, T, M)``, ``lengths (B,)`` frames (None: all T). Each utterance's mel bands get
    zero mean and, with ``variance=True``, unit (population) variance over its first ``length``
    frames; the standard deviation is floored at ``eps``. Padded frames come out as 0.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be (B, T, M), got shape {tuple(features.shape)}")
    b, t, _ = features.shape
    if lengths is None:
        lengths = torch.full((b,), t, dtype=torch.long, device=features.device)
    lengths = lengths.to(features.device)
    if lengths.shape != (b,) or bool((lengths < 0).any()) or bool((lengths > t).any()):
        raise ValueError(f"lengths must be (B,) = ({b},) with 0 <= length <= T = {t}, got {lengths.tolist()}")
    valid = (torch.arange(t, device=features.device) < lengths[:, None])[..., None]  # (B, T, 1)
    count = lengths.clamp_min(1).to(features.dtype)[:, None, None]  # (B, 1, 1)
    x = features.masked_fill(~valid, 0.0)
    mean = x.sum(1, keepdim=True) / count  # (B, 1, M)
    x = (x - mean).masked_fill(~valid, 0.0)
    if variance:
        std = (x.square().sum(1, keepdim=True) / count).sqrt().clamp_min(eps)  # (B, 1, M)
        x = x / std
    return x


class SpecAugment(nn.Module):
    """SpecAugment masking (Park et al., 2019, Sec. 2): frequency and time masks, training mode only.

    Each utterance gets ``freq_masks`` bands of ``f ~ U{0..freq_width}`` consecutive mel bins
    starting at ``f0 ~ U{0..M - f}``, and ``time_masks`` spans of ``t ~ U{0..min(time_width,
    floor(max_time_proportion * length))}`` frames starting at ``t0 ~ U{0..length - t}`` (inside the
    real frames). Masked values are set to ``mask_value`` (0: the mean after :func:`cmvn`). In eval
    mode the input is returned unchanged. Defaults: two 27-bin frequency masks (the paper's LD
    policy) and two time masks of at most 40 frames and 20% of the utterance (its SM/SS ``p = 0.2``;
    speech-mini utterances are short).

    Random numbers (for reproducing masks): ``u = torch.rand(B, freq_masks, 2)`` then
    ``torch.rand(B, time_masks, 2)`` from ``generator``; width ``= floor(u[..., 0] * (W + 1))``,
    start ``= floor(u[..., 1] * (L - width + 1))`` with ``W``/``L`` the width limit / extent.

    Shapes: ``forward(features (B, T, M), lengths (B,) | None, generator=None) -> (B, T, M)``.
    """

    def __init__(
        self,
        freq_masks: int = 2,
        freq_width: int = 27,
        time_masks: int = 2,
        time_width: int = 40,
        max_time_proportion: float = 0.2,
        mask_value: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("freq_masks", freq_masks), ("freq_width", freq_width),
                            ("time_masks", time_masks), ("time_width", time_width)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= max_time_proportion <= 1.0:
            raise ValueError(f"max_time_proportion must be in [0, 1], got {max_time_proportion}")
        self.freq_masks, self.freq_width = freq_masks, freq_width
        self.time_masks, self.time_width = time_masks, time_width
        self.max_time_proportion, self.mask_value = max_time_proportion, mask_value

    def masks(self, lengths: Tensor, n_frames: int, n_mels: int, *,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Boolean masks ``(freq (B, M), time (B, T))``: True where a value is masked."""
        b = lengths.shape[0]
        device = lengths.device

        def spans(n: int, limit: Tensor, extent: Tensor, size: int) -> Tensor:  # (B,) limits -> (B, size)
            u = torch.rand(b, n, 2, generator=generator, dtype=torch.float64, device=device)  # (B, n, 2)
            width = torch.minimum((u[..., 0] * (limit[:, None] + 1)).floor().long(), extent[:, None])  # (B, n)
            start = (u[..., 1] * (extent[:, None] - width + 1)).floor().long()  # (B, n)
            pos = torch.arange(size, device=device)  # (size,)
            inside = (pos >= start[..., None]) & (pos < (start + width)[..., None])  # (B, n, size)
            return inside.any(1) if n else torch.zeros(b, size, dtype=torch.bool, device=device)

        m = torch.full((b,), n_mels, dtype=torch.long, device=device)
        freq = spans(self.freq_masks, torch.full_like(m, self.freq_width), m, n_mels)
        cap = torch.clamp((self.max_time_proportion * lengths.double()).floor().long(), max=self.time_width)
        time = spans(self.time_masks, cap, lengths.long(), n_frames)
        return freq, time

    def forward(self, features: Tensor, lengths: Tensor | None = None, *,
                generator: torch.Generator | None = None) -> Tensor:
        if not self.training:
            return features
        if features.dim() != 3:
            raise ValueError(f"features must be (B, T, M), got shape {tuple(features.shape)}")
        b, t, m = features.shape
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=features.device)
        lengths = lengths.to(features.device)
        if lengths.shape != (b,) or bool((lengths < 0).any()) or bool((lengths > t).any()):
            raise ValueError(f"lengths must be (B,) = ({b},) with 0 <= length <= T = {t}, got {lengths.tolist()}")
        freq, time = self.masks(lengths, t, m, generator=generator)
        masked = freq[:, None, :] | time[:, :, None]  # (B, T, M)
        return features.masked_fill(masked, self.mask_value)


def pad_waveforms(
    waveforms: Sequence[np.ndarray | Tensor], *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Stack 1-D waveforms into a zero-padded ``(B, S_max)`` tensor plus their lengths ``(B,)``."""
    if len(waveforms) == 0:
        raise ValueError("pad_waveforms needs at least one waveform")
    tensors = [torch.as_tensor(np.asarray(w) if not isinstance(w, Tensor) else w) for w in waveforms]
    for i, w in enumerate(tensors):
        if w.dim() != 1:
            raise ValueError(f"waveform {i} must be 1-D (samples,), got shape {tuple(w.shape)}")
    lengths = torch.tensor([w.shape[0] for w in tensors], dtype=torch.long)
    out = torch.zeros(len(tensors), int(lengths.max()), dtype=dtype)
    for i, w in enumerate(tensors):
        out[i, : w.shape[0]] = w.to(dtype)
    return out, lengths
