"""Maximum likelihood by Monte Carlo for energy models: CD-k and persistent CD (PCD / SML).

Notation: N data configurations in the batch, M negative chains, F parameters.

The monograph writes p_θ(x) = exp(U_θ(x)) / Z_θ; seqebm's energies are E = −U, so
p_θ(x) = exp(−E_θ(x)) / Z_θ. The log-likelihood gradient (§2.3, Eq. 2.19) is

    ∇_θ L(θ) = E_{p_emp}[∇_θ U_θ(x)] − E_{p_θ}[∇_θ U_θ(x)]
             = −E_{p_emp}[∇_θ E_θ(x)] + E_{p_θ}[∇_θ E_θ(x)],

estimated with a data minibatch (Eq. 2.21) and M model samples (Eq. 2.20). This module returns
the *loss* whose gradient is the negative of that estimate,

    loss = (1/N) Σ_data E_θ(x) − (1/M) Σ_chains E_θ(x̃),     x̃ held fixed (no gradient),

so minimising it ascends the likelihood. Its value is not the NLL (log Z is missing); it is the
"energy gap" between data and negatives, which is reported as a metric.

Where the negatives x̃ come from:

* **CD-k** (``persistent=False``; Hinton 2002, the "regular contrastive divergence" of
  §2.3.3, Historical comments): every step restarts the chains at the data minibatch and runs
  the kernel k times. Cheap and low-variance, but biased: it does not converge to the MLE in
  general (the monograph quotes Sutskever & Tieleman on this). It is consistent when the model
  family contains the data distribution and the kernel leaves p_θ invariant.
* **PCD / stochastic maximum likelihood** (``persistent=True``; Younes 1989, Tieleman 2008;
  §2.3.3, Algorithm 6, and Algorithm 5 with M parallel chains): M chains persist across
  parameter updates and take a few kernel moves per update. With Robbins–Monro learning rates
  (Σγ_t = ∞, Σγ_t² < ∞; Theorem 2.2) this is stochastic approximation and converges to the
  MLE (Theorem 2.3). Use ``optim.name: sgd`` with ``optim.schedule: robbins_monro`` for the
  textbook algorithm, or :func:`seqebm.objectives.stochastic_approximation` directly.

The chains are a registered buffer, so they are saved in checkpoints and a resumed run
continues the same chains.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from seqebm.objectives.base import ObjectiveOutput, check_reduction, unwrap
from seqebm.sampling.kernels import Kernel


def ebm_data(batch: object) -> Tensor:
    """The data configurations (N, ...) of a batch for energy objectives.

    A Tensor is used as is; a :class:`~seqebm.data.batching.Batch` gives ``batch.inputs`` (its
    rows are the configurations: use :func:`seqebm.data.batching.ebm_batch` to build one).
    """
    if isinstance(batch, Tensor):
        x = batch
    elif hasattr(batch, "inputs") and isinstance(batch.inputs, Tensor):
        x = batch.inputs
    else:
        raise ValueError(f"batch must be a Tensor (N, ...) or a Batch, got {type(batch).__name__}")
    if x.dim() < 1 or x.shape[0] < 1:
        raise ValueError(f"the data batch must have at least one row, got shape {tuple(x.shape)}")
    return x


def energies(model: nn.Module, x: Tensor) -> Tensor:
    """``model(x)`` checked to be one finite-or-inf energy per row, shape (N,)."""
    e = model(x)
    if not isinstance(e, Tensor) or e.shape != (x.shape[0],):
        got = tuple(e.shape) if isinstance(e, Tensor) else type(e).__name__
        raise ValueError(f"the energy model must return shape ({x.shape[0]},) for input {tuple(x.shape)}, got {got}")
    if torch.isnan(e).any():
        raise ValueError("the energy model returned NaN")
    return e


class _EvalMode:
    """Context manager: the model in eval mode (no dropout) while the chains move."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.was_training = model, model.training

    def __enter__(self) -> nn.Module:
        self.model.eval()
        return self.model

    def __exit__(self, *exc: object) -> None:
        self.model.train(self.was_training)


