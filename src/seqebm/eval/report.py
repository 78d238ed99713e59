"""Markdown report of a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from seqebm.config import to_dict
from seqebm.io import atomic_write_text


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_report(run_dir: str | Path, cfg: Any, results: dict[str, Any], *, title: str | None = None) -> Path:
    """``report.md``: summary, metrics per split, samples, curves and the config."""
    run_dir = Path(run_dir)
    lines = [f"# {title or results.get('name', 'seqebm run')}", ""]
    lines += [f"- task: {results.get('task')}", f"- parameters: {results.get('params', 0) / 1e6:.2f}M",
              f"- steps: {results.get('steps')}, tokens seen: {results.get('tokens_seen')}",
              f"- training time: {results.get('train_time_s', 0):.0f} s, wall time: {results.get('wall_time_s', 0):.0f} s",
              ""]
    splits = [s for s in ("valid", "test") if isinstance(results.get(s), dict)]
    if splits:
        keys = sorted({k for s in splits for k in results[s]})
        lines += ["| metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
        lines += [f"| {k} | " + " | ".join(_fmt(results[s].get(k, "")) for s in splits) + " |" for k in keys]
        lines.append("")
    if results.get("samples"):
        lines += ["## Samples", ""]
        for i, s in enumerate(results["samples"], 1):
            lines += [f"{i}.", "```", s, "```"]
        lines.append("")
    if (run_dir / "curves.png").exists():
        lines += ["## Curves", "", "![curves](curves.png)", ""]
    lines += ["## Config", "", "```yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip(), "```", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path
