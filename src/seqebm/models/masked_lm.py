"""Masked language model (BERT) and its pseudo-log-likelihood: the baseline of Electric.

Notation: B batch, T padded length, V real vocabulary (ids ``[0, V)``), D model width,
l = |x| the real length of a row, N = Σ_b l_b the (sentence, position) rows of a PLL.

Sentences are left-aligned, right-padded rows of word ids with a bool ``mask`` (B, T), True at
real positions (ids of :class:`seqebm.data.tagged.WordVocabulary`: ``<pad>`` 0, ``<s>`` 1,
``</s>`` 2, ``<unk>`` 3); every row holds at least one real token. Whatever sits in a real
position (``<s>``/``</s>`` included) is an ordinary token x_t of the cloze task.

Monograph §3.4 ("Energy-based cloze models"): BERT draws positions R = {t_1, ..., t_k},
replaces them by ``[MASK]`` and maximises Σ_j log p_θ(x_{t_j} | mask(x, R)). It defines no
sentence likelihood; the pseudo-log-likelihood

    PLL(x) = Σ_{t=1}^{l} log p_θ(x_t | mask(x, {t}))

needs |x| passes of the Transformer (one per masked position), which Electric
(:mod:`seqebm.models.electric`, Eq. 3.19) replaces by a single pass.

Also here, shared with :mod:`seqebm.models.electric`: :func:`check_padding_mask` (input
validation) and :class:`BidirectionalEncoder` (token + learned position embeddings, pre-LN
:class:`~seqebm.models.seq2seq.EncoderBlock` s attending to every real position, final LN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.models.base import check_tokens
from seqebm.models.seq2seq import EncoderBlock
from seqebm.models.transformer import _init_weights

__all__ = ["BidirectionalEncoder", "MaskedLM", "check_padding_mask", "check_sizes"]


def check_padding_mask(tokens: Tensor, mask: Tensor, name: str = "mask") -> Tensor:
    """Validate the (B, T) bool ``mask`` of right-padded ``tokens``; return it on their device.

    Raises ``TypeError`` when it is not a bool tensor and ``ValueError`` (naming the shapes or the
    offending row) when its shape differs from the tokens', T = 0, a row has no real token
    (``mask[:, 0]`` False) or a row is not right padding (True ... True False ... False).
    """
    if not isinstance(mask, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True at real tokens), got {mask.dtype}")
    if mask.shape != tokens.shape:
        raise ValueError(f"{name} {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}")
    if tokens.shape[1] == 0:
        raise ValueError(f"tokens must hold at least one position, got shape {tuple(tokens.shape)}")
    if tokens.shape[0]:
        if not bool(mask[:, 0].all()):
            bad = int((~mask[:, 0]).nonzero()[0, 0])
            raise ValueError(f"row {bad} of {name} has no real token (mask[:, 0] must be True)")
        gap = mask[:, 1:] & ~mask[:, :-1]
        if bool(gap.any()):
            bad = int(gap.any(1).nonzero()[0, 0])
            raise ValueError(f"{name} must be right padding (True then False); row {bad} is not")
    return mask.to(tokens.device)


def check_sizes(vocab_size: int, d_model: int, n_layers: int, n_heads: int, max_len: int, dropout: float,
                pad_id: int) -> None:
    """Shared constructor checks (ValueError with the offending values)."""
    if min(vocab_size, d_model, n_layers, n_heads, max_len) <= 0:
        raise ValueError(f"vocab_size, d_model, n_layers, n_heads, max_len must be positive, got {vocab_size}, "
                         f"{d_model}, {n_layers}, {n_heads}, {max_len}")
    if d_model % n_heads:
        raise ValueError(f"d_model={d_model} is not divisible by n_heads={n_heads}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
    if not 0 <= pad_id < vocab_size:
        raise ValueError(f"pad_id={pad_id} is outside the vocabulary [0, {vocab_size})")


class BidirectionalEncoder(nn.Module):
    """h(x) = LN(Blocks(E[x] + P)): every position attends to every real position of its row.

    ``forward(tokens (B, T), attn_mask (B, 1, 1|T, T) bool) -> (B, T, D)``. Right padding
    never changes the states of real positions (padded keys are masked out and positions are
    absolute from the left). With a causal ``attn_mask`` the same stack is a one-directional
    tower (:class:`~seqebm.models.electric.TwoTowerCloze`). Inputs are not validated here.
    """

    def __init__(self, n_embeddings: int, *, d_model: int, n_layers: int, n_heads: int, d_ff: int,
                 max_len: int, dropout: float) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_embeddings, d_model)
        self.pos = nn.Embedding(max_len, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(EncoderBlock(d_model, n_heads, d_ff, dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)

    def forward(self, tokens: Tensor, attn_mask: Tensor) -> Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.embed(tokens) + self.pos(pos))  # (B, T, D)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.ln_f(x)


class MaskedLM(nn.Module):
    """BERT-style masked LM (Devlin et al. 2019): bidirectional encoder + tied MLM head.

    The input vocabulary has ``vocab_size + 1`` ids: the real ids ``[0, V)`` and ``mask_id = V``
    (``[MASK]``). The head LN(h) E_{[0,V)}ᵀ + b is tied to the real rows of the embedding and
    predicts real ids only.

    Args:
        vocab_size: V, the real vocabulary (e.g. ``len(WordVocabulary)``).
        d_model, n_layers, n_heads, d_ff, max_len, dropout: encoder size (d_ff defaults to 4 D).
        pad_id: the padding id (never masked, never drawn as a random replacement).
    """

    def __init__(self, vocab_size: int, *, d_model: int = 128, n_layers: int = 2, n_heads: int = 4,
                 d_ff: int | None = None, max_len: int = 256, dropout: float = 0.1, pad_id: int = 0) -> None:
        super().__init__()
        check_sizes(vocab_size, d_model, n_layers, n_heads, max_len, dropout, pad_id)
        self.vocab_size, self.max_len, self.pad_id, self.d_model = vocab_size, max_len, pad_id, d_model
        self.mask_id = vocab_size
        self.encoder = BidirectionalEncoder(vocab_size + 1, d_model=d_model, n_layers=n_layers, n_heads=n_heads,
                                            d_ff=d_ff or 4 * d_model, max_len=max_len, dropout=dropout)
        self.mlm_ln = nn.LayerNorm(d_model)
        self.mlm_bias = nn.Parameter(torch.zeros(vocab_size))
        self.apply(_init_weights)

    def _logits(self, tokens: Tensor, mask: Tensor) -> Tensor:
        h = self.encoder(tokens, mask[:, None, None, :])  # (B, T, D)
        return F.linear(self.mlm_ln(h), self.encoder.embed.weight[: self.vocab_size], self.mlm_bias)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        """MLM logits ``(B, T, V)`` over the real ids at every position.

        Args:
            tokens: ``(B, T)`` ids in ``[0, V]`` (``V`` = ``mask_id`` is allowed here).
            mask: ``(B, T)`` bool, True at real positions, right padding.
        """
        check_tokens(tokens, self.vocab_size + 1, self.max_len)
        mask = check_padding_mask(tokens, mask)
        return self._logits(tokens.long(), mask)

    def mlm_loss(self, tokens: Tensor, mask: Tensor, *, mask_prob: float = 0.15,
                 generator: torch.Generator | None = None) -> Tensor:
        """BERT's masked-LM loss (scalar): −mean_{t∈R} log p_θ(x_t | corrupt(x, R)) (monograph §3.4).

        Each real, non-pad position joins R with probability ``mask_prob`` (at least one per
        batch); of R, 80% become ``[MASK]``, 10% a uniformly random real id other than
        ``pad_id`` and 10% stay unchanged. Padding is never chosen.

        Args:
            tokens: ``(B, T)`` ids in ``[0, V)``; mask: ``(B, T)`` bool, right padding.
            mask_prob: the selection probability, in (0, 1].
            generator: random source (on the tokens' device) for R and the 80/10/10 split.
        """
        check_tokens(tokens, self.vocab_size, self.max_len)
        mask = check_padding_mask(tokens, mask)
        if not 0.0 < mask_prob <= 1.0:
            raise ValueError(f"mask_prob must lie in (0, 1], got {mask_prob}")
        tokens = tokens.long()
        candidates = mask & (tokens != self.pad_id)
        if not bool(candidates.any()):
            raise ValueError(f"no maskable (real, non-pad) token in the batch of shape {tuple(tokens.shape)}")
        dev = tokens.device
        chosen = candidates & (torch.rand(tokens.shape, generator=generator, device=dev) < mask_prob)
        if not bool(chosen.any()):  # always train on something
            chosen.view(-1)[candidates.flatten().nonzero()[0, 0]] = True
        action = torch.rand(tokens.shape, generator=generator, device=dev)
        if self.vocab_size > 1:  # uniform over [0, V) \ {pad_id}
            r = torch.randint(0, self.vocab_size - 1, tokens.shape, generator=generator, device=dev)
            random_ids = r + (r >= self.pad_id).long()
        else:
            random_ids = tokens
        inputs = torch.where(chosen & (action < 0.8), torch.full_like(tokens, self.mask_id), tokens)
        inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
        logits = self._logits(inputs, mask)[chosen]  # (|R|, V)
        return F.cross_entropy(logits, tokens[chosen])

    def token_pseudo_log_probs(self, tokens: Tensor, mask: Tensor, *, max_batch: int = 256) -> Tensor:
        """``(B, T)``: log p_θ(x_t | mask(x, {t})) at real positions, 0 at padding.

        One Transformer pass per (sentence, position): the N = Σ_b l_b copies of the rows, each
        with its own position masked, are run in chunks of at most ``max_batch`` rows (each chunk
        cut to its longest real length). Equal to a per-position loop. Runs in the caller's
        train/eval mode and grad mode (call ``eval()`` for deterministic scores).
        """
        check_tokens(tokens, self.vocab_size, self.max_len)
        mask = check_padding_mask(tokens, mask)
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be a positive int, got {max_batch!r}")
        tokens = tokens.long()
        lengths = mask.sum(1)  # (B,)
        b_idx, t_idx = mask.nonzero(as_tuple=True)  # (N,) each
        values = []
        for start in range(0, b_idx.numel(), max_batch):
            bi, ti = b_idx[start:start + max_batch], t_idx[start:start + max_batch]
            width = int(lengths[bi].max())
            rows = tokens[bi, :width].clone()  # (n, width)
            arange = torch.arange(bi.numel(), device=tokens.device)
            rows[arange, ti] = self.mask_id
            logits = self._logits(rows, mask[bi, :width])[arange, ti]  # (n, V)
            values.append(logits.log_softmax(-1).gather(1, tokens[bi, ti][:, None]).squeeze(1))
        dtype = self.mlm_bias.dtype
        out = torch.zeros(tokens.shape, dtype=dtype, device=tokens.device)
        if values:
            out = out.index_put((b_idx, t_idx), torch.cat(values).to(dtype))
        return out

    def pseudo_log_likelihood(self, tokens: Tensor, mask: Tensor, *, max_batch: int = 256) -> Tensor:
        """PLL(x) = Σ_t log p_θ(x_t | mask(x, {t})) per row, ``(B,)`` (monograph §3.4; |x| passes).

        See :meth:`token_pseudo_log_probs` for the batching; padding contributes nothing.
        """
        return self.token_pseudo_log_probs(tokens, mask, max_batch=max_batch).sum(1)
