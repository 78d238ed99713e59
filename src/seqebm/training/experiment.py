"""Experiments: a typed config tree -> task, model, objective, trainer -> a run folder.

A run folder holds ``config.yaml``, ``tokenizer/``, ``checkpoint.safetensors`` (for resuming),
``model.safetensors`` (best weights), ``metrics.jsonl``, ``curves.png``, ``results.json`` and
``report.md``. An existing run folder is never overwritten: pass ``resume=True`` to continue it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqebm.config import dump_config, save_config
from seqebm.models import ARCHITECTURES, build_model
from seqebm.objectives import EForcingLoss, ScheduledSamplingLoss, TeacherForcingLoss
from seqebm.io import atomic_write_text
from seqebm.training.checkpoint import load_model
from seqebm.training.config import OptimConfig, TrainerConfig
from seqebm.training.distributed import barrier, init_distributed, resolve_device
from seqebm.training.trainer import BEST_MODEL, CHECKPOINT, METRICS, Trainer

OBJECTIVES = ("teacher_forcing", "scheduled_sampling", "eforcing", "cnce")


@dataclass
class SyntheticConfig:
    """Sizes of the synthetic corpora (``data.corpus`` = ``oracle`` or ``synthetic-translation``)."""

    n_words: int = 1000
    length: int = 20  # oracle: sequence length (max length if variable_length)
    variable_length: bool = False
    arch: str = "lstm"  # the oracle's network: lstm | transformer
    temperature: float = 1.0
    n_train: int = 10000
    n_valid: int = 1000
    n_test: int = 1000
    oracle_samples: int = 1000  # model samples scored by the oracle (NLL_oracle)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_words", "length", "n_train", "n_valid", "n_test"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.synthetic.{name} must be positive, got {getattr(self, name)}")


@dataclass
class ResidualDataConfig:
    """Windows and negatives of the residual-EBM task (``model.arch=residual``; seed §4.1)."""

    prefix_len: int = 32
    cont_len: int = 16
    num_negatives: int = 16  # LM samples per training/validation prefix (the seed: 16 or 128)
    top_k: int | None = None  # top-k of the LM samples (None: untruncated)
    bound_samples: int = 64  # LM samples per test prefix for the perplexity bounds
    max_eval_rows: int | None = 256  # windows of valid/test (the bounds cost bound_samples each)
    max_train_rows: int | None = None  # cap on training windows (each costs num_negatives LM samples)
    # where the offline negatives live (default: <run_dir>/negatives). Point several runs (UniT, BiT,
    # BiT*) over the same base LM and settings at one folder to draw the negatives once: a folder of
    # other settings is refused by its fingerprint, never mixed in.
    negatives_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("prefix_len", "cont_len", "num_negatives", "bound_samples"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.residual.{name} must be positive, got {getattr(self, name)}")


@dataclass
class DataConfig:
    # wiki-mini | digits | oracle | synthetic-translation | a .txt/.jsonl file or a folder with train/valid/test
    corpus: str = "wiki-mini"
    source_file: str | None = None  # users' parallel data: source side (one sentence per line)
    target_file: str | None = None  # ... and the target side; together they select the translation task
    max_tokens: int = 4096  # token budget per batch for translation (E-Forcing App. A.2)
    tokenizer: str = "bpe"  # bpe | char
    vocab_size: int = 4000
    seq_len: int = 128
    batch_size: int = 32
    eval_batch_size: int = 64
    max_train_docs: int | None = None  # cap the training split (quick runs)
    cache_dir: str | None = None
    seed: int = 0
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    residual: ResidualDataConfig = field(default_factory=ResidualDataConfig)

    def __post_init__(self) -> None:
        if (self.source_file is None) != (self.target_file is None):
            raise ValueError("data.source_file and data.target_file must be given together")
        if self.tokenizer not in ("bpe", "char"):
            raise ValueError(f"data.tokenizer must be 'bpe' or 'char', got {self.tokenizer!r}")
        for name in ("vocab_size", "seq_len", "batch_size", "eval_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")


@dataclass
class ModelConfig:
    arch: str = "transformer"
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None
    dropout: float = 0.1
    max_len: int | None = None  # default: data.seq_len + 1 (LMs), 64 (digits)
    hidden: int | None = None  # RNN hidden width (default d_model)
    channels: int = 64  # PixelCNN width
    tie_embeddings: bool = True
    hf_path: str | None = None
    # start from the best weights of an earlier run folder (its tokenizer / oracle are reused);
    # the architecture settings must match that run's
    init_from: str | None = None
    # residual EBM (arch=residual): the frozen base LM's run folder and the energy network
    base_run: str | None = None
    energy: str = "unit"  # unit | bit | hf (BiT*: model.hf_path or the packaged MiniLM)
    residual_arch: str = "transformer"  # ralm: the architecture of P_φ (sizes from this section)

    def __post_init__(self) -> None:
        archs = (*ARCHITECTURES, "residual", "ralm")
        if self.arch not in archs:
            raise ValueError(f"model.arch must be one of {', '.join(archs)}, got {self.arch!r}")
        if self.arch in ("residual", "ralm") and not self.base_run:
            raise ValueError(f"model.arch={self.arch} needs model.base_run (the run folder of the base LM)")
        if self.energy not in ("unit", "bit", "hf"):
            raise ValueError(f"model.energy must be unit, bit or hf, got {self.energy!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class ObjectiveConfig:
    name: str = "teacher_forcing"  # teacher_forcing | scheduled_sampling | eforcing
    label_smoothing: float = 0.0
    ss_mode: str = "two_pass"  # two_pass | sequential
    ss_schedule: str = "inverse_sigmoid"
    ss_k: float = 2000.0
    ss_min: float = 0.0
    ss_predict: str = "sample"
    # E-Forcing (objective.name=eforcing; seed §4.3, Alg. 1): λ_k = ef_lambda · ef_decay^(k−1)
    ef_lambda: float = 0.1
    ef_decay: float = 0.95
    ef_num_steps: int | None = None  # K; default: 50 for text LMs (App. A), the sequence length otherwise
    ef_start_step: int = 0  # teacher forcing only before this optimiser step (Alg. 1's N)
    ef_start_epoch: float | None = None  # ... or before this epoch (overrides ef_start_step)
    ef_prefix_len: int = 1  # LM negatives continue the first ef_prefix_len tokens of each row
    ef_source_ratio: float | None = 1.5  # translation: negatives of <= ceil(ratio·|src|) + offset tokens
    ef_source_offset: int = 5
    ef_num_negatives: int | None = None  # default: one per data row
    ef_temperature: float = 1.0
    ef_top_k: int | None = None
    ef_max_batch_tokens: int | None = None

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise ValueError(f"objective.name must be one of {', '.join(OBJECTIVES)}, got {self.name!r}")
        if self.ef_start_epoch is not None and self.ef_start_epoch < 0:
            raise ValueError(f"objective.ef_start_epoch must be >= 0, got {self.ef_start_epoch}")


@dataclass
class EvalConfig:
    num_samples: int = 5
    sample_tokens: int = 60
    top_k: int | None = 40
    temperature: float = 1.0
    beam_size: int = 5  # translation: BLEU with greedy decoding and with this beam (1 = greedy only)
    # translation: Top-K energy re-sampling (E-Forcing App. C.1, Tab. 7): bleu_resample{k} for each k,
    # one of k model samples per source kept by its E-Forcing energy (0 = plain decoding: skipped)
    resample_k: list[int] = field(default_factory=list)
    resample_mode: str = "rerank"  # rerank (lowest energy) | sample (importance resampling)

    def __post_init__(self) -> None:
        if any(isinstance(k, bool) or not isinstance(k, int) or k < 0 for k in self.resample_k):
            raise ValueError(f"eval.resample_k must be a list of ints >= 0, got {self.resample_k!r}")
        if self.resample_mode not in ("sample", "rerank"):
            raise ValueError(f"eval.resample_mode must be 'sample' or 'rerank', got {self.resample_mode!r}")


@dataclass
class ExperimentConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    name: str = "experiment"


def build_task(cfg: ExperimentConfig, run_dir: Path | None = None):
    """The task named by ``cfg.data`` (a tokenizer is saved under ``run_dir/tokenizer``)."""
    from seqebm.training.tasks import DigitsTask, TextLMTask

    d = cfg.data
    tok_dir = None if run_dir is None else run_dir / "tokenizer"
    if cfg.model.arch == "residual":
        return _residual_task(cfg, run_dir)
    if cfg.model.arch == "ralm" and tok_dir is not None and not tok_dir.exists():
        import shutil

        shutil.copytree(Path(cfg.model.base_run) / "tokenizer", tok_dir)  # RALM shares the base LM's vocabulary
    if d.corpus == "digits":
        from seqebm.data.digits import load_digits_dataset

        return DigitsTask(load_digits_dataset(d.cache_dir, seed=d.seed), batch_size=d.batch_size,
                          seed=cfg.train.seed, eval_batch_size=d.eval_batch_size)
    if d.corpus == "oracle":
        return _oracle_task(cfg, run_dir)
    if d.corpus == "synthetic-translation" or d.source_file is not None:
        return _translation_task(cfg, tok_dir)
    from seqebm.data.corpora import load_corpus

    corpus = load_corpus(d.corpus, cache_dir=d.cache_dir, seed=d.seed)
    if d.max_train_docs is not None:
        corpus.train = corpus.train[: d.max_train_docs]
    return TextLMTask.build(corpus, tokenizer_kind=d.tokenizer, vocab_size=d.vocab_size, tokenizer_dir=tok_dir,
                            seq_len=d.seq_len, batch_size=d.batch_size, seed=cfg.train.seed,
                            eval_batch_size=d.eval_batch_size)


def load_base_lm(base_run: str | Path) -> tuple[nn.Module, Any]:
    """The frozen (eval, dropout 0) best LM of a finished text-LM run folder, and its tokenizer."""
    from seqebm.config import load_config
    from seqebm.data.tokenizers import load_tokenizer

    base = Path(base_run)
    if not (base / "config.yaml").is_file() or not (base / BEST_MODEL).is_file():
        raise FileNotFoundError(f"model.base_run: {base} is not a finished run folder (config.yaml, {BEST_MODEL})")
    base_cfg = load_config(ExperimentConfig, base / "config.yaml")
    if base_cfg.model.arch in ("seq2seq", "pixelcnn", "gated_pixelcnn", "residual", "ralm"):
        raise ValueError(f"the base LM must be a plain text LM, got model.arch={base_cfg.model.arch!r}")
    tok = load_tokenizer(base / "tokenizer")
    lm = build_model(base_cfg.model.arch, tok.vocab_size, d_model=base_cfg.model.d_model,
                     n_layers=base_cfg.model.n_layers, n_heads=base_cfg.model.n_heads, d_ff=base_cfg.model.d_ff,
                     dropout=0.0, max_len=base_cfg.model.max_len or base_cfg.data.seq_len + 1,
                     hidden=base_cfg.model.hidden, tie_embeddings=base_cfg.model.tie_embeddings,
                     hf_path=base_cfg.model.hf_path)
    load_model(lm, base / BEST_MODEL)
    return lm.eval(), tok


def _residual_task(cfg: ExperimentConfig, run_dir: Path | None):
    from seqebm.data.corpora import load_corpus
    from seqebm.training.tasks_residual import ResidualTask

    lm, tok = load_base_lm(cfg.model.base_run)
    r, d = cfg.data.residual, cfg.data
    corpus = load_corpus(d.corpus, cache_dir=d.cache_dir, seed=d.seed)
    rows = {"train": r.max_train_rows, "valid": r.max_eval_rows, "test": r.max_eval_rows}
    if d.max_train_docs is not None:
        corpus.train = corpus.train[: d.max_train_docs]
    return ResidualTask(corpus, tok, lm, run_dir=run_dir, prefix_len=r.prefix_len, cont_len=r.cont_len,
                        num_negatives=r.num_negatives, top_k=r.top_k, batch_size=d.batch_size, seed=cfg.train.seed,
                        bound_samples=r.bound_samples, max_rows=rows, eval_batch_size=d.eval_batch_size,
                        progress=cfg.train.progress, negatives_dir=r.negatives_dir)


def _oracle_task(cfg: ExperimentConfig, run_dir: Path | None):
    from seqebm.data.synthetic_oracle import OracleLM
    from seqebm.training.tasks_synthetic import OracleLMTask

    s = cfg.data.synthetic
    oracle_dir = None if run_dir is None else run_dir / "oracle"
    if oracle_dir is not None and oracle_dir.exists():
        oracle = OracleLM.load(oracle_dir)
    else:
        oracle = OracleLM(n_words=s.n_words, length=s.length, variable_length=s.variable_length, arch=s.arch,
                          temperature=s.temperature, seed=s.seed)
        if oracle_dir is not None:
            oracle.save(oracle_dir)
    splits = oracle.make_splits(s.n_train, s.n_valid, s.n_test, seed=s.seed)
    return OracleLMTask(oracle, splits, batch_size=cfg.data.batch_size, seed=cfg.train.seed,
                        eval_batch_size=cfg.data.eval_batch_size, oracle_samples=s.oracle_samples)


def _translation_task(cfg: ExperimentConfig, tok_dir: Path | None):
    from seqebm.data.tokenizers import build_tokenizer, load_tokenizer
    from seqebm.training.tasks_synthetic import TranslationTask

    d, s = cfg.data, cfg.data.synthetic
    if d.source_file is not None:
        from seqebm.data.corpora import load_parallel_corpus

        corpus = load_parallel_corpus(d.source_file, d.target_file, seed=d.seed)
        pairs = {"train": corpus.train, "valid": corpus.valid, "test": corpus.test}
    else:
        from seqebm.data.synthetic_translation import SyntheticTranslation

        pairs = SyntheticTranslation(n_words=s.n_words, seed=s.seed).generate(s.n_train, s.n_valid, s.n_test)
    if d.max_train_docs is not None:
        pairs["train"] = pairs["train"][: d.max_train_docs]
    if tok_dir is not None and tok_dir.exists():
        tok = load_tokenizer(tok_dir)
    else:
        tok = build_tokenizer(d.tokenizer, [x for p in pairs["train"] for x in p], vocab_size=d.vocab_size)
        if tok_dir is not None:
            tok.save(tok_dir)
    if cfg.model.arch != "seq2seq":
        raise ValueError(f"translation needs model.arch=seq2seq, got {cfg.model.arch!r}")
    return TranslationTask(pairs, tok, max_tokens=d.max_tokens, seed=cfg.train.seed,
                           max_len=cfg.model.max_len or 256, beam_size=cfg.eval.beam_size,
                           resample_k=cfg.eval.resample_k, resample_mode=cfg.eval.resample_mode)


def build_model_for(cfg: ExperimentConfig, task: Any) -> nn.Module:
    m = cfg.model
    if m.arch == "residual":
        return _residual_model(cfg, task)
    if m.arch == "ralm":
        from seqebm.models.ralm import ResidualAutoregressiveLM

        base, _ = load_base_lm(m.base_run)
        res = build_model(m.residual_arch, task.vocab_size, d_model=m.d_model, n_layers=m.n_layers,
                          n_heads=m.n_heads, d_ff=m.d_ff, dropout=m.dropout,
                          max_len=m.max_len or cfg.data.seq_len + 1, hidden=m.hidden, tie_embeddings=m.tie_embeddings)
        return ResidualAutoregressiveLM(base, res)
    default_len = {"digits": 64, "translation": 256}.get(task.kind, cfg.data.seq_len + 1)
    if task.kind == "oracle":
        default_len = task.oracle.config.length + 1
    max_len = m.max_len or default_len
    if task.kind == "digits" and m.arch not in ("pixelcnn", "gated_pixelcnn"):
        raise ValueError(f"the digits task needs model.arch pixelcnn or gated_pixelcnn, got {m.arch!r}")
    if task.kind != "translation" and m.arch == "seq2seq":
        raise ValueError(f"model.arch=seq2seq needs a translation corpus, not {cfg.data.corpus!r}")
    if task.kind != "digits" and m.arch in ("pixelcnn", "gated_pixelcnn"):
        raise ValueError(f"model.arch={m.arch} only fits the digits corpus, not {cfg.data.corpus!r}")
    model = build_model(m.arch, task.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                        d_ff=m.d_ff, dropout=m.dropout, max_len=max_len, hidden=m.hidden, channels=m.channels,
                        tie_embeddings=m.tie_embeddings, hf_path=m.hf_path)
    if model.vocab_size != task.vocab_size:
        raise ValueError(f"model vocabulary ({model.vocab_size}) != tokenizer vocabulary ({task.vocab_size})")
    return model


def _residual_model(cfg: ExperimentConfig, task: Any) -> nn.Module:
    from seqebm.models.energy import BiTEnergy, HFEncoderEnergy, UniTEnergy
    from seqebm.models.residual import ResidualEBM

    if task.kind != "residual":
        raise ValueError("model.arch=residual needs the residual task")
    m = cfg.model
    if m.energy == "unit":
        energy = UniTEnergy(task.lm)
    elif m.energy == "bit":
        energy = BiTEnergy(task.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
                           d_ff=m.d_ff or 4 * m.d_model, max_len=1 + task.prefix_len + task.cont_len,
                           dropout=m.dropout)
    else:
        energy = HFEncoderEnergy(m.hf_path, source_tokenizer=task.tokenizer)
    return ResidualEBM(task.lm, energy)


def build_objective(cfg: ObjectiveConfig, task: Any = None) -> nn.Module:
    if cfg.name == "teacher_forcing":
        return TeacherForcingLoss(label_smoothing=cfg.label_smoothing)
    if cfg.name == "eforcing":
        return _eforcing_objective(cfg, task)
    if cfg.name == "cnce":
        from seqebm.objectives.conditional_nce import ConditionalNCELoss

        return ConditionalNCELoss()
    return ScheduledSamplingLoss(mode=cfg.ss_mode, schedule=cfg.ss_schedule, k=cfg.ss_k, minimum=cfg.ss_min,
                                 predict=cfg.ss_predict)


def _eforcing_objective(cfg: ObjectiveConfig, task: Any) -> EForcingLoss:
    from seqebm.data.tokenizers import EOS_ID

    kind = getattr(task, "kind", "lm")
    num_steps = cfg.ef_num_steps
    if num_steps is None:
        num_steps = {"digits": 64, "translation": 256}.get(kind, 50)
        if kind == "oracle":  # variable-length oracle data end with EOS: one more step
            num_steps = task.oracle.config.length + int(task.oracle.config.variable_length)
    start = cfg.ef_start_step
    if cfg.ef_start_epoch is not None:
        if task is None:
            raise ValueError("objective.ef_start_epoch needs the task (its batches per epoch)")
        start = int(round(cfg.ef_start_epoch * task.train_source.num_batches()))
    conditional = kind == "translation"
    stops_at_eos = conditional or (kind == "oracle" and task.oracle.config.variable_length)
    return EForcingLoss(lambda_base=cfg.ef_lambda, lambda_decay=cfg.ef_decay, num_steps=num_steps,
                        source_length_ratio=cfg.ef_source_ratio if conditional else None,
                        source_length_offset=cfg.ef_source_offset, start_step=start, prefix_len=cfg.ef_prefix_len,
                        num_negatives=cfg.ef_num_negatives, eos_id=EOS_ID if stops_at_eos else None,
                        temperature=cfg.ef_temperature, top_k=cfg.ef_top_k, label_smoothing=cfg.label_smoothing,
                        max_batch_tokens=cfg.ef_max_batch_tokens)


def _adopt_init_run(cfg: ExperimentConfig, run_dir: Path) -> Path | None:
    """For ``model.init_from``: copy the earlier run's tokenizer / oracle into ``run_dir``; return its weights."""
    import shutil

    if cfg.model.init_from is None:
        return None
    src = Path(cfg.model.init_from)
    weights = src / BEST_MODEL if src.is_dir() else src
    if not weights.is_file():
        raise FileNotFoundError(f"model.init_from: no weights at {weights}")
    if src.is_dir():
        for sub in ("tokenizer", "oracle"):
            if (src / sub).is_dir() and not (run_dir / sub).exists():
                shutil.copytree(src / sub, run_dir / sub)
    return weights


