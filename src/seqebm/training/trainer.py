"""One training loop for every objective.

``Trainer(model, objective, train_source, ...)`` runs AdamW with a warm-up schedule, gradient
clipping and accumulation, bf16 autocast on CUDA, periodic evaluation with early stopping,
atomic checkpoints (safetensors) and exact resumption, JSONL metrics, a tqdm bar, and DDP when
launched with ``torchrun``.

Exactness contract: a step consumes one *global* batch ``train_source.batch(epoch, i)``; under
DDP each rank takes a contiguous shard of its rows, and with ``grad_accum = m`` the shard is cut
into m micro-batches. Micro-batch losses are weighted by their share of the global token count,
so the gradient equals that of one big batch on one process (for token-mean objectives).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from seqebm.data.batching import Batch
from seqebm.training.checkpoint import (_atomic_save_tensors, _load_weights, _read, _state_tensors, load_checkpoint,
                                        rng_state, save_checkpoint, save_model, set_rng_state)
from seqebm.io import atomic_write_text
from seqebm.training.config import OptimConfig, TrainerConfig, lr_at
from seqebm.training.distributed import DistInfo, all_reduce_sum, barrier

CHECKPOINT = "checkpoint.safetensors"
BEST_MODEL = "model.safetensors"
METRICS = "metrics.jsonl"
SNAPSHOTS = "snapshots"
# what a finished run writes last; a copy of the folder at another step leaves them out (they
# would describe another state)
RUN_OUTPUTS = ("tensorboard", "results.json", "report.md", "curves.png")


def copy_run_folder(src: Path, dest: Path, skip: tuple[str, ...] = (),
                    extra_files: dict[str, str] | None = None) -> None:
    """Copy run folder ``src`` to ``dest`` (replacing it), leaving out the top-level entries named in
    ``skip`` and adding ``extra_files`` (name -> text). The copy is assembled in a temporary folder
    next to ``dest`` and renamed, so ``dest`` is either complete or absent/unchanged."""
    import shutil

    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=lambda d, names: [n for n in names if Path(d) == src and n in skip])
    for name, text in (extra_files or {}).items():
        atomic_write_text(tmp / name, text)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


class BatchSource(Protocol):
    def num_batches(self) -> int: ...

    def batch(self, epoch: int, index: int) -> Batch: ...


class StopTraining(Exception):
    """Raised by a callback to end training cleanly after the current step."""


def build_optimizer(model: nn.Module, cfg: OptimConfig, extra: nn.Module | None = None) -> torch.optim.Optimizer:
    """AdamW (or SGD); no weight decay on biases, norms and embeddings' 1-D params.

    ``extra`` (the objective) contributes its trainable parameters too: NCE's log normaliser,
    DNCE's noise model. They never get weight decay.
    """
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    own = [p for p in (extra.parameters() if extra is not None else []) if p.requires_grad and id(p) not in seen]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if own:
        groups.append({"params": own, "weight_decay": 0.0})
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        objective: nn.Module,
        train_source: BatchSource,
        *,
        optim: OptimConfig,
        train: TrainerConfig,
        run_dir: str | Path,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        device: torch.device | None = None,
        dist_info: DistInfo | None = None,
        callbacks: list[Callable[["Trainer"], None]] | None = None,
        extra_state: dict[str, Any] | None = None,
    ) -> None:
        self.cfg, self.optim_cfg = train, optim
        self.dist = dist_info or DistInfo()
        self.device = device or torch.device("cpu")
        self.model = model.to(self.device)
        self.objective = objective.to(self.device)
        self.train_source = train_source
        self.evaluate_fn = evaluate
        self.run_dir = Path(run_dir)
        self.callbacks = callbacks or []
        self.wrapped: nn.Module = self.model
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.model, optim, self.objective)
        self._objective_params = [p for p in self.objective.parameters() if p.requires_grad
                                  and all(p is not q for q in self.model.parameters())]
        self.state: dict[str, Any] = {
            "step": 0, "epoch": 0, "position": 0, "best": None, "bad_evals": 0,
            "tokens_seen": 0, "elapsed_s": 0.0, **(extra_state or {}),
        }
        self._tb = None

    # ----------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.run_dir / CHECKPOINT

    def _rank_rng_path(self) -> Path:
        return self.run_dir / "rng" / f"rank{self.dist.rank}.safetensors"

    def save(self) -> None:
        if self.dist.enabled and not self.dist.is_main:
            # every rank draws its own negatives / noise / chain moves: keep each rank's RNG
            self._rank_rng_path().parent.mkdir(parents=True, exist_ok=True)
            _atomic_save_tensors(rng_state(), self._rank_rng_path(), {"format": "seqebm-rng-1"})
        if self.dist.is_main:
            # the objective's own state (NCE's log Z, DNCE's noise model, PCD chains), tied tensors once
            # and without what it shares with the model (saved with the model already)
            model_ptrs = {t.untyped_storage().data_ptr() for t in self.model.state_dict().values() if t.numel()}
            shared = {k for k, t in self.objective.state_dict().items()
                      if t.numel() and t.untyped_storage().data_ptr() in model_ptrs}
            objective_state = {f"extra.objective.{k}": v for k, v in _state_tensors(self.objective).items()
                               if k not in shared}
            save_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer,
                            trainer_state=self.state, extra_tensors=objective_state)
        barrier(self.dist)

    def snapshot(self) -> Path:
        """Copy the run folder as it is now (checkpoint, best weights, metrics, tokenizer...) to
        ``snapshots/step-N``, written to a temporary folder first and renamed, so a snapshot is
        either complete or absent. Call it right after :meth:`save`."""
        dest = self.run_dir / SNAPSHOTS / f"step-{self.state['step']}"
        if self.dist.is_main:
            # a resumed run passing the same step again replaces the snapshot
            dest.parent.mkdir(exist_ok=True)
            copy_run_folder(self.run_dir, dest, skip=(SNAPSHOTS, *RUN_OUTPUTS))
        barrier(self.dist)
        return dest

    def resume(self) -> None:
        """Continue from ``run_dir/checkpoint.safetensors`` (weights, optimizer, RNG, data position)."""
        state = load_checkpoint(self.checkpoint_path, model=self.model, optimizer=self.optimizer)
        extra = state.pop("extra_tensors", {})
        prefix = "extra.objective."
        objective_state = {k[len(prefix):]: v for k, v in extra.items() if k.startswith(prefix)}
        if objective_state or self.objective.state_dict():
            # buffers such as persistent chains may have been empty (shape 0) at construction
            for name, value in objective_state.items():
                owner, _, leaf = name.rpartition(".")
                module = self.objective.get_submodule(owner) if owner else self.objective
                if leaf in module._buffers and module._buffers[leaf] is not None:
                    module._buffers[leaf] = value.to(self.device)
            _load_weights(self.objective, {k: v.to(self.device) for k, v in objective_state.items()},
                          self.checkpoint_path, strict=False)
        if self.dist.enabled and not self.dist.is_main and self._rank_rng_path().is_file():
            set_rng_state(_read(self._rank_rng_path())[0])
        self.state.update(state)
        metrics = self.run_dir / METRICS
        if self.dist.is_main and metrics.is_file():
            # drop what was logged after the checkpoint (a killed run): those steps are redone now
            lines = metrics.read_text().splitlines()
            kept = [x for x in lines if x.strip() and json.loads(x).get("step", 0) <= self.state["step"]]
            if len(kept) != len(lines):
                atomic_write_text(metrics, "".join(x + "\n" for x in kept))

    # ----------------------------------------------------------------- logging
    def _log(self, record: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        with open(self.run_dir / METRICS, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k not in ("step",):
                    self._tb.add_scalar(f"{record.get('split', 'train')}/{k}", v, record["step"])

    def _open_tensorboard(self) -> None:
        if self.cfg.tensorboard and self.dist.is_main:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is optional
                raise ValueError("train.tensorboard=true needs the `tensorboard` package") from e
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))

    # ----------------------------------------------------------------- one step
    def _autocast(self):
        if self.device.type == "cuda" and self.cfg.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def train_step(self, batch: Batch) -> dict[str, float]:
        """Forward/backward over the global ``batch`` and one optimiser update."""
        step = self.state["step"]
        local = batch.shard(self.dist.rank, self.dist.world_size) if self.dist.enabled else batch
        m = self.cfg.grad_accum
        if len(local) < m:
            raise ValueError(f"a batch of {len(local)} rows per rank cannot be split into grad_accum={m} micro-batches")
        bounds = [round(i * len(local) / m) for i in range(m + 1)]
        micro = [local.rows(slice(bounds[i], bounds[i + 1])) for i in range(m)]
        global_tokens = all_reduce_sum(torch.tensor(float(local.num_tokens), device=self.device), self.dist)
        lr = lr_at(step, self.optim_cfg, self.cfg.max_steps)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.model.train()
        sums: dict[str, Tensor] = {}
        loss_total = torch.zeros((), device=self.device)
        for i, mb in enumerate(micro):
            mb = mb.to(self.device)
            sync = nullcontext()
            if self.dist.enabled and i < m - 1:
                sync = self.wrapped.no_sync()
            with sync:
                with self._autocast():
                    out = self.objective(self.wrapped, mb, step=step)
                weight = mb.num_tokens * self.dist.world_size / global_tokens.clamp_min(1)
                (out.loss * weight).backward()
            loss_total += out.loss.detach() * weight / self.dist.world_size
            for k, v in out.metrics.items():
                v = v if isinstance(v, Tensor) else torch.tensor(float(v))
                sums[k] = sums.get(k, torch.zeros((), device=self.device)) + v.detach().to(self.device).float()
        if self.dist.enabled and self._objective_params:
            # DDP averages the model's gradients; the objective's own (e.g. NCE's log Z) by hand
            for p in self._objective_params:
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                p.grad = all_reduce_sum(grad, self.dist) / self.dist.world_size
        grad_norm = None
        if self.optim_cfg.clip_norm:
            grad_norm = torch.nn.utils.clip_grad_norm_([*self.model.parameters(), *self._objective_params],
                                                       self.optim_cfg.clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        # aggregate metrics across ranks (sums), then normalise per token
        keys = sorted(sums)
        packed = torch.stack([sums[k] for k in keys] + [loss_total]) if keys else loss_total[None]
        packed = all_reduce_sum(packed, self.dist).tolist()
        metrics = dict(zip(keys, packed[:-1]))
        result = {"loss": packed[-1], "lr": lr}
        tokens = metrics.pop("tokens", 0.0)
        for k, v in metrics.items():
            result[k.removesuffix("_sum")] = v / tokens if tokens else v
        if "nll" in result:
            result["ppl"] = math.exp(min(result["nll"], 50.0))
        if grad_norm is not None:
            result["grad_norm"] = float(grad_norm)
        result["tokens"] = tokens
        self.state["step"] = step + 1
        self.state["tokens_seen"] += int(tokens)
        return result

    # ----------------------------------------------------------------- evaluation
    def run_evaluation(self) -> dict[str, float] | None:
        if self.evaluate_fn is None:
            return None
        self.model.eval()
        with torch.no_grad(), self._autocast():
            metrics = self.evaluate_fn(self.model)
        self.model.train()
        key = metrics.get("loss")
        improved = key is not None and (self.state["best"] is None or key < self.state["best"])
        if improved:
            self.state["best"], self.state["bad_evals"] = key, 0
            if self.dist.is_main:
                save_model(self.model, self.run_dir / BEST_MODEL, {"step": self.state["step"], "valid": metrics})
        elif key is not None:
            self.state["bad_evals"] += 1
        self._log({"split": "valid", "step": self.state["step"], **metrics})
        return metrics

    # ----------------------------------------------------------------- loop
    def fit(self, *, resume: bool = False) -> dict[str, Any]:
        """Train until ``max_steps``/``max_epochs`` or early stopping; returns the final state."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self.resume()
        else:
            # ranks share the weights (DDP broadcasts them) but not their random streams
            torch.manual_seed(self.cfg.seed + self.dist.rank)
        self._open_tensorboard()
        cfg = self.cfg
        bar = tqdm(total=cfg.max_steps, initial=self.state["step"], disable=not (cfg.progress and self.dist.is_main),
                   desc="train", dynamic_ncols=True, unit="step")
        n_batches = self.train_source.num_batches()
        t_start, t_window, tok_window = time.perf_counter(), time.perf_counter(), 0.0
        elapsed0 = self.state["elapsed_s"]
        stop = False
        try:
            while not stop and self.state["step"] < cfg.max_steps:
                if cfg.max_epochs is not None and self.state["epoch"] >= cfg.max_epochs:
                    break
                epoch = self.state["epoch"]
                for position in range(self.state["position"], n_batches):
                    batch = self.train_source.batch(epoch, position)
                    metrics = self.train_step(batch)
                    self.state["position"] = position + 1
                    if self.state["position"] >= n_batches:
                        self.state["epoch"], self.state["position"] = epoch + 1, 0
                    self.state["elapsed_s"] = elapsed0 + time.perf_counter() - t_start
                    step = self.state["step"]
                    tok_window += metrics["tokens"]
                    if step % cfg.log_every == 0 or step == cfg.max_steps:
                        now = time.perf_counter()
                        metrics["tokens_per_s"] = tok_window / max(now - t_window, 1e-9)
                        t_window, tok_window = now, 0.0
                        self._log({"split": "train", "step": step, "epoch": epoch, **metrics})
                        postfix = {"loss": f"{metrics['loss']:.3f}", "tok_s": f"{metrics['tokens_per_s']:.0f}"}
                        for key, fmt in (("ppl", ".1f"), ("accuracy", ".3f")):
                            if key in metrics:
                                postfix[key] = format(metrics[key], fmt)
                        bar.set_postfix(postfix)
                    bar.update(1)
                    if step % cfg.eval_every == 0 or step == cfg.max_steps:
                        self.run_evaluation()
                        if cfg.patience is not None and self.state["bad_evals"] >= cfg.patience:
                            stop = True
                            self.state["stopped_early"] = True
                    if step % cfg.checkpoint_every == 0 or step == cfg.max_steps or stop or step in cfg.snapshot_at:
                        self.save()
                    if step in cfg.snapshot_at:
                        self.snapshot()
                    for cb in self.callbacks:
                        cb(self)
                    if stop or step >= cfg.max_steps:
                        break
        except StopTraining:
            self.save()
        finally:
            if self.evaluate_fn is None and self.dist.is_main:
                save_model(self.model, self.run_dir / BEST_MODEL, {"step": self.state["step"]})
            bar.close()
            if self._tb is not None:
                self._tb.close()
        return dict(self.state)
