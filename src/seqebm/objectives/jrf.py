"""Supervised, unsupervised and semi-supervised training of joint random fields (monograph §5.3).

Notation: N labelled sentences (x, y), M unlabelled sentences x, α the weight of the unlabelled
part, q_φ the noise LM of DNCE.

For a :class:`~seqebm.models.jrf.JRF` p_ξ(l, x, y) = π_l exp(φ_θ(x, y) − ζ_l), ξ = (θ, ζ):

* J_sup (Eq. 5.9) = −(1/N) Σ log p_θ(y | x), the CRF's conditional NLL on the labelled batch; with
  ``sup_marginal=True`` the labelled sentences also enter the marginal's DNCE (their words are
  data for p(l, x) too), i.e. J_sup adds the DNCE loss of the labelled sentences.
* J_uns (Eq. 5.10) = the DNCE loss of the marginal TRF p_ξ(l, x) on the unlabelled batch
  (:class:`~seqebm.objectives.trf.TRFDNCELoss` on ``model.trf``): the classifier logit is
  log p_ξ(l, x) − log ν − log q_φ(x), ζ is learned as a parameter and the noise q_φ (a
  :class:`~seqebm.models.sentence_lm.BoundedSentenceLM`) is fitted to the data by MLE. With
  α = 0.5, ν = 1 it draws |B1| = N and |B2| = 2N noise sentences, as in the monograph.
* loss = J_sup + α · J_uns (Eq. 5.11, written as a minimisation) + w · NLL_q, where the noise's
  own NLL (mean over the sentences it was fitted on) keeps the weight ``noise_weight`` = w
  whatever α is: min_φ KL(p_data || q_φ) is a separate problem, not traded against J_sup.

Metrics are detached sums; ``"tokens"`` is the number of sentences N + M (the trainer divides
every ``*_sum`` by it); ``labeled_sum`` / ``unlabeled_sum`` give N and M so per-part means can be
recovered, e.g. ``sup_nll / labeled``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from seqebm.models.elm import check_sentences
from seqebm.models.jrf import JRF, labeled_batch
from seqebm.objectives.base import ObjectiveOutput, unwrap
from seqebm.objectives.trf import TRFDNCELoss, sentence_batch

__all__ = ["JRFLoss"]


class JRFLoss(nn.Module):
    """J_sup + α·J_uns for a :class:`~seqebm.models.jrf.JRF` (see the module docstring).

    Args:
        noise: the DNCE noise, a trainable :class:`~seqebm.models.sentence_lm.BoundedSentenceLM`
            with ``max_length`` equal to the JRF's m and the JRF's word vocabulary. Its
            parameters belong to this loss (``loss_fn.parameters()``): give them to the optimiser.
        alpha_uns: α > 0, the weight of J_uns.
        dnce_alpha: the data weight of DNCE's interpolated distribution (0 < α_d <= 1).
        nu: noise sentences per interpolated sentence.
        sup_marginal: also fit the marginal p(l, x) to the labelled sentences by DNCE.
        noise_weight: w >= 0, the weight of the noise LM's NLL (0 freezes q_φ).

    Call: ``loss_fn(model, labeled, unlabeled, *, generator=None)`` with ``labeled`` a
    (tokens, mask, tags) triple or a :class:`~seqebm.data.tag_batching.TagBatch` (or None) and
    ``unlabeled`` (tokens, mask) (or None); a dict ``{"labeled": ..., "unlabeled": ...}`` may be
    passed as ``labeled`` alone (the trainer's ``objective(model, batch)`` form).
    """

    def __init__(self, noise: nn.Module, *, alpha_uns: float = 1.0, dnce_alpha: float = 0.5, nu: float = 1.0,
                 sup_marginal: bool = False, noise_weight: float = 1.0) -> None:
        super().__init__()
        if not alpha_uns > 0:
            raise ValueError(f"alpha_uns must be > 0 (pass no unlabelled batch for supervised training), "
                             f"got {alpha_uns}")
        if not 0 < dnce_alpha <= 1 or not nu > 0 or noise_weight < 0:
            raise ValueError(f"need 0 < dnce_alpha <= 1, nu > 0, noise_weight >= 0; got {dnce_alpha}, {nu}, "
                             f"{noise_weight}")
        if not hasattr(noise, "sample") or not hasattr(noise, "log_prob") or not hasattr(noise, "max_length"):
            raise TypeError("noise must be a BoundedSentenceLM (sample, log_prob, max_length)")
        self.noise = noise
        self.alpha_uns, self.sup_marginal, self.noise_weight = float(alpha_uns), bool(sup_marginal), noise_weight
        # α·J_uns with the noise NLL at weight w: the inner loss is nce/n + (w/α)·nll/n
        self.dnce_uns = TRFDNCELoss(noise, alpha=dnce_alpha, nu=nu, noise_weight=noise_weight / self.alpha_uns)
        self.dnce_sup = TRFDNCELoss(noise, alpha=dnce_alpha, nu=nu, noise_weight=noise_weight)

    def _check_model(self, model: nn.Module) -> JRF:
        model = unwrap(model)
        if not isinstance(model, JRF):
            raise TypeError(f"JRFLoss trains a JRF, got {type(model).__name__}")
        if int(self.noise.max_length) != model.max_length:
            raise ValueError(f"the noise LM's max_length={self.noise.max_length} differs from the JRF's "
                             f"m={model.max_length}: DNCE needs the noise to cover exactly lengths 1..m")
        v = getattr(model.emitter, "vocab_size", None)
        if v is not None and int(getattr(self.noise, "vocab_size", v)) != int(v):
            raise ValueError(f"the noise LM's vocabulary ({self.noise.vocab_size}) differs from the emitter's ({v})")
        return model

    def forward(self, model: nn.Module, labeled: Any = None, unlabeled: Any = None, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        if isinstance(labeled, dict) and unlabeled is None:
            extra = set(labeled) - {"labeled", "unlabeled"}
            if extra:
                raise ValueError(f"a dict batch has the keys 'labeled' and 'unlabeled', got extra {sorted(extra)}")
            labeled, unlabeled = labeled.get("labeled"), labeled.get("unlabeled")
        if labeled is None and unlabeled is None:
            raise ValueError("JRFLoss needs a labelled batch, an unlabelled batch or both; got neither")
        jrf = self._check_model(model)
        loss: Tensor | None = None
        metrics: dict[str, Tensor | float] = {}
        n_lab = n_unl = 0
        if labeled is not None:
            tokens, mask, tags = labeled_batch(labeled)
            bounded = self.sup_marginal
            check_sentences(tokens, mask, max_length=jrf.max_length if bounded else None, who="JRFLoss labelled batch")
            ll = jrf.conditional_log_prob(tokens, mask, tags)  # validates tags (shape, tag set, constraints)
            n_lab = tokens.shape[0]
            loss = -ll.double().mean()
            metrics["sup_nll_sum"] = -ll.detach().double().sum()
            metrics["tag_tokens_sum"] = float(mask.sum())
            if self.sup_marginal:
                out = self.dnce_sup(jrf.trf, (tokens, mask), generator=generator)
                loss = loss + out.loss
                metrics["sup_dnce_sum"] = out.metrics["dnce_sum"]
                metrics["sup_noise_nll_sum"] = out.metrics["noise_nll_sum"]
        if unlabeled is not None:
            tokens, mask = sentence_batch(unlabeled)
            check_sentences(tokens, mask, max_length=jrf.max_length, who="JRFLoss unlabelled batch")
            out = self.dnce_uns(jrf.trf, (tokens, mask), generator=generator)
            n_unl = tokens.shape[0]
            part = self.alpha_uns * out.loss
            loss = part if loss is None else loss + part
            metrics["dnce_sum"] = out.metrics["dnce_sum"]
            metrics["noise_nll_sum"] = out.metrics["noise_nll_sum"]
            metrics["dnce_accuracy_sum"] = out.metrics["accuracy_sum"]
        metrics["labeled_sum"] = float(n_lab)
        metrics["unlabeled_sum"] = float(n_unl)
        metrics["tokens"] = float(n_lab + n_unl)
        return ObjectiveOutput(loss, metrics)
