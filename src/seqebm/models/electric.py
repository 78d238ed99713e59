"""Electric, an energy-based cloze model, and its two-tower noise (monograph §3.4; Clark et al. 2020).

Notation: B batch, T padded length, V vocabulary (ids ``[0, V)``), D model width, K positions
drawn for replacement, l = |x| the real length of a row, x_\\t = (x_1..x_{t−1}, x_{t+1}..x_l).

Sentences are left-aligned, right-padded rows of word ids (pad id 0 by default) with a bool
``mask`` (B, T), True at real positions (see :mod:`seqebm.models.masked_lm`).

* :class:`Electric` (Eq. 3.16): h = BiTransformer(x) over the *unmasked* input and the conditional
  EBM p_θ(x_t | x_\\t) = exp(−wᵀh_t) / Z_θ(x_\\t). ``forward`` returns the log of the
  un-normalised output, log p̂_θ(x_t | x_\\t) = −wᵀh_t (higher = more likely; the energy is
  wᵀh_t, see :meth:`Electric.energy`). Trained by NCE it learns to be self-normalised
  (Z_θ ≈ 1), so one pass scores a sentence: PLL(x) = Σ_t −wᵀh_t (Eq. 3.19,
  :meth:`Electric.score`), where a masked LM needs |x| passes
  (:meth:`seqebm.models.masked_lm.MaskedLM.pseudo_log_likelihood`).
* :class:`TwoTowerCloze`, the noise q of Electric's NCE: a left-to-right and a right-to-left
  causal Transformer, →h = T_LTR(x), ←h = T_RTL(x), and
  q(x_t | x_\\t) = softmax(W [→h_{t−1}, ←h_{t+1}] + b)_{x_t}; →h_0 is a learned start state and
  ←h_{l+1} a learned end state (per row: the RTL side of each row's own last real token).
  q(·|x_\\t) is exactly independent of x_t. ``pad_id`` is outside q's support (log q = −inf),
  so samples are never padding. Trained by maximum likelihood jointly with Electric (dynamic
  NCE, §2.4.1); see :class:`seqebm.objectives.electric.ElectricNCELoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.models.base import check_tokens
from seqebm.models.masked_lm import BidirectionalEncoder, check_padding_mask, check_sizes
from seqebm.models.transformer import _init_weights

__all__ = ["Electric", "TwoTowerCloze", "causal_attention_mask"]


def causal_attention_mask(mask: Tensor, *, reverse: bool = False) -> Tensor:
    """Bool attention mask ``(B, 1, T, T)`` (True = attend) of a causal tower over padded rows.

    Left-to-right: query t sees the real keys s <= t. Right-to-left (``reverse``): query t sees
    the real keys s >= t, so a row's RTL states start from its own last real token and padding
    never leaks. Padded queries of the RTL tower, which would see no key, see themselves
    (finite, unused states instead of NaN).
    """
    t = mask.shape[1]
    pos = torch.arange(t, device=mask.device)
    order = pos[None, :] >= pos[:, None] if reverse else pos[None, :] <= pos[:, None]  # (T_q, T_k)
    allowed = order[None] & mask[:, None, :]  # (B, T, T)
    if reverse:
        allowed = allowed | torch.eye(t, dtype=torch.bool, device=mask.device)[None]
    return allowed[:, None]


class TwoTowerCloze(nn.Module):
    """The two-tower cloze model q(x_t | x_\\t) (monograph §3.4), Electric's noise distribution.

    Two independent causal Transformers (own token and position embeddings, pre-LN blocks,
    final LN) and an output layer ``Linear(2D, V)`` on the concatenated context states.

    Args:
        vocab_size: V (the same vocabulary as the :class:`Electric` it serves).
        d_model, n_layers, n_heads, d_ff, max_len, dropout: size of *each* tower.
        pad_id: the padding id; it gets probability 0 and must not occur at real positions.
    """

    def __init__(self, vocab_size: int, *, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 d_ff: int | None = None, max_len: int = 256, dropout: float = 0.1, pad_id: int = 0) -> None:
        super().__init__()
        check_sizes(vocab_size, d_model, n_layers, n_heads, max_len, dropout, pad_id)
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be >= 2 (pad_id is outside the support), got {vocab_size}")
        self.vocab_size, self.max_len, self.pad_id, self.d_model = vocab_size, max_len, pad_id, d_model
        size = dict(d_model=d_model, n_layers=n_layers, n_heads=n_heads, d_ff=d_ff or 4 * d_model,
                    max_len=max_len, dropout=dropout)
        self.ltr = BidirectionalEncoder(vocab_size, **size)  # used with a causal mask
        self.rtl = BidirectionalEncoder(vocab_size, **size)  # used with a reversed causal mask
        self.start = nn.Parameter(torch.zeros(d_model))  # →h_0
        self.end = nn.Parameter(torch.zeros(d_model))  # ←h_{l+1}
        self.out = nn.Linear(2 * d_model, vocab_size)
        self.apply(_init_weights)
        nn.init.normal_(self.start, std=0.02)
        nn.init.normal_(self.end, std=0.02)

    def _check(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_tokens(tokens, self.vocab_size, self.max_len)
        mask = check_padding_mask(tokens, mask)
        tokens = tokens.long()
        bad = mask & (tokens == self.pad_id)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"pad_id={self.pad_id} at real position (row {b}, position {t}); "
                             "it lies outside the noise model's support")
        return tokens, mask

    def _context(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """[→h_{t−1}, ←h_{t+1}] for every position, ``(B, T, 2D)``."""
        b = tokens.shape[0]
        fwd = self.ltr(tokens, causal_attention_mask(mask))  # (B, T, D): reads x_{<=t}
        bwd = self.rtl(tokens, causal_attention_mask(mask, reverse=True))  # (B, T, D): reads x_{>=t}
        left = torch.cat([self.start.to(fwd.dtype).expand(b, 1, -1), fwd[:, :-1]], 1)  # →h_{t−1}
        right = torch.cat([bwd[:, 1:], bwd.new_zeros(b, 1, bwd.shape[-1])], 1)  # ←h_{t+1}
        has_next = F.pad(mask[:, 1:], (0, 1), value=False)  # (B, T): t+1 is real
        right = torch.where(has_next[..., None], right, self.end.to(bwd.dtype).expand_as(right))
        return torch.cat([left, right], -1)

    def log_probs(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """log q(· | x_\\t) at every position, ``(B, T, V)`` (rows sum to 1 in probability).

        Position t reads x_{<t} (LTR) and x_{>t} up to the row's last real token (RTL) only, never
        x_t nor padding; ``[:, t, pad_id]`` is −inf. Values at padded positions are finite but
        meaningless.

        Args:
            tokens: ``(B, T)`` ids in ``[0, V)``, no ``pad_id`` at real positions.
            mask: ``(B, T)`` bool, True at real positions, right padding.
        """
        tokens, mask = self._check(tokens, mask)
        logits = self.out(self._context(tokens, mask))  # (B, T, V)
        pad = torch.tensor([self.pad_id], device=logits.device)
        logits = logits.index_fill(-1, pad, float("-inf"))  # pad_id is outside the support
        return logits.log_softmax(-1)

    def token_log_probs(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """log q(x_t | x_\\t) of the tokens themselves, ``(B, T)``, 0 at padding."""
        lp = self.log_probs(tokens, mask).gather(-1, tokens.long()[..., None]).squeeze(-1)
        return torch.where(mask, lp, lp.new_zeros(()))

    def mle_loss(self, tokens: Tensor, mask: Tensor, *, reduction: str = "mean") -> Tensor:
        """Maximum-likelihood (cloze) loss −Σ_t log q(x_t | x_\\t), the noise's training objective.

        ``reduction``: ``"mean"`` per real token, ``"sum"`` over the batch, ``"none"`` per row (B,).
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        nll = -self.token_log_probs(tokens, mask).sum(1)  # (B,)
        if reduction == "none":
            return nll
        return nll.sum() / mask.sum() if reduction == "mean" else nll.sum()

    @torch.no_grad()
    def sample(self, tokens: Tensor, mask: Tensor, positions: Tensor, *, generator: torch.Generator | None = None,
               log_probs: Tensor | None = None) -> Tensor:
        """x̂_t ~ q(· | x_\\t) at the chosen positions, each from the *clean* context x_\\t.

        Returns ``(B, T)`` ids: samples where ``positions`` is True, ``tokens`` elsewhere (this is
        x^noised of Eq. 3.18 when ``positions`` is R). The samples are detached.

        Args:
            tokens, mask: as in :meth:`log_probs`.
            positions: ``(B, T)`` bool, True only at real positions.
            generator: random source (on the tokens' device).
            log_probs: optional precomputed :meth:`log_probs` of ``tokens`` (avoids a second pass).
        """
        tokens, mask = self._check(tokens, mask)
        if not isinstance(positions, Tensor) or positions.dtype != torch.bool or positions.shape != tokens.shape:
            got = (tuple(positions.shape), positions.dtype) if isinstance(positions, Tensor) else type(positions)
            raise ValueError(f"positions must be a bool tensor of shape {tuple(tokens.shape)}, got {got}")
        if bool((positions & ~mask).any()):
            raise ValueError("positions must select real positions only (positions & ~mask is not empty)")
        if log_probs is None:
            log_probs = self.log_probs(tokens, mask)
        elif log_probs.shape != (*tokens.shape, self.vocab_size):
            raise ValueError(f"log_probs must have shape {(*tokens.shape, self.vocab_size)}, "
                             f"got {tuple(log_probs.shape)}")
        out = tokens.clone()
        if bool(positions.any()):
            probs = log_probs.detach()[positions].double().exp()  # (n, V)
            out[positions] = torch.multinomial(probs, 1, generator=generator).squeeze(1).to(out.dtype)
        return out


