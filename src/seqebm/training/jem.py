"""JEM on the scikit-learn digits: the semi-supervised joint EBM vs the supervised classifier (issue #11).

``seqebm jem train --config configs/jem-digits.yaml --run-dir runs/jem`` trains a
:class:`~seqebm.models.jem.JointEnergyClassifier` with :class:`~seqebm.objectives.jem.JEMLoss`
(monograph §5.2, Eq. 5.1–5.4); ``objective.alpha_g: 0`` is the supervised baseline (the same
classifier, cross-entropy on the labeled digits only). A run folder gets ``config.yaml``, ``metrics.jsonl``,
``curves.png``, ``model.safetensors`` (best validation weights), ``checkpoint.safetensors``, ``results.json``,
``report.md``, ``reliability.png`` / ``reliability_ts.png`` (test, before / after temperature scaling)
and, for JEM runs, ``samples.png`` (class-conditional SGLD chains from uniform noise, one row per
class) and ``buffer.png`` (replay buffer chains). ``seqebm jem compare``: configs x label counts x seeds.

Data: the train/valid/test split of :func:`~seqebm.data.digits.load_digits_dataset` (1437/180/180,
``data.seed``). ``data.num_labels`` training digits, class-balanced and drawn with ``seed``, keep
their labels; the rest of train is the unlabeled pool. The generative term's batches come from all
training digits D (labeled ones included: p_emp in Eq. 5.4 is over D). Model selection (best
validation accuracy, ties to the lower NLL) and the temperature are fitted on the labeled validation
split (its first ``data.val_size`` digits when set).

Resumption is exact: the checkpoint (written atomically at step 0 and after every validation) holds
the weights, Adam's state, the replay buffer and its generator, the batch/SGLD generator, the global
RNG and the best weights so far; ``resume=True`` continues from it up to ``optim.steps`` (raise it
to extend a run). A run whose ``results.json`` already covers ``optim.steps`` is not retrained.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from functools import reduce
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from seqebm.config import load_config, save_config
from seqebm.eval.calibration import expected_calibration_error, ood_auroc, reliability_diagram, temperature_scale
from seqebm.io import atomic_write_text
from seqebm.models.jem import DIGITS_PIXELS, JointEnergyClassifier, digits_classifier, digits_to_inputs
from seqebm.objectives.jem import JEMLoss, sample, uniform_init
from seqebm.sampling.replay import ReplayBuffer
from seqebm.training.checkpoint import load_checkpoint, save_checkpoint, save_model

__all__ = ["JemConfig", "balanced_subset", "check_label_budget", "compare_jem", "ood_sets", "register_jem_commands",
           "run_jem"]

NUM_CLASSES = 10
CHECKPOINT, BEST_MODEL, METRICS = "checkpoint.safetensors", "model.safetensors", "metrics.jsonl"
OOD_KINDS = ("noise", "flipped", "shuffled")
_OOD_SEED = 1234  # the OOD sets are the same for every run


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass
class JemDataConfig:
    num_labels: int = 100  # labeled training digits (class-balanced); the rest of train is unlabeled
    seed: int = 0  # the train/valid/test split, shared by all runs
    val_size: int | None = None  # validation digits for model selection and temperature scaling (None: all 180)
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _need(self.num_labels != 0, "data.num_labels=0: the labeled fraction is 0, but model selection, the "
                                    "classifier and the comparison need labeled digits")
        _need(self.num_labels >= NUM_CLASSES, f"data.num_labels must be >= {NUM_CLASSES} (at least one labeled "
                                              f"digit per class), got {self.num_labels}")
        _need(self.seed >= 0, f"data.seed must be >= 0, got {self.seed}")
        _need(self.val_size is None or self.val_size >= 1, f"data.val_size must be >= 1 or null, got {self.val_size}")


@dataclass
class JemModelConfig:
    arch: str = "mlp"  # mlp | cnn (seqebm.models.jem.digits_classifier: SiLU, no batch norm)
    hidden: int = 128
    depth: int = 2  # MLP hidden layers

    def __post_init__(self) -> None:
        _need(self.arch in ("mlp", "cnn"), f"model.arch must be mlp or cnn, got {self.arch!r}")
        _need(self.hidden >= 1 and self.depth >= 1, f"model.hidden/depth must be >= 1, got {self.hidden}/{self.depth}")


@dataclass
class JemObjectiveConfig:
    alpha_d: float = 1.0  # weight of the cross-entropy of p(y|x) (Eq. 5.4)
    alpha_g: float = 1.0  # weight of KL[p_emp(x) || p(x)]; 0 = the supervised baseline
    sgld_steps: int = 20
    step_size: float = 1.0
    noise_std: float | None = 0.01  # null: Langevin noise sqrt(2 step_size)
    buffer_size: int = 2000
    reinit_prob: float = 0.05
    energy_reg: float = 0.1  # λ (mean U_data² + mean U_model²)
    data_noise: float = 0.03  # std of the noise added to the data batch of the generative term
    grad_clip: float | None = None  # max L2 norm of each chain's ∇_x U
    # EBM pre-training (§5.4): the first pretrain_steps steps train p(x) alone (α_d = 0) on all training
    # digits, the rest fine-tune the classifier alone (α_g = 0, fresh Adam) on the labeled ones; 0 = off
    pretrain_steps: int = 0

    def __post_init__(self) -> None:
        for k in ("alpha_d", "alpha_g", "energy_reg", "data_noise"):
            _need(getattr(self, k) >= 0, f"objective.{k} must be >= 0, got {getattr(self, k)}")
        _need(self.alpha_d > 0 or self.alpha_g > 0, "objective.alpha_d and objective.alpha_g are both 0")
        _need(self.step_size > 0, f"objective.step_size must be > 0, got {self.step_size}")
        _need(self.noise_std is None or self.noise_std >= 0, f"objective.noise_std must be >= 0, got {self.noise_std}")
        _need(self.buffer_size >= 1, f"objective.buffer_size must be >= 1, got {self.buffer_size}")
        _need(0 <= self.reinit_prob <= 1, f"objective.reinit_prob must lie in [0, 1], got {self.reinit_prob}")
        _need(self.grad_clip is None or self.grad_clip > 0, f"objective.grad_clip must be > 0, got {self.grad_clip}")
        _need(self.alpha_g == 0 or self.sgld_steps >= 1, "objective.sgld_steps must be >= 1 when alpha_g > 0")
        _need(self.pretrain_steps >= 0, f"objective.pretrain_steps must be >= 0, got {self.pretrain_steps}")
        _need(self.pretrain_steps == 0 or (self.alpha_g > 0 and self.alpha_d > 0),
              "objective.pretrain_steps > 0 needs alpha_g > 0 (the pre-training weight) and alpha_d > 0 (the "
              "fine-tuning weight)")


@dataclass
class JemOptimConfig:
    lr: float = 1e-3  # Adam, constant
    steps: int = 3000
    labeled_batch: int = 32
    unlabeled_batch: int = 64  # the data batch (and number of SGLD chains) of the generative term
    weight_decay: float = 0.0
    progress: bool = True  # tqdm bar

    def __post_init__(self) -> None:
        _need(self.lr > 0 and self.weight_decay >= 0, f"optim.lr must be > 0 and optim.weight_decay >= 0, got "
                                                      f"{self.lr}, {self.weight_decay}")
        for k in ("steps", "labeled_batch", "unlabeled_batch"):
            _need(getattr(self, k) >= 1, f"optim.{k} must be >= 1, got {getattr(self, k)}")


@dataclass
class JemEvalConfig:
    num_bins: int = 20  # ECE bins (monograph §5.5, Eq. 5.19)
    every: int = 250  # validate (and checkpoint) every so many steps
    ood_size: int | None = None  # rows per OOD set (None: the test size)
    sample_steps: int = 200  # SGLD steps from noise for samples.png
    samples_per_class: int = 8

    def __post_init__(self) -> None:
        for k in ("num_bins", "every", "samples_per_class"):
            _need(getattr(self, k) >= 1, f"eval.{k} must be >= 1, got {getattr(self, k)}")
        _need(self.sample_steps >= 0, f"eval.sample_steps must be >= 0, got {self.sample_steps}")
        _need(self.ood_size is None or self.ood_size >= 1, f"eval.ood_size must be >= 1 or null, got {self.ood_size}")


@dataclass
class JemConfig:
    data: JemDataConfig = field(default_factory=JemDataConfig)
    model: JemModelConfig = field(default_factory=JemModelConfig)
    objective: JemObjectiveConfig = field(default_factory=JemObjectiveConfig)
    optim: JemOptimConfig = field(default_factory=JemOptimConfig)
    eval: JemEvalConfig = field(default_factory=JemEvalConfig)
    name: str = "jem"
    seed: int = 0  # labeled subset, initialisation, batches, SGLD

    def __post_init__(self) -> None:
        _need(bool(self.name), "name must not be empty")
        _need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        ob = self.objective
        _need(ob.alpha_g == 0 or ob.buffer_size >= self.optim.unlabeled_batch,
              f"objective.buffer_size ({ob.buffer_size}) must be >= optim.unlabeled_batch "
              f"({self.optim.unlabeled_batch}), the number of chains advanced per step")
        _need(ob.pretrain_steps < self.optim.steps, f"objective.pretrain_steps ({ob.pretrain_steps}) must be "
              f"below optim.steps ({self.optim.steps}): no step would be left to fine-tune")


def check_label_budget(cfg: JemConfig, n_train: int) -> None:
    """Errors for label budgets the training split cannot meet (checked before a run folder is made)."""
    n = cfg.data.num_labels
    _need(n <= n_train, f"data.num_labels={n} exceeds the {n_train} training digits")
    _need(cfg.objective.alpha_g == 0 or n < n_train,
          f"data.num_labels={n} labels every training digit: the unlabeled pool is empty, so JEM "
          "(objective.alpha_g > 0) has nothing semi-supervised to learn from; lower num_labels or set alpha_g: 0")


def balanced_subset(labels: Tensor, n: int, seed: int) -> Tensor:
    """Sorted indices of n rows, as class-balanced as possible: round-robin over the classes (in a
    seeded random order), each class's rows in a seeded random order."""
    _need(0 < n <= len(labels), f"cannot pick {n} of {len(labels)} rows")
    g = torch.Generator().manual_seed(seed)
    pools = [idx[torch.randperm(len(idx), generator=g)].tolist()
             for idx in (torch.nonzero(labels == c).flatten() for c in labels.unique())]
    order = torch.randperm(len(pools), generator=g).tolist()
    chosen, depth = [], 0
    while len(chosen) < n:
        chosen += [pools[c][depth] for c in order if depth < len(pools[c])][: n - len(chosen)]
        depth += 1
    return torch.tensor(sorted(chosen), dtype=torch.long)


