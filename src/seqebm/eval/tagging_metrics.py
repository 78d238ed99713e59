"""Metrics of sequence labelling: token accuracy, BIO span F1 (seqeval), confusion matrices and plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["is_bio_tagset", "tagging_metrics", "confusion_matrix", "plot_confusion"]


def is_bio_tagset(tags: Sequence[str]) -> bool:
    """True when every tag is ``O`` or ``B-X``/``I-X`` (and at least one is B-/I-)."""
    tags = list(tags)
    return (all(t == "O" or t[:2] in ("B-", "I-") for t in tags)
            and any(t[:2] in ("B-", "I-") for t in tags))


def tagging_metrics(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]], *,
                    bio: bool = False) -> dict[str, float]:
    """``accuracy`` over tokens and ``sentence_accuracy``; with ``bio=True`` also span precision,
    recall and F1 from ``seqeval`` (CoNLL-2000 style: a span counts only with exact boundaries and type).
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold sentences but {len(pred)} predicted ones")
    correct = total = whole = 0
    for i, (g, p) in enumerate(zip(gold, pred)):
        if len(g) != len(p):
            raise ValueError(f"sentence {i}: {len(g)} gold tags but {len(p)} predicted")
        hits = sum(a == b for a, b in zip(g, p))
        correct, total, whole = correct + hits, total + len(g), whole + (hits == len(g))
    out = {"accuracy": correct / max(total, 1), "sentence_accuracy": whole / max(len(gold), 1),
           "tokens": float(total)}
    if bio:
        try:
            from seqeval.metrics import f1_score, precision_score, recall_score
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("span F1 needs seqeval: pip install seqeval (or pip install 'seqebm[metrics]')") from e
        g, p = [list(s) for s in gold], [list(s) for s in pred]
        out.update(span_precision=float(precision_score(g, p)), span_recall=float(recall_score(g, p)),
                   span_f1=float(f1_score(g, p)))
    return out


def confusion_matrix(gold: Sequence[Sequence[str]], pred: Sequence[Sequence[str]],
                     labels: Sequence[str]) -> torch.Tensor:
    """Counts (K, K): row = gold tag, column = predicted tag, in the order of ``labels``."""
    index = {t: i for i, t in enumerate(labels)}
    m = torch.zeros(len(labels), len(labels), dtype=torch.long)
    for g, p in zip(gold, pred):
        for a, b in zip(g, p):
            m[index[a], index[b]] += 1
    return m


def plot_confusion(matrix: torch.Tensor, labels: Sequence[str], path: str | Path, *, top: int = 25,
                   title: str = "confusion (row-normalised)") -> Path:
    """Heat map of the row-normalised confusion of the ``top`` most frequent gold tags; returns ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    freq = matrix.sum(1)
    keep = freq.argsort(descending=True)[: min(top, len(labels))].sort().values
    sub = matrix[keep][:, keep].double()
    sub = sub / sub.sum(1, keepdim=True).clamp_min(1)
    names = [labels[i] for i in keep.tolist()]
    size = max(4.0, 0.32 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(sub.numpy(), cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def summarize_errors(matrix: torch.Tensor, labels: Sequence[str], k: int = 10) -> list[dict[str, Any]]:
    """The ``k`` largest off-diagonal confusions as ``{"gold", "pred", "count"}``, largest first."""
    off = matrix.clone()
    off.fill_diagonal_(0)
    vals, idx = off.flatten().topk(min(k, off.numel()))
    K = len(labels)
    return [{"gold": labels[i // K], "pred": labels[i % K], "count": int(v)}
            for v, i in zip(vals.tolist(), idx.tolist()) if v > 0]
