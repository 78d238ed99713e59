"""Scheduled sampling (Bengio et al., 2015) and its two-pass Transformer variant
(Mihaylova & Martins, 2019).

At training step i each decoder input is the gold token with probability ε_i and otherwise a
token predicted by the model itself; the loss is still the cross-entropy of the gold targets.
ε_i decays with one of Bengio et al.'s schedules (§2.4):

* ``linear``:          ε_i = max(ε_min, 1 - i / k)
* ``exponential``:     ε_i = k^i  (k < 1)
* ``inverse_sigmoid``: ε_i = k / (k + exp(i / k))  (k >= 1)

Modes:

* ``sequential`` (the original, for recurrent models): decode left to right with
  ``model.step``; the input at position t is the gold token or a sample from the model's
  distribution at t - 1. No gradient flows through the sampling decision.
* ``two_pass`` (for Transformers, parallel): pass 1 runs the model on the gold inputs without
  gradient; each input position t >= 1 is then replaced, with probability 1 - ε_i, by the
  model's prediction made at t - 1 (argmax or a sample); pass 2 computes the loss on the mixed
  inputs.

Notation: B batch, T length, V vocabulary.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from seqebm.data.batching import Batch
from seqebm.objectives.base import ObjectiveOutput, check_reduction, nll_metrics, reduce_loss, token_nll, unwrap

SCHEDULES = ("linear", "exponential", "inverse_sigmoid", "constant")


def teacher_forcing_ratio(step: int, schedule: str, k: float, minimum: float = 0.0) -> float:
    """ε_i, the probability of feeding the gold token at training step ``step``."""
    if schedule == "linear":
        return max(minimum, 1.0 - step / k)
    if schedule == "exponential":
        return max(minimum, k**step)
    if schedule == "inverse_sigmoid":
        return max(minimum, k / (k + math.exp(min(step / k, 700.0))))
    if schedule == "constant":
        return k
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


class ScheduledSamplingLoss(nn.Module):
    def __init__(
        self,
        *,
        mode: str = "two_pass",
        schedule: str = "inverse_sigmoid",
        k: float = 2000.0,
        minimum: float = 0.0,
        predict: str = "sample",
        reduction: str = "mean",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if mode not in ("two_pass", "sequential"):
            raise ValueError(f"mode must be 'two_pass' or 'sequential', got {mode!r}")
        if predict not in ("argmax", "sample"):
            raise ValueError(f"predict must be 'argmax' or 'sample', got {predict!r}")
        if schedule == "exponential" and not 0 < k < 1:
            raise ValueError(f"the exponential schedule needs 0 < k < 1, got k={k}")
        if schedule in ("linear", "inverse_sigmoid") and k < 1:
            raise ValueError(f"the {schedule} schedule needs k >= 1, got k={k}")
        if schedule == "constant" and not 0 <= k <= 1:
            raise ValueError(f"the constant schedule needs 0 <= k <= 1, got k={k}")
        teacher_forcing_ratio(0, schedule, k)  # validates the schedule name
        self.mode, self.schedule, self.k, self.minimum, self.predict = mode, schedule, k, minimum, predict
        self.reduction = check_reduction(reduction)
        self.generator = generator

    def _pick(self, logits: Tensor) -> Tensor:  # (..., V) -> (...)
        if self.predict == "argmax":
            return logits.argmax(-1)
        probs = torch.softmax(logits.float(), -1)
        flat = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=self.generator)
        return flat.view(probs.shape[:-1])

    def _use_gold(self, shape: torch.Size, eps: float, device: torch.device) -> Tensor:
        u = torch.rand(shape, generator=self.generator, device="cpu").to(device)
        return u < eps

    def forward(self, model: nn.Module, batch: Batch, step: int = 0) -> ObjectiveOutput:
        eps = teacher_forcing_ratio(step, self.schedule, self.k, self.minimum)
        if self.mode == "two_pass":
            logits = self._two_pass(model, batch, eps)
        else:
            logits = self._sequential(model, batch, eps)
        nll = token_nll(logits, batch.targets, batch.mask)
        metrics = nll_metrics(nll, batch.mask)
        metrics["tf_ratio"] = eps * metrics["tokens"]  # summed like the others; trainer divides by tokens
        return ObjectiveOutput(reduce_loss(nll, batch.mask, self.reduction), metrics)

    def _two_pass(self, model: nn.Module, batch: Batch, eps: float) -> Tensor:
        kw = batch.model_kwargs()
        with torch.no_grad():
            first = model(batch.inputs, **kw)  # (B, T, V)
        predicted = self._pick(first[:, :-1])  # prediction for inputs[:, 1:]
        gold = self._use_gold(predicted.shape, eps, predicted.device)
        mixed = batch.inputs.clone()
        mixed[:, 1:] = torch.where(gold, batch.inputs[:, 1:], predicted)
        return model(mixed, **kw)

    def _sequential(self, model: nn.Module, batch: Batch, eps: float) -> Tensor:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            raise ValueError("sequential scheduled sampling runs model.step outside DDP's forward; "
                             "use mode='two_pass' for multi-process training")
        net = unwrap(model)
        b, t = batch.inputs.shape
        state = net.init_state(b, batch.inputs.device, **batch.model_kwargs())
        token = batch.inputs[:, :1]
        out = []
        for i in range(t):
            logits, state = net.step(token, state)  # (B, 1, V)
            out.append(logits)
            if i + 1 < t:
                gold = self._use_gold((b, 1), eps, token.device)
                pred = self._pick(logits.detach())
                token = torch.where(gold, batch.inputs[:, i + 1:i + 2], pred)
        return torch.cat(out, 1)