def ood_sets(x_test: Tensor, n: int | None = None, seed: int = _OOD_SEED) -> dict[str, Tensor]:
    """Out-of-distribution inputs (n, 64) in [-1, 1]: ``noise`` (uniform), ``flipped`` (test digits
    flipped left-right and up-down) and ``shuffled`` (each test digit's 64 pixels randomly permuted)."""
    g = torch.Generator().manual_seed(seed)
    n = n or len(x_test)
    base = x_test[torch.arange(n) % len(x_test)]
    return {"noise": torch.rand(n, DIGITS_PIXELS, generator=g) * 2 - 1,
            "flipped": base.view(n, 8, 8).flip(1, 2).reshape(n, DIGITS_PIXELS),
            "shuffled": base.gather(1, torch.rand(n, DIGITS_PIXELS, generator=g).argsort(1))}


def _logits(model: JointEnergyClassifier, x: Tensor) -> Tensor:
    with torch.no_grad():
        return model.logits(x).double()


def _cls_metrics(logits: Tensor, y: Tensor, bins: int, *, calibration: bool = True) -> dict[str, float]:
    out = {"accuracy": float((logits.argmax(1) == y).double().mean()), "nll": float(F.cross_entropy(logits, y))}
    if calibration:
        p = logits.softmax(1)
        out["ece"] = expected_calibration_error(p, y, num_bins=bins, mode="top")
        out["ece_classwise"] = expected_calibration_error(p, y, num_bins=bins, mode="classwise")
    return out


