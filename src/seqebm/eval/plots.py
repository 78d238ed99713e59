"""Loss curves from a run's ``metrics.jsonl``."""

from __future__ import annotations

import json
from pathlib import Path


def plot_curves(metrics_path: str | Path, out_path: str | Path, *, keys: tuple[str, ...] = ("loss",)) -> Path:
    """Train and validation curves of ``keys`` against the step, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in Path(metrics_path).read_text().splitlines() if line.strip()]
    keys = tuple(k for k in keys if any(k in r for r in records)) or keys[:1]  # skip metrics this run lacks
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for split, style in (("train", "-"), ("valid", "o-")):
            pts = [(r["step"], r[key]) for r in records if r.get("split") == split and key in r]
            if pts:
                ax.plot(*zip(*pts), style, label=split, markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
