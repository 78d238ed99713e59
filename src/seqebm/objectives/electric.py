"""NCE for Electric with a jointly trained two-tower noise (monograph §3.4, Eq. 3.17 / 3.18).

Notation: B batch, T padded length, V vocabulary, l = l_b the real length of row b,
R = R_b the k = k_b positions drawn for noise in row b, x̂_t ~ q(· | x_\\t) the noise token at
t ∈ R, x^noised = replace(x, R, x̂), p̂_θ(x_t | ·) = exp(−wᵀh_t) Electric's un-normalised output
(:class:`~seqebm.models.electric.Electric`), q the noise
(:class:`~seqebm.models.electric.TwoTowerCloze`). By default k_b = ⌈0.15 · l_b⌉ (at least 1),
drawn uniformly without replacement among the row's real positions.

The binary classifier of (conditional) NCE, Eq. (2.45)/(2.46), with n_pos positives and k
negatives per sentence has the logit

    G = log(n_pos · p̂_θ(y | ctx)) − log(k · q(y | x_\\t)),    p(positive | y) = σ(G),

and each sentence contributes −Σ_{positives} log σ(G) − Σ_{negatives} log σ(−G):

* ``variant="exact"`` (Eq. 3.17): n_pos = l positives, every t = 1..l with y = x_t and
  ctx = x_\\t (one clean pass), and k negatives, t ∈ R with y = x̂_t and ctx = x_\\t; each
  negative needs its own pass over x with only x_t replaced (the k rows are batched).
  l · E_{t∼Uni(1,l)}[·] is computed exactly as Σ_{t=1}^{l}[·], and k · E_{t∈R}[·] as Σ_{t∈R}[·].
* ``variant="efficient"`` (Eq. 3.18, the default): ONE pass over x^noised; n_pos = l − k
  positives, the untouched t ∉ R with y = x_t, and k negatives t ∈ R with y = x̂_t, both with
  ctx = x^noised_\\t (the efficiency assumption p̂_θ(·|x_\\t) ≈ p̂_θ(·|x^noised_\\t)); q is always
  evaluated in the clean context x_\\t. This needs l − k >= 1: a row with k_b >= l_b (e.g. a
  sentence of length 1, where ⌈0.15⌉ = 1 = l) raises ``ValueError``; filter such rows or add
  ``<s>``/``</s>``, or use ``variant="exact"``, which handles l = 1 (1 positive, 1 negative).

A noise token equal to the original x_t still counts as a negative (as in Eq. 3.17/3.18).

Normalisation (``reduction``): per sentence, L_b = the sum above; ``"none"`` returns (B,)
L_b, ``"sum"`` Σ_b L_b, ``"mean"`` (default) Σ_b L_b / Σ_b (n_pos,b + k_b), the average binary
cross-entropy per classified token (so the scale does not grow with sentence length). The noise
MLE term follows the same reduction over real tokens (−Σ_t log q(x_t|x_\\t); mean per token).

Dynamic NCE (§2.4.1): the noise is trained only by its MLE term. The noise samples are drawn
without gradient and the noise log-probabilities inside G are detached, so Electric's
parameters receive gradient only from the NCE term and the noise's only from −log q(data).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.models.base import check_tokens
from seqebm.models.masked_lm import check_padding_mask

__all__ = ["ElectricLogits", "ElectricNCELoss", "draw_noise_positions", "num_noise_positions"]


def num_noise_positions(length: int, fraction: float = 0.15) -> int:
    """k = ⌈fraction · l⌉, at least 1 (monograph §3.4: k = ⌈0.15 l⌉).

    The product is rounded to 9 decimals first so that e.g. 0.15 · 20 = 3.0000000000000004
    gives 3, not 4.
    """
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must lie in (0, 1], got {fraction}")
    return max(1, math.ceil(round(fraction * length, 9)))


def draw_noise_positions(mask: Tensor, counts: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
    """R: ``counts[b]`` distinct positions per row, uniform among the real ones, ``(B, T)`` bool."""
    if bool((counts > mask.sum(1)).any()) or bool((counts < 0).any()):
        raise ValueError(f"counts {counts.tolist()} must lie in [0, l_b] for lengths {mask.sum(1).tolist()}")
    u = torch.rand(mask.shape, generator=generator, device=mask.device)
    u = u.masked_fill(~mask, 2.0)  # padding sorts last
    rank = u.argsort(1).argsort(1)  # (B, T): rank of each position's key in its row
    return rank < counts[:, None]


class ElectricLogits(NamedTuple):
    """The NCE classifier logits G of one batch (all ``(B, T)``; 0 where not used)."""

    positive: Tensor  # G at the positives (y = x_t)
    is_positive: Tensor  # bool: the positives (all real t for Eq. 3.17, t ∉ R for Eq. 3.18)
    negative: Tensor  # G at the negatives (y = x̂_t)
    is_negative: Tensor  # bool: R


def _check_positions(positions: Any, mask: Tensor) -> Tensor:
    if not isinstance(positions, Tensor) or positions.dtype != torch.bool:
        got = positions.dtype if isinstance(positions, Tensor) else type(positions).__name__
        raise TypeError(f"positions must be a bool tensor (True at R), got {got}")
    if positions.shape != mask.shape:
        raise ValueError(f"positions {tuple(positions.shape)} must have the shape of tokens {tuple(mask.shape)}")
    positions = positions.to(mask.device)
    if bool((positions & ~mask).any()):
        raise ValueError("positions must select real positions only (positions & ~mask is not empty)")
    empty = positions.sum(1) == 0
    if bool(empty.any()):
        raise ValueError(f"every row needs at least one noise position; row {int(empty.nonzero()[0, 0])} has none")
    return positions


class ElectricNCELoss(nn.Module):
    """The (minimised) negative NCE objective of Electric, Eq. 3.17 or 3.18, plus the noise's MLE.

    Args:
        variant: ``"efficient"`` (Eq. 3.18, one pass over x^noised) or ``"exact"`` (Eq. 3.17,
            one clean pass plus one pass per negative).
        noise_fraction: k_b = ⌈noise_fraction · l_b⌉ (see :func:`num_noise_positions`).
        noise_weight: weight of the noise's MLE term in ``loss`` (1: dynamic NCE as in the
            monograph; 0: a fixed noise, whose log-probabilities are then computed without
            gradient; ``noise_mle`` is reported either way).
        reduction: ``"mean"``, ``"sum"`` or ``"none"`` (see the module docstring).

    Call as ``loss_fn(electric, noise, tokens, mask, generator=...)``; see :meth:`forward`.
    """

    VARIANTS = ("efficient", "exact")

    def __init__(self, *, variant: str = "efficient", noise_fraction: float = 0.15, noise_weight: float = 1.0,
                 reduction: str = "mean") -> None:
        super().__init__()
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        if not isinstance(noise_fraction, (int, float)) or not 0.0 < noise_fraction <= 1.0:
            raise ValueError(f"noise_fraction must lie in (0, 1], got {noise_fraction!r}")
        if not noise_weight >= 0:
            raise ValueError(f"noise_weight must be >= 0, got {noise_weight}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.variant, self.noise_fraction = variant, float(noise_fraction)
        self.noise_weight, self.reduction = float(noise_weight), reduction

    def noise_counts(self, mask: Tensor) -> Tensor:
        """k_b = ⌈noise_fraction · l_b⌉ per row, ``(B,)`` long."""
        ks = [num_noise_positions(int(n), self.noise_fraction) for n in mask.sum(1).tolist()]
        return torch.tensor(ks, dtype=torch.long, device=mask.device)

    def classifier_logits(self, electric: nn.Module, noise_log_probs: Tensor, tokens: Tensor, mask: Tensor,
                          positions: Tensor, noised: Tensor) -> ElectricLogits:
        """G = log(n_pos p̂_θ) − log(k q) at the positives and negatives of the chosen variant.

        Args:
            electric: ``electric(tokens, mask) -> (B, T)`` log p̂_θ(x_t | x_\\t) (an
                :class:`~seqebm.models.electric.Electric` or anything with that contract).
            noise_log_probs: log q(· | x_\\t) of the clean ``tokens``, ``(B, T, V)`` (detach it
                to keep the noise out of the NCE gradient).
            tokens, mask: the clean batch (validated by the caller).
            positions: R, ``(B, T)`` bool; noised: x^noised, ``(B, T)`` (x̂ at R, x elsewhere).
        """
        lengths, k = mask.sum(1), positions.sum(1)  # (B,), (B,)
        n_pos = lengths if self.variant == "exact" else lengths - k
        if bool((n_pos < 1).any()):
            b = int((n_pos < 1).nonzero()[0, 0])
            raise ValueError(
                f"Eq. 3.18 needs l - k >= 1 positives per sentence; row {b} has l={int(lengths[b])}, "
                f"k={int(k[b])} (by default k = ceil({self.noise_fraction} l)). Drop sentences that short, "
                "add <s>/</s>, or use variant='exact'")
        is_pos = mask if self.variant == "exact" else mask & ~positions
        lq_all = noise_log_probs
        lq_pos = lq_all.gather(-1, tokens[..., None]).squeeze(-1)  # log q(x_t | x_\t)
        lq_neg = lq_all.gather(-1, noised[..., None]).squeeze(-1)  # log q(x̂_t | x_\t)
        if not bool(torch.isfinite(lq_neg[positions]).all()) or not bool(torch.isfinite(lq_pos[is_pos]).all()):
            raise ValueError("a token at a classified position has zero noise probability (log q = -inf), "
                             "e.g. a pad id among the noise tokens")

        if self.variant == "exact":
            lp_pos = _electric_out(electric, tokens, mask)  # clean pass: log p̂(x_t | x_\t)
            b_idx, t_idx = positions.nonzero(as_tuple=True)  # (N,)
            rows = tokens[b_idx].clone()
            arange = torch.arange(b_idx.numel(), device=tokens.device)
            rows[arange, t_idx] = noised[b_idx, t_idx]  # only x_t replaced: one pass per negative
            lp_rows = _electric_out(electric, rows, mask[b_idx])[arange, t_idx]  # log p̂(x̂_t | x_\t)
            lp_neg = lp_pos.new_zeros(lp_pos.shape).index_put((b_idx, t_idx), lp_rows)
        else:
            lp_pos = lp_neg = _electric_out(electric, noised, mask)  # one pass over x^noised
        dtype = lp_pos.dtype
        log_ratio = (n_pos.to(dtype).log() - k.to(dtype).log())[:, None]  # log(n_pos / k), (B, 1)
        zero = lp_pos.new_zeros(())
        g_pos = torch.where(is_pos, lp_pos - torch.where(is_pos, lq_pos, 0).to(dtype) + log_ratio, zero)
        g_neg = torch.where(positions, lp_neg - torch.where(positions, lq_neg, 0).to(dtype) + log_ratio, zero)
        return ElectricLogits(g_pos, is_pos, g_neg, positions)

    def forward(self, electric: nn.Module, noise: nn.Module, tokens: Tensor, mask: Tensor, *,
                generator: torch.Generator | None = None, positions: Tensor | None = None,
                noise_tokens: Tensor | None = None) -> dict[str, Tensor]:
        """One batch of Electric's NCE (Eq. 3.17 / 3.18) and the noise's MLE.

        Args:
            electric: ``electric(tokens, mask) -> (B, T)`` log p̂_θ(x_t | x_\\t) (:class:`Electric`).
            noise: has ``log_probs(tokens, mask) -> (B, T, V)`` log q(·|x_\\t) and, unless
                ``noise_tokens`` is given, ``sample(tokens, mask, positions, generator=...,
                log_probs=...)`` (:class:`~seqebm.models.electric.TwoTowerCloze`).
            tokens: ``(B, T)`` ids in ``[0, V)``; mask: ``(B, T)`` bool, right padding.
            generator: random source for R and the noise samples (on the tokens' device).
            positions: optional R, ``(B, T)`` bool (real positions, >= 1 per row); then
                k_b = positions[b].sum() and ``noise_fraction`` is not used.
            noise_tokens: optional ``(B, T)`` noise ids, read only where ``positions`` is True
                (requires ``positions``); otherwise x̂_t ~ q(·|x_\\t) is drawn.

        Returns:
            dict with ``loss`` (nce + noise_weight · noise_mle, minimised), ``nce``,
            ``noise_mle`` (all with ``reduction``), ``accuracy`` (detached scalar: fraction of
            classified tokens with σ(G) on the right side of 1/2), ``positions`` (R) and
            ``noise_tokens`` (x^noised, detached) to replay the batch.
        """
        vocab = int(getattr(electric, "vocab_size", getattr(noise, "vocab_size", 0)) or 0)
        noise_vocab = getattr(noise, "vocab_size", None)
        if noise_vocab is not None and vocab and int(noise_vocab) != vocab:
            raise ValueError(f"electric.vocab_size={vocab} != noise.vocab_size={int(noise_vocab)}")
        if vocab:
            check_tokens(tokens, vocab, None)
        elif not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be a (B, T) tensor")
        mask = check_padding_mask(tokens, mask)
        tokens = tokens.long()
        if tokens.shape[0] == 0:
            raise ValueError(f"the batch must hold at least one sentence, got shape {tuple(tokens.shape)}")
        if noise_tokens is not None and positions is None:
            raise ValueError("noise_tokens needs explicit positions (R)")

        train_noise = self.noise_weight > 0 and torch.is_grad_enabled()
        with torch.set_grad_enabled(train_noise):
            log_q = noise.log_probs(tokens, mask)  # (B, T, V): keeps the graph only to train q
        if log_q.shape[:2] != tokens.shape or (vocab and log_q.shape[-1] != vocab):
            raise ValueError(f"noise.log_probs must return (B, T, V), got {tuple(log_q.shape)}")
        lq_data = log_q.gather(-1, tokens[..., None]).squeeze(-1)  # (B, T)
        noise_nll = -torch.where(mask, lq_data, lq_data.new_zeros(())).sum(1)  # (B,)
        log_q = log_q.detach()

        if positions is None:
            positions = draw_noise_positions(mask, self.noise_counts(mask), generator=generator)
        else:
            positions = _check_positions(positions, mask)
        if noise_tokens is None:
            noised = noise.sample(tokens, mask, positions, generator=generator, log_probs=log_q)
        else:
            if not isinstance(noise_tokens, Tensor) or noise_tokens.shape != tokens.shape:
                got = tuple(noise_tokens.shape) if isinstance(noise_tokens, Tensor) else type(noise_tokens).__name__
                raise ValueError(f"noise_tokens must be a tensor of shape {tuple(tokens.shape)}, got {got}")
            noised = torch.where(positions, noise_tokens.to(tokens.device).long(), tokens)
            if vocab:
                check_tokens(noised, vocab, None, name="noise_tokens")
        noised = noised.detach().long()

        logits = self.classifier_logits(electric, log_q, tokens, mask, positions, noised)
        pos_terms = torch.where(logits.is_positive, -F.logsigmoid(logits.positive), 0)
        neg_terms = torch.where(logits.is_negative, -F.logsigmoid(-logits.negative), 0)
        nce_rows = (pos_terms + neg_terms).sum(1)  # (B,) L_b
        n_classified = logits.is_positive.sum() + logits.is_negative.sum()
        correct = (((logits.positive > 0) & logits.is_positive).sum()
                   + ((logits.negative <= 0) & logits.is_negative).sum())
        noise_nll = noise_nll.to(nce_rows.dtype)
        if self.reduction == "none":
            nce, noise_mle = nce_rows, noise_nll
        elif self.reduction == "sum":
            nce, noise_mle = nce_rows.sum(), noise_nll.sum()
        else:
            nce, noise_mle = nce_rows.sum() / n_classified, noise_nll.sum() / mask.sum()
        loss = nce + self.noise_weight * noise_mle  # noise_mle has no graph unless the noise trains
        return {"loss": loss, "nce": nce, "noise_mle": noise_mle,
                "accuracy": (correct.double() / n_classified).detach(), "positions": positions,
                "noise_tokens": noised}


def _electric_out(electric: nn.Module, tokens: Tensor, mask: Tensor) -> Tensor:
    out = electric(tokens, mask)
    if not isinstance(out, Tensor) or out.shape != tokens.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"electric(tokens, mask) must return log p̂ of shape {tuple(tokens.shape)}, got {got}")
    return out
