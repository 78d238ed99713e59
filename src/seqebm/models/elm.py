"""Energy-based language models: GN-ELM, TRF-LM and residual ELM over a sentence potential.

Notation: B sentences, T padded length, m the maximum length, l a sentence's length, V vocabulary.

A *potential* is any ``nn.Module`` with ``forward(tokens (B, T) long, mask (B, T) bool) -> U (B,)``:
sentences are left-aligned word-id rows (pad 0, no BOS/EOS added by the caller) and U(x) is the
unnormalised log-probability (the negative energy), monograph §3.3.1. The three models here turn
a potential into a language model:

* :class:`GNELM` (Eq. 3.3): p(x) = exp(U(x ⟨/s⟩)) / Z, one normaliser over all lengths; the
  end-of-sentence token is appended before the potential sees the sentence (§3.3.1, "whether to
  include ⟨EOS⟩"), which lets the potential model length.
* :class:`TRFLM` (Eq. 3.5): p(l, x) = π_l exp(U(x) − ζ_l), a mixture of one random field per
  length l with the empirical length prior π_l and ζ_l = log Z_l estimated in training (by
  augmented stochastic approximation or noise-contrastive estimation,
  :mod:`seqebm.objectives.trf`).
* :class:`ResidualELM` (Eq. 3.15): p(x) = q(x) exp(U(x)) / Z with q a sentence-level
  autoregressive LM (:class:`~seqebm.models.sentence_lm.BoundedSentenceLM`).

:class:`MixedPotential` sums potentials, e.g. discrete n-gram features plus a neural network
(§3.3.2, mixed-feature TRFs).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["GNELM", "TRFLM", "ResidualELM", "MixedPotential", "check_sentences", "length_prior",
           "append_token"]


def check_sentences(tokens: Tensor, mask: Tensor, *, max_length: int | None = None, vocab_size: int | None = None,
                    who: str = "sentences") -> Tensor:
    """Validate a padded sentence batch; returns the lengths (B,). Rows must be left-aligned, non-empty."""
    if not isinstance(tokens, Tensor) or not isinstance(mask, Tensor):
        raise TypeError(f"{who}: tokens and mask must be tensors, got {type(tokens).__name__}, {type(mask).__name__}")
    if tokens.dim() != 2 or mask.shape != tokens.shape:
        raise ValueError(f"{who}: tokens (B, T) and mask (B, T) must match, got {tuple(tokens.shape)} and "
                         f"{tuple(mask.shape)}")
    if tokens.dtype not in (torch.long, torch.int32, torch.int64) or mask.dtype != torch.bool:
        raise TypeError(f"{who}: tokens must be integer and mask bool, got {tokens.dtype}, {mask.dtype}")
    lengths = mask.sum(1)
    if tokens.shape[0] and bool((lengths == 0).any()):
        raise ValueError(f"{who}: empty sentence in rows {(lengths == 0).nonzero().flatten().tolist()[:10]}")
    pos = torch.arange(tokens.shape[1], device=tokens.device)
    if not bool((mask == (pos[None] < lengths[:, None])).all()):
        raise ValueError(f"{who}: mask must be left-aligned (True then False in every row)")
    if max_length is not None and tokens.shape[0] and int(lengths.max()) > max_length:
        raise ValueError(f"{who}: a sentence has {int(lengths.max())} tokens, more than max_length={max_length}")
    if vocab_size is not None and bool(mask.any()):
        real = tokens[mask]
        if int(real.min()) < 0 or int(real.max()) >= vocab_size:
            raise ValueError(f"{who}: token ids must lie in [0, {vocab_size}), got [{int(real.min())}, "
                             f"{int(real.max())}]")
    return lengths


def append_token(tokens: Tensor, mask: Tensor, token_id: int) -> tuple[Tensor, Tensor]:
    """Write ``token_id`` right after each row's last real token (one extra column). (B, T+1) x2."""
    b, t = tokens.shape
    lengths = mask.sum(1)
    out = torch.cat([tokens, tokens.new_zeros(b, 1)], 1)
    out[torch.arange(b, device=tokens.device), lengths] = token_id
    new_mask = torch.cat([mask, mask.new_zeros(b, 1)], 1)
    new_mask[torch.arange(b, device=tokens.device), lengths] = True
    return out, new_mask