# settings a branched run must share with the run it starts from: everything that shaped the
# weights, optimiser state and data order up to the branch point (the objective, the step budget,
# evaluation and logging may differ)
BRANCH_FIXED = ("data", "model", "optim", "train.seed", "train.grad_accum")


def warn_schedule_change(optim: OptimConfig, old_steps: int, new_steps: int) -> None:
    """Warn when a new step budget reshapes a cosine schedule (its learning rate depends on it)."""
    if optim.schedule == "cosine" and old_steps != new_steps:
        import warnings

        warnings.warn(f"optim.schedule=cosine spans train.max_steps: changing it from {old_steps} to {new_steps} "
                      "changes the learning rate from here on (the steps already taken followed the old curve)",
                      stacklevel=2)


def branch_run(cfg: ExperimentConfig, source: str | Path, run_dir: str | Path) -> int:
    """Start ``run_dir`` as a copy of ``source`` (a run folder or one of its ``snapshots/step-N``) and
    write ``cfg`` as its config; :func:`run_experiment` with ``resume=True`` then continues it.

    Training up to the branch step is identical by construction (same weights, optimiser, RNG and
    data position), so e.g. an E-Forcing run whose CD term starts at step N can reuse a teacher-
    forcing run's state at step N instead of repeating its first N steps. Returns that step.

    Raises:
        FileNotFoundError: ``source`` has no checkpoint or config.
        FileExistsError: ``run_dir`` exists and is not empty.
        ValueError: ``cfg`` differs from the source's config in a :data:`BRANCH_FIXED` setting, or
            ``cfg.train.max_steps`` does not go past the branch step.
    """
    from seqebm.config import load_config, to_dict
    from seqebm.training.checkpoint import read_trainer_state
    from seqebm.training.trainer import RUN_OUTPUTS, SNAPSHOTS, copy_run_folder

    source, run_dir = Path(source), Path(run_dir)
    for name in (CHECKPOINT, "config.yaml"):
        if not (source / name).is_file():
            raise FileNotFoundError(f"cannot branch from {source}: no {name} there")
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run folder already exists: {run_dir} (choose another --run-dir); nothing was overwritten")
    src_cfg = to_dict(load_config(ExperimentConfig, source / "config.yaml"))
    new_cfg = to_dict(cfg)
    differ = []
    for key in BRANCH_FIXED:
        a, b = src_cfg, new_cfg
        for part in key.split("."):
            a, b = a[part], b[part]
        if a != b:
            differ.append(key if not isinstance(a, dict) else
                          ", ".join(f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)))
    if differ:
        raise ValueError(f"cannot branch from {source}: the new config differs in {'; '.join(differ)} "
                         "(only the objective, step budget, evaluation and logging may change)")
    step = int(read_trainer_state(source / CHECKPOINT)["step"])
    if cfg.train.max_steps <= step:
        raise ValueError(f"train.max_steps={cfg.train.max_steps} does not go past the branch step {step}")
    warn_schedule_change(cfg.optim, src_cfg["train"]["max_steps"], cfg.train.max_steps)
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    copy_run_folder(source, run_dir, skip=(SNAPSHOTS, *RUN_OUTPUTS, "branch.json"), extra_files={
        "config.yaml": dump_config(cfg),
        "branch.json": json.dumps({"source": str(source.resolve()), "step": step}, indent=2)})
    return step


