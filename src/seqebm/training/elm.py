"""Training and evaluating energy-based LMs on text: ``seqebm elm train`` and the ELM rescoring scorer.

Notation: N sentences, m the maximum length, W = Σ (l + 1) the words of a split plus one end per
sentence (the unit of perplexity, as for the autoregressive LMs).

Model kinds (``model.kind``, monograph §3.2–3.3):

* ``trf``: :class:`~seqebm.models.elm.TRFLM` trained by DNCE (``objective.name=dnce``) or augmented
  SA (``augsa``);
* ``gn``: :class:`~seqebm.models.elm.GNELM` trained by DNCE (one learned log Z);
* ``residual``: :class:`~seqebm.models.elm.ResidualELM` on a base LSTM LM pre-trained for
  ``objective.noise_pretrain_steps`` steps, then NCE against it (``nce``);
* ``alm``: the LSTM sentence LM alone, trained by MLE (``mle``): the autoregressive baseline;
* ``electric``: the energy-based cloze model (§3.4) with its two-tower noise, trained jointly by the
  one-pass NCE loss Eq. 3.18 (``nce``); sentences are scored by its one-pass pseudo-log-likelihood;
* ``mlm``: a masked LM (``mle``), scored by its |x|-pass pseudo-log-likelihood (the comparison point
  of Electric).

Potentials (``model.potential``): ``neural`` (``model.arch``: cnn, blstm_cnn, transformer or
sum_inner_product), ``discrete`` (n-gram features of ``model.feature_types`` up to
``model.order``; with ``model.num_classes > 0`` words are clustered by the exchange algorithm and
class features become available) or ``mixed`` (both, summed: §3.3.2).

After training, the normalisers are re-estimated by importance sampling with the noise/proposal LM
(``eval.is_samples`` sentences), and test perplexity is reported with a ±2 standard-error range
that comes from the uncertainty of those estimates (:func:`importance_log_normalizers`).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.config import load_config, save_config
from seqebm.data.elm_text import SentenceBatchSource, encode_sentences, load_elm_sentences
from seqebm.data.tagged import WordVocabulary
from seqebm.io import atomic_write_text
from seqebm.models.elm import GNELM, TRFLM, MixedPotential, ResidualELM, length_prior
from seqebm.models.sentence_lm import BoundedSentenceLM
from seqebm.training.config import OptimConfig, TrainerConfig

__all__ = ["ElmConfig", "build_elm", "run_elm", "importance_log_normalizers", "ELMScorer", "sentence_log_probs"]

KINDS = ("trf", "gn", "residual", "alm", "electric", "mlm")
OBJECTIVES = {"trf": ("dnce", "augsa"), "gn": ("dnce",), "residual": ("nce",), "alm": ("mle",), "electric": ("nce",),
              "mlm": ("mle",)}
CLOZE = ("electric", "mlm")  # scored by pseudo-log-likelihood: no normaliser, perplexity not defined


@dataclass
class ElmDataConfig:
    corpus: str = "speech-text"  # speech-text | files
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    cache_dir: str | None = None
    max_length: int = 40  # m: longer training sentences are dropped; longer eval sentences are reported apart
    min_count: int = 2
    max_vocab: int | None = 20000
    batch_size: int = 64
    max_eval_sentences: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.corpus not in ("speech-text", "files"):
            raise ValueError(f"data.corpus must be speech-text or files, got {self.corpus!r}")
        if self.max_length < 1 or self.min_count < 1 or self.batch_size < 1:
            raise ValueError("data.max_length, data.min_count and data.batch_size must be >= 1")


@dataclass
class ElmModelConfig:
    kind: str = "trf"
    potential: str = "neural"  # neural | discrete | mixed
    arch: str = "blstm_cnn"  # cnn | blstm_cnn | transformer | sum_inner_product
    d_model: int = 128
    n_layers: int = 1
    feature_types: list[str] | None = None  # default: w, ws (+ c, cs with classes)
    order: int = 3
    num_classes: int = 0
    lm_d_model: int = 128  # the noise / proposal / base / ALM LSTM
    lm_layers: int = 1

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.potential not in ("neural", "discrete", "mixed"):
            raise ValueError(f"model.potential must be neural, discrete or mixed, got {self.potential!r}")
        if self.arch not in ("cnn", "blstm_cnn", "transformer", "sum_inner_product"):
            raise ValueError(f"model.arch must be cnn, blstm_cnn, transformer or sum_inner_product, got {self.arch!r}")
        if self.num_classes < 0 or self.order < 1:
            raise ValueError("model.num_classes must be >= 0 and model.order >= 1")


@dataclass
class ElmObjectiveConfig:
    name: str = "dnce"  # dnce | augsa (trf); dnce (gn); nce (residual); mle (alm)
    alpha: float = 0.5
    nu: float = 1.0
    num_chains: int = 64
    local_jumps: int = 1
    zeta_step: float = 1.0
    zeta_t0: float = 100.0
    proposal_weight: float = 1.0
    noise_pretrain_steps: int = 300
    noise_lr: float = 3e-3


@dataclass
class ElmEvalConfig:
    is_samples: int = 4000


@dataclass
class ElmConfig:
    data: ElmDataConfig = field(default_factory=ElmDataConfig)
    model: ElmModelConfig = field(default_factory=ElmModelConfig)
    objective: ElmObjectiveConfig = field(default_factory=ElmObjectiveConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=100, weight_decay=0.0,
                                                                   clip_norm=5.0))
    train: TrainerConfig = field(default_factory=lambda: TrainerConfig(max_steps=2000, eval_every=250))
    eval: ElmEvalConfig = field(default_factory=ElmEvalConfig)
    name: str = "elm"

    def __post_init__(self) -> None:
        if self.objective.name not in OBJECTIVES[self.model.kind]:
            raise ValueError(f"model.kind={self.model.kind} trains with objective.name in "
                             f"{OBJECTIVES[self.model.kind]}, got {self.objective.name!r}")


# --------------------------------------------------------------------------- building


def _sentence_lm(cfg: ElmConfig, vocab_size: int) -> BoundedSentenceLM:
    from seqebm.models.rnn import RNNLM

    m = cfg.model
    lm = RNNLM(vocab_size, d_model=m.lm_d_model, n_layers=m.lm_layers, dropout=0.0)
    return BoundedSentenceLM(lm, max_length=cfg.data.max_length)


def _potential(cfg: ElmConfig, vocab: WordVocabulary, train_ids: list[list[int]]) -> nn.Module:
    from seqebm.models.elm_neural import Hidden2Scalar, SumInnerProduct

    m = cfg.model
    parts: list[nn.Module] = []
    if m.potential in ("neural", "mixed"):
        if m.arch == "sum_inner_product":
            parts.append(SumInnerProduct(len(vocab), d_emb=m.d_model, n_layers=m.n_layers))
        else:
            parts.append(Hidden2Scalar(len(vocab), encoder=m.arch, d_model=m.d_model, n_layers=m.n_layers,
                                       max_len=cfg.data.max_length + 1))
    if m.potential in ("discrete", "mixed"):
        from seqebm.data.word_classes import exchange_clustering
        from seqebm.models.elm_discrete import DiscreteFeatures, DiscretePotential

        classes = (exchange_clustering(train_ids, len(vocab), m.num_classes, max_iterations=10)
                   if m.num_classes else None)
        types = m.feature_types or (["w", "ws", "c", "cs"] if classes is not None else ["w", "ws"])
        feats = DiscreteFeatures.build(train_ids, len(vocab), feature_types=tuple(types), order=m.order,
                                       classes=classes)
        parts.append(DiscretePotential(feats))
    return parts[0] if len(parts) == 1 else MixedPotential(*parts)


class ElectricPair(nn.Module):
    """Electric and its two-tower cloze noise, trained together (one module for the trainer)."""

    def __init__(self, vocab_size: int, d_model: int, n_layers: int, max_len: int) -> None:
        super().__init__()
        from seqebm.models.electric import Electric, TwoTowerCloze

        self.electric = Electric(vocab_size, d_model=d_model, n_layers=n_layers, max_len=max_len)
        self.noise = TwoTowerCloze(vocab_size, d_model=d_model, n_layers=n_layers, max_len=max_len)


class ClozeObjective(nn.Module):
    """Trainer adapter: Electric's NCE (Eq. 3.18, noise MLE included) or a masked LM's MLM loss.
    Sentences of one word are left out (Eq. 3.18 needs a positive besides the k = 1 noise position)."""

    def __init__(self) -> None:
        super().__init__()
        from seqebm.objectives.electric import ElectricNCELoss

        self.nce = ElectricNCELoss(variant="efficient")

    def forward(self, model: nn.Module, batch, *, step: int | None = None, generator=None):
        from seqebm.objectives.base import ObjectiveOutput

        keep = batch.mask.sum(1) >= 2
        tokens, mask = batch.tokens[keep], batch.mask[keep]
        n = float(len(batch))
        if isinstance(model, ElectricPair):
            out = self.nce(model.electric, model.noise, tokens, mask, generator=generator)
            return ObjectiveOutput(out["loss"], {"nce_sum": out["nce"].detach() * n,
                                                 "noise_mle_sum": out["noise_mle"].detach() * n, "tokens": n})
        loss = model.mlm_loss(tokens, mask, generator=generator)
        return ObjectiveOutput(loss, {"mlm_sum": loss.detach() * n, "tokens": n})


def build_elm(cfg: ElmConfig, vocab: WordVocabulary, train: list[list[str]]) -> tuple[nn.Module, nn.Module]:
    """(model, objective) for ``cfg``; the potential's discrete features are built from ``train``."""
    from seqebm.objectives import trf as obj

    o, v = cfg.objective, len(vocab)
    if cfg.model.kind == "electric":
        return ElectricPair(v, cfg.model.d_model, cfg.model.n_layers, cfg.data.max_length + 1), ClozeObjective()
    if cfg.model.kind == "mlm":
        from seqebm.models.masked_lm import MaskedLM

        return MaskedLM(v, d_model=cfg.model.d_model, n_layers=cfg.model.n_layers,
                        max_len=cfg.data.max_length + 1), ClozeObjective()
    if cfg.model.kind == "alm":
        return _sentence_lm(cfg, v), obj.SentenceMLELoss()
    ids = [vocab.encode(s) for s in train]
    pot = _potential(cfg, vocab, ids)
    lm = _sentence_lm(cfg, v)
    if cfg.model.kind == "residual":
        return ResidualELM(lm, pot), obj.ResidualNCELoss(nu=o.nu)
    if cfg.model.kind == "gn":
        return GNELM(pot, eos_id=2, max_length=cfg.data.max_length), obj.TRFDNCELoss(lm, alpha=o.alpha, nu=o.nu)
    model = TRFLM(pot, length_prior([len(s) for s in train], cfg.data.max_length, smoothing=1.0))
    if o.name == "dnce":
        return model, obj.TRFDNCELoss(lm, alpha=o.alpha, nu=o.nu)
    from seqebm.objectives.stochastic_approximation import robbins_monro

    return model, obj.AugSALoss(lm, num_chains=o.num_chains, local_jumps=o.local_jumps,
                                zeta_step=robbins_monro(o.zeta_step, t0=o.zeta_t0, exponent=0.8),
                                anchor_word_ids=list(range(3, v)), proposal_weight=o.proposal_weight)


