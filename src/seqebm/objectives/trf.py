"""Training objectives for energy-based LMs: exact MLE, augmented SA, DNCE and residual NCE.

Notation: N data sentences in the batch, K chains / noise sentences, m the maximum length,
π_l the length prior, ζ_l the estimate of log Z_l, U the potential.

* :class:`ExactMLELoss` — maximum likelihood with the normalisers computed by enumerating every
  sentence (tiny vocabularies; the oracle of the tests and the label-bias example, §4.1.2). For a
  TRF-LM the log-likelihood of a sentence is log π_l + U(x) − log Z_l (Eq. 3.5), for a GN-ELM
  U(x ⟨/s⟩) − log Z (Eq. 3.3).
* :class:`AugSALoss` — augmented stochastic approximation for TRF-LMs (monograph §3.2.2 and
  Table 3.1; the SA framework of §2.3.4, Algorithm 5). Each call advances K persistent
  trans-dimensional chains under p(l, x) ∝ π_l exp(U(x) − ζ_l) (MIS with an autoregressive
  proposal plus local jumps, :mod:`seqebm.sampling.trans_dimensional`), moves ζ by the SA step

      ζ_l ← ζ_l + γ_t · (n_l / K) / π_l,   then   ζ ← ζ − ζ_1 + log Z_1,

  (n_l chains at length l; the root is ζ_l = log Z_l + const because the chains' length
  marginal is ∝ π_l Z_l e^{−ζ_l}; log Z_1 = log Σ_w e^{U(w)} is computed exactly over the
  one-word sentences when ``anchor_word_ids`` is given), and returns a surrogate loss whose
  gradient is minus the stochastic log-likelihood gradient of θ:

      ∇ = (1/N) Σ_data ∇U(x) − Σ_l π_l · mean_{chains at l} ∇U(y).

* :class:`TRFDNCELoss` — dynamic NCE (§2.4.1, Eq. 2.48) for a TRF-LM whose ζ are learned as
  parameters: the classifier logit is G(x) = log π_l − ζ_l + U(x) − log ν − log q_φ(x), with the
  noise q_φ a :class:`~seqebm.models.sentence_lm.BoundedSentenceLM` trained jointly by MLE on
  the data and p_int = α p_data + (1 − α) q_φ.
* :class:`ResidualNCELoss` — NCE for a residual ELM p ∝ q e^U (Eq. 3.15) with its own q as the
  noise; log q cancels in the logit, G(x) = U(x) − ζ − log ν (§3.3.3).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.estimators.elm_exact import exact_log_partition, exact_trf_log_normalizers
from seqebm.models.elm import GNELM, TRFLM, check_sentences
from seqebm.objectives.base import ObjectiveOutput
from seqebm.sampling.trans_dimensional import SentenceChains, local_jump_move, mis_move

__all__ = ["ExactMLELoss", "AugSALoss", "TRFDNCELoss", "SentenceMLELoss", "ResidualNCELoss", "sentence_batch"]


def sentence_batch(batch: object) -> tuple[Tensor, Tensor]:
    """(tokens, mask) from a (tokens, mask) pair or an object with ``.tokens`` and ``.mask``."""
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    if hasattr(batch, "tokens") and hasattr(batch, "mask"):
        return batch.tokens, batch.mask
    raise TypeError(f"expected (tokens, mask) or a batch with .tokens/.mask, got {type(batch).__name__}")


class ExactMLELoss(nn.Module):
    """−(1/N) Σ log p(x) with exact normalisers by enumeration over ``word_ids`` (tiny models only).

    Works for :class:`TRFLM` (per-length log Z_l; ζ is set to the exact values after each call)
    and :class:`GNELM` (one log Z; its ``log_z`` buffer is set). ``l2`` adds (l2/2)·||θ||² over the
    potential's parameters (a Gaussian prior: the MLE of n-gram features seen only in some
    sentences can be infinite, as in the label-bias example).
    """

    def __init__(self, word_ids: Sequence[int], *, l2: float = 0.0) -> None:
        super().__init__()
        if l2 < 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        self.word_ids, self.l2 = [int(i) for i in word_ids], float(l2)

    def forward(self, model: nn.Module, batch: object, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        tokens, mask = sentence_batch(batch)
        if isinstance(model, TRFLM):
            log_z = exact_trf_log_normalizers(model.potential, self.word_ids, model.max_length)
            lengths = check_sentences(tokens, mask, max_length=model.max_length)
            ll = model.log_length_probs[lengths] + model.log_unnormalized(tokens, mask).double() - log_z[lengths]
            with torch.no_grad():
                model.zeta.copy_(torch.nan_to_num(log_z.detach(), neginf=0.0))
        elif isinstance(model, GNELM):
            log_z = exact_log_partition(model.log_unnormalized, self.word_ids, model.max_length,
                                        device=tokens.device)
            ll = model.log_unnormalized(tokens, mask).double() - log_z
            with torch.no_grad():
                model.log_z.copy_(log_z.detach())
        else:
            raise TypeError(f"ExactMLELoss needs a TRFLM or GNELM, got {type(model).__name__}")
        n = tokens.shape[0]
        loss = -ll.mean()
        if self.l2:
            loss = loss + 0.5 * self.l2 * sum((p.double() ** 2).sum() for p in model.potential.parameters()) / n
        return ObjectiveOutput(loss, {"sentence_nll_sum": -ll.detach().sum(), "tokens": float(n)})


class AugSALoss(nn.Module):
    """Augmented stochastic approximation for a :class:`TRFLM` (see the module docstring).

    Args:
        proposal: a :class:`~seqebm.models.sentence_lm.BoundedSentenceLM` (MIS proposal and
            local-jump word proposal); it is not trained here.
        num_chains: K persistent chains.
        mis_moves, local_jumps: moves per call.
        zeta_step: γ_t for the ζ update, a float or a callable of the step (e.g.
            :func:`~seqebm.objectives.stochastic_approximation.robbins_monro`).
        anchor_word_ids: the ids of all one-word sentences; if given, ζ_1 is pinned to the exact
            log Z_1 after every update (otherwise ζ_1 stays where it starts and the other ζ_l are
            relative to it).
        proposal_weight: scale of the proposal's MLE loss on the data batch added to the returned
            loss (0: the proposal stays fixed; > 0: it is trained jointly, as the auxiliary model of
            joint stochastic approximation, Table 3.1, so MIS acceptance improves as it fits).
    """

    def __init__(self, proposal: nn.Module, *, num_chains: int = 64, mis_moves: int = 1, local_jumps: int = 1,
                 zeta_step: float | Callable[[int], float] = 1.0, anchor_word_ids: Sequence[int] | None = None,
                 proposal_weight: float = 0.0) -> None:
        super().__init__()
        if num_chains < 1 or mis_moves < 0 or local_jumps < 0 or mis_moves + local_jumps == 0:
            raise ValueError(f"need num_chains >= 1 and at least one move, got {num_chains}, {mis_moves}, "
                             f"{local_jumps}")
        if not callable(zeta_step) and not zeta_step > 0:
            raise ValueError(f"zeta_step must be positive or a schedule, got {zeta_step}")
        if proposal_weight < 0:
            raise ValueError(f"proposal_weight must be >= 0, got {proposal_weight}")
        self.proposal, self.num_chains, self.proposal_weight = proposal, num_chains, proposal_weight
        self.mis_moves, self.local_jumps, self.zeta_step = mis_moves, local_jumps, zeta_step
        self.anchor = None if anchor_word_ids is None else torch.tensor([int(i) for i in anchor_word_ids])
        self.chains: SentenceChains | None = None
        self.calls = 0

    def _gamma(self, t: int) -> float:
        return float(self.zeta_step(t)) if callable(self.zeta_step) else float(self.zeta_step)

    @torch.no_grad()
    def anchor_log_z1(self, model: TRFLM) -> Tensor:
        """Exact log Z_1 = log Σ_w exp U(w) over the anchor ids (float64 scalar)."""
        ids = self.anchor.to(model.zeta.device)
        u = torch.cat([model.potential(ids[s:s + 4096, None], torch.ones(len(ids[s:s + 4096]), 1, dtype=torch.bool,
                                                                            device=ids.device)).double()
                       for s in range(0, len(ids), 4096)])
        return torch.logsumexp(u, 0)

    @torch.no_grad()
    def advance(self, model: TRFLM, generator: torch.Generator | None = None) -> dict[str, float]:
        """Move the chains (MIS, then local jumps) under the current θ and ζ; returns acceptance rates."""
        def target(t: Tensor, m: Tensor) -> Tensor:
            return model.log_target(t, m)

        if self.chains is None:
            dev = model.zeta.device
            x, mask, _ = self.proposal.sample(self.num_chains, generator, device=dev)
            self.chains = SentenceChains(x, mask, target(x, mask).double())
        else:  # θ and ζ moved since the last call: re-score the current states
            self.chains.log_target = target(self.chains.tokens, self.chains.mask).double()
        rates = {}
        for _ in range(self.mis_moves):
            self.chains, a = mis_move(self.chains, target, self.proposal, generator)
            rates["mis_accept"] = float(a.double().mean())
        for _ in range(self.local_jumps):
            self.chains, a = local_jump_move(self.chains, target, self.proposal, generator)
            rates["jump_accept"] = float(a.double().mean())
        return rates

    @torch.no_grad()
    def update_zeta(self, model: TRFLM, lengths: Tensor) -> None:
        """ζ_l += γ (n_l / K) / π_l, then re-anchor ζ_1 (see the module docstring)."""
        self.calls += 1
        pi = model.length_probs
        counts = torch.bincount(lengths, minlength=pi.numel()).double()[: pi.numel()]
        seen = pi > 0
        step = torch.zeros_like(pi)
        step[seen] = counts[seen] / counts.sum() / pi[seen]
        zeta = model.zeta.detach() + self._gamma(self.calls) * step
        ref = self.anchor_log_z1(model) if self.anchor is not None else model.zeta.detach()[1]
        zeta[1:] = zeta[1:] - zeta[1] + ref
        model.zeta.copy_(zeta)

    def forward(self, model: nn.Module, batch: object, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        if not isinstance(model, TRFLM):
            raise TypeError(f"AugSALoss trains a TRFLM, got {type(model).__name__}")
        tokens, mask = sentence_batch(batch)
        check_sentences(tokens, mask, max_length=model.max_length)
        rates = self.advance(model, generator)
        y, ym = self.chains.tokens, self.chains.mask
        lengths = ym.sum(1)
        self.update_zeta(model, lengths)
        # weights: π_l spread over the chains at length l (lengths without chains are dropped)
        pi = model.length_probs
        n_l = torch.bincount(lengths, minlength=pi.numel()).double()
        w = pi[lengths] / n_l[lengths]
        w = w / w.sum()
        width = int(lengths.max())
        u_data = model.log_unnormalized(tokens, mask)
        u_samples = model.log_unnormalized(y[:, :width], ym[:, :width])
        loss = -(u_data.double().mean() - (w * u_samples.double()).sum())
        n = tokens.shape[0]
        metrics: dict[str, Tensor | float] = {"tokens": float(n), "mean_sample_length_sum": float(lengths.double().mean()) * n}
        if self.proposal_weight:
            nll = -self.proposal.log_prob(tokens, mask).mean()
            loss = loss + self.proposal_weight * nll.double()
            metrics["proposal_nll_sum"] = nll.detach() * n
        for k, v in rates.items():
            metrics[f"{k}_sum"] = v * n
        return ObjectiveOutput(loss, metrics)


class TRFDNCELoss(nn.Module):
    """Dynamic NCE for a :class:`TRFLM` with learned ζ (see the module docstring); also trains a
    :class:`GNELM`, whose single learned ``log_z`` then plays the role of ζ (G = U(x ⟨/s⟩) − log Z
    − log ν − log q(x)).

    Args:
        noise: a trainable :class:`~seqebm.models.sentence_lm.BoundedSentenceLM`.
        alpha: weight of the data in p_int (α = 1: plain NCE with a jointly trained noise).
        nu: noise sentences per p_int sentence.
        noise_weight: scale of the noise model's NLL in the loss (0 freezes q_φ).
    """

    def __init__(self, noise: nn.Module, *, alpha: float = 0.5, nu: float = 1.0, noise_weight: float = 1.0) -> None:
        super().__init__()
        if not 0 < alpha <= 1 or not nu > 0 or noise_weight < 0:
            raise ValueError(f"need 0 < alpha <= 1, nu > 0, noise_weight >= 0; got {alpha}, {nu}, {noise_weight}")
        self.noise, self.alpha, self.nu, self.noise_weight = noise, alpha, nu, noise_weight

    def forward(self, model: nn.Module, batch: object, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        if not isinstance(model, (TRFLM, GNELM)):
            raise TypeError(f"TRFDNCELoss trains a TRFLM or GNELM, got {type(model).__name__}")
        tokens, mask = sentence_batch(batch)
        check_sentences(tokens, mask, max_length=model.max_length)
        n = tokens.shape[0]
        k1 = int(round((1 - self.alpha) / self.alpha * n))
        k2 = max(1, int(round(self.nu / self.alpha * n)))
        y, ym, log_q_y = self.noise.sample(k1 + k2, generator, device=tokens.device)
        log_q_x = self.noise.log_prob(tokens, mask)  # keeps the graph: trains q_φ
        m = model.max_length
        pad = tokens.new_zeros(n, max(0, m - tokens.shape[1]))
        allx = torch.cat([torch.cat([tokens, pad], 1)[:, :m], y])
        allm = torch.cat([torch.cat([mask, pad.bool()], 1)[:, :m], ym])
        width = int(allm.sum(1).max())
        log_p = model.log_prob(allx[:, :width], allm[:, :width]).double()  # (N + K,), ζ learned
        log_q = torch.cat([log_q_x.detach().double(), log_q_y.double()])
        nu = k2 / (n + k1)
        g = log_p - math.log(nu) - log_q
        g_pos, g_neg = g[: n + k1], g[n + k1:]
        nce = -self.alpha * (F.logsigmoid(g_pos).sum() + F.logsigmoid(-g_neg).sum())
        noise_nll = -log_q_x.sum()
        loss = (nce + self.noise_weight * noise_nll.double()) / n
        correct = (g_pos.detach() > 0).sum() + (g_neg.detach() <= 0).sum()
        return ObjectiveOutput(loss, {"dnce_sum": nce.detach(), "noise_nll_sum": noise_nll.detach(),
                                      "accuracy_sum": correct.double() * n / g.shape[0], "tokens": float(n)})


class SentenceMLELoss(nn.Module):
    """−mean log q(x) per sentence for a :class:`~seqebm.models.sentence_lm.BoundedSentenceLM` (an ALM)."""

    def forward(self, model: nn.Module, batch: object, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        tokens, mask = sentence_batch(batch)
        ll = model.log_prob(tokens, mask)
        return ObjectiveOutput(-ll.mean(), {"sentence_nll_sum": -ll.detach().sum(), "tokens": float(tokens.shape[0])})


class ResidualNCELoss(nn.Module):
    """NCE for a :class:`~seqebm.models.elm.ResidualELM` against its own base LM (§3.3.3, Eq. 3.15).

    G(x) = U(x) − ζ − log ν: the base log q cancels between model and noise. ``log_z`` (ζ) is a
    learned parameter of this objective (``learn_log_z=False`` keeps the model self-normalised);
    after training it estimates log Z of Eq. 3.15.
    """

    def __init__(self, *, nu: float = 1.0, learn_log_z: bool = True) -> None:
        super().__init__()
        if not nu > 0:
            raise ValueError(f"nu must be positive, got {nu}")
        self.nu = nu
        self.log_z = nn.Parameter(torch.zeros((), dtype=torch.float64), requires_grad=learn_log_z)

    def forward(self, model: nn.Module, batch: object, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        tokens, mask = sentence_batch(batch)
        n = tokens.shape[0]
        k = max(1, int(round(self.nu * n)))
        y, ym, _ = model.base.sample(k, generator, device=tokens.device)
        g_data = model.residual(tokens, mask).double() - self.log_z - math.log(k / n)
        width = int(ym.sum(1).max())
        g_noise = model.residual(y[:, :width], ym[:, :width]).double() - self.log_z - math.log(k / n)
        total = -(F.logsigmoid(g_data).sum() + F.logsigmoid(-g_noise).sum())
        with torch.no_grad():
            model.log_z.copy_(self.log_z.detach())
        correct = (g_data.detach() > 0).sum() + (g_noise.detach() <= 0).sum()
        return ObjectiveOutput(total / n, {"nce_sum": total.detach(), "accuracy_sum": correct.double() * n / (n + k),
                                           "tokens": float(n)})