def length_prior(lengths: Sequence[int] | Tensor, max_length: int, *, smoothing: float = 0.0) -> Tensor:
    """Empirical length probabilities π_1..π_m (Eq. 3.5's MLE), as a (m + 1,) float64 tensor with π_0 = 0.

    ``smoothing`` adds that count to every length 1..m so that lengths unseen in training keep a
    non-zero probability.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if smoothing < 0:
        raise ValueError(f"smoothing must be >= 0, got {smoothing}")
    lengths = torch.as_tensor(lengths, dtype=torch.long).flatten()
    if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > max_length):
        raise ValueError(f"lengths must lie in [1, {max_length}], got [{int(lengths.min())}, {int(lengths.max())}]")
    counts = torch.bincount(lengths, minlength=max_length + 1).double()
    counts[1:] += smoothing
    counts[0] = 0.0
    if counts.sum() <= 0:
        raise ValueError("no lengths to estimate the length prior from")
    return counts / counts.sum()


class MixedPotential(nn.Module):
    """U(x) = Σ_k U_k(x): e.g. a linear potential on discrete features plus a neural one (monograph §3.3.2)."""

    def __init__(self, *potentials: nn.Module) -> None:
        super().__init__()
        if not potentials:
            raise ValueError("MixedPotential needs at least one potential")
        self.parts = nn.ModuleList(potentials)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        total = None
        for part in self.parts:
            u = part(tokens, mask)
            total = u if total is None else total + u.to(total.dtype)
        return total


class GNELM(nn.Module):
    """Globally normalised ELM, p(x) = exp(U(x ⟨/s⟩)) / Z (monograph §3.2.1, Eq. 3.3).

    Args:
        potential: U over sentences (see the module docstring).
        eos_id: id of ⟨/s⟩ appended before the potential is evaluated (``None``: not appended).
        max_length: longest sentence the model defines (Z sums over lengths 1..max_length).
    """

    def __init__(self, potential: nn.Module, *, eos_id: int | None = 2, max_length: int = 64) -> None:
        super().__init__()
        if max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        self.potential, self.eos_id, self.max_length = potential, eos_id, max_length
        # log Z estimate: learned by NCE/DNCE, set exactly by ExactMLELoss
        self.log_z = nn.Parameter(torch.zeros((), dtype=torch.float64))

    def potential_input(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        return append_token(tokens, mask, self.eos_id) if self.eos_id is not None else (tokens, mask)

    def log_unnormalized(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """U(x ⟨/s⟩), shape (B,)."""
        check_sentences(tokens, mask, max_length=self.max_length, who="GNELM")
        return self.potential(*self.potential_input(tokens, mask))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.log_unnormalized(tokens, mask)

    def log_prob(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """log p(x) with the current ``log_z`` estimate, (B,) float64 (differentiable in ``log_z``)."""
        return self.log_unnormalized(tokens, mask).double() - self.log_z


class TRFLM(nn.Module):
    """Trans-dimensional random field LM, p(l, x) = π_l / Z_l · exp(U(x)) (monograph §3.2.2, Eq. 3.5).

    Args:
        potential: U over sentences of one length (no ⟨/s⟩ is appended: each length has its own
            normaliser, §3.3.1).
        length_probs: (m + 1,) π_l with π_0 = 0, e.g. :func:`length_prior` of the training text.

    Attributes:
        zeta: (m + 1,) parameter, ζ_l = the estimate of log Z_l (ζ_0 unused). Trained by NCE as a
            parameter, or moved by augmented SA under ``torch.no_grad``.
    """

    def __init__(self, potential: nn.Module, length_probs: Tensor) -> None:
        super().__init__()
        pi = torch.as_tensor(length_probs, dtype=torch.float64)
        if pi.dim() != 1 or pi.numel() < 2:
            raise ValueError(f"length_probs must be a (m + 1,) vector with m >= 1, got shape {tuple(pi.shape)}")
        if bool((pi < 0).any()) or abs(float(pi.sum()) - 1.0) > 1e-6 or float(pi[0]) != 0.0:
            raise ValueError("length_probs must be a probability vector over lengths 1..m with π_0 = 0")
        self.potential = potential
        self.max_length = pi.numel() - 1
        self.register_buffer("length_probs", pi)
        self.zeta = nn.Parameter(torch.zeros(self.max_length + 1, dtype=torch.float64))

    @property
    def log_length_probs(self) -> Tensor:
        return torch.log(self.length_probs)

    def log_unnormalized(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """U(x), shape (B,)."""
        check_sentences(tokens, mask, max_length=self.max_length, who="TRFLM")
        return self.potential(tokens, mask)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.log_unnormalized(tokens, mask)

    def log_prob(self, tokens: Tensor, mask: Tensor, *, zeta: Tensor | None = None) -> Tensor:
        """log p(l, x) = log π_l − ζ_l + U(x), (B,) float64; ``zeta`` overrides the learned ζ."""
        lengths = mask.sum(1)
        z = self.zeta if zeta is None else zeta.to(self.zeta)
        return self.log_length_probs[lengths] - z[lengths] + self.log_unnormalized(tokens, mask).double()

    def log_target(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """log π_l − ζ_l + U(x) with ζ detached: the unnormalised density samplers target, (B,)."""
        lengths = mask.sum(1)
        return (self.log_length_probs[lengths] - self.zeta.detach()[lengths]
                + self.log_unnormalized(tokens, mask).double())


class ResidualELM(nn.Module):
    """Residual ELM, p(x) = q(x) exp(U(x)) / Z (monograph §3.3.3, Eq. 3.15).

    Args:
        base: the reference LM q, a :class:`~seqebm.models.sentence_lm.BoundedSentenceLM`
            (frozen here: its parameters get ``requires_grad=False``).
        potential: the residual potential U.
    """

    def __init__(self, base: nn.Module, potential: nn.Module) -> None:
        super().__init__()
        if not hasattr(base, "log_prob"):
            raise TypeError("base must provide log_prob(tokens, mask), e.g. a BoundedSentenceLM")
        self.base, self.potential = base, potential
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.register_buffer("log_z", torch.zeros((), dtype=torch.float64))

    @property
    def max_length(self) -> int:
        return self.base.max_length

    def residual(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """U(x), (B,)."""
        check_sentences(tokens, mask, max_length=self.max_length, who="ResidualELM")
        return self.potential(tokens, mask)

    def log_unnormalized(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """log q(x) + U(x), (B,) float64."""
        with torch.no_grad():
            log_q = self.base.log_prob(tokens, mask).double()
        return log_q + self.residual(tokens, mask).double()

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.log_unnormalized(tokens, mask)

    def log_prob(self, tokens: Tensor, mask: Tensor) -> Tensor:
        return self.log_unnormalized(tokens, mask) - self.log_z
