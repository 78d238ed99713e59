"""Residual autoregressive LM (RALM), the residual-EBM seed's locally normalised baseline (§4.1, Eq. 6).

Notation: B batch, T length, V vocabulary.

    log P_RALM(x_t | x_<t) = log P_LM(x_t | x_<t) + log P_φ(x_t | x_<t) + const,

with P_LM frozen and P_φ another autoregressive LM trained by exact maximum likelihood of
P_RALM (teacher forcing on the combined model). Its logits are the sum of the two models'
log-softmax outputs; the softmax supplies the constant. It has the parameter count of the
joint model (LM + energy network) when P_φ has that of the energy network, which makes it the
fair locally normalised comparison for a residual EBM. P_φ starts near uniform (a fresh model's
logits are small), so P_RALM starts near P_LM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from seqebm.sampling.sampler import _accepts_capacity


class ResidualAutoregressiveLM(nn.Module):
    """Frozen base LM + trainable residual LM, summed in log space; the seqebm AR protocol.

    Args:
        lm: the frozen base LM (``requires_grad=False``, kept in eval mode).
        residual: the trainable AR model P_φ with the same vocabulary.
    """

    def __init__(self, lm: nn.Module, residual: nn.Module) -> None:
        super().__init__()
        if lm.vocab_size != residual.vocab_size:
            raise ValueError(f"vocabularies differ: base LM {lm.vocab_size}, residual {residual.vocab_size}")
        self.lm, self.residual = lm, residual
        for p in self.lm.parameters():
            p.requires_grad_(False)
        self.lm.eval()
        self.vocab_size = lm.vocab_size
        lens = [m for m in (getattr(lm, "max_len", None), getattr(residual, "max_len", None)) if m is not None]
        self.max_len = min(lens) if lens else None

    def train(self, mode: bool = True) -> "ResidualAutoregressiveLM":
        super().train(mode)
        self.lm.eval()
        return self

    @staticmethod
    def _combine(base: Tensor, res: Tensor) -> Tensor:
        return torch.log_softmax(base.float(), -1) + torch.log_softmax(res.float(), -1)

    def forward(self, tokens: Tensor, **context: Tensor) -> Tensor:
        with torch.no_grad():
            base = self.lm(tokens, **context)
        return self._combine(base, self.residual(tokens, **context))

    def init_state(self, batch_size: int, device: torch.device | str, *, capacity: int | None = None,
                   **context: Tensor) -> dict:
        def one(model: nn.Module) -> Any:
            if capacity is not None and _accepts_capacity(model):
                return model.init_state(batch_size, device, capacity=capacity, **context)
            return model.init_state(batch_size, device, **context)

        return {"lm": one(self.lm), "res": one(self.residual)}

    def step(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict]:
        with torch.no_grad():
            base, s_lm = self.lm.step(tokens, state["lm"])
        res, s_res = self.residual.step(tokens, state["res"])
        return self._combine(base, res), {"lm": s_lm, "res": s_res}

    def select_state(self, state: dict, index: Tensor) -> dict:
        return {"lm": self.lm.select_state(state["lm"], index), "res": self.residual.select_state(state["res"], index)}
