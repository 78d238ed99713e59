"""Calibrated NLU: fine-tune a text encoder with a residual joint EBM (monograph §5.5; issue #11 part 4).

``seqebm nlu train --config configs/nlu-sentiment-hidden.yaml --run-dir runs/nlu`` fine-tunes the
encoder (default: the packaged all-MiniLM-L6-v2) with a classifier head on L_CE (Eq. 5.17) and, for
the variants ``scalar``, ``hidden`` and ``sharp-hidden``, the residual energy Ê_θ(x) of Eq. 5.18 on
L_NCE (:mod:`seqebm.objectives.calibrated_nlu`); ``model.variant: none`` is the plain fine-tuning
baseline, evaluated with and without post-hoc temperature scaling (fitted on the validation split).

The noise is made once per run, before training: a small causal LM (seqebm's TransformerLM over the
encoder's word pieces) is trained on the training sentences with the masked-completion objective
(mask ratio M = ``noise.mask_ratio``), then completes ``noise.samples_per_sentence`` freshly masked
copies of every training sentence (:mod:`seqebm.models.calibrated_nlu`). Files of a run folder:
``config.yaml``, ``noise.jsonl`` / ``noise_meta.json`` / ``noise_lm.safetensors`` (EBM variants),
``metrics.jsonl``, ``curves.png``, ``checkpoint.safetensors``, ``model.safetensors`` (best
validation weights), ``results.json``, ``report.md``, ``reliability.png`` / ``reliability_ts.png``
(test, class-wise bins of Eq. 5.19, before / after temperature scaling) and ``entropy_energy.png``
(H(p_θ(·|x)) against Ê_θ(x) on the test split, Fig. 5.6).

Resumption is exact: batches and noise draws are functions of (seed, step), the checkpoint (written
atomically at step 0 and after every validation) holds the weights, AdamW's state, the RNG and the
best trainable weights so far, and the noise is read back from ``noise.jsonl``. ``train.max_steps``
cuts a run short without changing its learning-rate schedule; resume with a larger value (or null)
to finish it. A run whose ``results.json`` covers the planned steps is not retrained.
``seqebm nlu compare``: configs x seeds, one mean ± std table.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from seqebm.config import load_config, save_config
from seqebm.eval.calibration import expected_calibration_error, reliability_diagram, temperature_scale
from seqebm.io import atomic_write_text
from seqebm.models.calibrated_nlu import (VARIANTS, CompactVocab, EncoderClassifier, generate_noise, load_hf_encoder,
                                          noise_lm, pad_rows, train_noise_lm)
from seqebm.objectives.calibrated_nlu import CalibratedNLULoss, NluBatch
from seqebm.training.checkpoint import load_checkpoint, save_checkpoint, save_model
from seqebm.training.distributed import resolve_device

__all__ = ["NluConfig", "compare_nlu", "register_nlu_commands", "run_nlu"]

CHECKPOINT, BEST_MODEL, METRICS = "checkpoint.safetensors", "model.safetensors", "metrics.jsonl"
NOISE_ROWS, NOISE_META, NOISE_LM = "noise.jsonl", "noise_meta.json", "noise_lm.safetensors"


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


def _positive_or_none(section: str, obj: Any, *keys: str) -> None:
    for k in keys:
        v = getattr(obj, k)
        _need(v is None or v >= 1, f"{section}.{k} must be >= 1 or null, got {v}")


@dataclass
class NluDataConfig:
    dataset: str = "rotten-tomatoes"  # rotten-tomatoes | bbc-news | a .csv/.tsv/.jsonl file | a folder
    text_field: str = "text"  # your own files: column/key names and (optional) label set
    label_field: str = "label"
    label_names: list[str] | None = None
    train_size: int | None = 1000  # subsample of each split (fixed by data.seed); null = all
    valid_size: int | None = 500
    test_size: int | None = None
    max_len: int = 48  # word pieces per text, [CLS] and [SEP] included
    seed: int = 0
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _need(bool(self.dataset), "data.dataset must not be empty")
        _positive_or_none("data", self, "train_size", "valid_size", "test_size")
        _need(self.max_len >= 3, f"data.max_len must be >= 3 ([CLS], one piece, [SEP]), got {self.max_len}")
        _need(self.seed >= 0, f"data.seed must be >= 0, got {self.seed}")


@dataclass
class NluModelConfig:
    variant: str = "none"  # none (CE baseline) | scalar | hidden | sharp-hidden (§5.5)
    encoder_path: str | None = None  # a local HF encoder folder; null = the packaged all-MiniLM-L6-v2
    pooling: str = "mean"  # mean | cls
    head: str = "linear"  # linear | mlp
    dropout: float = 0.1
    train_layers: int | None = None  # fine-tune only the top n encoder layers; null = all
    freeze_embeddings: bool = True

    def __post_init__(self) -> None:
        _need(self.variant in VARIANTS, f"model.variant must be one of {VARIANTS}, got {self.variant!r}")
        _need(self.pooling in ("mean", "cls"), f"model.pooling must be mean or cls, got {self.pooling!r}")
        _need(self.head in ("linear", "mlp"), f"model.head must be linear or mlp, got {self.head!r}")
        _need(0 <= self.dropout < 1, f"model.dropout must lie in [0, 1), got {self.dropout}")
        _need(self.train_layers is None or self.train_layers >= 0, f"model.train_layers must be >= 0, got "
                                                                   f"{self.train_layers}")


@dataclass
class NluNoiseConfig:
    mask_ratio: float = 0.4  # M
    samples_per_sentence: int = 2  # noise pool = this many completions of each training sentence
    d_model: int = 128  # the noise LM (TransformerLM over the word pieces of the training text)
    n_layers: int = 2
    n_heads: int = 4
    epochs: int = 4
    batch_size: int = 32
    lr: float = 2.0e-3
    temperature: float = 1.0
    top_k: int | None = None

    def __post_init__(self) -> None:
        _need(0 < self.mask_ratio <= 1, f"noise.mask_ratio must lie in (0, 1], got {self.mask_ratio}")
        for k in ("samples_per_sentence", "d_model", "n_layers", "n_heads", "epochs", "batch_size"):
            _need(getattr(self, k) >= 1, f"noise.{k} must be >= 1, got {getattr(self, k)}")
        _need(self.d_model % self.n_heads == 0, f"noise.d_model ({self.d_model}) must be divisible by n_heads")
        _need(self.lr > 0 and self.temperature > 0, "noise.lr and noise.temperature must be > 0")
        _positive_or_none("noise", self, "top_k")


@dataclass
class NluObjectiveConfig:
    nu: float = 1.0  # ν: noise rows per data row in a batch
    nce_weight: float = 1.0  # λ in L_CE + λ L_NCE (§5.5: 1)

    def __post_init__(self) -> None:
        _need(self.nu > 0 and self.nce_weight >= 0, f"objective.nu must be > 0 and nce_weight >= 0, got "
                                                     f"{self.nu}, {self.nce_weight}")


@dataclass
class NluOptimConfig:
    lr: float = 1.0e-4  # AdamW; linear warm-up, then linear decay to 0 at the planned end
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    clip_norm: float | None = 1.0

    def __post_init__(self) -> None:
        _need(self.lr > 0 and self.weight_decay >= 0, f"optim.lr must be > 0 and weight_decay >= 0, got "
                                                      f"{self.lr}, {self.weight_decay}")
        _need(0 <= self.warmup_ratio < 1, f"optim.warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        _need(self.clip_norm is None or self.clip_norm > 0, f"optim.clip_norm must be > 0, got {self.clip_norm}")


@dataclass
class NluTrainConfig:
    epochs: int = 2
    batch_size: int = 16  # data rows per step (plus ν times as many noise rows)
    max_steps: int | None = None  # stop early (the schedule still spans all epochs); null = all
    eval_every: int | None = None  # validate (and checkpoint) every n steps; null = every epoch
    eval_batch_size: int = 64
    num_bins: int = 20  # B of Eq. 5.19
    device: str = "auto"  # auto (CUDA if available) | cpu | cuda | cuda:N
    progress: bool = True

    def __post_init__(self) -> None:
        for k in ("epochs", "batch_size", "eval_batch_size", "num_bins"):
            _need(getattr(self, k) >= 1, f"train.{k} must be >= 1, got {getattr(self, k)}")
        _positive_or_none("train", self, "max_steps", "eval_every")


@dataclass
class NluConfig:
    data: NluDataConfig = field(default_factory=NluDataConfig)
    model: NluModelConfig = field(default_factory=NluModelConfig)
    noise: NluNoiseConfig = field(default_factory=NluNoiseConfig)
    objective: NluObjectiveConfig = field(default_factory=NluObjectiveConfig)
    optim: NluOptimConfig = field(default_factory=NluOptimConfig)
    train: NluTrainConfig = field(default_factory=NluTrainConfig)
    name: str = "nlu"
    seed: int = 0  # initialisation, batches, noise LM, noise draws, dropout

    def __post_init__(self) -> None:
        _need(bool(self.name), "name must not be empty")
        _need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")


def _seeded(*parts: object) -> torch.Generator:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _subsample(texts: list[str], labels: list[int], n: int | None, seed: int, split: str
               ) -> tuple[list[str], list[int]]:
    if n is None or n >= len(texts):
        return texts, labels
    keep = sorted(torch.randperm(len(texts), generator=_seeded(seed, split)).tolist()[:n])
    return [texts[i] for i in keep], [labels[i] for i in keep]


def load_nlu_data(cfg: NluDataConfig) -> dict[str, Any]:
    """The (sub-sampled) splits: ``{"label_names", "train"|"valid"|"test": (texts, labels)}``."""
    from seqebm.data.text_classification import BUILTIN_DATASETS, load_text_classification

    kw = {} if cfg.dataset in BUILTIN_DATASETS else {"text_field": cfg.text_field, "label_field": cfg.label_field,
                                                      "label_names": cfg.label_names}
    ds = load_text_classification(cfg.dataset, cfg.cache_dir, **kw)
    out: dict[str, Any] = {"label_names": ds.label_names}
    for split, n in (("train", cfg.train_size), ("valid", cfg.valid_size), ("test", cfg.test_size)):
        texts, labels, _ = ds.split(split)
        out[split] = _subsample(texts, labels, n, cfg.seed, split)
    return out


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total`` (step is 1-based)."""
    if warmup and step <= warmup:
        return step / warmup
    return max(0.0, (total - step + 1) / max(1, total - warmup))


