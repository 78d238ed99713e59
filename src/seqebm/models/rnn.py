"""LSTM and GRU language models.

Notation: B batch, T length, V vocabulary, E embedding width, H hidden width, L layers.
The recurrent state is kept batch-first, ``(B, L, H)``, so that :func:`select_batch_rows`
works on it; it is transposed to PyTorch's ``(L, B, H)`` only inside ``step``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from seqebm.models.base import check_tokens, select_batch_rows


class RNNLM(nn.Module):
    """Embedding -> LSTM/GRU stack -> (projection) -> tied output layer."""

    def __init__(
        self,
        vocab_size: int,
        *,
        cell: str = "lstm",
        d_model: int = 256,
        hidden: int | None = None,
        n_layers: int = 2,
        dropout: float = 0.1,
        max_len: int | None = None,
        tie_embeddings: bool = True,
    ) -> None:
        super().__init__()
        if cell not in ("lstm", "gru"):
            raise ValueError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        hidden = hidden or d_model
        self.vocab_size, self.max_len, self.cell = vocab_size, max_len, cell
        self.n_layers, self.hidden = n_layers, hidden
        self.embed = nn.Embedding(vocab_size, d_model)
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(d_model, hidden, n_layers, batch_first=True,
                           dropout=dropout if n_layers > 1 else 0.0)
        self.drop = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, d_model) if hidden != d_model else nn.Identity()
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        if tie_embeddings:
            self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.05)

    def _run(self, tokens: Tensor, hx) -> tuple[Tensor, object]:
        out, hx = self.rnn(self.drop(self.embed(tokens)), hx)
        return self.head(self.drop(self.proj(out))), hx

    def forward(self, tokens: Tensor, **context: Tensor) -> Tensor:
        check_tokens(tokens, self.vocab_size, self.max_len)
        return self._run(tokens, None)[0]

    def features(self, tokens: Tensor, **context: Tensor) -> Tensor:
        """Top hidden states ``(B, T, E)`` after the projection: ``head(features) == forward``.

        The same dropout as in :meth:`forward` is applied, so the identity also holds in
        training mode for a shared random state. Used by energy networks built on the LM
        (residual-EBM seed §4.1, UniT).
        """
        check_tokens(tokens, self.vocab_size, self.max_len)
        out, _ = self.rnn(self.drop(self.embed(tokens)), None)
        return self.drop(self.proj(out))

    def init_state(self, batch_size: int, device: torch.device | str, **context: Tensor) -> dict:
        dtype = self.embed.weight.dtype
        z = torch.zeros(batch_size, self.n_layers, self.hidden, device=device, dtype=dtype)
        state = {"h": z, "length": 0}
        if self.cell == "lstm":
            state["c"] = z.clone()
        return state

    def step(self, tokens: Tensor, state: dict) -> tuple[Tensor, dict]:
        length = state["length"] + tokens.shape[1]
        if self.max_len is not None and length > self.max_len:
            raise ValueError(
                f"sequence of length {length} is longer than the model's context max_len={self.max_len}"
            )
        h = state["h"].transpose(0, 1).contiguous()
        hx = (h, state["c"].transpose(0, 1).contiguous()) if self.cell == "lstm" else h
        logits, hx = self._run(tokens, hx)
        if self.cell == "lstm":
            new = {"h": hx[0].transpose(0, 1), "c": hx[1].transpose(0, 1), "length": length}
        else:
            new = {"h": hx.transpose(0, 1), "length": length}
        return logits, new

    def select_state(self, state: dict, index: Tensor) -> dict:
        return select_batch_rows(state, index)
