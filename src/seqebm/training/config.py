"""Configs of the optimiser and the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEDULES = ("constant", "inverse_sqrt", "cosine", "robbins_monro")
OPTIMIZERS = ("adamw", "sgd")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 1e-3
    momentum: float = 0.0  # sgd only (weight_decay applies to sgd as coupled L2: set 0 for textbook SA)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    schedule: str = "cosine"  # constant | inverse_sqrt | cosine | robbins_monro
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    clip_norm: float | None = 1.0
    # robbins_monro: lr_t = lr * (rm_offset / (rm_offset + t))^rm_exponent after warm-up
    # (monograph §2.3.3, Theorem 2.2: converges for 0.5 < rm_exponent <= 1)
    rm_offset: float = 100.0
    rm_exponent: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.schedule == "robbins_monro" and not (0.5 < self.rm_exponent <= 1 and self.rm_offset > 0):
            raise ValueError("optim.schedule=robbins_monro needs 0.5 < rm_exponent <= 1 and rm_offset > 0, got "
                             f"rm_exponent={self.rm_exponent}, rm_offset={self.rm_offset}")
        if self.momentum < 0:
            raise ValueError(f"optim.momentum must be >= 0, got {self.momentum}")
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if len(self.betas) != 2:
            raise ValueError(f"optim.betas must have two values, got {self.betas}")


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    max_epochs: int | None = None
    grad_accum: int = 1  # micro-batches per step (each global batch is split into this many)
    eval_every: int = 200
    log_every: int = 10
    checkpoint_every: int = 200
    # steps at which a copy of the whole run folder is kept in snapshots/step-N (a run can be
    # branched from it with `seqebm train --branch-from RUN/snapshots/step-N`)
    snapshot_at: list[int] = field(default_factory=list)
    patience: int | None = None  # evaluations without improvement before stopping early
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    bf16: bool = True  # autocast to bfloat16 on CUDA (ignored on CPU)
    progress: bool = True
    tensorboard: bool = False

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "eval_every", "log_every", "checkpoint_every"):
            if getattr(self, name) <= 0:
                raise ValueError(f"train.{name} must be positive, got {getattr(self, name)}")
        if self.patience is not None and self.patience <= 0:
            raise ValueError(f"train.patience must be positive or null, got {self.patience}")
        if any(not isinstance(s, int) or isinstance(s, bool) or s <= 0 for s in self.snapshot_at):
            raise ValueError(f"train.snapshot_at must be a list of positive step numbers, got {self.snapshot_at}")


def lr_at(step: int, cfg: OptimConfig, total_steps: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based): linear warm-up, then the schedule."""
    warm = cfg.warmup_steps
    if warm and step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "robbins_monro":
        return cfg.lr * (cfg.rm_offset / (cfg.rm_offset + step - warm)) ** cfg.rm_exponent
    if cfg.schedule == "inverse_sqrt":
        return cfg.lr * ((max(warm, 1)) / (step + 1)) ** 0.5
    import math

    span = max(1, total_steps - warm)
    progress = min(1.0, (step - warm) / span)
    floor = cfg.min_lr_ratio * cfg.lr
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