@torch.no_grad()
def _predict(model: EncoderClassifier, rows: list[list[int]], batch_size: int, pad_id: int) -> tuple[Tensor, Tensor]:
    """Logits (N, K) and energies Ê (N,) in float64 on the CPU, batches sorted by length (less padding)."""
    was, dev = model.training, next(model.parameters()).device
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    logits = torch.empty(len(rows), model.num_labels, dtype=torch.float64)
    energy = torch.empty(len(rows), dtype=torch.float64)
    for s in range(0, len(rows), batch_size):
        idx = order[s:s + batch_size]
        out = model(*(t.to(dev) for t in pad_rows([rows[i] for i in idx], pad_id)))
        logits[idx], energy[idx] = out.logits.double().cpu(), out.energy.double().cpu()
    model.train(was)
    return logits, energy


def _metrics(logits: Tensor, y: Tensor, bins: int) -> dict[str, float]:
    p = logits.softmax(1)
    return {"accuracy": float((logits.argmax(1) == y).double().mean()), "nll": float(F.cross_entropy(logits, y)),
            "ece": expected_calibration_error(p, y, num_bins=bins, mode="classwise"),
            "ece_top": expected_calibration_error(p, y, num_bins=bins, mode="top")}


def _pearson(u: Tensor, v: Tensor) -> float | None:
    u, v = u - u.mean(), v - v.mean()
    den = float(u.norm() * v.norm())
    return float((u * v).sum()) / den if den > 0 else None


