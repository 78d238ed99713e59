"""E-Forcing: teacher forcing plus an importance-weighted contrastive-divergence loss on
self-generated negatives (E-Forcing seed, §3–4, Algorithm 1, App. B).

Notation: D data rows, n negatives, K contrastive steps, V vocabulary, p context (prefix) length.

**The model as an EBM (§3, Eq. 3).** For every step k the autoregressive model q_θ defines a
product EBM over (x_k, x_<k) given the context c (BOS and an optional prefix for LMs, the
source sentence for translation):

    p_θ(x_k, x_<k) = q_θ(x_<k) · exp(−φ_θ(x_k, x_<k)) / Z_θ,    φ_θ(x_k, x_<k) = −logit_θ(x_k | x_<k),

with the *raw* logits (§3.1: softmax ignores a shift of the logits, and that free offset is what
the EBM uses; with log-softmax-normalised logits the loss collapses to extra teacher forcing).
Its energy is E_θ(x_k, x_<k) = φ_θ(x_k, x_<k) − log q_θ(x_<k) (after Eq. 6). Note that
p_θ(x_k | x_<k) = softmax(logits) = q_θ(x_k | x_<k); p_θ differs from q_θ only in the prefix
marginal p_θ(x_<k) ∝ q_θ(x_<k) · S_k(x_<k), S_k = Σ_v exp(logit_v(x_<k)).

**The gradient (Eq. 6–10).** Minimising KL(p_d(x_k, x_<k) ‖ p_θ(x_k, x_<k)) (Eq. 5) has gradient
G₊ − G₋ with the positive phase (Eq. 7) G₊ = E_{p_d}[∇φ − ∇log q(x_<k)] and the negative
phase rewritten under q_θ by importance sampling (Eq. 8/17, App. B.1–B.2):

    G₋ = E_{x∼q_θ}[ w(x_<k) (∇φ_θ(x_k, x_<k) − ∇log q_θ(x_<k)) ],
    w(x_<k) = S_k(x_<k) / E_{x'∼q_θ}[S_k(x'_<k)]                      (Eq. 9/18).

**The estimator computed here.** Per batch, n negatives x̃⁽ⁱ⁾ are drawn from q_θ given the
batch's contexts (:func:`seqebm.sampling.sample`, no gradient through sampling). The expectation
in the denominator of Eq. 9 is estimated with the *same* negatives (App. A: "the same batch of
samples ... to approximate both the expectations in Eq. 10 and weight w"), which makes the
weights self-normalised over the negatives of the batch, separately for every step k:

    ŵ_{i,k} = S_k(x̃⁽ⁱ⁾_<k) / ((1/n_k) Σ_j S_k(x̃⁽ʲ⁾_<k)),     Σ_i ŵ_{i,k} = n_k,

where the sums run over the n_k negatives still alive at step k (not ended by EOS or the
negative-length cap). In log space, log S_k = logsumexp(logits) and ŵ_{·,k}/n_k =
softmax_i(log S_k); weights are detached. If the negatives were drawn from a tempered or
truncated proposal r instead of q_θ, the correction log q_θ(x̃_≤k) − log r(x̃_≤k) (both
log-probabilities come from the sampler) is added to log S_k before the softmax. With a
temperature r covers q_θ's support and the estimator still targets Eq. 8 (tested exactly);
top-k / top-p never cover it, so they bias the estimator towards the truncated distribution.
Self-normalisation makes the minibatch gradient biased by O(1/n) (and consistent as n grows).

Three practical consequences of computing the weights from one batch:

* With several contexts in a batch (sources in translation, prefixes with ``prefix_len`` > 1)
  one normaliser is shared across contexts, as in the seed's batch practice: the estimator then
  targets the KL of the joint over (context, x) rather than one conditional EBM per context.
* Weights are normalised per micro-batch and per data-parallel rank, so the O(1/n) bias is that
  of the local number of negatives (gradient accumulation does not reduce it).
* Negatives are drawn with the model in eval mode (no dropout) while energies and weights come
  from the training forward; with dropout > 0 the proposal is therefore not exactly the q_θ of
  the weights (the correction is set to zero for the default proposal).

The per-step contrastive loss whose gradient is that estimate of G₊ − G₋ (Eq. 10) is

    L_CD^(k) = (1/D_k) Σ_{data alive at k} E_θ(x_k, x_<k) − (1/n_k) Σ_i ŵ_{i,k} E_θ(x̃⁽ⁱ⁾_k, x̃⁽ⁱ⁾_<k),

and the total (Eq. 11, Algorithm 1) adds it to teacher forcing with per-step coefficients
λ_k = λ · decay^(k−1) (the seed's exponentially descending λ_k), for steps k = 1..K after the
context, once ``step >= start_step`` (teacher forcing only before, Algorithm 1's N):

    loss = [Σ_tokens NLL + D · Σ_k λ_k L_CD^(k)] / (number of target tokens),

i.e. Eq. 11 averaged over the batch and divided by the mean target length, so that with λ = 0
(or before ``start_step``) the loss *is* teacher forcing's token-mean cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.data.batching import Batch
from seqebm.objectives.base import ObjectiveOutput, nll_metrics, token_nll, unwrap
from seqebm.sampling.sampler import sample


def snis_step_weights(log_s: Tensor, alive: Tensor) -> Tensor:
    """Self-normalised weights ŵ_{i,k}/n_k of Eq. 9 over the negatives alive at each step.

    Args:
        log_s: (n, K) log S_k(x̃⁽ⁱ⁾_<k) (plus any proposal correction), any finite magnitude.
        alive: (n, K) bool, negatives that reach step k.

    Returns:
        (n, K) float64, non-negative, zero where not alive, each column summing to 1 where any
        negative is alive (to 0 otherwise). Multiply by n_k for the ŵ of the docstring.
    """
    logits = log_s.double().masked_fill(~alive, float("-inf"))
    w = torch.softmax(logits, dim=0)
    return torch.nan_to_num(w, nan=0.0)  # columns with no live negative


def step_coefficients(num_steps: int, base: float, decay: float, device: torch.device | None = None) -> Tensor:
    """λ_k = base · decay^(k−1) for k = 1..num_steps (float64)."""
    return base * decay ** torch.arange(num_steps, dtype=torch.float64, device=device)


def _token_terms(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per (row, position): target logit, log S = logsumexp(logits), token log q (0 where masked)."""
    logits = logits.float()
    lse = torch.logsumexp(logits, -1)  # (R, T) log S_k
    logit_tgt = logits.gather(-1, targets[..., None]).squeeze(-1)  # (R, T)
    log_q_tok = (logit_tgt - lse).masked_fill(~mask, 0.0)
    return logit_tgt, lse, log_q_tok


