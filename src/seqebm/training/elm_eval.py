"""``seqebm elm evaluate``: estimate a finished ELM run's normalisers again, with more samples.

Training ends with an importance-sampling estimate of the normalisers (``eval.is_samples`` draws
from the run's own sentence LM: DNCE noise, AugSA proposal or residual base;
:func:`~seqebm.training.elm.importance_log_normalizers`). A TRF spreads those draws over every
length, so a few thousand of them can leave some lengths with a handful of useful weights. When
one weight dominates a length, the standard error of log Ẑ_l approaches 1, and the estimate
is then unreliable. This command estimates them again from the saved run with as many draws as
asked. It uses the best weights, and the sentence LM as it was at the last checkpoint. It writes
the valid/test perplexities under the new estimates to ``RUN/is-<n>-s<seed>.json`` and does not
change the run's ``results.json``.

With the same number of draws and the default seed (``train.seed + 17``), it repeats the estimate
made at the end of training draw for draw.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from seqebm.config import load_config
from seqebm.data.tagged import WordVocabulary
from seqebm.io import atomic_write_text
from seqebm.models.elm import ResidualELM
from seqebm.training.elm import (
    CLOZE,
    ElmConfig,
    _load_text,
    _restore_run,
    _perplexity_with_is,
    auxiliary_lm,
    evaluate_split,
    importance_log_normalizers,
)

__all__ = ["reestimate_normalizers", "register_elm_evaluate_command"]


def _restore_with_objective(run_dir: Path, device: torch.device) -> tuple[ElmConfig, WordVocabulary, nn.Module,
                                                                          nn.Module]:
    """The run's best model and its objective, with the objective's state (noise/proposal LM) from the
    last training checkpoint."""
    from seqebm.training.checkpoint import _load_weights, _read
    from seqebm.training.trainer import BEST_MODEL

    needed = ("config.yaml", "vocab.json", BEST_MODEL, "checkpoint.safetensors")
    missing = [f for f in needed if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a finished ELM run: missing {', '.join(missing)}")
    kind = load_config(ElmConfig, run_dir / "config.yaml").model.kind
    if kind in ("alm", *CLOZE):
        raise ValueError(f"{run_dir} is a {kind} run: it has no normaliser to estimate "
                         f"(an ALM is normalised by construction; Electric and the MLM give pseudo-likelihoods)")
    cfg, vocab, model, objective = _restore_run(run_dir, device)
    ckpt = run_dir / "checkpoint.safetensors"
    prefix = "extra.objective."
    state = {k[len(prefix):]: v.to(device) for k, v in _read(ckpt)[0].items() if k.startswith(prefix)}
    _load_weights(objective, state, ckpt, strict=False)
    return cfg, vocab, model, objective.eval()


def reestimate_normalizers(run_dir: str | Path, *, num_samples: int, seed: int | None = None,
                           device: str = "auto", out: str | Path | None = None, progress: bool = True,
                           log=print) -> dict[str, Any]:
    """Importance-sample the normalisers of a finished TRF / GN-ELM / residual run with ``num_samples``
    draws and report valid/test perplexity under them (±2 standard errors); returns what it writes."""
    from seqebm.training.distributed import resolve_device

    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2, got {num_samples}")
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    cfg, vocab, model, objective = _restore_with_objective(run_dir, dev)
    seed = cfg.train.seed + 17 if seed is None else int(seed)
    out = Path(out) if out is not None else run_dir / f"is-{num_samples}-s{seed}.json"
    text = _load_text(cfg)
    t0 = time.perf_counter()
    g = torch.Generator(device="cpu").manual_seed(seed)
    log_z, se = importance_log_normalizers(model, auxiliary_lm(model, objective), num_samples, generator=g,
                                           progress=progress)
    result: dict[str, Any] = {"run": str(run_dir), "num_samples": num_samples, "seed": seed,
                              "is_log_normalizers": {"estimate": log_z.tolist(), "stderr": se.tolist()}}
    if hasattr(model, "zeta"):
        result["learned_log_normalizers"] = model.zeta.detach().double().cpu().tolist()
    elif hasattr(model, "log_z"):
        result["learned_log_normalizers"] = [float(model.log_z.detach())]
    for split in ("valid", "test"):
        r = evaluate_split(model, text[split], vocab, cfg.data.max_length, dev)
        result[split] = {"learned_ppl": r["ppl"], **_perplexity_with_is(model, r, log_z, se)}
        if isinstance(model, ResidualELM):
            result[split]["base_ppl"] = evaluate_split(model.base, text[split], vocab, cfg.data.max_length, dev)["ppl"]
    result["time_s"] = time.perf_counter() - t0
    atomic_write_text(out, json.dumps(result, indent=2))
    finite = se[torch.isfinite(se)]
    worst = float(finite.max()) if finite.numel() else float("nan")
    t = result["test"]
    shown = (f"{t['ppl']:.2f} [{t['ppl_low']:.2f}, {t['ppl_high']:.2f}]" if t.get("ppl") is not None
             else t.get("note", "n/a"))
    log(f"[seqebm] {cfg.name}: test ppl {shown} with {num_samples} IS draws (learned normalisers: "
        f"{t['learned_ppl']:.2f}); largest standard error of a log normaliser {worst:.2f} -> {out}")
    return result


def register_elm_evaluate_command(subparsers) -> None:
    """``seqebm elm evaluate``."""

    def _cmd(args) -> int:
        reestimate_normalizers(args.run_dir, num_samples=args.is_samples, seed=args.seed, device=args.device,
                               out=args.out, progress=not args.no_progress)
        return 0

    e = subparsers.add_parser("evaluate", help="estimate a finished TRF / GN-ELM / residual run's normalisers "
                                               "again by importance sampling, with more draws")
    e.add_argument("run_dir")
    e.add_argument("--is-samples", type=int, default=40000, help="draws from the run's sentence LM (default 40000)")
    e.add_argument("--seed", type=int, help="default: train.seed + 17, the seed of the estimate made in training")
    e.add_argument("--device", default="auto")
    e.add_argument("--out", help="default: RUN/is-<n>-s<seed>.json")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd)
