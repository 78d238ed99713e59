"""The residual-EBM comparison table: continuation perplexity of autoregressive baselines and the
joint models' perplexity bounds, all on the *same* (prefix, continuation) windows.

Residual-EBM seed §4.1 compares the base LM, RALM (a second AR model added in log space) and BALM
(one bigger AR model) with the joint models' perplexity bounds. Their test perplexities are only
comparable on the same tokens with the same conditioning, so :func:`window_perplexity` scores
every AR run (base LM, RALM, BALM, ...) on the continuation tokens of a residual run's windows
given their prefixes, and lists each residual run's bounds from its ``results.json`` (same
windows: same base LM, window sizes and ``max_eval_rows``, which is checked).

    seqebm analyze window-ppl --run runs/res-unit --joint runs/res-bit runs/res-bit-star \\
        --lm runs/ralm runs/balm --out runs/analysis
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.eval.analysis import _add_output_args, _check_output_free, _emit
from seqebm.eval.run_tables import Analysis, _document, markdown_table

__all__ = ["continuation_nll", "window_perplexity", "register_window_ppl_command"]


@torch.no_grad()
def continuation_nll(model: nn.Module, rows: Tensor, prefix_len: int, *, batch_size: int = 32) -> Tensor:
    """Summed NLL (N,) of the last ``rows.shape[1] - prefix_len`` tokens of each row given the tokens before.

    ``rows`` (N, T) start with BOS; ``prefix_len`` counts BOS. ``model(tokens)`` returns logits (B, T, V).
    """
    if not 1 <= prefix_len < rows.shape[1]:
        raise ValueError(f"prefix_len must be in 1..{rows.shape[1] - 1}, got {prefix_len}")
    out = []
    for i in range(0, rows.shape[0], batch_size):
        r = rows[i:i + batch_size]
        logp = model(r[:, :-1]).float().log_softmax(-1)
        tok = logp.gather(2, r[:, 1:].unsqueeze(-1)).squeeze(-1)  # (B, T-1): log p(r[t+1] | r[:t+1])
        out.append(-tok[:, prefix_len - 1:].sum(1))
    return torch.cat(out)


def _tokenizer_file(run: Path) -> bytes:
    path = run / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run} has no tokenizer/tokenizer.json")
    return path.read_bytes()


def window_perplexity(run: str | Path, *, lms: Sequence[str | Path] = (), joint: Sequence[str | Path] = (),
                      split: str = "test", max_rows: int | None = None, device: str = "auto",
                      decimals: int = 2, name: str = "window_ppl") -> Analysis:
    """Continuation perplexity of the base LM and of every run in ``lms`` on the windows of the residual
    run ``run``, and the joint perplexity bounds of ``run`` and of every residual run in ``joint``."""
    from seqebm.cli import _load_run
    from seqebm.eval.residual_analysis import _Residual

    res = _Residual(run, split=split, max_rows=max_rows, device=device)
    rows, p = res.rows, res.prefix_len
    tokens = rows.shape[0] * res.cont_len
    entries: list[dict[str, Any]] = []

    def add_lm(label: str, model: nn.Module, where: str) -> None:
        nll = continuation_nll(model, rows, p)
        entries.append({"system": label, "kind": "autoregressive", "run": where,
                        "params": sum(t.numel() for t in model.parameters()),
                        "ppl": math.exp(float(nll.sum()) / tokens)})

    add_lm("base LM", res.task.lm.to(res.device), "model.base_run of " + str(res.path))
    tok = _tokenizer_file(_base_run(res.path))
    for r in lms:
        r = Path(r)
        if _tokenizer_file(r) != tok:
            raise ValueError(f"{r} uses a different tokenizer than the base LM: perplexities per token would not "
                             "be comparable (train it with the same data.tokenizer/vocab_size on the same corpus)")
        _, _, model, _ = _load_run(r, str(res.device))
        add_lm(r.name, model, str(r))
    ref = _window_key(res.path)
    for r in [res.path, *map(Path, joint)]:
        key = _window_key(r)
        if key != ref:
            raise ValueError(f"{r} evaluates other windows than {res.path} ({key} vs {ref})")
        results = json.loads((r / "results.json").read_text())
        t = results.get(split) if split == "test" else None
        if not t or "joint_ppl_lower" not in t:
            raise ValueError(f"{r}/results.json has no joint perplexity bounds for split {split!r}")
        cfg_rows = key["max_eval_rows"]
        if max_rows is not None and cfg_rows is not None and max_rows != cfg_rows:
            raise ValueError(f"--max-rows {max_rows} differs from the {cfg_rows} windows the bounds in "
                             f"{r}/results.json were computed on")
        entries.append({"system": f"joint ({results.get('energy', _energy_name(r))})", "kind": "residual EBM",
                        "run": str(r), "params": results.get("params"),
                        "ppl_lower": t["joint_ppl_lower"], "ppl_upper": t["joint_ppl_upper"],
                        "lm_ppl_check": t.get("lm_ppl"), "bound_samples": t.get("bound_samples")})
    d = decimals
    table_rows = []
    for e in entries:
        ppl = f"{e['ppl']:.{d}f}" if "ppl" in e else f"[{e['ppl_lower']:.{d}f}, {e['ppl_upper']:.{d}f}]"
        params = f"{e['params'] / 1e6:.2f}M" if e.get("params") else "?"
        table_rows.append([e["system"], e["kind"], params, ppl])
    intro = (f"Continuation perplexity on {rows.shape[0]} {split} windows of {res.task.prefix_len} prefix + "
             f"{res.cont_len} continuation tokens ({tokens} scored tokens); joint models: Nowozin lower/upper "
             "bounds from their results.json (residual-EBM seed Thm. 2).")
    first_joint = next(e for e in entries if e["kind"] == "residual EBM")
    notes = [f"consistency check: the base LM's perplexity here is {entries[0]['ppl']:.{d}f}; {res.path.name}'s "
             f"results.json reports {first_joint['lm_ppl_check']:.{d}f} on the same windows."]
    data = {"split": split, "windows": int(rows.shape[0]), "prefix_len": res.task.prefix_len,
            "cont_len": res.cont_len, "entries": entries}
    md = _document("Residual EBM vs autoregressive baselines", intro,
                   markdown_table(["system", "kind", "parameters", "perplexity"], table_rows), notes)
    return Analysis(name, md, data)


def _base_run(run: Path) -> Path:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    return Path(cfg["model"]["base_run"])


def _energy_name(run: Path) -> str:
    import yaml

    return {"unit": "UniT", "bit": "BiT", "hf": "BiT*"}.get(
        yaml.safe_load((run / "config.yaml").read_text())["model"].get("energy"), "?")


def _window_key(run: Path) -> dict[str, Any]:
    import yaml

    cfg = yaml.safe_load((run / "config.yaml").read_text())
    r = cfg["data"]["residual"]
    return {"base_run": str(Path(cfg["model"]["base_run"]).resolve()), "corpus": cfg["data"]["corpus"],
            "prefix_len": r["prefix_len"], "cont_len": r["cont_len"], "max_eval_rows": r["max_eval_rows"],
            "seed": cfg["data"].get("seed")}


def _cmd_window_ppl(args: argparse.Namespace) -> int:
    _check_output_free(args)
    return _emit(window_perplexity(args.run, lms=args.lm or [], joint=args.joint or [], split=args.split,
                                   max_rows=args.max_rows, device=args.device, decimals=args.decimals,
                                   name=args.name), args)


def register_window_ppl_command(subparsers: Any) -> None:
    w = subparsers.add_parser("window-ppl", help="residual EBM: base LM, RALM/BALM perplexities and joint bounds "
                                                 "on the same windows (seed §4.1 table)")
    w.add_argument("--run", required=True, help="a residual-EBM run folder (its windows and bounds)")
    w.add_argument("--joint", nargs="+", default=None, help="more residual runs on the same windows (BiT, BiT*)")
    w.add_argument("--lm", nargs="+", default=None, help="autoregressive run folders (RALM, BALM) to score")
    w.add_argument("--split", default="test", choices=["test"])
    w.add_argument("--max-rows", type=int, default=None)
    w.add_argument("--device", default="auto")
    _add_output_args(w, "window_ppl")
    w.set_defaults(func=_cmd_window_ppl)