class ContrastiveDivergenceLoss(nn.Module):
    """CD-k or persistent CD loss for any energy model ``model(x (N, ...)) -> E (N,)``.

    Args:
        kernel: Markov transition ``kernel(energy, x, generator) -> x_new`` that leaves
            exp(−E) invariant (:mod:`seqebm.sampling.kernels`: Gibbs / MH for tokens, block
            Gibbs for RBMs, Langevin / HMC for vectors). One call = the k moves of CD-k.
        persistent: False for CD-k (chains start at the data batch each step), True for PCD.
        num_chains: M persistent chains (PCD only; default: the first batch's size).
        init: PCD only: ``init(M, like) -> (M, ...)`` first chain states; by default the chains
            start from the first data batch (repeated to M rows).
        reduction: ``"mean"`` (the estimate of Eq. 2.19 per data row) or ``"sum"`` (times N).

    Raises:
        ValueError: on bad arguments or malformed model outputs.
    """

    def __init__(self, kernel: Kernel, *, persistent: bool = False, num_chains: int | None = None,
                 init: Callable[[int, Tensor], Tensor] | None = None, reduction: str = "mean") -> None:
        super().__init__()
        if not callable(kernel):
            raise ValueError(f"kernel must be callable (energy, x, generator) -> x, got {type(kernel).__name__}")
        if num_chains is not None and (not isinstance(num_chains, int) or isinstance(num_chains, bool)
                                       or num_chains < 1):
            raise ValueError(f"num_chains must be a positive int or None, got {num_chains!r}")
        if not persistent and (num_chains is not None or init is not None):
            raise ValueError("num_chains and init only apply to persistent=True (PCD)")
        self.kernel, self.persistent, self.num_chains, self.init = kernel, persistent, num_chains, init
        self.reduction = check_reduction(reduction)
        if reduction == "none":
            raise ValueError("reduction='none' is not defined for a loss over data and model samples; use mean or sum")
        self.register_buffer("chains", torch.empty(0))

    def _start_chains(self, x: Tensor) -> Tensor:
        m = self.num_chains or x.shape[0]
        if self.init is not None:
            chains = self.init(m, x)
        else:
            chains = x[torch.arange(m, device=x.device) % x.shape[0]]
        if not isinstance(chains, Tensor) or chains.shape[1:] != x.shape[1:] or chains.shape[0] != m:
            raise ValueError(f"init must return shape ({m}, {', '.join(map(str, x.shape[1:]))}), "
                             f"got {tuple(chains.shape) if isinstance(chains, Tensor) else type(chains).__name__}")
        return chains.to(x.device, x.dtype)

    def negatives(self, model: nn.Module, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Move the chains (restarted at ``x`` for CD-k, persistent for PCD) and return them."""
        base = unwrap(model)
        if not isinstance(base, nn.Module):
            raise ValueError(f"model must be an nn.Module returning energies (N,), got {type(base).__name__}")
        start = x.detach()
        if self.persistent:
            if self.chains.numel() == 0 or self.chains.shape[1:] != x.shape[1:]:
                self.chains = self._start_chains(start)
            start = self.chains
        with _EvalMode(base), torch.no_grad():
            neg = self.kernel(base, start, generator)
        if not isinstance(neg, Tensor) or neg.shape != start.shape:
            raise ValueError(f"kernel must return the chains' shape {tuple(start.shape)}, "
                             f"got {tuple(neg.shape) if isinstance(neg, Tensor) else type(neg).__name__}")
        neg = neg.detach()
        if self.persistent:
            self.chains = neg.clone()
        return neg

    def forward(self, model: nn.Module, batch: object, *, step: int | None = None,
                generator: torch.Generator | None = None) -> ObjectiveOutput:
        x = ebm_data(batch)
        neg = self.negatives(model, x, generator)
        n = x.shape[0]
        e = energies(model, torch.cat([x, neg.to(x.dtype)]))  # one forward (DDP-friendly)
        e_data, e_neg = e[:n], e[n:]
        loss = e_data.mean() - e_neg.mean()
        if self.reduction == "sum":
            loss = loss * n
        gap = (e_data.detach().mean() - e_neg.detach().mean()) * n
        return ObjectiveOutput(loss, {"energy_data_sum": e_data.detach().sum(),
                                      "energy_model_sum": e_neg.detach().mean() * n,
                                      "energy_gap_sum": gap, "tokens": float(n)})