def _energies(logit_tgt: Tensor, log_q_tok: Tensor) -> Tensor:
    """E = φ − log q(x_<k) per (row, step), with φ = −logit and Σ_{l<k} over the given steps."""
    return -logit_tgt - (torch.cumsum(log_q_tok, 1) - log_q_tok)


class EForcingLoss(nn.Module):
    """E-Forcing loss for any seqebm autoregressive model (LM, encoder–decoder, PixelCNN, HF adapter).

    Args:
        lambda_base: λ, the coefficient of the first contrastive step (0 = teacher forcing).
        lambda_decay: per-step decay of λ_k (exponential in k).
        num_steps: K, the contrastive steps after the context. LMs: the negatives' length (the
            seed uses 50). Conditional models: the cap on the negatives' length when
            ``source_length_ratio`` is None.
        source_length_ratio: conditional models: negatives for source i get at most
            ceil(ratio · |source_i|) + ``source_length_offset`` tokens (capped by ``num_steps``);
            they also stop at ``eos_id``.
        source_length_offset: see above.
        start_step: optimiser steps of teacher forcing only before E-Forcing starts.
        prefix_len: p, the data tokens (BOS included) that form an LM negative's context.
        num_negatives: n negatives per batch (default: one per data row, as in Algorithm 1);
            with fewer/more than D, contexts are reused cyclically.
        eos_id: stop negatives at EOS (None: fixed length).
        temperature, top_k, top_p: the proposal the negatives are drawn from (default q_θ
            itself); the weights carry the exact correction back to q_θ.
        label_smoothing: for the teacher-forcing term (the reported NLL stays unsmoothed).
        max_batch_tokens: memory budget of negative generation (see ``sample``).
    """

    def __init__(self, *, lambda_base: float = 0.1, lambda_decay: float = 0.95, num_steps: int = 50,
                 source_length_ratio: float | None = None, source_length_offset: int = 5, start_step: int = 0,
                 prefix_len: int = 1, num_negatives: int | None = None, eos_id: int | None = None,
                 temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 label_smoothing: float = 0.0, max_batch_tokens: int | None = None) -> None:
        super().__init__()
        if lambda_base < 0 or not 0 < lambda_decay <= 1:
            raise ValueError(f"need lambda_base >= 0 and 0 < lambda_decay <= 1, got {lambda_base}, {lambda_decay}")
        for name, v, lo in (("num_steps", num_steps, 1), ("start_step", start_step, 0), ("prefix_len", prefix_len, 1),
                            ("source_length_offset", source_length_offset, 0)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
        if num_negatives is not None and (not isinstance(num_negatives, int) or num_negatives < 1):
            raise ValueError(f"num_negatives must be a positive int or None, got {num_negatives!r}")
        if source_length_ratio is not None and not source_length_ratio > 0:
            raise ValueError(f"source_length_ratio must be positive, got {source_length_ratio}")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.lambda_base, self.lambda_decay, self.num_steps = float(lambda_base), float(lambda_decay), num_steps
        self.source_length_ratio, self.source_length_offset = source_length_ratio, source_length_offset
        self.start_step, self.prefix_len, self.num_negatives, self.eos_id = start_step, prefix_len, num_negatives, eos_id
        self.sample_kwargs = {"temperature": temperature, "top_k": top_k, "top_p": top_p,
                              "max_batch_tokens": max_batch_tokens}
        self.label_smoothing = label_smoothing

    # ------------------------------------------------------------------ negatives
    def generate_negatives(self, model: nn.Module, batch: Batch,
                           generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, dict]:
        """Sample the negatives (no gradient) from the batch's contexts.

        Returns ``(prefix (n, p), tokens (n, K), alive (n, K), log_q_over_r (n, K), context)``
        where ``log_q_over_r`` is the per-token log q_θ − log r correction (0 for the default
        untruncated proposal) and ``context`` the per-negative model keywords (source).
        """
        base = unwrap(model)
        d = len(batch)
        n = self.num_negatives or d
        owner = torch.arange(n, device=batch.inputs.device) % d
        conditional = batch.source is not None
        p = 1 if conditional else self.prefix_len
        if batch.inputs.shape[1] < p:
            raise ValueError(f"prefix_len={p} exceeds the batch's input length {batch.inputs.shape[1]}")
        prefix = batch.inputs[owner, :p]
        context = {k: v[owner] for k, v in batch.model_kwargs().items() if v is not None}
        caps = torch.full((n,), self.num_steps, dtype=torch.long, device=prefix.device)
        if conditional and self.source_length_ratio is not None:
            if context.get("source_mask") is not None:
                src_len = context["source_mask"].sum(1)
            else:
                src_len = (context["source"] != getattr(base, "pad_id", 0)).sum(1)
            caps = torch.minimum(caps, torch.ceil(self.source_length_ratio * src_len).long()
                                 + self.source_length_offset).clamp_min(1)
        k = int(caps.max())
        max_len = getattr(base, "max_len", None)
        if max_len is not None and p + k - 1 > max_len:
            k = max_len - p + 1
            caps = caps.clamp_max(k)
        was = base.training
        base.eval()
        try:
            with torch.no_grad():
                out = sample(base, prefix, max_new_tokens=k, num_samples=1, eos_id=self.eos_id,
                             generator=generator, context=context or None, **self.sample_kwargs)
        finally:
            base.train(was)
        steps = torch.arange(k, device=prefix.device)[None]
        alive = out.mask & (steps < caps[:, None])
        kw = self.sample_kwargs
        if kw["temperature"] == 1.0 and kw["top_k"] is None and kw["top_p"] is None:
            log_q_over_r = torch.zeros(alive.shape, dtype=torch.float64, device=alive.device)  # r = q_θ exactly
        else:
            log_q_over_r = (out.token_log_p.double() - out.token_log_q.double()).masked_fill(~alive, 0.0)
        return prefix, out.tokens.masked_fill(~alive, 0), alive, log_q_over_r, context

    # ------------------------------------------------------------------ loss
    def forward(self, model: nn.Module, batch: Batch, step: int = 0, *,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        active = self.lambda_base > 0 and step >= self.start_step
        if not active:
            logits = model(batch.inputs, **batch.model_kwargs())
            return self._teacher_forcing(logits, batch, None)
        prefix, neg, alive, log_q_over_r, neg_context = self.generate_negatives(model, batch, generator)
        d, t = batch.inputs.shape
        p, k = prefix.shape[1], neg.shape[1]
        neg_inputs = torch.cat([prefix, neg[:, :-1]], 1)  # (n, p + K − 1)
        if isinstance(model, nn.parallel.DistributedDataParallel):
            # DDP: one forward over data and negatives (padded to one width) before the backward
            width = max(t, neg_inputs.shape[1])
            inputs = torch.cat([F.pad(batch.inputs, (0, width - t)),
                                F.pad(neg_inputs, (0, width - neg_inputs.shape[1]))])
            context = {key: torch.cat([batch.model_kwargs()[key], neg_context[key]]) for key in neg_context}
            logits = model(inputs, **context)
            data_logits, neg_logits = logits[:d, :t], logits[d:, p - 1:p - 1 + k]
        else:  # two forwards, each at its own width (no padding work)
            data_logits = model(batch.inputs, **batch.model_kwargs())
            neg_logits = model(neg_inputs, **neg_context)[:, p - 1:p - 1 + k]
        logit_tgt, _, log_q_tok = _token_terms(data_logits, batch.targets, batch.mask)
        out = self._teacher_forcing(data_logits, batch, -log_q_tok)
        # positive phase: data steps k = 1..K after the context
        start = p - 1
        kd = max(0, min(k, t - start))
        e_pos = _energies(logit_tgt[:, start:start + kd], log_q_tok[:, start:start + kd])
        pos_alive = batch.mask[:, start:start + kd]
        neg_logit_tgt, log_s, neg_log_q_tok = _token_terms(neg_logits, neg, alive)
        e_neg = _energies(neg_logit_tgt, neg_log_q_tok)
        # tempered/truncated proposal r: the pair (x̃_k, x̃_<k) was drawn from r, so weight by
        # q_θ(x̃_≤k) / r(x̃_≤k) as well (inclusive of step k: under p_θ, x_k | x_<k follows q_θ)
        correction = torch.cumsum(log_q_over_r, 1)
        w = snis_step_weights(log_s.detach().double() + correction, alive)  # (n, K), columns sum to 1
        dev = data_logits.device
        lam = step_coefficients(k, self.lambda_base, self.lambda_decay, dev)
        d_k = pos_alive.sum(0).double()  # (kd,)
        pos_mean = (e_pos.double() * pos_alive).sum(0) / d_k.clamp_min(1)  # (kd,)
        neg_mean = (w * e_neg.double()).sum(0)  # (K,)
        both = torch.zeros(k, dtype=torch.bool, device=dev)
        both[:kd] = d_k > 0
        both &= alive.any(0)
        diff = torch.zeros(k, dtype=torch.float64, device=dev)
        diff[:kd] = pos_mean
        cd_steps = (diff - neg_mean) * both  # L_CD^(k)
        cd = (lam * cd_steps).sum()
        tokens = batch.mask.sum()
        loss = out.loss + (d * cd / tokens.clamp_min(1)).to(out.loss.dtype)
        n_k = alive.sum(0).clamp_min(1).double()
        ess = (1.0 / (w**2).sum(0).clamp_min(1e-300)) / n_k  # ESS / n_k per step
        metrics = dict(out.metrics)
        metrics.update({"cd_sum": d * cd.detach(),
                        "ess_frac_sum": (ess[both].mean() if both.any() else ess.new_zeros(())) * tokens,
                        "neg_len_sum": alive.sum(1).double().mean() * tokens})
        return ObjectiveOutput(loss, metrics)

    def _teacher_forcing(self, logits: Tensor, batch: Batch, nll: Tensor | None) -> ObjectiveOutput:
        """Token-mean cross-entropy (label-smoothed if set); ``nll`` (B, T) reuses a computed NLL."""
        if nll is None:
            nll = token_nll(logits, batch.targets, batch.mask)
        if self.label_smoothing > 0:
            per_token = F.cross_entropy(logits.float().transpose(1, 2), batch.targets, reduction="none",
                                        label_smoothing=self.label_smoothing).masked_fill(~batch.mask, 0.0)
        else:
            per_token = nll
        loss = per_token.sum() / batch.mask.sum().clamp_min(1)
        return ObjectiveOutput(loss, nll_metrics(nll.detach(), batch.mask))


__all__ = ["EForcingLoss", "snis_step_weights", "step_coefficients"]
