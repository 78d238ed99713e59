"""Residual energy-based model: a frozen autoregressive LM times exp(−E) (residual-EBM seed, §3).

Notation: B sequences, T total length (BOS + prefix + continuation), p prefix length (BOS
included), V vocabulary.

The joint model over continuations of a prefix x_{1..p} is (Eq. 2)

    P_θ(x_{p+1..T} | x_{1..p}) = P_LM(x_{p+1..T} | x_{1..p}) · exp(−E_θ(x_{1..T})) / Z_θ(x_{1..p}),
    Z_θ(x_{1..p}) = E_{x ∼ P_LM(·|x_{1..p})}[exp(−E_θ(x))],

with P_LM fixed during training ("residual": the energy only corrects the LM). The energy reads
the whole sequence, prefix included; any :class:`~seqebm.models.energy.SequenceEnergy`
(``energy(tokens, mask) -> (B,)``) fits: UniT, BiT, BiT* or your own module.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seqebm.sampling.scoring import sequence_log_prob


class ResidualEBM(nn.Module):
    """A frozen LM plus a trainable energy network.

    Args:
        lm: an autoregressive seqebm model (or HF adapter); its parameters are frozen
            (``requires_grad=False``) and it is kept in eval mode.
        energy: a module ``energy(tokens (B, T), mask (B, T)) -> (B,)``.

    ``forward(tokens, mask)`` returns the energy (what the trainer's objective differentiates).
    """

    def __init__(self, lm: nn.Module, energy: nn.Module) -> None:
        super().__init__()
        if not isinstance(lm, nn.Module) or not isinstance(energy, nn.Module):
            raise ValueError("lm and energy must be nn.Modules")
        self.lm, self.energy_net = lm, energy
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.lm.eval()

    def train(self, mode: bool = True) -> "ResidualEBM":
        super().train(mode)
        self.lm.eval()  # the LM stays frozen: no dropout
        return self

    def forward(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.energy(tokens, mask)

    def energy(self, tokens: Tensor, mask: Tensor | None = None) -> Tensor:
        """E_θ(x_{1..T}) per row, shape (B,)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must have shape (B, T), got {tuple(tokens.shape)}")
        mask = torch.ones_like(tokens, dtype=torch.bool) if mask is None else mask
        if mask.shape != tokens.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must match tokens {tuple(tokens.shape)}")
        e = self.energy_net(tokens, mask)
        if not isinstance(e, Tensor) or e.shape != (tokens.shape[0],):
            got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
            raise ValueError(f"the energy network must return shape ({tokens.shape[0]},), got {got}")
        return e

    @torch.no_grad()
    def lm_log_prob(self, tokens: Tensor, *, prefix_len: int | Tensor, lengths: Tensor | None = None) -> Tensor:
        """log P_LM(x_{p+1..T} | x_{1..p}) per row (float64, (B,)); ``lengths`` = real lengths (BOS incl.)."""
        return sequence_log_prob(self.lm, tokens, prefix_len=prefix_len, lengths=lengths)

    @torch.no_grad()
    def unnormalized_log_prob(self, tokens: Tensor, *, prefix_len: int | Tensor,
                              lengths: Tensor | None = None) -> Tensor:
        """log P_LM(continuation | prefix) − E(x): log P_θ + log Z_θ(prefix), float64 (B,)."""
        mask = None
        if lengths is not None:
            mask = torch.arange(tokens.shape[1], device=tokens.device)[None] < lengths.to(tokens.device)[:, None]
        return self.lm_log_prob(tokens, prefix_len=prefix_len, lengths=lengths) - \
            self.energy(tokens, mask).double()