def _image_grid(images: Tensor, rows: int, path: Path, title: str, row_labels: list[str] | None = None) -> None:
    """The (N, 64) images in [-1, 1] as one mosaic of ``rows`` rows (one imshow: fast), 1-pixel gaps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = -(-len(images) // rows)
    canvas = torch.full((rows * 9 + 1, cols * 9 + 1), float("nan"))
    for i, img in enumerate(images):
        r, c = divmod(i, cols)
        canvas[1 + 9 * r: 9 * (r + 1), 1 + 9 * c: 9 * (c + 1)] = img.view(8, 8)
    fig, ax = plt.subplots(figsize=(0.5 * cols + 0.6, 0.5 * rows + 0.5))
    cmap = plt.get_cmap("gray_r").with_extremes(bad="#c8d4f0")  # the gaps
    ax.imshow(canvas.numpy(), cmap=cmap, vmin=-1, vmax=1, interpolation="nearest")
    ax.set(xticks=[], yticks=[4.5 + 9 * r for r in range(len(row_labels or []))], yticklabels=row_labels or [])
    ax.set_title(title, fontsize=7)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _save_state(run_dir: Path, model, opt, loss_fn: JEMLoss, gen: torch.Generator, state: dict, best: dict) -> None:
    extra = {"extra.gen": gen.get_state(), **{f"extra.best.{k}": v for k, v in best.items()}}
    if loss_fn.replay is not None:
        extra.update({f"extra.replay.{k}": v.contiguous() for k, v in loss_fn.replay.state_dict().items()})
    save_checkpoint(run_dir / CHECKPOINT, model=model, optimizer=opt, trainer_state=state, extra_tensors=extra)


def _load_state(run_dir: Path, model, opt, loss_fn: JEMLoss, gen: torch.Generator) -> tuple[dict, dict]:
    state = load_checkpoint(run_dir / CHECKPOINT, model=model, optimizer=opt)
    extra = state.pop("extra_tensors")
    gen.set_state(extra["extra.gen"])
    if loss_fn.replay is not None:
        loss_fn.replay.load_state_dict({k[13:]: v for k, v in extra.items() if k.startswith("extra.replay.")})
    return state, {k[11:]: v for k, v in extra.items() if k.startswith("extra.best.")}


def run_jem(cfg: JemConfig, run_dir: str | Path, *, resume: bool = False, log=print) -> dict[str, Any]:
    """Train one JEM (or supervised, ``alpha_g = 0``) digits classifier, evaluate its best weights, write the
    report; returns the results dict (also ``run_dir/results.json``). Files: see the module docstring. Raises:
        ValueError: a label budget the training split cannot meet (:func:`check_label_budget`).
        FileExistsError: ``run_dir`` is not empty and ``resume`` is False.
        FileNotFoundError: ``resume`` without a checkpoint in ``run_dir``.
    """
    from tqdm.auto import tqdm

    from seqebm.data.digits import load_digits_dataset
    run_dir, t0 = Path(run_dir), time.perf_counter()
    data = load_digits_dataset(cfg.data.cache_dir, seed=cfg.data.seed)
    check_label_budget(cfg, len(data.train))
    o, ob, ev = cfg.optim, cfg.objective, cfg.eval
    if resume:
        res = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
        if res.get("steps_planned", -1) >= o.steps:
            log(f"[seqebm] {run_dir}: finished earlier ({res['steps_planned']} steps), not retraining")
            return res
        if not (run_dir / CHECKPOINT).is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run folder already exists: {run_dir} (resume it or pick another); nothing overwritten")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")

    x_train, y_train = digits_to_inputs(data.train), data.train_labels
    x_val, y_val = digits_to_inputs(data.valid)[: cfg.data.val_size], data.valid_labels[: cfg.data.val_size]
    x_test, y_test = digits_to_inputs(data.test), data.test_labels
    lab = balanced_subset(y_train, cfg.data.num_labels, cfg.seed)
    x_lab, y_lab = x_train[lab], y_train[lab]
    generative = ob.alpha_g > 0
    kind = "pretrain" if ob.pretrain_steps else "jem" if generative else "supervised"
    torch.manual_seed(cfg.seed)
    model = JointEnergyClassifier(digits_classifier(cfg.model.hidden, arch=cfg.model.arch, depth=cfg.model.depth))
    loss_fn = JEMLoss(alpha_d=ob.alpha_d, alpha_g=ob.alpha_g, sgld_steps=ob.sgld_steps, step_size=ob.step_size,
                      noise_std=ob.noise_std, buffer_size=ob.buffer_size, reinit_prob=ob.reinit_prob,
                      energy_reg=ob.energy_reg, grad_clip=ob.grad_clip, data_noise=ob.data_noise)
    if generative:  # made here (not lazily in the loss) so that a checkpoint can restore it
        loss_fn.replay = ReplayBuffer(ob.buffer_size, uniform_init((DIGITS_PIXELS,)), ob.reinit_prob,
                                      generator=torch.Generator().manual_seed(cfg.seed))
    opt = torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    n_params = sum(p.numel() for p in model.parameters())
    if resume:
        state, best = _load_state(run_dir, model, opt, loss_fn, gen)
        kept = [s for s in (run_dir / METRICS).read_text().splitlines() if s.strip()
                and json.loads(s)["step"] <= state["step"]]  # drop records written after the checkpoint
        atomic_write_text(run_dir / METRICS, "".join(f"{s}\n" for s in kept))
        log(f"[seqebm] {cfg.name}: resuming at step {state['step']} of {o.steps}")
    else:
        state = {"step": 0, "elapsed_s": 0.0, "best_key": None, "best_step": 0, "diverged_at": None}
        best = {k: v.detach().clone() for k, v in model.state_dict().items()}
        (run_dir / METRICS).write_text("")
        _save_state(run_dir, model, opt, loss_fn, gen, state, best)
    log(f"[seqebm] {cfg.name}: {kind} on digits, {len(lab)} labeled / {len(x_train) - len(lab)} unlabeled training "
        f"digits, {cfg.model.arch} params={n_params}, {o.steps} steps")

    sums: dict[str, float] = {}
    t_start = time.perf_counter() - state["elapsed_s"]
    bar = tqdm(total=o.steps, initial=state["step"], desc=cfg.name, disable=not o.progress, leave=False)
    for step in range(state["step"] + 1, o.steps + 1):
        il = torch.randint(len(lab), (o.labeled_batch,), generator=gen)
        xu = x_train[torch.randint(len(x_train), (o.unlabeled_batch,), generator=gen)] if generative else None
        if ob.pretrain_steps:  # phase 1: p(x) alone; phase 2: p(y|x) alone, with a fresh optimiser
            pre = step <= ob.pretrain_steps
            loss_fn.alpha_d, loss_fn.alpha_g = (0.0, ob.alpha_g) if pre else (ob.alpha_d, 0.0)
            if step == ob.pretrain_steps + 1:
                opt = torch.optim.Adam(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
            out = loss_fn(model, None if pre else x_lab[il], None if pre else y_lab[il], xu if pre else None,
                          generator=gen)
        else:
            out = loss_fn(model, x_lab[il], y_lab[il], xu, generator=gen)
        if not torch.isfinite(out.loss):
            state["diverged_at"] = step
            log(f"[seqebm] {cfg.name}: the loss is not finite at step {step}; stopping with the best weights so far")
            break
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        tok = out.metrics["tokens"]
        for k, v in (("n", 1.0), ("loss", float(out.loss.detach())),
                     *((k[:-4], float(out.metrics[k]) / tok) for k in out.metrics if k.endswith("_sum"))):
            sums[k] = sums.get(k, 0.0) + v
        bar.update(1)
        if step % ev.every == 0 or step == o.steps:
            train = {k: v / sums["n"] for k, v in sums.items() if k != "n"}
            sums = {}
            val = _cls_metrics(_logits(model, x_val), y_val, ev.num_bins, calibration=False)
            key = [val["accuracy"], -val["nll"]]
            # selection only among fine-tuned weights: pre-training has not used the labels yet
            if step > ob.pretrain_steps and (state["best_key"] is None or key > state["best_key"]):
                state.update(best_key=key, best_step=step)
                best = {k: v.detach().clone() for k, v in model.state_dict().items()}
            state.update(step=step, elapsed_s=time.perf_counter() - t_start)
            with open(run_dir / METRICS, "a") as fh:
                fh.write(json.dumps({"split": "train", "step": step, **train}) + "\n")
                fh.write(json.dumps({"split": "valid", "step": step, "ce": val["nll"], **val}) + "\n")
            _save_state(run_dir, model, opt, loss_fn, gen, state, best)
            bar.set_postfix(valid_acc=f"{val['accuracy']:.3f}",
                            best=f"{state['best_key'][0]:.3f}" if state["best_key"] else "-")
    bar.close()
    if state["diverged_at"] is not None:
        state["elapsed_s"] = time.perf_counter() - t_start

    model.load_state_dict(best)
    save_model(model, run_dir / BEST_MODEL, {"name": cfg.name, "step": state["best_step"]})
    lg_val, lg_test = _logits(model, x_val), _logits(model, x_test)
    temp = temperature_scale(lg_val, y_val)
    test = _cls_metrics(lg_test, y_test, ev.num_bins)
    test.update({f"{k}_ts": v for k, v in _cls_metrics(lg_test / temp, y_test, ev.num_bins).items()
                 if k != "accuracy"}, temperature=temp)
    u_in, p_in = torch.logsumexp(lg_test, 1), lg_test.softmax(1).max(1).values
    ood = {}
    for name, x_ood in ood_sets(x_test, ev.ood_size).items():
        lg = _logits(model, x_ood)
        ood[name] = {"auroc_logpx": ood_auroc(u_in, torch.logsumexp(lg, 1)),
                     "auroc_maxp": ood_auroc(p_in, lg.softmax(1).max(1).values)}
    done = state["step"] if state["diverged_at"] is None else state["diverged_at"] - 1
    results: dict[str, Any] = {
        "name": cfg.name, "task": "jem-digits", "kind": kind, "num_labels": len(lab),
        "num_unlabeled": len(x_train) - len(lab), "seed": cfg.seed,
        "labeled_per_class": torch.bincount(y_lab, minlength=NUM_CLASSES).tolist(), "params": n_params,
        "steps_planned": o.steps, "steps": done, "best_step": state["best_step"], "diverged_at": state["diverged_at"],
        "train_time_s": state["elapsed_s"], "sec_per_step": state["elapsed_s"] / max(done, 1),
        "valid": _cls_metrics(lg_val, y_val, ev.num_bins), "test": test, "ood": ood}
    reliability_diagram(lg_test.softmax(1), y_test, run_dir / "reliability.png", ev.num_bins, title=f"{cfg.name} test")
    reliability_diagram((lg_test / temp).softmax(1), y_test, run_dir / "reliability_ts.png", ev.num_bins,
                        title=f"{cfg.name} test, T={temp:.2f}")
    from seqebm.eval.plots import plot_curves
    plot_curves(run_dir / METRICS, run_dir / "curves.png", keys=("ce", "accuracy", "u_data", "u_model"))
    if generative:
        k = ev.samples_per_class
        labels = torch.arange(NUM_CLASSES).repeat_interleave(k)
        xs = sample(model, len(labels), ev.sample_steps, event_shape=(DIGITS_PIXELS,), y=labels,
                    step_size=ob.step_size, noise_std=ob.noise_std, grad_clip=ob.grad_clip,
                    generator=torch.Generator().manual_seed(cfg.seed))
        with torch.no_grad():
            results["samples"] = {"sgld_steps": ev.sample_steps,
                                  "class_agreement": float((_logits(model, xs).argmax(1) == labels).double().mean()),
                                  "u_samples": float(model.log_marginal(xs).mean()),
                                  "u_test": float(u_in.mean())}
        _image_grid(xs, NUM_CLASSES, run_dir / "samples.png", f"{cfg.name}: SGLD from noise, "
                    f"{ev.sample_steps} steps, p(x|y) per row", [str(c) for c in range(NUM_CLASSES)])
        _image_grid(loss_fn.replay.buffer[: NUM_CLASSES * k].cpu(), NUM_CLASSES, run_dir / "buffer.png",
                    f"{cfg.name}: replay buffer chains")
    results["wall_time_s"] = time.perf_counter() - t0
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(run_dir / "report.md", _report(cfg, results))
    log(f"[seqebm] {cfg.name}: test accuracy {100 * test['accuracy']:.2f}%, ECE {100 * test['ece']:.2f}% "
        f"({100 * test['ece_ts']:.2f}% after TS), AUROC noise {ood['noise']['auroc_logpx']:.3f} / flipped "
        f"{ood['flipped']['auroc_logpx']:.3f} (log p(x)); {results['train_time_s']:.0f} s")
    return results


_KIND_TITLES = {"jem": "JEM (§5.2, Eq. 5.4)", "supervised": "supervised baseline",
                "pretrain": "EBM pre-training then fine-tuning (§5.4)"}


def _report(cfg: JemConfig, r: dict[str, Any]) -> str:
    from seqebm.eval.run_tables import markdown_table
    def row(name: str, m: dict[str, float], sfx: str = "") -> list[str]:
        acc = f"{100 * m['accuracy']:.2f}" if "accuracy" in m else "(same)"
        return [name, acc, f"{m['nll' + sfx]:.3f}", *(f"{100 * m[k + sfx]:.2f}" for k in ("ece", "ece_classwise"))]

    t = r["test"]
    lines = [f"# {cfg.name}: {_KIND_TITLES[r['kind']]} on digits", "",
             f"{r['num_labels']} labeled training digits (per class {r['labeled_per_class']}), "
             f"{r['num_unlabeled']} unlabeled; seed {cfg.seed}; "
             f"{r['steps']} of {r['steps_planned']} steps, best validation step {r['best_step']}; "
             f"{r['params']} parameters; training {r['train_time_s']:.0f} s ({1000 * r['sec_per_step']:.1f} ms/step).",
             "", markdown_table(["split", "accuracy (%)", "NLL", f"ECE top-label (%, B={cfg.eval.num_bins})",
                                 "ECE class-wise (%, Eq. 5.19)"],
                                [row("valid", r["valid"]), row("test", t),
                                 row(f"test, temperature-scaled (T = {t['temperature']:.3f}, fitted on valid)",
                                     {k: v for k, v in t.items() if k != "accuracy"}, "_ts")]),
             "", "OOD detection on the test digits (AUROC; higher = in-distribution scores higher):", "",
             markdown_table(["OOD set", "score U(x) = log p(x) + log Z", "score max p(y|x)"],
                            [[k, f"{v['auroc_logpx']:.3f}", f"{v['auroc_maxp']:.3f}"] for k, v in r["ood"].items()]),
             "", "![reliability](reliability.png) ![reliability after TS](reliability_ts.png)", "",
             "![curves](curves.png)", ""]
    if r.get("diverged_at"):
        lines.insert(3, f"\n**Training diverged at step {r['diverged_at']}** (non-finite loss); best weights kept.\n")
    if "samples" in r:
        s = r["samples"]
        lines += [f"Class-conditional SGLD samples from noise ({s['sgld_steps']} steps; the classifier gives "
                  f"{100 * s['class_agreement']:.0f}% of them their conditioning class; mean U: samples "
                  f"{s['u_samples']:.2f}, test digits {s['u_test']:.2f}):", "", "![samples](samples.png)", "",
                  "Replay buffer chains:", "", "![buffer](buffer.png)", ""]
    return "\n".join(lines)


_TABLE = [("accuracy (%)", ("test", "accuracy"), 100, 2), ("NLL", ("test", "nll"), 1, 3),
          ("ECE (%)", ("test", "ece"), 100, 2), ("ECE after TS (%)", ("test", "ece_ts"), 100, 2),
          *((f"AUROC {k} {s}", ("ood", k, f"auroc_{m}"), 1, 3) for k in OOD_KINDS
            for s, m in (("log p(x)", "logpx"), ("max p", "maxp"))),
          ("train time (s)", ("train_time_s",), 1, 0)]


def compare_jem(configs: list[str | Path], seeds: list[int], label_counts: list[int], out_dir: str | Path,
                overrides: list[str] | None = None, *, log=print) -> dict[str, Any]:
    """Train every config x label count x seed under ``out_dir/<stem>-n<labels>-s<seed>`` (finished runs reused,
    interrupted ones resumed) and write ``comparison.md`` / ``comparison.json``: mean ± std over seeds."""
    from seqebm.eval.run_tables import format_mean_std, markdown_table, mean_std

    _need(bool(configs) and bool(seeds) and bool(label_counts), "compare needs configs, seeds and label counts")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = [], {}
    for path in configs:
        stem = Path(path).stem
        for n in label_counts:
            results = []
            for seed in seeds:
                run = out / f"{stem}-n{n}-s{seed}"
                cfg = load_config(JemConfig, path, list(overrides or []) + [f"seed={seed}", f"data.num_labels={n}"])
                resume = (run / CHECKPOINT).is_file() or (run / "results.json").is_file()
                results.append(run_jem(cfg, run, resume=resume, log=log))
            stats = {title: mean_std([scale * reduce(lambda t, k: t[k], keys, r) for r in results])
                     for title, keys, scale, _ in _TABLE}
            summary[f"{stem}-n{n}"] = {"config": str(path), "num_labels": n, "kind": results[0]["kind"],
                                       **{t: vars(s) for t, s in stats.items()}}
            rows.append([stem, n, *(format_mean_std(stats[t], d) for t, _, _, d in _TABLE)])
    text = (f"# JEM vs supervised on digits ({len(seeds)} seeds: {', '.join(map(str, seeds))})\n\n"
            "Mean ± sample std over seeds (each seed draws its own labeled subset) of the best-validation weights "
            "on the 180 test digits. ECE: top-label, B = 20; TS: temperature scaling fitted on the validation split. "
            "AUROC: test digits vs uniform noise, flipped (left-right and up-down) and pixel-shuffled digits, "
            "scored by log p(x) (U(x) = logsumexp of the logits) or by max p(y|x).\n\n"
            + markdown_table(["config", "labels", *(t for t, *_ in _TABLE)], rows) + "\n")
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.json", json.dumps({"seeds": seeds, "labels": label_counts,
                                                           "configs": [str(c) for c in configs],
                                                           "overrides": overrides or [], "summary": summary}, indent=2))
    log(text)
    return summary


def register_jem_commands(subparsers) -> None:
    """``seqebm jem train`` and ``seqebm jem compare`` on the given (top-level) subparsers."""
    from seqebm.training.commands import add_train_compare_commands

    add_train_compare_commands(
        subparsers, "jem", "JEM on digits (§5.2): semi-supervised training, calibration, OOD, samples",
        config_cls=JemConfig, run=run_jem,
        compare=lambda a: compare_jem(a.configs, a.seeds, a.labels, a.out, a.overrides),
        train_help="train one JEM, pre-trained or supervised digits classifier (configs/jem-digits*.yaml)",
        compare_help="configs x label counts x seeds; a mean ± std table", compare_axis=("labels", int, [50, 100]),
        override_example="optim.lr=3e-4")
