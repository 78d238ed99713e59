"""The exposure-bias analysis of the E-Forcing seed (§5.3, Tab. 4) for translation runs."""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.data.tokenizers import BOS_ID, EOS_ID, PAD_ID

from seqebm.eval.run_tables import Analysis, RunInfo, _document, load_runs, markdown_table, task_kind


# --------------------------------------------------------------------------- exposure bias (Tab. 4)


@torch.no_grad()
def greedy_decode_ids(model: nn.Module, sources: Sequence[Sequence[int]], *, max_len: int,
                      device: torch.device | str = "cpu", batch_size: int = 64) -> list[list[int]]:
    """Greedy translations as token ids (EOS and what follows removed), one list per source.

    Same decoding as ``TranslationTask.translate(beam_size=1)`` (budget ``min(max_len, 2·S + 10)``
    per chunk of ``batch_size`` sources, S the chunk's longest source), but keeps the ids.
    """
    from seqebm.data.batching import sequence_batch
    from seqebm.sampling.basic import generate

    model.eval()
    out: list[list[int]] = []
    for i in range(0, len(sources), batch_size):
        enc = [list(s) for s in sources[i:i + batch_size]]
        batch = sequence_batch(enc, bos_id=BOS_ID, eos_id=None, sources=enc)
        src, mask = batch.source.to(device), batch.source_mask.to(device)  # (B, S)
        prefix = torch.full((src.shape[0], 1), BOS_ID, device=device)
        budget = min(max_len, 2 * src.shape[1] + 10)
        rows = generate(model, prefix, budget, greedy=True, eos_id=EOS_ID, source=src, source_mask=mask).tolist()
        out += [r[: r.index(EOS_ID)] if EOS_ID in r else r for r in rows]
    return out


@torch.no_grad()
def reference_log_probs(model: nn.Module, sources: Sequence[Sequence[int]], hypotheses: Sequence[Sequence[int]],
                        references: Sequence[Sequence[int]], *, device: torch.device | str = "cpu",
                        batch_size: int = 64) -> list[Tensor]:
    """log q(y_t | x, ŷ_<t): each reference token scored after the model's *own* decoded prefix.

    For sentence i with reference y (L tokens, no EOS) and hypothesis ŷ (H tokens, no EOS) the
    positions are t = 0 .. n_i − 1 with n_i = min(L, H + 1, max_len): ŷ_<t exists for t ≤ H.
    One forward per chunk of ``batch_size`` sentences over the decoder inputs
    (B, T) = [BOS, ŷ_0, ..., ŷ_{n_i − 2}] (right-padded; the decoder is causal, so padding never
    reaches earlier positions), then a gather of the reference ids. Returns one (n_i,) float
    tensor per sentence (E-Forcing §5.3, Tab. 4).
    """
    if not len(sources) == len(hypotheses) == len(references):
        raise ValueError(f"got {len(sources)} sources, {len(hypotheses)} hypotheses, {len(references)} references")
    from seqebm.data.batching import sequence_batch

    model.eval()
    limit = getattr(model, "max_len", None) or math.inf
    out: list[Tensor] = []
    for i in range(0, len(sources), batch_size):
        src_ids = [list(s) for s in sources[i:i + batch_size]]
        hyps, refs = hypotheses[i:i + batch_size], references[i:i + batch_size]
        n = [int(min(len(y), len(h) + 1, limit)) for h, y in zip(hyps, refs)]
        if max(n) == 0:
            out += [torch.zeros(0) for _ in n]
            continue
        b, t = len(n), max(n)
        inputs = torch.full((b, t), PAD_ID, dtype=torch.long)  # (B, T)
        targets = torch.full((b, t), PAD_ID, dtype=torch.long)  # (B, T)
        for j, (h, y, k) in enumerate(zip(hyps, refs, n)):
            inputs[j, :k] = torch.tensor([BOS_ID, *h[: k - 1]][:k], dtype=torch.long)
            targets[j, :k] = torch.tensor(list(y[:k]), dtype=torch.long)
        src = sequence_batch(src_ids, bos_id=BOS_ID, eos_id=None, sources=src_ids)
        logits = model(inputs.to(device), source=src.source.to(device), source_mask=src.source_mask.to(device))
        logits = logits.float()  # (B, T, V)
        logp = (logits.gather(-1, targets.to(device)[..., None]).squeeze(-1) - logits.logsumexp(-1)).cpu()  # (B, T)
        out += [logp[j, :k] for j, k in enumerate(n)]
    return out


def _load_translation_run(run: RunInfo, device: str) -> tuple[Any, nn.Module, torch.device]:
    """Task and model (best weights) of a translation run folder; clear errors otherwise."""
    from seqebm.config import load_config
    from seqebm.training.checkpoint import load_model
    from seqebm.training.distributed import resolve_device
    from seqebm.training.experiment import ExperimentConfig, build_model_for, build_task
    from seqebm.training.trainer import BEST_MODEL

    if not (run.path / BEST_MODEL).is_file():
        raise FileNotFoundError(f"no trained weights ({BEST_MODEL}) in run folder {run.path}")
    cfg = load_config(ExperimentConfig, run.path / "config.yaml")
    task = build_task(cfg, run.path)
    model = build_model_for(cfg, task)
    load_model(model, run.path / BEST_MODEL)
    dev = resolve_device(device)
    return task, model.to(dev).eval(), dev