def _entropy_energy_plot(energy: Tensor, entropy: Tensor, correct: Tensor, path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5, 4))
    for ok, colour, label in ((True, "tab:blue", "correct"), (False, "tab:red", "wrong")):
        m = correct == ok
        ax.scatter(energy[m].numpy(), entropy[m].numpy(), s=6, alpha=0.5, c=colour, label=label)
    ax.set(xlabel="residual energy Ê(x)", ylabel="entropy H(p(·|x)) (nats)", title=title)
    ax.title.set_fontsize(8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _make_noise(cfg: NluConfig, run_dir: Path, train_rows: list[list[int]], tokenizer, device, log) -> dict[str, Any]:
    """Train the masked-completion noise LM and write its completions of the training sentences."""
    nc, keep = cfg.noise, [i for i, r in enumerate(train_rows) if len(r) > 2]  # texts with >= 1 word piece
    _need(bool(keep), "no training text has a word piece left after tokenization; cannot train the noise LM")
    bodies = [train_rows[i][1:-1] for i in keep]  # word pieces without [CLS] / [SEP]
    vocab = CompactVocab.build(bodies, tokenizer.unk_token_id)
    compact = [vocab.encode(b) for b in bodies]
    torch.manual_seed(cfg.seed)
    lm = noise_lm(len(vocab), max(map(len, compact)), nc.mask_ratio, d_model=nc.d_model, n_layers=nc.n_layers,
                  n_heads=nc.n_heads).to(device)
    t = time.perf_counter()
    losses = train_noise_lm(lm, compact, ratio=nc.mask_ratio, epochs=nc.epochs, batch_size=nc.batch_size, lr=nc.lr,
                            generator=_seeded(cfg.seed, "noise-lm"), log=log)
    t_lm = time.perf_counter() - t
    rows, source = generate_noise(lm, compact, ratio=nc.mask_ratio, samples_per_row=nc.samples_per_sentence,
                                  generator=_seeded(cfg.seed, "noise-sample"), temperature=nc.temperature,
                                  top_k=nc.top_k)
    noise = [[tokenizer.cls_token_id, *vocab.decode(r), tokenizer.sep_token_id] for r in rows]
    t_gen = time.perf_counter() - t - t_lm
    source = [keep[i] for i in source]
    changed = sum(n != train_rows[i] for n, i in zip(noise, source)) / len(noise)
    save_model(lm, run_dir / NOISE_LM, {"vocab_size": len(vocab)})
    atomic_write_text(run_dir / NOISE_ROWS, "".join(json.dumps({"source": i, "ids": n}) + "\n"
                                                    for n, i in zip(noise, source)))
    meta = {"vocab": vocab.to_dict(), "lm_params": sum(p.numel() for p in lm.parameters()), "lm_loss": losses,
            "lm_time_s": t_lm, "generation_time_s": t_gen, "rows": len(noise), "changed_fraction": changed}
    atomic_write_text(run_dir / NOISE_META, json.dumps(meta))  # last: the noise is complete
    log(f"[seqebm] {cfg.name}: noise LM {meta['lm_params']} params, {t_lm:.0f} s; {len(noise)} noise sentences "
        f"in {t_gen:.0f} s ({100 * changed:.0f}% differ from their source)")
    return meta


def _read_noise(run_dir: Path) -> tuple[list[list[int]], dict[str, Any]]:
    rows = [json.loads(s)["ids"] for s in (run_dir / NOISE_ROWS).read_text().splitlines() if s.strip()]
    return rows, json.loads((run_dir / NOISE_META).read_text())


def _trainable(model: torch.nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_state(run_dir: Path, model, opt, state: dict, best: dict[str, Tensor]) -> None:
    save_checkpoint(run_dir / CHECKPOINT, model=model, optimizer=opt, trainer_state=state,
                    extra_tensors={f"extra.best.{k}": v.contiguous() for k, v in best.items()})


def run_nlu(cfg: NluConfig, run_dir: str | Path, *, resume: bool = False, log=print) -> dict[str, Any]:
    """Train and evaluate one calibrated-NLU classifier; returns the results (also ``results.json``).

    Raises:
        FileExistsError: ``run_dir`` is not empty and ``resume`` is False.
        FileNotFoundError: ``resume`` without a checkpoint in ``run_dir``.
        ValueError: bad data (labels outside the label set, an empty split) or a ``data.max_len``
            beyond the encoder's positions (checked before the run folder is made).
    """
    from tqdm.auto import tqdm

    run_dir, t0 = Path(run_dir), time.perf_counter()
    tr, ob = cfg.train, cfg.objective
    if resume:
        res = json.loads((run_dir / "results.json").read_text()) if (run_dir / "results.json").is_file() else {}
        if not (run_dir / CHECKPOINT).is_file():
            raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run folder already exists: {run_dir} (resume it or pick another); nothing overwritten")
    data = load_nlu_data(cfg.data)
    n_train = len(data["train"][0])
    steps_per_epoch = math.ceil(n_train / tr.batch_size)
    total = tr.epochs * steps_per_epoch
    planned = min(total, tr.max_steps or total)
    if resume and res.get("steps_planned", -1) >= planned:
        log(f"[seqebm] {run_dir}: finished earlier ({res['steps_planned']} steps), not retraining")
        return res
    encoder, tok = load_hf_encoder(cfg.model.encoder_path)
    limit = int(getattr(encoder.config, "max_position_embeddings", cfg.data.max_len))
    _need(cfg.data.max_len <= limit, f"data.max_len={cfg.data.max_len} exceeds the encoder's {limit} positions")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    rows = {s: tok(data[s][0], truncation=True, max_length=cfg.data.max_len)["input_ids"]
            for s in ("train", "valid", "test")}
    labels = {s: torch.tensor(data[s][1], dtype=torch.long) for s in ("train", "valid", "test")}
    ebm, device = cfg.model.variant != "none", resolve_device(tr.device)
    noise_rows: list[list[int]] = []
    noise_meta: dict[str, Any] = {}
    if ebm:
        if not (run_dir / NOISE_META).is_file():  # made once per run; a resumed run reads it back
            _make_noise(cfg, run_dir, rows["train"], tok, device, log)
        noise_rows, noise_meta = _read_noise(run_dir)

    torch.manual_seed(cfg.seed)
    model = EncoderClassifier(encoder, len(data["label_names"]), variant=cfg.model.variant,
                              pooling=cfg.model.pooling, head=cfg.model.head, dropout=cfg.model.dropout,
                              train_layers=cfg.model.train_layers, freeze_embeddings=cfg.model.freeze_embeddings
                              ).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    loss_fn = CalibratedNLULoss(nce_weight=ob.nce_weight)
    warmup = int(cfg.optim.warmup_ratio * total)
    if resume:
        state = load_checkpoint(run_dir / CHECKPOINT, model=model, optimizer=opt)
        best = {k[len("extra.best."):]: v for k, v in state.pop("extra_tensors").items()}
        kept = [s for s in (run_dir / METRICS).read_text().splitlines() if s.strip()
                and json.loads(s)["step"] <= state["step"]]  # drop records written after the checkpoint
        atomic_write_text(run_dir / METRICS, "".join(f"{s}\n" for s in kept))
        log(f"[seqebm] {cfg.name}: resuming at step {state['step']} of {planned}")
    else:
        state = {"step": 0, "elapsed_s": 0.0, "best_key": None, "best_step": 0, "diverged_at": None}
        best = _trainable(model)
        (run_dir / METRICS).write_text("")
        _save_state(run_dir, model, opt, state, best)
    log(f"[seqebm] {cfg.name}: variant {cfg.model.variant} on {cfg.data.dataset}, {n_train} training texts, "
        f"{len(noise_rows)} noise texts, {sum(p.numel() for p in params)} trainable parameters, {planned} steps")

    state["planned"] = planned
    eval_every = tr.eval_every or steps_per_epoch
    pad = tok.pad_token_id
    sums: dict[str, float] = {}
    t_start = time.perf_counter() - state["elapsed_s"]
    model.train()
    bar = tqdm(total=planned, initial=state["step"], desc=cfg.name, disable=not tr.progress, leave=False)
    for step in range(state["step"] + 1, planned + 1):
        epoch, j = divmod(step - 1, steps_per_epoch)
        perm = torch.randperm(n_train, generator=_seeded(cfg.seed, "epoch", epoch))
        idx = perm[j * tr.batch_size:(j + 1) * tr.batch_size].tolist()
        ids, mask = pad_rows([rows["train"][i] for i in idx], pad)
        batch = NluBatch(ids.to(device), mask.to(device), labels["train"][idx].to(device))
        if ebm:
            k = max(1, round(ob.nu * len(idx)))
            pick = torch.randint(len(noise_rows), (k,), generator=_seeded(cfg.seed, "noise", step)).tolist()
            batch.noise_ids, batch.noise_mask = (t.to(device) for t in pad_rows([noise_rows[i] for i in pick], pad))
        for g in opt.param_groups:
            g["lr"] = cfg.optim.lr * _lr_factor(step, total, warmup)
        out = loss_fn(model, batch)
        if not torch.isfinite(out.loss):
            state["diverged_at"] = step
            log(f"[seqebm] {cfg.name}: the loss is not finite at step {step}; stopping with the best weights so far")
            break
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        if cfg.optim.clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip_norm)
        opt.step()
        n = out.metrics["tokens"]
        for key, v in (("n", 1.0), ("loss", float(out.loss.detach())),
                       *((key[:-4], float(out.metrics[key]) / n) for key in out.metrics if key.endswith("_sum"))):
            sums[key] = sums.get(key, 0.0) + v
        bar.update(1)
        if step % eval_every == 0 or step == planned:
            train_avg = {k: v / sums["n"] for k, v in sums.items() if k != "n"}
            sums = {}
            lg, _ = _predict(model, rows["valid"], tr.eval_batch_size, pad)
            val = _metrics(lg, labels["valid"], tr.num_bins)
            key = [val["accuracy"], -val["nll"]]
            if state["best_key"] is None or key > state["best_key"]:
                state.update(best_key=key, best_step=step)
                best = _trainable(model)
            state.update(step=step, elapsed_s=time.perf_counter() - t_start)
            with open(run_dir / METRICS, "a") as fh:
                fh.write(json.dumps({"split": "train", "step": step, **train_avg}) + "\n")
                fh.write(json.dumps({"split": "valid", "step": step, "ce": val["nll"], **val}) + "\n")
            _save_state(run_dir, model, opt, state, best)
            bar.set_postfix(valid_acc=f"{val['accuracy']:.3f}")
    bar.close()
    if state["diverged_at"] is not None:
        state["elapsed_s"] = time.perf_counter() - t_start
    return _finish(cfg, run_dir, model, best, state, rows, labels, data["label_names"], noise_meta, pad, t0, log)


def _finish(cfg: NluConfig, run_dir: Path, model: EncoderClassifier, best: dict[str, Tensor], state: dict,
            rows: dict, labels: dict, label_names: list[str], noise_meta: dict, pad: int, t0: float, log
            ) -> dict[str, Any]:
    """Evaluate the best weights on valid/test, fit the temperature, write plots, results and report."""
    tr, t = cfg.train, time.perf_counter()
    model.load_state_dict({k: v.to(next(model.parameters()).device) for k, v in best.items()}, strict=False)
    save_model(model, run_dir / BEST_MODEL, {"name": cfg.name, "step": state["best_step"]})
    lg_val, _ = _predict(model, rows["valid"], tr.eval_batch_size, pad)
    lg_test, e_test = _predict(model, rows["test"], tr.eval_batch_size, pad)
    temp = temperature_scale(lg_val, labels["valid"])
    test = _metrics(lg_test, labels["test"], tr.num_bins)
    test.update({f"{k}_ts": v for k, v in _metrics(lg_test / temp, labels["test"], tr.num_bins).items()
                 if k != "accuracy"}, temperature=temp)
    logp = lg_test.log_softmax(1)
    entropy = -(logp.exp() * logp).sum(1)  # H(p_θ(·|x)) (N,)
    bins, name = tr.num_bins, cfg.name
    reliability_diagram(lg_test.softmax(1), labels["test"], run_dir / "reliability.png", bins, mode="classwise",
                        title=f"{name} test")
    reliability_diagram((lg_test / temp).softmax(1), labels["test"], run_dir / "reliability_ts.png", bins,
                        mode="classwise", title=f"{name} test, T={temp:.2f}")
    what = "Ê(x)" if cfg.model.variant != "none" else "−logsumexp logits (not trained as an energy)"
    _entropy_energy_plot(e_test.float(), entropy.float(), lg_test.argmax(1) == labels["test"],
                         run_dir / "entropy_energy.png", f"{name}: test entropy vs {what}")
    from seqebm.eval.plots import plot_curves
    plot_curves(run_dir / METRICS, run_dir / "curves.png", keys=("ce", "accuracy", "nce", "nce_accuracy"))
    records = [json.loads(s) for s in (run_dir / METRICS).read_text().splitlines() if s.strip()]
    last_train = next((r for r in reversed(records) if r["split"] == "train"), {})
    done = state["step"] if state["diverged_at"] is None else state["diverged_at"] - 1
    results: dict[str, Any] = {
        "name": name, "task": "calibrated-nlu", "variant": cfg.model.variant, "dataset": cfg.data.dataset,
        "seed": cfg.seed, "label_names": label_names, "sizes": {s: len(r) for s, r in rows.items()},
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "steps_planned": state["planned"], "steps": done, "best_step": state["best_step"],
        "diverged_at": state["diverged_at"],
        "train_time_s": state["elapsed_s"], "sec_per_step": state["elapsed_s"] / max(done, 1),
        "valid": _metrics(lg_val, labels["valid"], bins), "test": test,
        "energy_entropy": {"energy_mean": float(e_test.mean()), "entropy_mean": float(entropy.mean()),
                           "pearson": _pearson(e_test, entropy),  # Spearman: ties broken by position
                           "spearman": _pearson(*(t.argsort().argsort().double() for t in (e_test, entropy)))},
        "last_train": {k: v for k, v in last_train.items() if k not in ("split",)},
        "noise": {k: v for k, v in noise_meta.items() if k != "vocab"}}
    results["eval_time_s"] = time.perf_counter() - t
    results["wall_time_s"] = time.perf_counter() - t0  # this call (a resumed run: the resumed part)
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(run_dir / "report.md", _report(cfg, results))
    log(f"[seqebm] {name}: test accuracy {100 * test['accuracy']:.2f}%, ECE (Eq. 5.19) {100 * test['ece']:.2f}% "
        f"({100 * test['ece_ts']:.2f}% after TS, T={temp:.2f}); {results['train_time_s']:.0f} s training")
    return results


_TITLES = {"none": "plain fine-tuning (CE, Eq. 5.17)", "scalar": "CE + NCE, scalar energy g_S(enc(x))",
           "hidden": "CE + NCE, hidden energy −logsumexp f_CLS",
           "sharp-hidden": "CE + NCE, sharp-hidden energy −max f_CLS"}


def _report(cfg: NluConfig, r: dict[str, Any]) -> str:
    from seqebm.eval.run_tables import markdown_table
    def row(label: str, m: dict[str, float], sfx: str = "") -> list[str]:
        acc = f"{100 * m['accuracy']:.2f}" if "accuracy" in m else "(same)"
        return [label, acc, f"{m['nll' + sfx]:.3f}", f"{100 * m['ece' + sfx]:.2f}", f"{100 * m['ece_top' + sfx]:.2f}"]

    t, ee, nz = r["test"], r["energy_entropy"], r["noise"]
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# {cfg.name}: {_TITLES[r['variant']]} (monograph §5.5)", "",
             f"Data {r['dataset']} ({', '.join(r['label_names'])}): {r['sizes']['train']} train / "
             f"{r['sizes']['valid']} valid / {r['sizes']['test']} test texts, at most {cfg.data.max_len} word pieces; "
             f"seed {cfg.seed}; {r['steps']} of {r['steps_planned']} steps, best validation step {r['best_step']}; "
             f"{r['trainable_params']} trainable parameters; training {r['train_time_s']:.0f} s "
             f"({r['sec_per_step']:.2f} s/step), evaluation {r['eval_time_s']:.0f} s.", "",
             markdown_table(["split", "accuracy (%)", "NLL", f"ECE class-wise (%, Eq. 5.19, B={cfg.train.num_bins})",
                             "ECE top-label (%)"],
                            [row("valid", r["valid"]), row("test", t),
                             row(f"test, temperature-scaled (T = {t['temperature']:.3f}, fitted on valid)",
                                 {k: v for k, v in t.items() if k != "accuracy"}, "_ts")]), ""]
    if r.get("diverged_at"):
        lines.insert(3, f"\n**Training diverged at step {r['diverged_at']}** (non-finite loss); best weights kept.\n")
    if nz:
        lt = r["last_train"]
        lines += [f"Noise (masked completion, M = {cfg.noise.mask_ratio}): a {nz['lm_params']}-parameter causal LM "
                  f"trained for {len(nz['lm_loss'])} epochs in {nz['lm_time_s']:.0f} s (final loss "
                  f"{nz['lm_loss'][-1]:.3f} nats per masked piece); {nz['rows']} noise texts generated in "
                  f"{nz['generation_time_s']:.0f} s. Last training window: NCE loss {lt.get('nce', float('nan')):.3f}, "
                  f"data-vs-noise accuracy {100 * lt.get('nce_accuracy', float('nan')):.1f}%.", ""]
    lines += [f"Test entropy vs energy (Fig. 5.6): mean Ê {ee['energy_mean']:.3f}, mean entropy "
              f"{ee['entropy_mean']:.3f} nats, Pearson {fmt(ee['pearson'])}, Spearman {fmt(ee['spearman'])}.", "",
              "![reliability](reliability.png) ![reliability after TS](reliability_ts.png)", "",
              "![entropy vs energy](entropy_energy.png)", "", "![curves](curves.png)", ""]
    return "\n".join(lines)


