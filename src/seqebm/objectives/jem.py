"""Semi-supervised training of joint energy-based models (JEM) and SGLD sampling from them.

Notation: n_l labeled rows (x, y), n_u unlabeled rows x, n_m model samples (SGLD chains advanced
per step), K labels, ``event`` the shape of one observation, U_θ(x, y) = logit_y(x) and
U_θ(x) = log Σ_y exp U_θ(x, y) the potentials of :class:`~seqebm.models.jem.JointEnergyClassifier`
(higher = more likely; the energy is E = −U), [lo, hi] the data range.

Monograph "Energy-based models for speech and language", §5.1–5.2. With labeled data L and all
observations D (labeled and unlabeled; p_emp is the empirical distribution over D), JEM solves
(Eq. 5.4)

    min_θ  KL[p_emp(x) || p_θ(x)] − α_d Σ_{(x,y)∈L} log p_θ(y|x),

a hybrid of a generative criterion on p_θ(x) = exp U_θ(x) / Z(θ) (Eq. 5.3) and the
discriminative cross-entropy of p_θ(y|x) (Eq. 5.2). The KL gradient is the maximum-likelihood
gradient of an EBM (§2.3),

    −∇_θ KL = E_{p_emp}[∇_θ U_θ(x)] − E_{p_θ}[∇_θ U_θ(x)],

so per minibatch :class:`JEMLoss` minimises the surrogate

    loss = α_d · mean_L CE(y|x) + α_g · (−[mean_{x∈batch} U_θ(x) − mean_{x∼chains} U_θ(x)]) + reg,

whose θ-gradient is exactly α_d ∇CE − α_g (mean ∇U(data) − mean ∇U(samples)): the model
samples are detached SGLD states, so only U's explicit θ-dependence is differentiated.
(Eq. 5.4 divides nothing by n; here both terms are per-row means, and α_d absorbs the ratio.)

Model samples (Grathwohl et al. 2020, "Your classifier is secretly an energy based model"): n_m
chains are drawn from a :class:`~seqebm.sampling.replay.ReplayBuffer`; each is reset to uniform
noise on [lo, hi] with probability ρ (``reinit_prob``, 0.05), then advanced K SGLD steps

    x ← x + δ ∇_x U_θ(x) + σ η,   η ∼ N(0, I)    (δ = ``step_size`` = 1, σ = ``noise_std`` = 0.01 in JEM),

and written back. With σ ≠ sqrt(2δ) this is not an exact sampler of p_θ but the short-run,
noisy gradient ascent JEM uses (see :func:`seqebm.sampling.langevin_dynamics.sgld`,
``noise_scale``); ``noise_std=None`` restores the Langevin noise sqrt(2δ).

Optional stabilisers (all off by default except clamping; Du & Mordatch 2019, JEM):

* ``energy_reg`` λ: adds λ · (mean U(x_data)² + mean U(x_model)²), keeping the potentials
  near 0 so the Langevin gradients do not blow up;
* ``grad_clip`` c: each chain's input gradient ∇_x U is rescaled to L2 norm at most c;
* ``clamp``: every SGLD state is clamped to the data range [lo, hi];
* ``data_noise`` s: N(0, s²) noise added to the unlabeled batch before U(x_data) (dequantises
  discrete pixels; JEM uses 0.03 on [-1, 1] images).
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seqebm.models.jem import JointEnergyClassifier, check_labels
from seqebm.objectives.base import ObjectiveOutput, unwrap
from seqebm.sampling.langevin_dynamics import StepSizes, sgld
from seqebm.sampling.replay import InitFn, ReplayBuffer

__all__ = ["JEMLoss", "as_joint", "generative_surrogate", "sample", "sgld_chains", "uniform_init"]

_Range = tuple[float, float]


def _check_range(name: str, value: object) -> _Range:
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise ValueError(f"{name} must be a pair (lo, hi) of finite numbers, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not lo < hi:
        raise ValueError(f"{name} must satisfy lo < hi, got ({lo}, {hi})")
    return lo, hi


def _check_number(name: str, value: object, *, positive: bool = False, optional: bool = False) -> Optional[float]:
    if value is None and optional:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a finite number {'> 0' if positive else '>= 0'}"
                         f"{' or None' if optional else ''}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _check_int(name: str, value: object, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")
    return value


def as_joint(model: nn.Module) -> JointEnergyClassifier:
    """``model`` as a :class:`JointEnergyClassifier`: returned as is (after unwrapping DDP/compile
    wrappers) when it is one, otherwise a plain classifier ``x -> logits (B, K)`` is wrapped.

    Note: a DistributedDataParallel-wrapped JEM is unwrapped here, so its methods run outside
    DDP's forward and gradients are not all-reduced by DDP; a multi-process trainer must
    synchronise them itself (or route ``logits`` through the wrapper's forward).

    Raises:
        TypeError: model is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a JointEnergyClassifier or a classifier nn.Module, got {type(model).__name__}")
    inner = unwrap(model)
    return inner if isinstance(inner, JointEnergyClassifier) else JointEnergyClassifier(model)


def uniform_init(event_shape: Sequence[int], data_range: _Range = (-1.0, 1.0), *,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> InitFn:
    """``init_fn(k, generator) -> Tensor (k, *event_shape)`` drawing uniform noise on [lo, hi]
    (JEM's chain initialisation, for :class:`~seqebm.sampling.replay.ReplayBuffer`)."""
    lo, hi = _check_range("data_range", data_range)
    shape = tuple(int(s) for s in event_shape)

    def init(k: int, generator: torch.Generator | None) -> Tensor:
        u = torch.rand((k, *shape), generator=generator, dtype=dtype, device=device)
        return lo + (hi - lo) * u
    return init


def _drift(joint: JointEnergyClassifier, y: Tensor | int | None, grad_clip: float | None) -> Callable[[Tensor], Tensor]:
    """``x -> ∇_x U(x)`` (or ∇_x U(x, y)) (C, *event), each row clipped to L2 norm <= grad_clip.

    The gradient is taken with respect to x only; no parameter ``.grad`` is touched.
    """
    def drift(x: Tensor) -> Tensor:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            u = joint.log_marginal(xg) if y is None else joint.log_joint(xg, y)
            (g,) = torch.autograd.grad(u.sum(), xg)
        if grad_clip is not None:
            norm = g.flatten(1).norm(dim=1).clamp_min(1e-12)  # (C,)
            scale = (grad_clip / norm).clamp(max=1.0)
            g = g * scale.view(-1, *([1] * (g.dim() - 1)))
        return g.detach()
    return drift


def sgld_chains(model: nn.Module, x0: Tensor, steps: int, *, y: Tensor | int | None = None,
                step_size: StepSizes = 1.0, noise_std: float | None = 0.01, clamp: _Range | None = (-1.0, 1.0),
                grad_clip: float | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Advance chains ``steps`` SGLD steps on U_θ(x) (or U_θ(x, y)): x ← x + δ_l ∇_x U + σ η.

    A thin wrapper of :func:`seqebm.sampling.langevin_dynamics.sgld` (monograph §2.3.1, Eq. 2.24)
    with JEM's input-gradient clipping.

    Args:
        model: a :class:`JointEnergyClassifier` or a classifier ``x -> logits (B, K)``.
        x0: floating-point Tensor (C, *event), the starting states.
        steps: K >= 0 transitions.
        y: None (sample p_θ(x)), an int or a LongTensor (C,) (sample p_θ(x|y) ∝ exp U_θ(x, y)).
        step_size: δ: a constant, L values, or ``l -> δ_l`` (see ``sgld``'s ``step_sizes``).
        noise_std: σ; None gives the Langevin noise sqrt(2 δ_l) (an exact sampler as δ → 0).
        clamp: (lo, hi) to clamp every state to, or None.
        grad_clip: max L2 norm of each chain's ∇_x U, or None.
        generator: torch generator on x0's device for the noise.

    Returns:
        Tensor (C, *event), the final states (detached).
    """
    joint = as_joint(model)
    _check_int("steps", steps, 0)
    noise_std = _check_number("noise_std", noise_std, optional=True)
    grad_clip = _check_number("grad_clip", grad_clip, positive=True, optional=True)
    if clamp is not None:
        clamp = _check_range("clamp", clamp)
    result = sgld(None, x0, step_sizes=step_size, num_steps=steps, grad_log_prob=_drift(joint, y, grad_clip),
                  noise_scale=noise_std, generator=generator, keep_samples=False, clamp=clamp)
    return result.final


def sample(model: nn.Module, n: int, steps: int, *, event_shape: Sequence[int] | None = None,
           y: Tensor | int | None = None, step_size: StepSizes = 1.0, noise_std: float | None = 0.01,
           data_range: _Range = (-1.0, 1.0), clamp: bool = True, grad_clip: float | None = None,
           x0: Tensor | None = None, generator: torch.Generator | None = None) -> Tensor:
    """Draw n samples of p_θ(x) (Eq. 5.3), or of p_θ(x|y) ∝ exp U_θ(x, y) (Eq. 5.1), by SGLD from noise.

    Chains start from uniform noise on ``data_range`` (or from ``x0``) and run ``steps``
    transitions of :func:`sgld_chains`. JEM's defaults (δ = 1, σ = 0.01) give short-run samples
    of a trained model; for samples that follow p_θ itself use ``noise_std=None`` with a small or
    decaying ``step_size`` and many steps.

    Args:
        model: a :class:`JointEnergyClassifier` or a classifier ``x -> logits (B, K)``.
        n: number of chains (>= 1).
        steps: SGLD transitions (>= 0).
        event_shape: the shape of one observation, e.g. (64,); required unless x0 is given.
        y: None, an int label, or a LongTensor (n,) of labels (class-conditional sampling).
        step_size, noise_std, grad_clip, generator: as in :func:`sgld_chains`.
        data_range: (lo, hi) of the uniform initialisation and of the clamp.
        clamp: clamp every state to ``data_range``.
        x0: optional starting states (n, *event) (then event_shape is taken from it).

    Returns:
        Tensor (n, *event) on the device and dtype of the model's parameters (of x0 when given).

    Raises:
        ValueError: n < 1, neither event_shape nor x0, or x0 not of shape (n, ...).
    """
    _check_int("n", n, 1)
    lo_hi = _check_range("data_range", data_range)
    if x0 is None:
        if event_shape is None:
            raise ValueError("give event_shape (the shape of one observation, e.g. (64,)) or x0")
        if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in event_shape):
            raise ValueError(f"event_shape must be a sequence of positive ints, got {event_shape!r}")
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        device = param.device if param is not None else torch.device("cpu")
        x0 = uniform_init(event_shape, lo_hi, dtype=dtype, device=device)(n, generator)
    elif not isinstance(x0, Tensor) or x0.dim() < 2 or x0.shape[0] != n:
        got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
        raise ValueError(f"x0 must be a Tensor of shape ({n}, *event), got {got}")
    return sgld_chains(model, x0, steps, y=y, step_size=step_size, noise_std=noise_std,
                       clamp=lo_hi if clamp else None, grad_clip=grad_clip, generator=generator)


def _upcast(t: Tensor) -> Tensor:
    """t in float32 when it is in a lower precision (float64 stays float64)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def generative_surrogate(u_data: Tensor, u_model: Tensor) -> Tensor:
    """−(mean U_θ(x_data) − mean U_θ(x_model)): the per-row KL[p_emp || p_θ] surrogate of Eq. 5.4.

    Its θ-gradient is mean ∇U(samples) − mean ∇U(data), the negative log-likelihood gradient
    of the EBM p_θ(x) ∝ exp U_θ(x), when x_model are (detached) samples of p_θ.
    """
    return -(u_data.mean() - u_model.mean())


class JEMLoss(nn.Module):
    """Semi-supervised JEM objective (monograph §5.2, Eq. 5.3–5.4) with replay-buffer SGLD.

    Called as ``loss_fn(model, labeled_x, labeled_y, unlabeled_x, generator=g)``; see :meth:`forward`.
    The replay buffer is created on the first call that needs model samples (its event shape,
    dtype and device are those of ``unlabeled_x``) and is available as :attr:`replay` (its
    ``state_dict()`` goes into checkpoints). The last model samples are kept, detached, in
    :attr:`last_model_samples` (for monitoring).

    Args:
        alpha_d: α_d >= 0, the weight of the discriminative cross-entropy (Eq. 5.4).
        alpha_g: weight >= 0 of the generative KL term (1 in Eq. 5.4); 0 gives the purely
            supervised baseline (no SGLD, unlabeled_x may be None).
        sgld_steps: K >= 0 SGLD steps per training step (20 in JEM).
        step_size: δ > 0 of the SGLD drift (1 in JEM, with data in [-1, 1]).
        noise_std: σ >= 0 of the SGLD noise (0.01 in JEM); None for Langevin noise sqrt(2δ).
        buffer_size: replay buffer capacity N (10000 in JEM).
        reinit_prob: ρ, the probability that a drawn chain restarts from uniform noise (0.05).
        num_model_samples: n_m chains advanced per step; None = n_u (the unlabeled batch size).
        data_range: (lo, hi) of the data: uniform initialisation and the clamp.
        clamp: clamp SGLD states to ``data_range``.
        energy_reg: λ >= 0 of the regulariser λ (mean U_data² + mean U_model²).
        grad_clip: max per-chain L2 norm of ∇_x U in SGLD (None: no clipping).
        data_noise: std >= 0 of Gaussian noise added to unlabeled_x for the generative term.
        seed: seeds the replay buffer's generator (index draws, restarts, initial noise).
    """

    def __init__(self, *, alpha_d: float = 1.0, alpha_g: float = 1.0, sgld_steps: int = 20,
                 step_size: float = 1.0, noise_std: float | None = 0.01, buffer_size: int = 10000,
                 reinit_prob: float = 0.05, num_model_samples: int | None = None,
                 data_range: _Range = (-1.0, 1.0), clamp: bool = True, energy_reg: float = 0.0,
                 grad_clip: float | None = None, data_noise: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        self.alpha_d = _check_number("alpha_d", alpha_d)
        self.alpha_g = _check_number("alpha_g", alpha_g)
        if self.alpha_d == 0 and self.alpha_g == 0:
            raise ValueError("alpha_d and alpha_g are both 0: the loss would be empty")
        self.sgld_steps = _check_int("sgld_steps", sgld_steps, 0)
        self.step_size = _check_number("step_size", step_size, positive=True)
        self.noise_std = _check_number("noise_std", noise_std, optional=True)
        self.buffer_size = _check_int("buffer_size", buffer_size, 1)
        if not (isinstance(reinit_prob, (int, float)) and not isinstance(reinit_prob, bool) and 0 <= reinit_prob <= 1):
            raise ValueError(f"reinit_prob must lie in [0, 1], got {reinit_prob!r}")
        self.reinit_prob = float(reinit_prob)
        if num_model_samples is not None:
            _check_int("num_model_samples", num_model_samples, 1)
            if num_model_samples > buffer_size:
                raise ValueError(f"num_model_samples ({num_model_samples}) exceeds buffer_size ({buffer_size})")
        self.num_model_samples = num_model_samples
        self.data_range = _check_range("data_range", data_range)
        self.clamp = bool(clamp)
        self.energy_reg = _check_number("energy_reg", energy_reg)
        self.grad_clip = _check_number("grad_clip", grad_clip, positive=True, optional=True)
        self.data_noise = _check_number("data_noise", data_noise)
        if seed is not None:
            _check_int("seed", seed, 0)
        self.seed = seed
        self.replay: ReplayBuffer | None = None
        self.last_model_samples: Tensor | None = None

    # ------------------------------------------------------------------ helpers
    def _buffer(self, x: Tensor) -> ReplayBuffer:
        if self.replay is None:
            gen = None
            if self.seed is not None:
                gen = torch.Generator(device=x.device).manual_seed(self.seed)
            init = uniform_init(x.shape[1:], self.data_range, dtype=x.dtype, device=x.device)
            self.replay = ReplayBuffer(self.buffer_size, init, self.reinit_prob, generator=gen)
        stored = self.replay.buffer
        if stored.shape[1:] != x.shape[1:] or stored.dtype != x.dtype:
            raise ValueError(f"unlabeled_x rows have shape {tuple(x.shape[1:])} and dtype {x.dtype}, but the "
                             f"replay buffer holds {tuple(stored.shape[1:])} / {stored.dtype} from earlier calls")
        return self.replay

    def model_samples(self, model: nn.Module, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Draw n_m chains from the buffer (restarting a fraction ρ), run K SGLD steps, write them back.

        Args:
            model: the JEM (or classifier) whose U_θ(x) the chains follow.
            like: a data batch (n_u, *event) fixing n_m (when ``num_model_samples`` is None),
                the event shape, dtype and device.
            generator: generator on the data's device for the SGLD noise.

        Returns:
            Tensor (n_m, *event), detached.
        """
        buf = self._buffer(like)
        n_m = self.num_model_samples or min(like.shape[0], self.buffer_size)
        x0, index = buf.sample(n_m)
        x = sgld_chains(model, x0, self.sgld_steps, step_size=self.step_size, noise_std=self.noise_std,
                        clamp=self.data_range if self.clamp else None, grad_clip=self.grad_clip,
                        generator=generator)
        buf.update(index, x)
        self.last_model_samples = x
        return x

    # ------------------------------------------------------------------ forward
    def forward(self, model: nn.Module, labeled_x: Tensor | None, labeled_y: Tensor | None,
                unlabeled_x: Tensor | None, *, generator: torch.Generator | None = None) -> ObjectiveOutput:
        """One semi-supervised JEM step (Eq. 5.4).

        Args:
            model: a :class:`JointEnergyClassifier` (or a classifier ``x -> logits (B, K)``).
            labeled_x: floating Tensor (n_l, *event), or None when ``alpha_d == 0``.
            labeled_y: LongTensor (n_l,) of labels in [0, K), or None with labeled_x.
            unlabeled_x: floating Tensor (n_u, *event) drawn from all observations D (labeled
                ones included, as p_emp is over D); None allowed only when ``alpha_g == 0``.
            generator: torch generator on the data's device for the SGLD and data noise.

        Returns:
            :class:`ObjectiveOutput` with the scalar loss (see the module docstring) and detached
            metrics, each a batch mean times ``tokens`` (so ``metric_sum / tokens`` is the batch
            mean): ``tokens`` = n_l (n_u without labeled rows); with labeled rows ``ce_sum``
            (Σ CE) and ``accuracy_sum`` (correct predictions); with the generative term
            ``gen_sum`` (the surrogate), ``u_data_sum`` and ``u_model_sum`` (mean potentials).

        Raises:
            ValueError: a required batch is missing or empty, shapes disagree (labels vs rows,
                event shapes), or labels lie outside [0, K).
            TypeError: inputs of the wrong type or dtype.
        """
        joint = as_joint(model)
        if (labeled_x is None) != (labeled_y is None):
            raise ValueError("give both labeled_x and labeled_y, or neither")
        if labeled_x is not None:
            labeled_x = self._check_batch("labeled_x", labeled_x)
        elif self.alpha_d > 0:
            raise ValueError(f"a labeled batch is required when alpha_d > 0 (alpha_d={self.alpha_d})")
        if unlabeled_x is not None:
            unlabeled_x = self._check_batch("unlabeled_x", unlabeled_x)
        elif self.alpha_g > 0:
            raise ValueError(f"an unlabeled batch is required when alpha_g > 0 (alpha_g={self.alpha_g}); "
                             "use alpha_g=0 for supervised training")
        if labeled_x is not None and unlabeled_x is not None and labeled_x.shape[1:] != unlabeled_x.shape[1:]:
            raise ValueError(f"labeled_x rows have shape {tuple(labeled_x.shape[1:])} but unlabeled_x rows "
                             f"{tuple(unlabeled_x.shape[1:])}")
        if labeled_x is not None:
            labeled_y = self._check_label_tensor(labeled_y, labeled_x.shape[0])
        generative = self.alpha_g > 0 and unlabeled_x is not None
        if generative and self.replay is not None:
            self._buffer(unlabeled_x)  # event shape / dtype agree with the stored chains

        n_l = labeled_x.shape[0] if labeled_x is not None else 0
        tokens = float(n_l) if n_l else float(unlabeled_x.shape[0])  # type: ignore[union-attr]
        metrics: dict[str, Tensor | float] = {"tokens": tokens}
        loss: Tensor | None = None
        if labeled_x is not None:
            logits_l = joint.logits(labeled_x)  # (n_l, K); labels are checked before any SGLD work
            y = check_labels("labeled_y", labeled_y, n_l, logits_l.shape[1], device=logits_l.device)
            ce = F.cross_entropy(_upcast(logits_l), y, reduction="sum")
            loss = self.alpha_d * ce / n_l
            metrics["ce_sum"] = ce.detach().double()
            metrics["accuracy_sum"] = (logits_l.detach().argmax(1) == y).sum().double()
        if generative:
            assert unlabeled_x is not None
            n_u = unlabeled_x.shape[0]
            x_data = unlabeled_x
            if self.data_noise > 0:
                x_data = x_data + self.data_noise * torch.randn(x_data.shape, generator=generator,
                                                                dtype=x_data.dtype, device=x_data.device)
            x_model = self.model_samples(joint, unlabeled_x, generator)
            u = _upcast(joint.log_marginal(torch.cat([x_data, x_model.to(x_data.dtype)])))  # one pass
            u_data, u_model = u[:n_u], u[n_u:]
            gen = generative_surrogate(u_data, u_model)
            term = self.alpha_g * gen
            if self.energy_reg > 0:
                term = term + self.energy_reg * (u_data.pow(2).mean() + u_model.pow(2).mean())
            loss = term if loss is None else loss + term
            metrics["gen_sum"] = gen.detach().double() * tokens
            metrics["u_data_sum"] = u_data.detach().mean().double() * tokens
            metrics["u_model_sum"] = u_model.detach().mean().double() * tokens
        assert loss is not None
        return ObjectiveOutput(loss, metrics)

    @staticmethod
    def _check_batch(name: str, x: object) -> Tensor:
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a floating-point Tensor (n, *event), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
        if x.dim() < 2:
            raise ValueError(f"{name} must have shape (n, *event), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); a non-empty batch is required")
        return x

    @staticmethod
    def _check_label_tensor(y: object, n: int) -> Tensor:
        if not isinstance(y, Tensor):
            raise TypeError(f"labeled_y must be a LongTensor ({n},), got {type(y).__name__}")
        if tuple(y.shape) != (n,):
            raise ValueError(f"labeled_y has shape {tuple(y.shape)} but labeled_x has {n} rows")
        return y