def _tokenizer_files(run: RunInfo) -> dict[str, str]:
    tok = run.path / "tokenizer"
    if not tok.is_dir():
        raise FileNotFoundError(f"no tokenizer/ folder in run folder {run.path}")
    return {str(p.relative_to(tok)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tok.rglob("*")) if p.is_file()}


def exposure_bias(baseline: str | Path, candidate: str | Path, *, split: str = "train", n: int = 1000,
                  seed: int = 0, device: str = "auto", batch_size: int = 64, decimals: int = 2,
                  name: str = "exposure_bias") -> Analysis:
    """Exposure-bias test of E-Forcing §5.3, Tab. 4 (after Zhang et al., 2019), for translation runs.

    Sample ``n`` source/reference pairs of ``split`` (``random.Random(seed)``; the seed's §5.3
    draws 1K pairs from the *training* data). Each model decodes every source greedily. At each
    target position t < min(len(ref), len(own hypothesis) + 1) take the model's probability of
    the reference token y_t given the source and the model's OWN decoded prefix ŷ_<t (the
    inference-time context, where exposure bias acts); positions are compared where both models
    have one, t < min(len(ref), H_baseline + 1, H_candidate + 1). N counts the positions where the
    candidate's probability is strictly greater than the baseline's; ratio = N / total. A run
    compared with itself gives N = 0. Reference tokens exclude EOS ("ground truth words").

    Both runs must be translation runs with identical tokenizer files; the sampled pairs are the
    baseline's (a note says so when the candidate's ``split`` differs).
    """
    if n <= 0:
        raise ValueError(f"the number of pairs n must be positive, got {n}")
    runs = load_runs([baseline, candidate], need_results=False, unique=False)  # a run vs itself: N = 0
    for role, run in zip(("baseline", "candidate"), runs):
        kind = task_kind(run.config)
        if kind != "translation":
            raise ValueError(f"exposure-bias needs translation runs (task kind 'translation'); the {role} "
                             f"{run.path} is a {kind!r} run (data.corpus={run.config['data']['corpus']!r})")
    if _tokenizer_files(runs[0]) != _tokenizer_files(runs[1]):
        raise ValueError(f"the runs do not share a tokenizer: {runs[0].path}/tokenizer and "
                         f"{runs[1].path}/tokenizer differ (train both from the same data and tokenizer settings)")
    (task_b, model_b, dev), (task_c, model_c, _) = (_load_translation_run(r, device) for r in runs)
    if task_b.vocab_size != task_c.vocab_size:
        raise ValueError(f"vocabulary sizes differ: baseline {task_b.vocab_size}, candidate {task_c.vocab_size}")
    if split not in task_b.pairs:
        raise ValueError(f"unknown split {split!r}; the run has {', '.join(task_b.pairs)}")
    notes = []
    if task_c.pairs.get(split) != task_b.pairs[split]:
        notes.append(f"the candidate's {split} pairs differ from the baseline's; the baseline's are used")
    pairs = task_b.pairs[split]
    if not pairs:
        raise ValueError(f"the {split} split of {runs[0].path} is empty")
    index = random.Random(seed).sample(range(len(pairs)), min(n, len(pairs)))
    tok = task_b.tokenizer
    sources = tok.encode_batch([pairs[i][0] for i in index])
    refs = tok.encode_batch([pairs[i][1] for i in index])
    hyp_b = greedy_decode_ids(model_b, sources, max_len=task_b.max_len, device=dev, batch_size=batch_size)
    hyp_c = greedy_decode_ids(model_c, sources, max_len=task_c.max_len, device=dev, batch_size=batch_size)
    lp_b = reference_log_probs(model_b, sources, hyp_b, refs, device=dev, batch_size=batch_size)
    lp_c = reference_log_probs(model_c, sources, hyp_c, refs, device=dev, batch_size=batch_size)
    wins = ties = total = 0
    sum_b = sum_c = 0.0
    for a, b in zip(lp_b, lp_c):
        m = min(len(a), len(b))
        wins += int((b[:m] > a[:m]).sum())
        ties += int((b[:m] == a[:m]).sum())
        total += m
        sum_b += float(a[:m].sum())
        sum_c += float(b[:m].sum())
    ratio = wins / total if total else None
    data = {"analysis": "exposure_bias", "baseline": str(runs[0].path), "candidate": str(runs[1].path),
            "split": split, "seed": seed, "sentences": len(index), "N": wins, "total": total, "ratio": ratio,
            "ties": ties, "reference_tokens": sum(len(r) for r in refs),
            "mean_log_prob": {"baseline": sum_b / total if total else None,
                              "candidate": sum_c / total if total else None},
            "mean_hypothesis_tokens": {"baseline": sum(map(len, hyp_b)) / len(index),
                                       "candidate": sum(map(len, hyp_c)) / len(index)},
            "indices": index}
    table = markdown_table(["baseline", "candidate", "split", "sentences", "N", "total", "ratio"],
                           [[runs[0].name, runs[1].name, split, len(index), wins, total,
                             "n/a" if ratio is None else f"{100 * ratio:.{decimals}f}%"]])
    notes.append(f"ties (equal probabilities, not counted in N): {ties}")
    intro = ("E-Forcing §5.3, Tab. 4: N = target positions where the candidate gives the reference token "
             "a strictly higher probability than the baseline, each model conditioned on the source and its "
             "OWN greedy prefix ŷ_<t; total = positions t < min(|ref|, |ŷ_baseline| + 1, |ŷ_candidate| + 1). "
             "A ratio above 50% means the candidate copes better with its own (inference-time) context.")
    return Analysis(name, _document("Exposure bias", intro, table, notes), data)