class Electric(nn.Module):
    """Electric (monograph §3.4, Eq. 3.16): log p̂_θ(x_t | x_\\t) = −wᵀh_t, h = BiTransformer(x).

    Token + learned position embeddings, pre-LN encoder blocks over the unmasked input (padded
    keys masked out), a final LayerNorm and the bias-free scalar head w (``Linear(D, 1)``).

    Args:
        vocab_size: V.
        d_model, n_layers, n_heads, d_ff, max_len, dropout: encoder size (d_ff defaults to 4 D).
        pad_id: the padding id (only used for validation of the vocabulary).
    """

    def __init__(self, vocab_size: int, *, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 d_ff: int | None = None, max_len: int = 256, dropout: float = 0.1, pad_id: int = 0) -> None:
        super().__init__()
        check_sizes(vocab_size, d_model, n_layers, n_heads, max_len, dropout, pad_id)
        self.vocab_size, self.max_len, self.pad_id, self.d_model = vocab_size, max_len, pad_id, d_model
        self.encoder = BidirectionalEncoder(vocab_size, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                            d_ff=d_ff or 4 * d_model, max_len=max_len, dropout=dropout)
        self.w = nn.Linear(d_model, 1, bias=False)
        self.apply(_init_weights)

    def _hidden(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        check_tokens(tokens, self.vocab_size, self.max_len)
        mask = check_padding_mask(tokens, mask)
        return self.encoder(tokens.long(), mask[:, None, None, :]), mask

    def hidden(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """The contextual representations h(x) ``(B, T, D)`` (for fine-tuning / features)."""
        return self._hidden(tokens, mask)[0]

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """log p̂_θ(x_t | x_\\t) = −wᵀh_t at every real position, ``(B, T)``; 0 at padding.

        This is the *negative* energy (the log of Eq. 3.16's un-normalised output): higher means
        x_t is more plausible in its context. Under self-normalisation (Z_θ = 1) it is
        log p_θ(x_t | x_\\t).

        Args:
            tokens: ``(B, T)`` ids in ``[0, V)``; mask: ``(B, T)`` bool, True at real positions.
        """
        h, mask = self._hidden(tokens, mask)  # validates
        log_p = -self.w(h).squeeze(-1)  # (B, T)
        return torch.where(mask, log_p, log_p.new_zeros(()))

    def energy(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """Per-position energy wᵀh_t ``(B, T)`` (= −forward; lower = more likely), 0 at padding."""
        return -self.forward(tokens, mask)

    def score(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """PLL(x) = Σ_t log p̂_θ(x_t | x_\\t) = Σ_t −wᵀh_t per row, ``(B,)``, in ONE pass (Eq. 3.19).

        Assumes self-normalisation (Z_θ(x_\\t) = 1, which NCE training encourages).
        """
        return self.forward(tokens, mask).sum(1)