def prepare_run_dir(run_dir: Path, resume: bool) -> None:
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise FileNotFoundError(f"cannot resume: no checkpoint in {run_dir}")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run folder already exists: {run_dir} (use --resume to continue it, "
                              "or choose another --run-dir); nothing was overwritten")
    run_dir.mkdir(parents=True, exist_ok=True)


def run_experiment(cfg: ExperimentConfig, run_dir: str | Path, *, resume: bool = False,
                   branch_from: str | Path | None = None, log=print) -> dict[str, Any]:
    """Train, evaluate on valid/test with the best weights, sample, and write the report.

    ``resume=True`` continues ``run_dir`` from its checkpoint (``cfg`` is written as its config, so a
    resumed run may be given e.g. a larger ``train.max_steps``); ``branch_from`` starts ``run_dir`` from
    another run's state (see :func:`branch_run`).
    """
    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    dist_info = init_distributed(device)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device(f"cuda:{dist_info.local_rank}")
    if branch_from is not None:
        if resume:
            raise ValueError("branch_from and resume exclude each other")
        if dist_info.is_main:
            step = branch_run(cfg, branch_from, run_dir)
            log(f"[seqebm] branched from {branch_from} at step {step}")
        barrier(dist_info)
        resume = True
    if dist_info.is_main:
        prepare_run_dir(run_dir, resume)
        save_config(cfg, run_dir / "config.yaml")
    t0 = time.perf_counter()
    if dist_info.is_main and not resume:
        _adopt_init_run(cfg, run_dir)
    # rank 0 trains and saves the tokenizer (or oracle) first; the other ranks then load it
    task = build_task(cfg, run_dir) if dist_info.is_main else None
    barrier(dist_info)
    if task is None:
        task = build_task(cfg, run_dir)
    torch.manual_seed(cfg.train.seed)
    model = build_model_for(cfg, task)
    if cfg.model.init_from is not None and not resume:
        weights = Path(cfg.model.init_from)
        load_model(model, weights / BEST_MODEL if weights.is_dir() else weights)
        log(f"[seqebm] initialised from {weights}")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[seqebm] {cfg.name}: task={task.kind} vocab={task.vocab_size} arch={cfg.model.arch} "
        f"params={n_params / 1e6:.2f}M train_batches/epoch={task.train_source.num_batches()} device={device}")

    def evaluate(m: nn.Module) -> dict[str, float]:
        return task.evaluate(m, "valid", device)

    trainer = Trainer(model, build_objective(cfg.objective, task), task.train_source, optim=cfg.optim, train=cfg.train,
                      run_dir=run_dir, evaluate=evaluate, device=device, dist_info=dist_info)
    state = trainer.fit(resume=resume)
    if (run_dir / BEST_MODEL).exists():
        load_model(model, run_dir / BEST_MODEL)
    results: dict[str, Any] = {"name": cfg.name, "task": task.kind, "params": n_params, "steps": state["step"],
                               "tokens_seen": state["tokens_seen"], "train_time_s": state["elapsed_s"]}
    for split in ("valid", "test"):
        results[split] = task.evaluate(model, split, device)
    e = cfg.eval
    results["samples"] = task.samples(model, e.num_samples, e.sample_tokens, device=device, top_k=e.top_k,
                                      temperature=e.temperature, seed=cfg.train.seed) if e.num_samples else []
    results["wall_time_s"] = time.perf_counter() - t0
    if dist_info.is_main:
        from seqebm.eval.plots import plot_curves
        from seqebm.eval.report import write_report

        plot_curves(run_dir / METRICS, run_dir / "curves.png", keys=("loss", "ppl"))
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
        write_report(run_dir, cfg, results)
    return results
