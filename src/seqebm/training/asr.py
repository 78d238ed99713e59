"""Speech-recognition experiments: CTC, CTC-CRF and RNN-T on speech-mini or users' manifests.

``seqebm asr train --config configs/asr-ctc-crf.yaml --run-dir runs/asr-ctc-crf`` trains one recogniser
with the shared :class:`seqebm.training.trainer.Trainer` (checkpoints, exact resume, model selection
on dev CER) and writes ``config.yaml``, ``model.safetensors``, ``label_lm.json`` (CTC-CRF),
``metrics.jsonl``, ``curves.png``, ``results.json`` (CER/WER on dev, test and test_unseen),
``report.md`` and ``nbest/<split>.jsonl`` (utterance id, reference, hypotheses with acoustic, LM
and total scores) for the rescoring experiments of the energy-based LMs.
``seqebm asr compare`` trains every config x training fraction x seed and tabulates mean ± std.

Decoding: CTC by prefix beam search over its frame posteriors; CTC-CRF by the same search fused
with its own label n-gram at weight 1 (the model's posterior, Eqs. 4.22-4.24); RNN-T by its
frame-synchronous beam search. Validation uses greedy decoding (fast).
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
from seqebm.io import atomic_write_text
from seqebm.training.config import OptimConfig, TrainerConfig

__all__ = ["AsrConfig", "AsrTask", "run_asr", "compare_asr", "transcribe_files"]

KINDS = ("ctc", "ctc_crf", "rnnt")


@dataclass
class AsrDataConfig:
    corpus: str = "speech-mini"  # speech-mini | manifest (then train/dev/test_manifest)
    train_manifest: str | None = None
    dev_manifest: str | None = None
    test_manifest: str | None = None
    test_unseen_manifest: str | None = None  # optional second test set (e.g. unseen speakers)
    cache_dir: str | None = None
    train_fraction: float = 1.0  # data-efficiency runs: the first fraction of a fixed shuffle of train
    max_eval_utterances: int | None = None
    batch_size: int = 16
    n_mels: int = 80
    spec_augment: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.corpus not in ("speech-mini", "manifest"):
            raise ValueError(f"data.corpus must be speech-mini or manifest, got {self.corpus!r}")
        if self.corpus == "manifest" and (self.train_manifest is None or self.test_manifest is None):
            raise ValueError("data.corpus=manifest needs data.train_manifest and data.test_manifest")
        if not 0.0 < self.train_fraction <= 1.0:
            raise ValueError(f"data.train_fraction must be in (0, 1], got {self.train_fraction}")
        if self.batch_size < 1 or self.n_mels < 7:
            raise ValueError("data.batch_size must be >= 1 and data.n_mels >= 7")


@dataclass
class AsrModelConfig:
    kind: str = "ctc"  # ctc | ctc_crf | rnnt
    encoder: str = "blstm"  # blstm | conformer
    d_model: int = 256
    num_layers: int = 3
    n_heads: int = 4
    dropout: float = 0.1
    pred_dim: int = 128  # RNN-T prediction network
    joint_dim: int = 256
    lm_order: int = 2  # CTC-CRF label n-gram order
    conv_channels: int = 32  # channels of the 4x convolutional subsampling (its cost dominates on CPU)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.encoder not in ("blstm", "conformer"):
            raise ValueError(f"model.encoder must be blstm or conformer, got {self.encoder!r}")
        if self.lm_order < 1:
            raise ValueError(f"model.lm_order must be >= 1, got {self.lm_order}")
        if self.conv_channels < 1:
            raise ValueError(f"model.conv_channels must be >= 1, got {self.conv_channels}")


@dataclass
class AsrEvalConfig:
    beam_size: int = 8
    nbest: int = 10
    max_symbols: int = 4  # RNN-T: labels per frame in decoding

    def __post_init__(self) -> None:
        if self.beam_size < 1 or self.nbest < 1 or self.max_symbols < 1:
            raise ValueError("eval.beam_size, eval.nbest and eval.max_symbols must be >= 1")


@dataclass
class AsrConfig:
    data: AsrDataConfig = field(default_factory=AsrDataConfig)
    model: AsrModelConfig = field(default_factory=AsrModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=200, weight_decay=0.0,
                                                                   clip_norm=5.0))
    train: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=3000, eval_every=500))
    eval: AsrEvalConfig = field(default_factory=AsrEvalConfig)
    name: str = "asr"


def _load_splits(d: AsrDataConfig, progress: bool) -> dict[str, list]:
    from seqebm.data.speech import load_manifest, load_speech_mini

    if d.corpus == "speech-mini":
        splits = load_speech_mini(d.cache_dir, progress=progress)
    else:
        splits = {"train": load_manifest(d.train_manifest), "test": load_manifest(d.test_manifest)}
        if d.test_unseen_manifest:
            splits["test_unseen"] = load_manifest(d.test_unseen_manifest)
        splits["dev"] = load_manifest(d.dev_manifest) if d.dev_manifest else splits["train"][::20]
        if not d.dev_manifest:
            splits["train"] = [u for i, u in enumerate(splits["train"]) if i % 20]
    g = torch.Generator().manual_seed(d.seed)
    train = splits["train"]
    perm = torch.randperm(len(train), generator=g).tolist()
    keep = max(1, round(d.train_fraction * len(train)))
    splits["train"] = [train[i] for i in sorted(perm[:keep])]
    if d.max_eval_utterances is not None:
        splits = {k: (v if k == "train" else v[: d.max_eval_utterances]) for k, v in splits.items()}
    return {k: v for k, v in splits.items() if v}


class AsrTask:
    """Features and labels of every split, the training source, decoding and CER/WER."""

    kind = "asr"

    def __init__(self, splits: dict[str, list], *, n_mels: int, batch_size: int, seed: int,
                 progress: bool = False) -> None:
        from seqebm.data.features import LogMelFeatures
        from seqebm.data.speech import SPEECH_UNITS, read_audio
        from seqebm.data.speech_batching import SpeechBatchSource, encode_transcript, featurize

        self.units = SPEECH_UNITS
        self.num_symbols = len(SPEECH_UNITS) + 1
        self.featurizer = LogMelFeatures(n_mels=n_mels)
        self.ids, self.refs, self.feats, self.labels = {}, {}, {}, {}
        for split, utts in splits.items():
            wavs = [torch.from_numpy(read_audio(u.audio)) for u in utts]
            self.feats[split] = featurize(wavs, self.featurizer, progress=progress)
            self.labels[split] = [encode_transcript(u.text, self.units) for u in utts]
            self.ids[split], self.refs[split] = [u.id for u in utts], [u.text for u in utts]
        self.train_source = (SpeechBatchSource(self.feats["train"], self.labels["train"], batch_size, seed=seed)
                             if "train" in splits else None)  # None: a decoding-only task

    def eval_splits(self) -> list[str]:
        return [s for s in ("dev", "test", "test_unseen") if s in self.feats]

    @torch.no_grad()
    def decode(self, model: nn.Module, split: str, device: Any, *, kind: str, lm=None, beam_size: int = 1,
               nbest: int = 1, max_symbols: int = 4, batch_size: int = 32) -> list[list[Any]]:
        """Per utterance a list of hypotheses (best first), each ``(text, acoustic, lm, score)``."""
        from seqebm.data.speech_batching import collate, decode_labels
        from seqebm.objectives.base import unwrap
        from seqebm.structured.ctc_decode import NGramScorer, ctc_greedy_decode, ctc_prefix_beam_search
        from seqebm.structured.rnnt import rnnt_beam_search, rnnt_greedy_decode

        net = unwrap(model)
        was = net.training
        net.eval()
        out: list[list[Any]] = []
        feats, labels = self.feats[split], self.labels[split]
        scorer = NGramScorer(lm) if lm is not None else None
        for i in range(0, len(feats), batch_size):
            b = collate(feats[i:i + batch_size], labels[i:i + batch_size]).to(device)
            if kind == "rnnt":
                f, flen = net.encoder(b.features, b.feature_lengths)
                for j in range(f.shape[0]):
                    step = _rnnt_step(net, f[j])
                    if beam_size == 1:
                        hyps = [(rnnt_greedy_decode(step, int(flen[j]), max_symbols=max_symbols), None)]
                    else:
                        hyps = [(h.labels, h.log_prob) for h in rnnt_beam_search(
                            step, int(flen[j]), beam_size=beam_size, max_symbols=max_symbols, nbest=nbest)]
                    out.append([(decode_labels(y, self.units), s, 0.0, s) for y, s in hyps])
                continue
            lp, flen = net(b.features, b.feature_lengths)
            if beam_size == 1 and scorer is None:
                out += [[(decode_labels(y, self.units), None, 0.0, None)] for y in ctc_greedy_decode(lp, flen)]
                continue
            for j in range(lp.shape[0]):
                hyps = ctc_prefix_beam_search(lp[j, : int(flen[j])], beam_size=beam_size, nbest=nbest, lm=scorer,
                                              label_threshold=-12.0)
                out.append([(decode_labels(h.labels, self.units), h.acoustic, h.lm, h.score) for h in hyps])
        net.train(was)
        return out

    def error_rates(self, split: str, hyps: list[list[Any]]) -> dict[str, float]:
        import jiwer

        refs = self.refs[split]
        best = [h[0][0] if h else "" for h in hyps]
        return {"cer": float(jiwer.cer(refs, best)), "wer": float(jiwer.wer(refs, best)),
                "utterances": float(len(refs))}


def _rnnt_step(net: nn.Module, f: torch.Tensor):
    """``step(t, prefixes) -> (N, C)`` log-probs of an RNN-T for one utterance's encodings f (T, D).

    The prediction network's output and state are cached per label prefix; the prefixes a call
    has not seen yet are advanced from their parents' states in one batched LSTM step.
    """
    cache: dict[tuple[int, ...], tuple[torch.Tensor, Any]] = {}
    g0, s0 = net.predict(torch.zeros(1, 1, dtype=torch.long, device=f.device), None)
    cache[()] = (g0[0, -1], s0)

    def extend(prefixes: list[tuple[int, ...]]) -> None:
        todo = list(dict.fromkeys(p for p in prefixes if p not in cache))
        if not todo:
            return
        extend([p[:-1] for p in todo])  # parents first (a beam step adds one label, so this is shallow)
        states = [cache[p[:-1]][1] for p in todo]
        state = tuple(torch.cat([st[i] for st in states], dim=1) for i in range(len(states[0])))
        tok = torch.tensor([[p[-1]] for p in todo], device=f.device)
        g, state = net.predict(tok, state)
        for n, p in enumerate(todo):
            cache[p] = (g[n, -1], tuple(x[:, n:n + 1] for x in state))

    def step(t: int, prefixes: list[tuple[int, ...]]) -> torch.Tensor:
        extend(prefixes)
        g = torch.stack([cache[p][0] for p in prefixes])
        return net.joint(f[t].unsqueeze(0), g)

    return step


def _build_model(cfg: AsrConfig, num_symbols: int) -> nn.Module:
    from seqebm.data.features import SpecAugment
    from seqebm.models.asr import AcousticEncoder, CTCAcousticModel, RNNTAcousticModel

    m = cfg.model
    enc = AcousticEncoder(cfg.data.n_mels, d_model=m.d_model, num_layers=m.num_layers, arch=m.encoder,
                          n_heads=m.n_heads, dropout=m.dropout, conv_channels=m.conv_channels)
    aug = SpecAugment(freq_width=min(27, cfg.data.n_mels // 3)) if cfg.data.spec_augment else None
    if m.kind == "rnnt":
        return RNNTAcousticModel(enc, num_symbols, pred_dim=m.pred_dim, joint_dim=m.joint_dim, dropout=m.dropout,
                                 augment=aug)
    return CTCAcousticModel(enc, num_symbols, augment=aug)


def run_asr(cfg: AsrConfig, run_dir: str | Path, *, resume: bool = False, log=print) -> dict[str, Any]:
    """Train one recogniser, decode dev/test(/test_unseen) with its best weights, write n-best lists."""
    from seqebm.eval.plots import plot_curves
    from seqebm.eval.report import write_report
    from seqebm.objectives.asr import build_asr_objective
    from seqebm.structured.label_ngram import LabelNGram
    from seqebm.training.checkpoint import load_model
    from seqebm.training.distributed import init_distributed, resolve_device
    from seqebm.training.experiment import prepare_run_dir
    from seqebm.training.trainer import BEST_MODEL, METRICS, Trainer

    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    if init_distributed(device).enabled:
        raise ValueError("seqebm asr train runs on one process; launch it without torchrun")
    t0 = time.perf_counter()
    splits = _load_splits(cfg.data, cfg.train.progress)  # bad data fails before the run folder exists
    prepare_run_dir(run_dir, resume)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    task = AsrTask(splits, n_mels=cfg.data.n_mels, batch_size=cfg.data.batch_size, seed=cfg.train.seed,
                   progress=cfg.train.progress)
    lm = None
    if cfg.model.kind == "ctc_crf":
        lm = LabelNGram.fit(task.labels["train"], task.num_symbols - 1, cfg.model.lm_order)
        lm.save(run_dir / "label_lm.json")
    torch.manual_seed(cfg.train.seed)
    model = _build_model(cfg, task.num_symbols)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[seqebm] {cfg.name}: {cfg.model.kind} ({cfg.model.encoder}), {len(splits['train'])} training utterances "
        f"({cfg.data.train_fraction:g} of train), params={n_params / 1e6:.2f}M")
    e = cfg.eval

    def evaluate(m: nn.Module) -> dict[str, float]:
        hyps = task.decode(m, "dev", device, kind=cfg.model.kind, beam_size=1, max_symbols=e.max_symbols)
        r = task.error_rates("dev", hyps)
        return {"loss": r["cer"], **r}

    trainer = Trainer(model, build_asr_objective(cfg.model.kind, lm=lm), task.train_source, optim=cfg.optim,
                      train=cfg.train, run_dir=run_dir, evaluate=evaluate, device=device)
    state = trainer.fit(resume=resume)
    if (run_dir / BEST_MODEL).exists():
        load_model(model, run_dir / BEST_MODEL)
    results: dict[str, Any] = {"name": cfg.name, "task": "asr", "kind": cfg.model.kind, "params": n_params,
                               "train_utterances": len(splits["train"]), "train_fraction": cfg.data.train_fraction,
                               "steps": state["step"], "train_time_s": state["elapsed_s"]}
    (run_dir / "nbest").mkdir(exist_ok=True)
    for split in task.eval_splits():
        hyps = task.decode(model, split, device, kind=cfg.model.kind, lm=lm, beam_size=e.beam_size, nbest=e.nbest,
                           max_symbols=e.max_symbols)
        results[split] = task.error_rates(split, hyps)
        _write_nbest(task, split, hyps, run_dir / "nbest" / f"{split}.jsonl")
    results["wall_time_s"] = time.perf_counter() - t0
    plot_curves(run_dir / METRICS, run_dir / "curves.png", keys=("loss",))
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    write_report(run_dir, cfg, results)
    return results


#: what a run writes before its first checkpoint: a folder holding only these has nothing to resume
_BEFORE_FIRST_CHECKPOINT = frozenset({"config.yaml", "metrics.jsonl", "label_lm.json"})


def _clear_unstarted(run: Path) -> None:
    """Empty a run folder that was stopped before its first checkpoint, so the run can start again."""
    if not run.is_dir() or (run / "checkpoint.safetensors").is_file():
        return
    names = {p.name for p in run.iterdir()}
    if names and names <= _BEFORE_FIRST_CHECKPOINT:
        for name in names:
            (run / name).unlink()


def compare_asr(configs: list[str | Path], seeds: list[int], fractions: list[float], out_dir: str | Path, *,
                overrides: list[str] | None = None, train: bool = True, log=print) -> dict[str, Any]:
    """Every config x training fraction x seed under ``out_dir/<stem>-f<fraction>-s<seed>``; mean ± std table.

    Finished runs are read back, unfinished ones resumed. With ``train=False`` nothing is trained:
    the table covers the finished runs only, and a cell with fewer seeds says ``(n=k)``.
    """
    from seqebm.eval.run_tables import format_mean_std, markdown_table, mean_std

    if not configs or not seeds or not fractions:
        raise ValueError("compare needs configs, seeds and fractions")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table, summary = [], {}
    for path in configs:
        stem = Path(path).stem
        for frac in fractions:
            results = []
            for seed in seeds:
                run = out / f"{stem}-f{frac:g}-s{seed}"
                if (run / "results.json").is_file():
                    results.append(json.loads((run / "results.json").read_text()))
                    continue
                if not train:
                    continue
                _clear_unstarted(run)
                cfg = load_config(AsrConfig, path, list(overrides or []) + [f"train.seed={seed}",
                                                                             f"data.train_fraction={frac}"])
                results.append(run_asr(cfg, run, resume=(run / "checkpoint.safetensors").is_file(), log=log))
            if not results:
                table.append([stem, "", f"{frac:g}", *(["n/a"] * 4)])
                continue
            stats = {f"{s}_{m}": mean_std([100 * r[s][m] for r in results if s in r])
                     for s in ("test", "test_unseen") for m in ("cer", "wer")}
            summary[f"{stem}@{frac:g}"] = {k: {"mean": v.mean, "std": v.std, "values": v.values}
                                          for k, v in stats.items()}
            table.append([stem, results[0]["kind"], f"{frac:g}",
                          *(format_mean_std(v, 2, expected_n=len(seeds)) for v in stats.values())])
    header = ["config", "model", "train fraction", *(f"{k.replace('_', ' ')} (%)" for k in
                                                     ("test_cer", "test_wer", "test_unseen_cer", "test_unseen_wer"))]
    text = (f"# Recogniser comparison ({len(seeds)} seeds)\n\nMean ± sample std over seeds ((n=k): only k "
            "finished); CER/WER in %, best-dev-CER weights, beam-search decoding.\n\n"
            + markdown_table(header, table) + "\n")
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.json", json.dumps({"seeds": seeds, "fractions": fractions,
                                                           "summary": summary}, indent=2))
    log(text)
    return summary


def _write_nbest(task: AsrTask, split: str, hyps: list[list[Any]], path: Path) -> None:
    lines = [json.dumps({"id": i, "reference": ref, "hypotheses": [
        {"text": t, "acoustic": a, "lm": lmv, "score": s} for t, a, lmv, s in h]})
        for i, ref, h in zip(task.ids[split], task.refs[split], hyps)]
    atomic_write_text(path, "".join(x + "\n" for x in lines))


def _restore_asr_run(run_dir: Path, device: str) -> tuple[AsrConfig, nn.Module, Any, torch.device]:
    """(config, model with its best weights on ``device`` in eval mode, label n-gram or None, device)."""
    from seqebm.data.speech import SPEECH_UNITS
    from seqebm.structured.label_ngram import LabelNGram
    from seqebm.training.checkpoint import load_model
    from seqebm.training.distributed import resolve_device
    from seqebm.training.trainer import BEST_MODEL

    if not (run_dir / "config.yaml").is_file() or not (run_dir / BEST_MODEL).is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished speech-recognition run (config.yaml, {BEST_MODEL})")
    cfg = load_config(AsrConfig, run_dir / "config.yaml")
    model = _build_model(cfg, len(SPEECH_UNITS) + 1)
    load_model(model, run_dir / BEST_MODEL)
    dev = resolve_device(device)
    model.to(dev).eval()
    lm = LabelNGram.load(run_dir / "label_lm.json") if cfg.model.kind == "ctc_crf" else None
    return cfg, model, lm, dev


def decode_nbest_lists(run_dir: str | Path, *, beam_size: int, nbest: int, out_name: str = "nbest",
                       splits: list[str] | None = None, device: str = "auto", force: bool = False,
                       log=print) -> dict[str, dict[str, float]]:
    """Decode a finished run's evaluation splits again with another beam, writing ``run_dir/out_name/<split>.jsonl``.

    Rescoring gains are bounded by the lists' oracle; a wider beam and longer lists than the
    training recipe's (``eval.beam_size``, ``eval.nbest``) give the LMs of ``seqebm rescore`` more
    to choose from. Uses the run's best weights and, for CTC-CRF, its label n-gram. Returns the
    1-best CER/WER per split. Existing lists are kept unless ``force``.
    """
    if beam_size < 1 or nbest < 1:
        raise ValueError(f"beam_size and nbest must be >= 1, got {beam_size}, {nbest}")
    if not out_name or "/" in out_name or out_name.startswith("."):
        raise ValueError(f"out_name must be a plain folder name, got {out_name!r}")
    run_dir = Path(run_dir)
    cfg, model, lm, dev = _restore_asr_run(run_dir, device)
    all_splits = _load_splits(cfg.data, progress=False)
    want = splits or [s for s in ("dev", "test", "test_unseen") if s in all_splits]
    unknown = [s for s in want if s == "train" or s not in all_splits]
    if unknown:
        raise ValueError(f"no evaluation split {unknown[0]!r} in this run's data (have: "
                         f"{', '.join(s for s in all_splits if s != 'train')})")
    out = run_dir / out_name
    existing = [str(out / f"{s}.jsonl") for s in want if (out / f"{s}.jsonl").exists()]
    if existing and not force:
        raise FileExistsError(f"refusing to overwrite {', '.join(existing)} (pass --force, or another --out-name)")
    task = AsrTask({s: all_splits[s] for s in want}, n_mels=cfg.data.n_mels, batch_size=cfg.data.batch_size,
                   seed=cfg.train.seed)
    out.mkdir(exist_ok=True)
    rates = {}
    for split in want:
        t0 = time.perf_counter()
        hyps = task.decode(model, split, dev, kind=cfg.model.kind, lm=lm, beam_size=beam_size, nbest=nbest,
                           max_symbols=cfg.eval.max_symbols)
        _write_nbest(task, split, hyps, out / f"{split}.jsonl")
        rates[split] = task.error_rates(split, hyps)
        log(f"[seqebm] {split}: {len(hyps)} lists, {sum(map(len, hyps)) / max(1, len(hyps)):.1f} hypotheses each, "
            f"CER {100 * rates[split]['cer']:.2f}% WER {100 * rates[split]['wer']:.2f}% "
            f"({time.perf_counter() - t0:.0f} s) -> {out / f'{split}.jsonl'}")
    return rates


def transcribe_files(run_dir: str | Path, files: list[str | Path], *, beam_size: int | None = None,
                     device: str = "auto") -> list[str]:
    """Transcribe 16 kHz audio files with a trained run's best weights (its own decoder)."""
    from seqebm.data.features import LogMelFeatures
    from seqebm.data.speech import SPEECH_UNITS, read_audio
    from seqebm.data.speech_batching import featurize

    cfg, model, lm, dev = _restore_asr_run(Path(run_dir), device)
    task = AsrTask.__new__(AsrTask)
    task.units = SPEECH_UNITS
    feats = featurize([torch.from_numpy(read_audio(f)) for f in files], LogMelFeatures(n_mels=cfg.data.n_mels))
    task.feats, task.labels = {"x": feats}, {"x": [[1] for _ in files]}
    hyps = task.decode(model, "x", dev, kind=cfg.model.kind, lm=lm, beam_size=beam_size or cfg.eval.beam_size,
                       max_symbols=cfg.eval.max_symbols)
    return [h[0][0] if h else "" for h in hyps]