def auxiliary_lm(model: nn.Module, objective: nn.Module) -> BoundedSentenceLM:
    """The model's sentence LM: noise (DNCE), proposal (AugSA), base (residual) or the ALM itself."""
    for owner, name in ((model, "base"), (objective, "noise"), (objective, "proposal")):
        if isinstance(getattr(owner, name, None), BoundedSentenceLM):
            return getattr(owner, name)
    if isinstance(model, BoundedSentenceLM):
        return model
    raise TypeError(f"no sentence LM in {type(model).__name__} / {type(objective).__name__}")


def pretrain_sentence_lm(lm: BoundedSentenceLM, source: SentenceBatchSource, steps: int, lr: float, *,
                         device: torch.device, progress: bool = True) -> float:
    """MLE steps on the training batches (the AugSA proposal / residual base start from a fitted LM)."""
    from tqdm.auto import tqdm

    params = list(lm.parameters())
    frozen = [p for p in params if not p.requires_grad]  # a residual ELM freezes its base: train it here first
    for p in frozen:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    loss = torch.tensor(float("nan"))
    n = source.num_batches()
    for step in tqdm(range(steps), desc="pretrain LM", disable=not progress):
        b = source.batch(1_000_000 + step // n, step % n).to(device)
        loss = -lm.log_prob(b.tokens, b.mask).mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
    for p in frozen:
        p.requires_grad_(False)
    return loss.item()


# --------------------------------------------------------------------------- scoring and evaluation


@torch.no_grad()
def sentence_log_probs(model: nn.Module, batch, *, clamp_length: bool = False) -> Tensor:
    """log p(x) per sentence (N,) float64 under the model's current normaliser estimates.

    ``clamp_length``: a TRF gives sentences longer than m the π and ζ of length m (for rescoring
    hypotheses of any length); otherwise they must not occur.
    """
    tokens, mask = batch.tokens, batch.mask
    if isinstance(model, BoundedSentenceLM):
        return model.log_prob(tokens, mask).double()
    if isinstance(model, ElectricPair):
        return model.electric.score(tokens, mask).double()
    if type(model).__name__ == "MaskedLM":
        return model.pseudo_log_likelihood(tokens, mask).double()
    if isinstance(model, TRFLM):
        lengths = mask.sum(1)
        if clamp_length:
            lengths = lengths.clamp_max(model.max_length)
        u = model.potential(tokens, mask).double()
        return model.log_length_probs[lengths] - model.zeta.double()[lengths] + u
    if isinstance(model, GNELM):
        return model.potential(*model.potential_input(tokens, mask)).double() - model.log_z.double()
    if isinstance(model, ResidualELM):
        return model.base.log_prob(tokens, mask).double() + model.potential(tokens, mask).double() - model.log_z
    raise TypeError(f"cannot score sentences with {type(model).__name__}")


@torch.no_grad()
def importance_log_normalizers(model: nn.Module, lm: BoundedSentenceLM, num_samples: int, *,
                               batch_size: int = 500, generator: torch.Generator | None = None,
                               progress: bool = False) -> tuple[Tensor, Tensor]:
    """Importance-sampling estimates of the normalisers with q = ``lm`` and their standard errors.

    TRF: Ẑ_l = (1/n) Σ_i 1{|y_i| = l} e^{U(y_i)} / q(y_i) for every l (shape (m + 1,)); GN-ELM:
    Ẑ = (1/n) Σ e^{U(y ⟨/s⟩)}/q(y); residual: Ẑ = (1/n) Σ e^{U(y)} (shape (1,)). Returned as log Ẑ
    and the delta-method standard error of log Ẑ, sd(w)/(√n · mean(w)); lengths never sampled get
    log Ẑ = −inf and an infinite error.
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    from tqdm.auto import tqdm

    log_w, lens = [], []
    dev = lm.banned.device
    for s in tqdm(range(0, num_samples, batch_size), desc="IS normalisers", disable=not progress):
        y, ym, log_q = lm.sample(min(batch_size, num_samples - s), generator, device=dev)
        w = int(ym.sum(1).max())
        y, ym = y[:, :w], ym[:, :w]
        if isinstance(model, TRFLM):
            log_w.append(model.potential(y, ym).double() - log_q)
        elif isinstance(model, GNELM):
            log_w.append(model.potential(*model.potential_input(y, ym)).double() - log_q)
        elif isinstance(model, ResidualELM):
            log_w.append(model.potential(y, ym).double())
        else:
            raise TypeError(f"no normaliser to estimate for {type(model).__name__}")
        lens.append(ym.sum(1))
    log_w, lens = torch.cat(log_w), torch.cat(lens)
    n = log_w.numel()
    groups = ([lens == l for l in range(model.max_length + 1)] if isinstance(model, TRFLM)
              else [torch.ones_like(lens, dtype=torch.bool)])
    est, se = [], []
    for g in groups:
        lw = torch.where(g, log_w, torch.full_like(log_w, float("-inf")))
        if not bool(g.any()):
            est.append(float("-inf"))
            se.append(float("inf"))
            continue
        top = lw.max()
        w = (lw - top).exp()  # scaled weights, zeros outside the group
        mean = w.mean()
        est.append(float(top + mean.log()))
        se.append(float(w.std() / (math.sqrt(n) * mean)))
    return torch.tensor(est, dtype=torch.float64), torch.tensor(se, dtype=torch.float64)


def evaluate_split(model: nn.Module, sentences: list[list[str]], vocab: WordVocabulary, max_length: int,
                   device: torch.device, *, batch_size: int = 256) -> dict[str, Any]:
    """Per-word NLL and perplexity (W = Σ(l + 1)) over the sentences of at most ``max_length`` words."""
    kept = [s for s in sentences if 1 <= len(s) <= max_length]
    if not kept:
        raise ValueError(f"no evaluation sentence has 1..{max_length} words")
    model.eval()
    ll, lengths = [], []
    for s in range(0, len(kept), batch_size):
        b = encode_sentences(kept[s:s + batch_size], vocab).to(device)
        ll.append(sentence_log_probs(model, b).cpu())
        lengths.append(b.mask.sum(1).cpu())
    ll, lengths = torch.cat(ll), torch.cat(lengths)
    words = float((lengths + 1).sum())
    nll = float(-ll.sum()) / words
    return {"loss": nll, "ppl": math.exp(min(nll, 700.0)), "sentences": len(kept),
            "excluded_longer": len(sentences) - len(kept), "words": words,
            "length_counts": torch.bincount(lengths, minlength=max_length + 1).tolist()}


# --------------------------------------------------------------------------- one run


def _load_text(cfg: ElmConfig) -> dict[str, list[list[str]]]:
    d = cfg.data
    files = {"train": d.train_file, "valid": d.valid_file, "test": d.test_file}
    out = {s: load_elm_sentences(d.corpus, s, files=files, cache_dir=d.cache_dir) for s in ("train", "valid", "test")}
    out["train"] = [s for s in out["train"] if 1 <= len(s) <= d.max_length]
    if d.max_eval_sentences is not None:
        out["valid"], out["test"] = out["valid"][: d.max_eval_sentences], out["test"][: d.max_eval_sentences]
    if len(out["train"]) < d.batch_size:
        raise ValueError(f"{len(out['train'])} training sentences of 1..{d.max_length} words: fewer than one batch")
    return out


def _restore_run(run_dir: Path, device: torch.device | str = "cpu"
                 ) -> tuple[ElmConfig, WordVocabulary, nn.Module, nn.Module]:
    """A finished run's config, vocabulary, best model and (untrained) objective, on ``device`` in eval mode."""
    from seqebm.training.checkpoint import load_model
    from seqebm.training.trainer import BEST_MODEL

    if not (run_dir / "config.yaml").is_file() or not (run_dir / BEST_MODEL).is_file():
        raise FileNotFoundError(f"{run_dir} is not a finished ELM run (config.yaml, vocab.json, {BEST_MODEL})")
    cfg = load_config(ElmConfig, run_dir / "config.yaml")
    vocab = WordVocabulary.from_dict(json.loads((run_dir / "vocab.json").read_text(encoding="utf-8")))
    train = json.loads((run_dir / "potential_text.json").read_text(encoding="utf-8")) \
        if (run_dir / "potential_text.json").is_file() else []
    model, objective = build_elm(cfg, vocab, train)
    load_model(model, run_dir / BEST_MODEL)
    return cfg, vocab, model.to(device).eval(), objective.to(device).eval()


def run_elm(cfg: ElmConfig, run_dir: str | Path, *, resume: bool = False, log=print) -> dict[str, Any]:
    """Train one ELM (or the ALM baseline), then evaluate valid/test perplexity with IS normalisers."""
    from seqebm.training.checkpoint import load_model
    from seqebm.training.distributed import resolve_device
    from seqebm.training.experiment import prepare_run_dir
    from seqebm.training.trainer import BEST_MODEL, Trainer

    run_dir = Path(run_dir)
    device = resolve_device(cfg.train.device)
    t0 = time.perf_counter()
    text = _load_text(cfg)  # bad data fails before the folder exists
    prepare_run_dir(run_dir, resume)
    if not resume:
        save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.train.seed)
    vocab = WordVocabulary.build(text["train"], min_count=cfg.data.min_count, max_size=cfg.data.max_vocab)
    unk_types = len({w for s in text["train"] for w in s if w not in vocab})  # word types folded into <unk>
    atomic_write_text(run_dir / "vocab.json", json.dumps({**vocab.to_dict(), "unk_types": unk_types}))
    if cfg.model.potential in ("discrete", "mixed"):  # the feature table is rebuilt from this text on reload
        atomic_write_text(run_dir / "potential_text.json", json.dumps(text["train"]))
    model, objective = build_elm(cfg, vocab, text["train"])
    model.to(device)
    objective.to(device)
    source = SentenceBatchSource(text["train"], vocab, cfg.data.batch_size, seed=cfg.data.seed)
    lm = auxiliary_lm(model, objective) if cfg.model.kind not in CLOZE else None
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[seqebm] {cfg.name}: {cfg.model.kind} ({cfg.model.potential}) by {cfg.objective.name}, "
        f"{len(text['train'])} training sentences, vocab {len(vocab)}, params={n_params / 1e6:.2f}M")
    pre = None
    if cfg.model.kind in ("residual",) or cfg.objective.name == "augsa":
        if not (resume and (run_dir / "checkpoint.safetensors").is_file()):
            pre = pretrain_sentence_lm(lm, source, cfg.objective.noise_pretrain_steps, cfg.objective.noise_lr,
                                       device=device, progress=cfg.train.progress)

    def evaluate(m: nn.Module) -> dict[str, float]:
        r = evaluate_split(m, text["valid"], vocab, cfg.data.max_length, device)
        return {"loss": r["loss"], "ppl": r["ppl"]}

    trainer = Trainer(model, objective, source, optim=cfg.optim, train=cfg.train, run_dir=run_dir,
                      evaluate=evaluate, device=device)
    state = trainer.fit(resume=resume)
    if (run_dir / BEST_MODEL).exists():
        load_model(model, run_dir / BEST_MODEL)
    model.eval()
    results: dict[str, Any] = {"name": cfg.name, "task": "elm", "kind": cfg.model.kind,
                               "potential": cfg.model.potential, "objective": cfg.objective.name,
                               "params": n_params, "vocab": len(vocab), "steps": state["step"],
                               "train_time_s": state["elapsed_s"], "lm_pretrain_final_nll": pre}
    for split in ("valid", "test"):
        results[split] = evaluate_split(model, text[split], vocab, cfg.data.max_length, device)
    if isinstance(model, ResidualELM):  # what the energy adds: the base LM's own perplexity
        results["base"] = {split: evaluate_split(model.base, text[split], vocab, cfg.data.max_length, device)["ppl"]
                           for split in ("valid", "test")}
    if cfg.model.kind not in ("alm", *CLOZE):
        g = torch.Generator(device="cpu").manual_seed(cfg.train.seed + 17)
        log_z, se = importance_log_normalizers(model, lm.eval(), cfg.eval.is_samples, generator=g)
        results["is_log_normalizers"] = {"estimate": log_z.tolist(), "stderr": se.tolist()}
        results["test_is"] = _perplexity_with_is(model, results["test"], log_z, se)
    results["wall_time_s"] = time.perf_counter() - t0
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    return results


