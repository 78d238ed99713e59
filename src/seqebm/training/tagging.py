"""Sequence-labelling experiments: config tree -> corpus, vocabularies, tagger, loss -> a run folder.

``seqebm tag train --config configs/pos-crf.yaml --run-dir runs/pos-crf`` trains one labeller with the
shared :class:`seqebm.training.trainer.Trainer` (checkpoints, exact resume, early stopping on the
validation error rate) and writes ``config.yaml``, ``vocab.json``, ``model.safetensors``,
``metrics.jsonl``, ``curves.png``, ``confusion.png``, ``results.json`` and ``report.md``.
``seqebm tag compare --configs ... --seeds 0 1 2 --out DIR`` trains every config with every seed
(skipping finished runs, resuming interrupted ones) and writes ``comparison.md``/``.json`` with
mean ± std of the test metrics (:func:`compare_taggers`).

Corpora (``data.corpus``): ``pos`` (OANC train/valid, gold WSJ test; :func:`seqebm.data.tagging.load_pos_corpus`),
``truecase`` (wiki-mini), or users' CoNLL files given by ``data.train_file``/``valid_file``/``test_file``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqebm.config import load_config, save_config
from seqebm.data.tag_batching import TagBatchSource, TagEncoder
from seqebm.data.tagged import TaggedCorpus
from seqebm.eval.tagging_metrics import confusion_matrix, is_bio_tagset, plot_confusion, summarize_errors, tagging_metrics
from seqebm.io import atomic_write_text
from seqebm.models.taggers import TAGGER_KINDS, HFWordEncoder, WordCharEncoder, build_tagger
from seqebm.objectives.base import unwrap
from seqebm.objectives.tagging import CRFTransducerLoss, build_tagging_objective
from seqebm.training.checkpoint import load_model
from seqebm.training.config import OptimConfig, TrainerConfig
from seqebm.training.distributed import init_distributed, resolve_device
from seqebm.training.trainer import BEST_MODEL, METRICS, Trainer

__all__ = ["TaggingConfig", "TaggingTask", "run_tagging", "compare_taggers", "load_tagging_corpus"]


@dataclass
class TagDataConfig:
    corpus: str = "pos"  # pos | truecase | conll (then train_file/valid_file/test_file)
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    tag_col: int = -1  # CoNLL: column of the tag (token in column 0)
    cache_dir: str | None = None
    pos_dir: str | None = None  # a folder holding tagged-en-oanc.txt and tagged-en-wsj.txt (no download)
    max_train_sentences: int | None = None
    max_eval_sentences: int | None = None  # per valid/test split
    min_count: int = 1  # words seen fewer times in training map to <unk>
    max_words: int | None = None
    lowercase_words: bool = False
    max_word_chars: int = 20
    batch_size: int = 32
    eval_batch_size: int = 128
    seed: int = 0  # the corpus's train/valid split

    def __post_init__(self) -> None:
        if self.corpus not in ("pos", "truecase", "conll"):
            raise ValueError(f"data.corpus must be pos, truecase or conll, got {self.corpus!r}")
        if self.corpus == "conll" and (self.train_file is None or self.test_file is None):
            raise ValueError("data.corpus=conll needs data.train_file and data.test_file (valid_file optional)")
        for name in ("batch_size", "eval_batch_size", "min_count", "max_word_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}")


@dataclass
class TaggerModelConfig:
    kind: str = "crf"  # softmax | crf | rnnt | crf_transducer
    encoder: str = "bilstm"  # bilstm (word + char CNN + BiLSTM) | hf (pretrained encoder, first sub-word)
    hf_path: str | None = None  # default: the packaged all-MiniLM-L6-v2
    hf_freeze: bool = False
    word_dim: int = 100
    char_dim: int = 30
    char_channels: int = 50  # 0 disables the character CNN
    char_kernel: int = 3
    hidden: int = 128  # BiLSTM width per direction
    num_layers: int = 1
    dropout: float = 0.5
    label_dim: int = 32  # transducers: label embedding and label-LSTM widths (network G)
    label_hidden: int = 64
    potentials: str = "log_softmax"  # CRF transducer: raw (Eq. 4.30) | log_softmax (Eq. 4.31)
    bio_constraints: bool = True  # forbid O -> I-X and friends when the tag set is BIO

    def __post_init__(self) -> None:
        if self.kind not in TAGGER_KINDS:
            raise ValueError(f"model.kind must be one of {', '.join(TAGGER_KINDS)}, got {self.kind!r}")
        if self.encoder not in ("bilstm", "hf"):
            raise ValueError(f"model.encoder must be bilstm or hf, got {self.encoder!r}")
        if self.potentials not in ("raw", "log_softmax"):
            raise ValueError(f"model.potentials must be raw or log_softmax, got {self.potentials!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.dropout must be in [0, 1), got {self.dropout}")


@dataclass
class TagObjectiveConfig:
    method: str = "early_update"  # CRF transducer: early_update | monte_carlo | exact
    beam_size: int = 8  # early-update beam
    num_samples: int = 16  # Monte Carlo samples per sentence
    local_steps: int = 0  # CRF transducer: first steps trained with the locally normalised loss
    label_smoothing: float = 0.0  # softmax / RNN-T labellers

    def __post_init__(self) -> None:
        if self.method not in CRFTransducerLoss.METHODS:
            raise ValueError(f"objective.method must be one of {CRFTransducerLoss.METHODS}, got {self.method!r}")
        if self.beam_size < 1 or self.num_samples < 1 or self.local_steps < 0:
            raise ValueError("objective.beam_size and objective.num_samples must be >= 1, objective.local_steps >= 0")


@dataclass
class TagEvalConfig:
    beam_size: int = 8  # decoding beam of the RNN-T labeller and the CRF transducer (1 = greedy)

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"eval.beam_size must be >= 1, got {self.beam_size}")


@dataclass
class TaggingConfig:
    data: TagDataConfig = field(default_factory=TagDataConfig)
    model: TaggerModelConfig = field(default_factory=TaggerModelConfig)
    objective: TagObjectiveConfig = field(default_factory=TagObjectiveConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=2e-3, warmup_steps=100, weight_decay=0.0))
    train: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=2000, eval_every=250))
    eval: TagEvalConfig = field(default_factory=TagEvalConfig)
    name: str = "tagging"


def load_tagging_corpus(d: TagDataConfig, *, progress: bool = True) -> TaggedCorpus:
    """The corpus named by ``d`` with the sentence caps applied."""
    if d.corpus == "pos":
        from seqebm.data.pos import load_pos_corpus

        corpus = load_pos_corpus(d.cache_dir, pos_dir=d.pos_dir, seed=d.seed, progress=progress)
    elif d.corpus == "truecase":
        from seqebm.data.truecasing import truecasing_corpus

        corpus = truecasing_corpus(d.cache_dir, seed=d.seed)
    else:
        from seqebm.data.conll import load_conll

        train = load_conll(d.train_file, tag_col=d.tag_col)
        test = load_conll(d.test_file, tag_col=d.tag_col)
        if d.valid_file is not None:
            valid = load_conll(d.valid_file, tag_col=d.tag_col)
        else:  # hold out 5% of training (every 20th sentence)
            valid, train = train[::20], [s for i, s in enumerate(train) if i % 20]
        corpus = TaggedCorpus("conll", train, valid, test, meta={"files": [d.train_file, d.valid_file, d.test_file]})
    if d.max_train_sentences is not None:
        corpus.train = corpus.train[: d.max_train_sentences]
    if d.max_eval_sentences is not None:
        corpus.valid, corpus.test = corpus.valid[: d.max_eval_sentences], corpus.test[: d.max_eval_sentences]
    for split in ("train", "valid", "test"):
        if not corpus.split(split):
            raise ValueError(f"the {split} split of the {d.corpus} corpus is empty")
    return corpus


class TaggingTask:
    """Training batches and evaluation (accuracy; span F1 for BIO tag sets) of one tagged corpus."""

    kind = "tagging"

    def __init__(self, corpus: TaggedCorpus, encoder: TagEncoder, *, batch_size: int, seed: int,
                 eval_batch_size: int = 128, beam_size: int = 8) -> None:
        self.corpus, self.encoder = corpus, encoder
        self.eval_batch_size, self.beam_size = eval_batch_size, beam_size
        self.bio = is_bio_tagset(encoder.tags.tags)
        self.train_source = TagBatchSource(corpus.train, encoder, batch_size, seed=seed)
        self._eval = {s: [encoder.encode(corpus.split(s)[i:i + eval_batch_size])
                          for i in range(0, len(corpus.split(s)), eval_batch_size)] for s in ("valid", "test")}

    @property
    def num_tags(self) -> int:
        return self.encoder.num_tags

    @torch.no_grad()
    def predict(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> tuple[list, list]:
        """Gold and predicted tag names per sentence of ``split``."""
        net = unwrap(model)
        was_training = net.training
        net.eval()
        gold, pred = [], []
        for batch in self._eval[split]:
            b = batch.to(device)
            out = net.decode(b, beam_size=self.beam_size).cpu()
            gold += self.encoder.decode_tags(batch.tags, batch.mask)
            pred += self.encoder.decode_tags(out.clamp_min(0), batch.mask)
        net.train(was_training)
        return gold, pred

    def evaluate(self, model: nn.Module, split: str, device: torch.device | str = "cpu") -> dict[str, float]:
        """Metrics of ``split``; ``loss`` is the token error rate (1 - accuracy), the model-selection key."""
        gold, pred = self.predict(model, split, device)
        m = tagging_metrics(gold, pred, bio=self.bio)
        return {"loss": 1.0 - m["accuracy"], **m}


def _build_model(cfg: TaggingConfig, encoder_vocab: TagEncoder | None, hf: HFWordEncoder | None) -> nn.Module:
    m = cfg.model
    if hf is not None:
        enc: nn.Module = hf
    else:
        enc = WordCharEncoder(len(encoder_vocab.words), len(encoder_vocab.chars), word_dim=m.word_dim,
                              char_dim=m.char_dim, char_channels=m.char_channels, char_kernel=m.char_kernel,
                              hidden=m.hidden, num_layers=m.num_layers, dropout=m.dropout)
    tags = encoder_vocab.tags.tags
    constraints: dict[str, Any] = {}
    if m.bio_constraints and is_bio_tagset(tags):
        from seqebm.structured.crf import bio_constraints

        constraints = bio_constraints(tags)
    return build_tagger(m.kind, len(tags), encoder=enc, label_dim=m.label_dim, label_hidden=m.label_hidden,
                        potentials=m.potentials, dropout=min(m.dropout, 0.3), **constraints)


def build_tagging_run(cfg: TaggingConfig, run_dir: Path | None, *, progress: bool = True,
                      corpus: TaggedCorpus | None = None):
    """Corpus, vocabularies (saved to / loaded from ``run_dir/vocab.json``), task and model."""
    if corpus is None:
        corpus = load_tagging_corpus(cfg.data, progress=progress)
    hf = None
    if cfg.model.encoder == "hf":
        hf = HFWordEncoder(cfg.model.hf_path, freeze=cfg.model.hf_freeze, dropout=min(cfg.model.dropout, 0.1))
    vocab_path = None if run_dir is None else run_dir / "vocab.json"
    d = cfg.data
    if vocab_path is not None and vocab_path.is_file():
        vocab = TagEncoder.load(vocab_path, hf_tokenizer=None if hf is None else hf.tokenizer)
    else:
        vocab = TagEncoder.build(corpus.train, min_count=d.min_count, max_words=d.max_words,
                                 lowercase=d.lowercase_words, max_word_chars=d.max_word_chars,
                                 hf_tokenizer=None if hf is None else hf.tokenizer)
        if vocab_path is not None:
            vocab.save(vocab_path)
    task = TaggingTask(corpus, vocab, batch_size=d.batch_size, seed=cfg.train.seed,
                       eval_batch_size=d.eval_batch_size, beam_size=cfg.eval.beam_size)
    torch.manual_seed(cfg.train.seed)
    return task, _build_model(cfg, vocab, hf)


def run_tagging(cfg: TaggingConfig, run_dir: str | Path, *, resume: bool = False, log=print) -> dict[str, Any]:
    """Train one labeller, evaluate its best weights on valid and test, write the report."""
    from seqebm.training.experiment import prepare_run_dir

    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    dist_info = init_distributed(device)
    if dist_info.enabled:
        raise ValueError("seqebm tag train runs on one process (the taggers are small); launch it without torchrun")
    t0 = time.perf_counter()
    corpus = load_tagging_corpus(cfg.data, progress=cfg.train.progress)  # bad data fails before the folder exists
    prepare_run_dir(run_dir, resume)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    task, model = build_tagging_run(cfg, run_dir, corpus=corpus)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[seqebm] {cfg.name}: {cfg.data.corpus} tagging, {task.num_tags} tags, model={cfg.model.kind} "
        f"({cfg.model.encoder}) params={n_params / 1e6:.2f}M train_batches/epoch={task.train_source.num_batches()}")
    o = cfg.objective
    objective = build_tagging_objective(cfg.model.kind, method=o.method, beam_size=o.beam_size,
                                        num_samples=o.num_samples, label_smoothing=o.label_smoothing,
                                        local_steps=o.local_steps)
    trainer = Trainer(model, objective, task.train_source, optim=cfg.optim, train=cfg.train, run_dir=run_dir,
                      evaluate=lambda m: task.evaluate(m, "valid", device), device=device, dist_info=dist_info)
    state = trainer.fit(resume=resume)
    if (run_dir / BEST_MODEL).exists():
        load_model(model, run_dir / BEST_MODEL)
    results: dict[str, Any] = {"name": cfg.name, "task": "tagging", "corpus": cfg.data.corpus, "kind": cfg.model.kind,
                               "params": n_params, "steps": state["step"], "tokens_seen": state["tokens_seen"],
                               "train_time_s": state["elapsed_s"]}
    results["valid"] = task.evaluate(model, "valid", device)
    gold, pred = task.predict(model, "test", device)
    results["test"] = {"loss": None, **tagging_metrics(gold, pred, bio=task.bio)}
    results["test"]["loss"] = 1.0 - results["test"]["accuracy"]
    tags = task.encoder.tags.tags
    cm = confusion_matrix(gold, pred, tags)
    results["top_confusions"] = summarize_errors(cm, tags)
    results["wall_time_s"] = time.perf_counter() - t0
    from seqebm.eval.plots import plot_curves
    from seqebm.eval.report import write_report

    plot_curves(run_dir / METRICS, run_dir / "curves.png", keys=("loss",))
    plot_confusion(cm, tags, run_dir / "confusion.png", title=f"{cfg.name}: test confusion (row-normalised)")
    results["samples"] = [" ".join(f"{w}/{p}" for w, p in zip(words, tg))
                          for (words, _), tg in zip(task.corpus.test[:3], pred[:3])]
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    write_report(run_dir, cfg, {k: v for k, v in results.items() if k != "top_confusions"})
    with open(run_dir / "report.md", "a") as fh:
        fh.write("\n## Test confusion\n\n![confusion](confusion.png)\n\nLargest confusions (gold -> predicted): "
                 + ", ".join(f"{c['gold']}->{c['pred']} ({c['count']})" for c in results["top_confusions"]) + "\n")
    return results


def compare_taggers(configs: list[str | Path], seeds: list[int], out_dir: str | Path, *,
                    overrides: list[str] | None = None, log=print) -> dict[str, Any]:
    """Train each config with each seed under ``out_dir/<config stem>-s<seed>`` and tabulate the test metrics.

    Finished runs (``results.json`` present) are reused and interrupted ones resumed, so the command
    can be re-run after a stop. Writes ``comparison.md`` and ``comparison.json`` in ``out_dir``.
    """
    from seqebm.eval.run_tables import format_mean_std, markdown_table, mean_std

    if not configs or not seeds:
        raise ValueError("compare needs at least one config and one seed")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[dict[str, Any]]] = {}
    for path in configs:
        stem = Path(path).stem
        for seed in seeds:
            run = out / f"{stem}-s{seed}"
            if (run / "results.json").is_file():
                res = json.loads((run / "results.json").read_text())
                log(f"[seqebm] {run}: finished earlier, reusing its results")
            else:
                cfg = load_config(TaggingConfig, path, list(overrides or []) + [f"train.seed={seed}"])
                resume = (run / "checkpoint.safetensors").is_file()
                res = run_tagging(cfg, run, resume=resume, log=log)
            rows.setdefault(stem, []).append(res)
    metrics = ["accuracy", "sentence_accuracy"] + (["span_f1"] if "span_f1" in next(iter(rows.values()))[0]["test"]
                                                   else [])
    table, summary = [], {}
    for stem, results in rows.items():
        stats = {m: mean_std([100 * r["test"][m] for r in results]) for m in metrics}
        stats["valid_accuracy"] = mean_std([100 * r["valid"]["accuracy"] for r in results])
        stats["train_time_s"] = mean_std([r["train_time_s"] for r in results])
        summary[stem] = {k: {"mean": v.mean, "std": v.std, "values": v.values} for k, v in stats.items()}
        table.append([stem, results[0]["kind"], *(format_mean_std(stats[m], 2) for m in metrics),
                      format_mean_std(stats["valid_accuracy"], 2), format_mean_std(stats["train_time_s"], 0)])
    header = ["config", "labeller", *(f"test {m} (%)" for m in metrics), "valid accuracy (%)", "train time (s)"]
    text = (f"# Labeller comparison ({len(seeds)} seeds: {', '.join(map(str, seeds))})\n\n"
            "Mean ± sample std over seeds of the best-validation weights; test = "
            f"{rows[next(iter(rows))][0]['corpus']} test split.\n\n" + markdown_table(header, table) + "\n")
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.json", json.dumps({"seeds": seeds, "configs": [str(c) for c in configs],
                                                           "overrides": overrides or [], "summary": summary}, indent=2))
    log(text)
    return summary


def predict_file(run_dir: str | Path, input_path: str | Path, *, beam_size: int | None = None,
                 batch_size: int = 64, device: str = "auto") -> list[str]:
    """Tag every line of ``input_path`` (whitespace-tokenised) with the best weights of a tagging run.

    Returns one ``word/TAG word/TAG ...`` line per input line (empty lines stay empty).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file() or not (run_dir / BEST_MODEL).is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished tagging run (config.yaml, {BEST_MODEL})")
    cfg = load_config(TaggingConfig, run_dir / "config.yaml")
    hf = None
    if cfg.model.encoder == "hf":
        hf = HFWordEncoder(cfg.model.hf_path, freeze=cfg.model.hf_freeze)
    vocab = TagEncoder.load(run_dir / "vocab.json", hf_tokenizer=None if hf is None else hf.tokenizer)
    model = _build_model(cfg, vocab, hf)
    load_model(model, run_dir / BEST_MODEL)
    dev = resolve_device(device)
    model.to(dev).eval()
    lines = Path(input_path).read_text(encoding="utf-8").splitlines()
    sentences = [line.split() for line in lines]
    filler = vocab.tags.tags[0]
    out: list[str] = [""] * len(lines)
    todo = [i for i, s in enumerate(sentences) if s]
    beam = beam_size or cfg.eval.beam_size
    with torch.no_grad():
        for s in range(0, len(todo), batch_size):
            ids = todo[s:s + batch_size]
            batch = vocab.encode([(sentences[i], [filler] * len(sentences[i])) for i in ids]).to(dev)
            tags = vocab.decode_tags(model.decode(batch, beam_size=beam).cpu().clamp_min(0), batch.mask.cpu())
            for i, tg in zip(ids, tags):
                out[i] = " ".join(f"{w}/{t}" for w, t in zip(sentences[i], tg))
    return out
