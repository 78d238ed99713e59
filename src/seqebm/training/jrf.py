"""Semi-supervised POS tagging with joint random fields (monograph §5.3-5.4): ``seqebm ssl train|compare``.

One :class:`~seqebm.models.jrf.JRF` (emitter + linear-chain CRF; its marginal p(l, x) is a TRF-LM with
potential log Z_θ(x)) is trained by ``objective.method``, a list of phases on one step counter: ``crf``
(``sup``: J_sup, Eq. 5.9), ``self_training`` (``sup``, then rounds ``st1``, ``st2``, ... on labelled +
confidently Viterbi-labelled pool sentences), ``pretrain`` (``noise``: MLE of the DNCE noise LM; ``pretrain``:
DNCE of p(l, x) on the pool, J_uns of Eq. 5.10; ``finetune``: J_sup) and ``jrf`` (``noise``, then ``joint``:
J_sup + α J_uns, Eq. 5.11, :class:`~seqebm.objectives.jrf.JRFLoss`). Data, vocabulary, model selection,
checkpoints and the run folder: docs/jrf.md.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pad_sequence

from seqebm.config import load_config, save_config
from seqebm.data.tagged import Sentence, TagVocabulary, WordVocabulary
from seqebm.data.tokenizers import UNK_ID
from seqebm.io import atomic_write_text
from seqebm.models.jrf import JRF, CharTableEmitter, WordEmitter, char_table
from seqebm.training.checkpoint import load_checkpoint, save_checkpoint, save_model

__all__ = ["SslConfig", "SslEmitter", "prepare_ssl_data", "build_ssl_model", "phase_plan", "run_ssl", "compare_ssl",
           "register_ssl_commands", "wiki_sentences", "evaluate_tagger", "pseudo_label", "METHODS"]

METHODS = ("crf", "self_training", "pretrain", "jrf")
CHECKPOINT, BEST_MODEL, METRICS, PSEUDO = "checkpoint.safetensors", "model.safetensors", "metrics.jsonl", "pseudo.json"


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass
class SslDataConfig:
    corpus: str = "pos"  # pos | conll (train_file, valid_file, test_file)
    train_file: str | None = None
    valid_file: str | None = None
    test_file: str | None = None
    cache_dir: str | None = None
    labeled_fraction: float = 0.1  # 0 < f <= 1 of the training sentences keep their tags
    include_wiki: bool = True  # add the wiki-mini training sentences to the unlabelled pool
    unlabeled_file: str | None = None  # more unlabelled text, one whitespace-tokenised sentence per line
    max_length: int = 40  # m of p(l, x); longer sentences train the CRF part only
    max_unlabeled: int | None = 20000
    min_count: int = 2
    max_vocab: int | None = 5000
    max_eval_sentences: int | None = None
    seed: int = 0  # the corpus's train/valid split (the labelled subset follows train.seed)

    def __post_init__(self) -> None:
        _need(0.0 < self.labeled_fraction <= 1.0, f"data.labeled_fraction must be in (0, 1], got "
              f"{self.labeled_fraction}")
        _need(self.corpus == "pos" or (self.corpus == "conll" and None not in (self.train_file, self.test_file)),
              f"data.corpus must be pos or conll (with data.train_file and data.test_file), got {self.corpus!r}")
        _need(self.max_length >= 1 and self.min_count >= 1 and (self.max_unlabeled or 0) >= 0,
              "need data.max_length >= 1, data.min_count >= 1, data.max_unlabeled >= 0")


@dataclass
class SslModelConfig:
    emitter: str = "word"  # word (embedding + BiLSTM) | wordchar (+ char CNN over the vocabulary spelling)
    word_dim: int = 64
    hidden: int = 64  # BiLSTM width per direction
    char_dim: int = 16
    char_channels: int = 32
    dropout: float = 0.25
    word_dropout: float = 0.05  # training words replaced by <unk>
    lm_dim: int = 64  # the DNCE noise LSTM LM
    lm_layers: int = 1

    def __post_init__(self) -> None:
        _need(self.emitter in ("word", "wordchar") and 0 <= self.dropout < 1 and 0 <= self.word_dropout < 1
              and min(self.word_dim, self.hidden, self.lm_dim, self.lm_layers) >= 1,
              f"need model.emitter word|wordchar (got {self.emitter!r}), dropouts in [0, 1), sizes >= 1")


@dataclass
class SslObjectiveConfig:
    method: str = "jrf"  # crf | self_training | pretrain | jrf
    alpha_uns: float = 1.0  # α of Eq. 5.11
    dnce_alpha: float = 0.5
    nu: float = 1.0
    noise_weight: float = 1.0
    noise_pretrain_steps: int = 200  # pretrain, jrf: MLE of the noise LM first
    pretrain_steps: int = 800  # pretrain: DNCE steps on the pool before fine-tuning
    reinit_head: bool = True  # pretrain: new emission layer and CRF tables for fine-tuning
    self_training_rounds: int = 2
    self_training_steps: int = 300
    self_training_threshold: float = 0.9  # minimum per-word posterior p(y*|x)^(1/l)
    self_training_ratio: float = 4.0  # at most this many pseudo-labelled sentences per labelled one

    def __post_init__(self) -> None:
        _need(self.method in METHODS, f"objective.method must be one of {', '.join(METHODS)}, got {self.method!r}")
        _need(self.alpha_uns > 0 and 0 < self.dnce_alpha <= 1 and self.nu > 0 and self.noise_weight >= 0
              and 0 <= self.self_training_threshold <= 1 and self.self_training_ratio > 0
              and min(self.noise_pretrain_steps, self.pretrain_steps, self.self_training_rounds,
                      self.self_training_steps) >= 0,
              "need objective.alpha_uns > 0, 0 < dnce_alpha <= 1, nu > 0, noise_weight >= 0, step counts >= 0, "
              "0 <= self_training_threshold <= 1, self_training_ratio > 0")


@dataclass
class SslOptimConfig:
    lr: float = 4e-3
    noise_lr: float = 2e-3
    zeta_lr: float = 1e-2
    clip_norm: float = 5.0


@dataclass
class SslTrainConfig:
    steps: int = 1000  # of the labelled phase (sup / finetune / joint)
    eval_every: int = 250
    labeled_batch: int = 64
    unlabeled_batch: int = 16
    eval_batch: int = 256
    seed: int = 0  # labelled subset, initialisation, batches
    device: str = "cpu"
    progress: bool = True


@dataclass
class SslConfig:
    data: SslDataConfig = field(default_factory=SslDataConfig)
    model: SslModelConfig = field(default_factory=SslModelConfig)
    objective: SslObjectiveConfig = field(default_factory=SslObjectiveConfig)
    optim: SslOptimConfig = field(default_factory=SslOptimConfig)
    train: SslTrainConfig = field(default_factory=SslTrainConfig)
    name: str = "ssl"

    def __post_init__(self) -> None:
        o, t = self.optim, self.train
        _need(min(o.lr, o.noise_lr, o.zeta_lr, o.clip_norm) > 0, "optim learning rates and clip_norm must be > 0")
        _need(min(t.steps, t.eval_every, t.labeled_batch, t.unlabeled_batch, t.eval_batch) >= 1,
              "train.steps, eval_every and the batch sizes must be >= 1")


_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)


@functools.lru_cache(maxsize=2)
def wiki_sentences(cache_dir: str | None = None) -> tuple[tuple[str, ...], ...]:
    """wiki-mini training sentences tokenised like the POS corpus (cased; punctuation and the Penn clitics
    's n't 're 've 'll 'd 'm split off)."""
    from seqebm.data.corpora import load_corpus
    from seqebm.data.truecasing import split_sentences, word_tokenize

    sents = (s for p in load_corpus("wiki-mini", cache_dir=cache_dir).split("train")
             for s in split_sentences(p.replace("\u2019", "'")))
    words = (tuple(x for t in word_tokenize(s) for x in _CLITIC.sub(r"\1 \2", t).split()) for s in sents)
    return tuple(w for w in words if w)


def prepare_ssl_data(cfg: SslConfig, *, progress: bool = False) -> SimpleNamespace:
    """labeled, pool, valid, test, words, chars, tags, pool_too_long (see the module docstring)."""
    from seqebm.data.elm_text import read_sentence_file
    from seqebm.training.tagging import TagDataConfig, load_tagging_corpus

    d, m = cfg.data, cfg.data.max_length
    corpus = load_tagging_corpus(TagDataConfig(corpus=d.corpus, train_file=d.train_file, valid_file=d.valid_file,
                                               test_file=d.test_file, cache_dir=d.cache_dir,
                                               max_eval_sentences=d.max_eval_sentences, seed=d.seed),
                                 progress=progress)
    tags = TagVocabulary.from_sequences(t for _, t in corpus.train)
    outside = sorted({t for split in (corpus.valid, corpus.test) for _, ts in split for t in ts} - set(tags.tags))
    _need(not outside, f"labels {outside} of the valid/test splits are outside the tag set of the training split "
          f"({', '.join(tags.tags)})")
    g = torch.Generator().manual_seed(cfg.train.seed)
    order = torch.randperm(len(corpus.train), generator=g).tolist()
    n_lab = max(1, round(d.labeled_fraction * len(corpus.train)))
    labeled = [corpus.train[i] for i in order[:n_lab]]
    pool = [list(corpus.train[i][0]) for i in order[n_lab:]]
    pool += [list(s) for s in wiki_sentences(d.cache_dir)] if d.include_wiki else []
    pool += read_sentence_file(d.unlabeled_file) if d.unlabeled_file else []
    kept = [s for s in pool if 1 <= len(s) <= m]
    too_long = len(pool) - len(kept)
    pool = [kept[i] for i in torch.randperm(len(kept), generator=g).tolist()][: d.max_unlabeled]
    _need(bool(pool) or cfg.objective.method == "crf",
          f"the unlabelled pool is empty (labeled_fraction={d.labeled_fraction}, include_wiki={d.include_wiki}, "
          f"unlabeled_file={d.unlabeled_file}, 1..{m} words): method={cfg.objective.method} needs unlabelled text")
    text = [w for w, _ in labeled] + pool
    return SimpleNamespace(labeled=labeled, pool=pool, valid=corpus.valid, test=corpus.test, tags=tags,
                           words=WordVocabulary.build(text, min_count=d.min_count, max_size=d.max_vocab),
                           chars=WordVocabulary.build([c for w in s for c in w] for s in text), pool_too_long=too_long)


class SslEmitter(nn.Module):
    """Emissions (B, T, K) from word ids, with the ids the method never trained on (``known``) and, in training,
    a ``word_dropout`` fraction mapped to <unk>: a :class:`WordEmitter` (``kw``), or with ``encoder`` a
    :class:`CharTableEmitter` whose characters come from the original ids (unknown words keep their spelling)."""

    def __init__(self, vocab_size: int, num_tags: int, *, word_dropout: float = 0.0, encoder: nn.Module | None = None,
                 table: Tensor | None = None, **kw: Any) -> None:
        super().__init__()
        self.vocab_size, self.num_tags, self.word_dropout = vocab_size, num_tags, word_dropout
        self.inner = WordEmitter(vocab_size, num_tags, **kw) if encoder is None else \
            CharTableEmitter(encoder, num_tags, table)
        self.register_buffer("known", torch.ones(vocab_size, dtype=torch.bool))

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        ids = torch.where(self.known[tokens], tokens, torch.full_like(tokens, UNK_ID))
        if self.training and self.word_dropout > 0:
            ids = ids.masked_fill((torch.rand(tokens.shape, device=tokens.device) < self.word_dropout) & (tokens > 0),
                                  UNK_ID)
        if isinstance(self.inner, WordEmitter):
            return self.inner(ids, mask)
        chars = self.inner.table[tokens].masked_fill(~mask.unsqueeze(-1), 0)
        return self.inner.proj(self.inner.encoder(SimpleNamespace(words=ids, chars=chars, mask=mask)))


def build_ssl_model(cfg: SslConfig, data: SimpleNamespace) -> tuple[JRF, nn.Module]:
    """(JRF, DNCE noise LM); π from the pool's lengths, ζ at :meth:`JRF.init_zeta`."""
    from seqebm.models.elm import length_prior
    from seqebm.models.rnn import RNNLM
    from seqebm.models.sentence_lm import BoundedSentenceLM
    from seqebm.models.taggers import WordCharEncoder
    from seqebm.structured.crf import LinearChainCRF

    mc, m, v, k = cfg.model, cfg.data.max_length, len(data.words), len(data.tags)
    torch.manual_seed(cfg.train.seed)
    if mc.emitter == "word":
        em = SslEmitter(v, k, dim=mc.word_dim, hidden=mc.hidden, dropout=mc.dropout, word_dropout=mc.word_dropout)
    else:
        enc = WordCharEncoder(v, len(data.chars), word_dim=mc.word_dim, char_dim=mc.char_dim,
                              char_channels=mc.char_channels, hidden=mc.hidden, dropout=mc.dropout)
        em = SslEmitter(v, k, encoder=enc, table=char_table(data.words, data.chars), word_dropout=mc.word_dropout)
    lengths = [len(s) for s in data.pool] or [min(len(w), m) for w, _ in data.labeled]
    jrf = JRF(em, LinearChainCRF(k), length_prior(lengths, m, smoothing=1.0))
    jrf.init_zeta(max(1, v - 3))
    return jrf, BoundedSentenceLM(RNNLM(v, d_model=mc.lm_dim, n_layers=mc.lm_layers, dropout=0.0), max_length=m)


def phase_plan(cfg: SslConfig) -> list[tuple[str, int]]:
    """The method's phases as (name, steps); phases of 0 steps are left out."""
    o, s = cfg.objective, cfg.train.steps
    plan = {"crf": [("sup", s)],
            "self_training": [("sup", s)] + [(f"st{r}", o.self_training_steps)
                                              for r in range(1, o.self_training_rounds + 1)],
            "pretrain": [("noise", o.noise_pretrain_steps), ("pretrain", o.pretrain_steps), ("finetune", s)],
            "jrf": [("noise", o.noise_pretrain_steps), ("joint", s)]}[o.method]
    return [(p, n) for p, n in plan if n > 0]


def _pad(rows: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    tokens = pad_sequence([torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True)
    lengths = torch.tensor([len(r) for r in rows])
    return tokens.to(device), (torch.arange(tokens.shape[1])[None] < lengths[:, None]).to(device)


@torch.no_grad()
def _viterbi(jrf: JRF, rows: list[list[int]], batch: int, device: torch.device) -> list[tuple[list[int], float]]:
    """(Viterbi tag ids, per-word posterior p(y*|x)^(1/l)) of every word-id row, in eval mode, length-bucketed."""
    was, out = jrf.training, [([], 0.0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    jrf.eval()
    for s in range(0, len(order), batch):
        idx = order[s:s + batch]
        tokens, mask = _pad([rows[i] for i in idx], device)
        em = jrf.emissions(tokens, mask)
        best, score = jrf.crf.viterbi(em, mask)
        conf = ((score - jrf.crf.log_partition(em, mask)) / mask.sum(1)).exp().tolist()
        for j, i in enumerate(idx):
            out[i] = (best[j, :len(rows[i])].tolist(), conf[j])
    jrf.train(was)
    return out


def evaluate_tagger(jrf: JRF, sentences: list[Sentence], data: SimpleNamespace, lab_words: set[str], batch: int,
                    device: torch.device) -> dict[str, float]:
    """Token / sentence accuracy of Viterbi decoding, and the accuracy on words absent from the labelled data."""
    from seqebm.eval.tagging_metrics import tagging_metrics

    pred = [data.tags.decode(t) for t, _ in _viterbi(jrf, [data.words.encode(w) for w, _ in sentences], batch, device)]
    oov = [(a == b) for (w, g), p in zip(sentences, pred) for x, a, b in zip(w, g, p) if x not in lab_words]
    return {**tagging_metrics([t for _, t in sentences], pred), "oov_accuracy": sum(oov) / max(len(oov), 1),
            "oov_tokens": float(len(oov))}


def pseudo_label(jrf: JRF, pool_ids: list[list[int]], *, threshold: float, limit: int, batch: int,
                 device: torch.device) -> list[tuple[int, list[int]]]:
    """The ``limit`` most confident (index, Viterbi tag ids) of the pool with p(y*|x)^(1/l) >= ``threshold``."""
    scored = sorted((-c, i, t) for i, (t, c) in enumerate(_viterbi(jrf, pool_ids, batch, device)) if c >= threshold)
    return [(i, t) for _, i, t in scored[:limit]]


def _save(run_dir: Path, bundle: nn.Module, opt, gen: torch.Generator, state: dict, best: dict) -> None:
    extra = {"extra.gen": gen.get_state(), **{f"extra.best.{k}": v.contiguous() for k, v in best.items()}}
    save_checkpoint(run_dir / CHECKPOINT, model=bundle, optimizer=opt, trainer_state=state, extra_tensors=extra)


def run_ssl(cfg: SslConfig, run_dir: str | Path, resume: bool = False, *, log=print) -> dict[str, Any]:
    """Train one tagger by ``cfg.objective.method``, evaluate its best weights, write results.json and report.md.
    Raises ValueError (empty pool the method needs, labels outside the tag set) before touching ``run_dir``,
    FileExistsError (non-empty ``run_dir`` without ``resume``), FileNotFoundError (``resume``, no checkpoint)."""
    from tqdm.auto import tqdm

    from seqebm.objectives.jrf import JRFLoss

    run_dir, t0, plan = Path(run_dir), time.perf_counter(), phase_plan(cfg)
    ends = list(itertools.accumulate(n for _, n in plan))
    total = ends[-1]
    if resume and (run_dir / "results.json").is_file():
        res = json.loads((run_dir / "results.json").read_text())
        if res.get("steps_planned", -1) >= total:
            log(f"[seqebm] {run_dir}: finished earlier ({res['steps_planned']} steps), not retraining")
            return res
    data = prepare_ssl_data(cfg, progress=cfg.train.progress)
    if resume and not (run_dir / CHECKPOINT).is_file():
        raise FileNotFoundError(f"cannot resume: no {CHECKPOINT} in {run_dir}")
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run folder already exists: {run_dir} (resume it or pick another); nothing overwritten")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    atomic_write_text(run_dir / "vocab.json", json.dumps({k: getattr(data, k).to_dict() for k in ("words", "chars",
                                                                                                 "tags")}))
    device, o, op, tr = torch.device(cfg.train.device), cfg.objective, cfg.optim, cfg.train
    jrf, noise = build_ssl_model(cfg, data)
    bundle = nn.ModuleDict({"jrf": jrf, "noise": noise}).to(device)
    loss_fn = JRFLoss(noise, alpha_uns=o.alpha_uns, dnce_alpha=o.dnce_alpha, nu=o.nu, noise_weight=o.noise_weight)
    lab_ids = [(data.words.encode(w), data.tags.encode(t)) for w, t in data.labeled]
    pool_ids = [data.words.encode(s) for s in data.pool]
    lab_words = {x for w, _ in data.labeled for x in w}
    if o.method in ("crf", "self_training"):  # only the labelled words are trained
        jrf.emitter.known.zero_()[:4] = True
        jrf.emitter.known[sorted({i for r, _ in lab_ids for i in r})] = True
    pseudo: list[tuple[int, list[int]]] = []
    train_rows = list(lab_ids)  # labelled + pseudo-labelled (word ids, tag ids)

    def make_opt() -> torch.optim.Optimizer:
        body = [p for n, p in jrf.named_parameters() if n != "trf.zeta"]
        return torch.optim.Adam([{"params": body, "lr": op.lr}, {"params": [jrf.zeta], "lr": op.zeta_lr},
                                 {"params": list(noise.parameters()), "lr": op.noise_lr}])

    def set_pseudo(items: list, known_update: bool = True) -> None:
        pseudo[:] = [(int(i), list(t)) for i, t in items]
        train_rows[:] = lab_ids + [(pool_ids[i], t) for i, t in pseudo]
        ids = sorted({w for i, _ in pseudo for w in pool_ids[i]})
        if ids and known_update:
            jrf.emitter.known[ids] = True

    def draw(rows: list, n: int) -> list:
        return [rows[i] for i in torch.randint(len(rows), (n,), generator=gen).tolist()]

    def step_loss(phase: str) -> tuple[Tensor, dict[str, float]]:
        if phase == "noise":
            return noise.mle_loss(*_pad(draw(pool_ids, tr.unlabeled_batch), device)), {}
        lab = None
        if phase != "pretrain":
            rows = draw(train_rows, tr.labeled_batch)
            lab = (*_pad([r for r, _ in rows], device), _pad([t for _, t in rows], device)[0])
        if phase not in ("pretrain", "joint"):
            loss = -jrf.conditional_log_prob(*lab).mean()
            return loss, {"sup_nll": float(loss.detach())}
        out = loss_fn(jrf, lab, _pad(draw(pool_ids, tr.unlabeled_batch), device), generator=gen)
        mo = out.metrics
        return out.loss, {k[:-4]: float(mo[k]) / max(mo["labeled_sum" if k == "sup_nll_sum" else "unlabeled_sum"], 1)
                          for k in ("sup_nll_sum", "dnce_sum", "noise_nll_sum", "dnce_accuracy_sum") if k in mo}

    opt, gen = make_opt(), torch.Generator().manual_seed(tr.seed + 1)
    if resume:
        state = load_checkpoint(run_dir / CHECKPOINT, model=bundle, optimizer=opt)
        extra = state.pop("extra_tensors")
        gen.set_state(extra["extra.gen"])
        best = {k[11:]: v for k, v in extra.items() if k.startswith("extra.best.")}
        j = bisect.bisect_left(ends, state["step"] + 1)
        if state["step"] < total and plan[j][0].startswith("st") and state["step"] != ends[j] - plan[j][1]:
            set_pseudo(json.loads((run_dir / PSEUDO).read_text())["items"], known_update=False)  # inside a round
        kept = [r for r in (run_dir / METRICS).read_text().splitlines() if json.loads(r)["step"] <= state["step"]]
        atomic_write_text(run_dir / METRICS, "".join(f"{r}\n" for r in kept))
        log(f"[seqebm] {cfg.name}: resuming at step {state['step']} of {total}")
    else:
        state = {"step": 0, "elapsed_s": 0.0, "best_acc": None, "best_step": 0, "diverged_at": None,
                 "pseudo_counts": []}
        best = {k: v.detach().clone() for k, v in jrf.state_dict().items()}
        (run_dir / METRICS).write_text("")
        _save(run_dir, bundle, opt, gen, state, best)
    n_params = sum(p.numel() for p in jrf.parameters())
    log(f"[seqebm] {cfg.name}: {o.method}, {len(data.labeled)} labelled / {len(data.pool)} unlabelled sentences, "
        f"vocab {len(data.words)}, {len(data.tags)} tags, params={n_params}, phases {plan}")
    sums: dict[str, float] = {}
    t_start = time.perf_counter() - state["elapsed_s"]
    bar = tqdm(total=total, initial=state["step"], desc=cfg.name, disable=not tr.progress, leave=False)
    for step in range(state["step"] + 1, total + 1):
        j = bisect.bisect_left(ends, step)
        phase = plan[j][0]
        if step == ends[j] - plan[j][1] + 1:  # entering a phase: fresh Adam
            opt = make_opt()
            if phase.startswith("st"):
                jrf.load_state_dict(best)
                set_pseudo(pseudo_label(jrf, pool_ids, threshold=o.self_training_threshold, batch=tr.eval_batch,
                                        limit=max(1, round(o.self_training_ratio * len(lab_ids))), device=device))
                atomic_write_text(run_dir / PSEUDO, json.dumps({"phase": phase, "items": pseudo}))
                state["pseudo_counts"].append(len(pseudo))
                log(f"[seqebm] {cfg.name}: {phase}: {len(pseudo)} pseudo-labelled sentences")
            if phase == "finetune" and o.reinit_head:
                torch.manual_seed(tr.seed + 2)
                jrf.emitter.inner.proj.reset_parameters()
                jrf.crf.reset_parameters()
        loss, metrics = step_loss(phase)
        if not torch.isfinite(loss):
            state.update(diverged_at=step, elapsed_s=time.perf_counter() - t_start)
            log(f"[seqebm] {cfg.name}: non-finite loss at step {step} ({phase}); stopping with the best weights")
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(bundle.parameters(), op.clip_norm)
        opt.step()
        for k, v in (("n", 1.0), ("loss", float(loss.detach())), *metrics.items()):
            sums[k] = sums.get(k, 0.0) + v
        bar.update(1)
        if step % tr.eval_every == 0 or step == ends[j]:
            lines = [{"split": "train", "step": step, "phase": phase,
                      **{k: v / sums["n"] for k, v in sums.items() if k != "n"}}]
            sums = {}
            if phase not in ("noise", "pretrain"):  # a labelled phase: model selection on valid
                val = evaluate_tagger(jrf, data.valid, data, lab_words, tr.eval_batch, device)
                lines.append({"split": "valid", "step": step, "phase": phase, "loss": 1 - val["accuracy"], **val})
                if state["best_acc"] is None or val["accuracy"] > state["best_acc"]:
                    state.update(best_acc=val["accuracy"], best_step=step)
                    best = {k: v.detach().clone() for k, v in jrf.state_dict().items()}
                bar.set_postfix(phase=phase, valid_acc=f"{val['accuracy']:.4f}", best=f"{state['best_acc']:.4f}")
            state.update(step=step, elapsed_s=time.perf_counter() - t_start)
            with open(run_dir / METRICS, "a") as fh:
                fh.write("".join(json.dumps(x) + "\n" for x in lines))
            _save(run_dir, bundle, opt, gen, state, best)
    bar.close()
    if state["best_acc"] is not None:
        jrf.load_state_dict(best)
    save_model(jrf, run_dir / BEST_MODEL, {"name": cfg.name, "step": state["best_step"]})
    done = state["step"] if state["diverged_at"] is None else state["diverged_at"] - 1
    results: dict[str, Any] = {
        "name": cfg.name, "task": "ssl-tagging", "method": o.method, "corpus": cfg.data.corpus, "seed": tr.seed,
        "labeled_fraction": cfg.data.labeled_fraction, "num_labeled": len(data.labeled),
        "num_unlabeled": len(data.pool), "pool_too_long": data.pool_too_long, "vocab": len(data.words),
        "tags": len(data.tags), "params": n_params, "phases": [list(x) for x in plan], "steps_planned": total,
        "steps": done, "best_step": state["best_step"], "diverged_at": state["diverged_at"],
        "pseudo_counts": state["pseudo_counts"], "train_time_s": state["elapsed_s"],
        "sec_per_step": state["elapsed_s"] / max(done, 1),
        **{s: evaluate_tagger(jrf, getattr(data, s), data, lab_words, tr.eval_batch, device)
           for s in ("valid", "test")}}
    results["wall_time_s"] = time.perf_counter() - t0
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(run_dir / "report.md", _report(cfg, results))
    log(f"[seqebm] {cfg.name}: test accuracy {100 * results['test']['accuracy']:.2f}% (words unseen in the labelled "
        f"data {100 * results['test']['oov_accuracy']:.2f}%), {results['train_time_s']:.0f} s")
    return results


def _report(cfg: SslConfig, r: dict[str, Any]) -> str:
    from seqebm.eval.run_tables import markdown_table

    rows = [[s, *(f"{100 * r[s][k]:.2f}" for k in ("accuracy", "oov_accuracy", "sentence_accuracy"))]
            for s in ("valid", "test")]
    facts = {"labelled sentences": r["num_labeled"], "unlabelled sentences": r["num_unlabeled"], "seed": r["seed"],
             **{k: r[k] for k in ("vocab", "params", "phases", "best_step", "pseudo_counts", "diverged_at")},
             "train time (s)": round(r["train_time_s"]), "ms/step": round(1000 * r["sec_per_step"])}
    return (f"# {cfg.name}: {r['method']}, {100 * r['labeled_fraction']:g}% labelled (docs/jrf.md)\n\n"
            + "; ".join(f"{k}: {v}" for k, v in facts.items()) + "\n\n" + markdown_table(
                ["split", "accuracy (%)", "accuracy on words unseen in the labelled data (%)", "sentence accuracy (%)"],
                rows) + "\n")


def compare_ssl(configs: list[str | Path], seeds: list[int], fractions: list[float], out_dir: str | Path,
                overrides: list[str] | None = None, *, log=print) -> dict[str, Any]:
    """Every config x labelled fraction x seed under ``out_dir/<stem>-f<fraction>-s<seed>`` (finished runs
    reused, interrupted ones resumed); writes ``comparison.md`` / ``comparison.json`` (mean ± std over seeds)."""
    from seqebm.eval.run_tables import format_mean_std, markdown_table, mean_std

    _need(bool(configs) and bool(seeds) and bool(fractions), "compare needs configs, seeds and fractions")
    (out := Path(out_dir)).mkdir(parents=True, exist_ok=True)
    summary, table = {}, []
    for path in configs:
        stem, cells = Path(path).stem, []
        for f in fractions:
            res = []
            for seed in seeds:
                run = out / f"{stem}-f{f:g}-s{seed}"
                cfg = load_config(SslConfig, path, [*(overrides or []), f"train.seed={seed}",
                                                    f"data.labeled_fraction={f}"])
                resume = (run / CHECKPOINT).is_file() or (run / "results.json").is_file()
                res.append(run_ssl(cfg, run, resume=resume, log=log))
            st = {k: mean_std([100 * r[s][m] for r in res]) for k, s, m in (
                ("test_accuracy", "test", "accuracy"), ("test_oov_accuracy", "test", "oov_accuracy"),
                ("valid_accuracy", "valid", "accuracy"))}
            st["train_time_s"] = mean_std([r["train_time_s"] for r in res])
            summary[f"{stem}-f{f:g}"] = {"config": str(path), "method": res[0]["method"], "fraction": f,
                                         **{k: res[0][k] for k in ("num_labeled", "num_unlabeled")},
                                         **{k: vars(v) for k, v in st.items()}}
            cells += [format_mean_std(st[k], 2 if k != "train_time_s" else 0, expected_n=len(seeds))
                      for k in ("test_accuracy", "test_oov_accuracy", "train_time_s")]
        table.append([stem, res[0]["method"], *cells])
    header = ["config", "method", *(f"{h} {100 * f:g}%" for f in fractions
                                    for h in ("accuracy", "OOV accuracy", "time (s)"))]
    text = (f"# Semi-supervised POS tagging ({len(seeds)} seeds: {', '.join(map(str, seeds))})\n\n"
            "Test token accuracy (%) of the best-validation weights, overall and on the words absent from the "
            "labelled sentences (OOV), and training time; mean ± sample std over seeds (each seed draws its own "
            "labelled subset, shared by all methods).\n\n" + markdown_table(header, table) + "\n")
    atomic_write_text(out / "comparison.md", text)
    atomic_write_text(out / "comparison.json", json.dumps({"seeds": seeds, "fractions": fractions, "overrides":
                                                           overrides or [], "configs": [str(c) for c in configs],
                                                           "summary": summary}, indent=2))
    log(text)
    return summary


def register_ssl_commands(subparsers) -> None:
    """``seqebm ssl train`` and ``seqebm ssl compare`` on the given (top-level) subparsers."""
    from seqebm.training.commands import add_train_compare_commands

    add_train_compare_commands(
        subparsers, "ssl", "semi-supervised tagging (§5.3-5.4): CRF, self-training, EBM pre-training, JRF joint "
                           "training", config_cls=SslConfig, run=run_ssl,
        compare=lambda a: compare_ssl(a.configs, a.seeds, a.fractions, a.out, a.overrides),
        train_help="train one tagger (configs/ssl-pos-*.yaml)",
        compare_help="configs x labelled fractions x seeds; a mean ± std table",
        compare_axis=("fractions", float, [0.02, 0.1]), override_example="optim.lr=1e-3")