def _perplexity_with_is(model: nn.Module, split: dict[str, Any], log_z: Tensor, se: Tensor) -> dict[str, Any]:
    """Test perplexity after replacing the learned normalisers by the IS estimates, ±2 standard errors."""
    counts = torch.tensor(split["length_counts"], dtype=torch.float64)
    if isinstance(model, TRFLM):
        current = model.zeta.detach().double().cpu()
        used = counts > 0
        if bool(torch.isinf(log_z[used]).any()):
            return {"ppl": None, "note": "a test length was never sampled by the IS proposal; raise eval.is_samples"}
        shift = float((counts[used] * (log_z[used] - current[used])).sum())
        spread = float(torch.sqrt(((counts[used] * se[used]) ** 2).sum()))
    else:
        current = float(model.log_z.detach())
        n = float(counts.sum())
        shift, spread = n * (float(log_z[0]) - current), n * float(se[0])
    nll = split["loss"] * split["words"] + shift
    ppl = lambda total: math.exp(min(total / split["words"], 700.0))  # noqa: E731
    return {"ppl": ppl(nll), "ppl_low": ppl(nll - 2 * spread), "ppl_high": ppl(nll + 2 * spread)}


# --------------------------------------------------------------------------- rescoring


class ELMScorer:
    """Sentence scorer (``texts -> log p (N,)``) from a trained ELM/ALM run folder, for ``seqebm rescore``.

    Hypotheses are split on whitespace and mapped to the run's vocabulary; a TRF scores sentences
    longer than its m with the length prior and ζ of length m.

    Out-of-vocabulary words: the model gives ``<unk>`` the mass of every training word type left out
    of its vocabulary, so a misspelt hypothesis word would look as likely as a frequent class of
    rare words. ``unk_penalty`` (default: log of that number of types, stored by the run) is
    subtracted per ``<unk>``, spreading the mass evenly over those types — the usual correction
    that makes scores over different vocabularies comparable (an n-gram LM's unknown-word
    probability plays the same role).
    """

    def __init__(self, run_dir: str | Path, *, device: str = "auto", batch_size: int = 64,
                 unk_penalty: float | None = None) -> None:
        from seqebm.training.distributed import resolve_device

        self.device = resolve_device(device)
        self.cfg, self.vocab, self.model, _ = _restore_run(Path(run_dir), self.device)
        self.batch_size, self.run_dir = batch_size, str(run_dir)
        if unk_penalty is None:
            types = json.loads((Path(run_dir) / "vocab.json").read_text(encoding="utf-8")).get("unk_types", 1)
            unk_penalty = math.log(max(1, int(types)))
        if unk_penalty < 0:
            raise ValueError(f"unk_penalty must be >= 0, got {unk_penalty}")
        self.unk_penalty = float(unk_penalty)

    def __call__(self, texts) -> Tensor:
        texts = list(texts)
        out = torch.empty(len(texts), dtype=torch.float64)
        nonempty = [i for i, t in enumerate(texts) if t.split()]
        for i in set(range(len(texts))) - set(nonempty):
            out[i] = float("-inf")
        for s in range(0, len(nonempty), self.batch_size):
            idx = nonempty[s:s + self.batch_size]
            b = encode_sentences([texts[i].split() for i in idx], self.vocab).to(self.device)
            if not isinstance(self.model, TRFLM):
                b.tokens, b.mask = b.tokens[:, : self.cfg.data.max_length], b.mask[:, : self.cfg.data.max_length]
            unk = ((b.tokens == self.vocab.unk_id) & b.mask).sum(1).double().cpu()
            out[idx] = sentence_log_probs(self.model, b, clamp_length=True).cpu() - self.unk_penalty * unk
        return out

    def __repr__(self) -> str:
        return f"ELMScorer({self.run_dir}: {self.cfg.model.kind}/{self.cfg.model.potential})"


def register_elm_train_command(subparsers) -> None:
    """``seqebm elm train``."""

    def _cmd(args) -> int:
        cfg = load_config(ElmConfig, args.config, args.overrides)
        run_dir = Path(args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
        res = run_elm(cfg, run_dir, resume=args.resume)
        line = f"test: ppl {res['test']['ppl']:.2f} (learned normalisers)"
        if res.get("test_is", {}).get("ppl"):
            t = res["test_is"]
            line += f"; {t['ppl']:.2f} [{t['ppl_low']:.2f}, {t['ppl_high']:.2f}] with IS normalisers"
        print(line + f"\n[seqebm] run folder: {run_dir}")
        return 0

    t = subparsers.add_parser("train", help="train a TRF-LM / GN-ELM / residual ELM / ALM baseline "
                                            "(configs/elm-*.yaml)")
    t.add_argument("--config")
    t.add_argument("--run-dir")
    t.add_argument("--resume", action="store_true")
    t.add_argument("overrides", nargs="*")
    t.set_defaults(func=_cmd)