_COLUMNS = [("accuracy (%)", "accuracy", 100, 2), ("NLL", "nll", 1, 3), ("ECE (%, Eq. 5.19)", "ece", 100, 2),
            ("ECE top-label (%)", "ece_top", 100, 2)]


def compare_nlu(configs: list[str | Path], seeds: list[int], out_dir: str | Path, overrides: list[str] | None = None,
                *, log=print) -> dict[str, Any]:
    """Train every config x seed under ``out_dir/<stem>-s<seed>`` (finished runs reused, interrupted ones
    resumed) and write ``comparison.md`` / ``comparison.json``: mean ± std over seeds of the test metrics.
    A ``variant: none`` config gives two rows (CE, and CE + temperature scaling)."""
    from seqebm.eval.run_tables import format_mean_std, markdown_table, mean_std

    _need(bool(configs) and bool(seeds), "compare needs configs and seeds")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows, summary = [], {}
    for path in configs:
        stem = Path(path).stem
        results = []
        for seed in seeds:
            run = out / f"{stem}-s{seed}"
            cfg = load_config(NluConfig, path, list(overrides or []) + [f"seed={seed}"])
            resume = (run / CHECKPOINT).is_file()
            results.append(run_nlu(cfg, run, resume=resume, log=log))
        variant = results[0]["variant"]
        methods = [("baseline CE", ""), ("CE + temperature scaling", "_ts")] if variant == "none" else [(variant, "")]
        for method, sfx in methods:
            stats = {title: mean_std([scale * r["test"][key + (sfx if key != "accuracy" else "")] for r in results])
                     for title, key, scale, _ in _COLUMNS}
            stats["ECE after TS (%)"] = mean_std([100 * r["test"]["ece_ts"] for r in results])
            stats["train time (s)"] = mean_std([r["train_time_s"] for r in results])
            summary[f"{stem}/{method}"] = {"config": str(path), "method": method,
                                           **{t: vars(s) for t, s in stats.items()}}
            rows.append([stem, method, *(format_mean_std(stats[t], d) for t, _, _, d in _COLUMNS),
                         "—" if sfx else format_mean_std(stats["ECE after TS (%)"], 2),
                         format_mean_std(stats["train time (s)"], 0)])
    text = (f"# Calibrated NLU (monograph §5.5): {len(seeds)} seed(s): {', '.join(map(str, seeds))}\n\n"
            "Mean ± sample std over seeds of the best-validation weights on the test split. ECE: Eq. 5.19 "
            "(class-wise, B = 20) and top-label; TS: temperature scaling fitted on the validation split.\n\n"
            + markdown_table(["config", "method", *(t for t, *_ in _COLUMNS), "ECE after TS (%)", "train time (s)"],
                             rows) + "\n")
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.json", json.dumps({"seeds": seeds, "configs": [str(c) for c in configs],
                                                           "overrides": overrides or [], "summary": summary}, indent=2))
    log(text)
    return summary


def register_nlu_commands(subparsers) -> None:
    """``seqebm nlu train`` and ``seqebm nlu compare`` on the given (top-level) subparsers."""
    from seqebm.training.commands import add_train_compare_commands

    add_train_compare_commands(
        subparsers, "nlu", "calibrated NLU (§5.5): encoder + residual EBM, ECE, temperature scaling",
        config_cls=NluConfig, run=run_nlu, compare=lambda a: compare_nlu(a.configs, a.seeds, a.out, a.overrides),
        train_help="train one classifier (configs/nlu-*.yaml)", compare_help="configs x seeds; a mean ± std table",
        override_example="optim.lr=3e-5")
