"""Calibration and out-of-distribution metrics for classifiers: ECE, reliability diagrams,
temperature scaling and AUROC.

Notation: N test rows, K labels, probs (N, K) predicted p(y|x) (rows sum to 1), labels (N,) in
[0, K), B confidence bins, bin b = [b/B, (b+1)/B) (the last bin also holds confidence 1), G
groups of predictions (G = 1 for the top label, G = K for the class-wise ECE).

Expected calibration error, monograph "Energy-based models for speech and language", §5.5
("Evaluation of the Calibration performance"), Eq. 5.19 with B = 20 (bin width 0.05):

    ECE = (1/|Y|) Σ_{y=1}^{|Y|} Σ_{b=1}^{B} (|B_yb| / n) · |acc(B_yb) − conf(B_yb)|,

where B_yb holds the test rows x whose confidence p_θ(y|x) for label y falls in bin b,
acc(B_yb) is the fraction of them whose true label is y and conf(B_yb) their mean p_θ(y|x).
Every row contributes one prediction per label (n × |Y| predictions): this is
``mode="classwise"``. ``mode="top"`` is the common top-label ECE (Guo et al. 2017), one
prediction per row: the confidence is max_y p(y|x), correct when the argmax is the true label,
ECE = Σ_b (|B_b|/n) |acc(B_b) − conf(B_b)|. Empty bins contribute 0 (their weight is 0).

Also: :func:`reliability_diagram` (a PNG via matplotlib's Agg backend), :func:`temperature_scale`
(one temperature T fitted by minimising the NLL of softmax(logits / T) on validation data,
LBFGS on log T) and :func:`ood_auroc` (area under the ROC curve for telling in-distribution
rows from out-of-distribution ones by a score, via the Mann–Whitney rank statistic with
mid-ranks for ties).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ECE_NUM_BINS", "ReliabilityBins", "calibration_bins", "expected_calibration_error", "ood_auroc",
    "reliability_diagram", "temperature_scale",
]

#: B = 20 bins of width 0.05, following the monograph (§5.5, Eq. 5.19).
ECE_NUM_BINS: int = 20
_MODES = ("top", "classwise")
_SUM_TOL = 1e-3


def _as_tensor(name: str, value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a Tensor or an array-like of numbers, got {type(value).__name__}") from err


def _check_probs_labels(probs: Any, labels: Any) -> tuple[Tensor, Tensor]:
    """probs as float64 (N, K) in [0, 1] with rows summing to 1; labels as int64 (N,) in [0, K)."""
    p = _as_tensor("probs", probs)
    y = _as_tensor("labels", labels)
    if not (p.is_floating_point()):
        raise TypeError(f"probs must be floating point, got {p.dtype}")
    if p.dim() != 2 or p.shape[0] < 1 or p.shape[1] < 1:
        raise ValueError(f"probs must have shape (N, K) with N, K >= 1, got {tuple(p.shape)}")
    p = p.to(torch.float64)
    if not torch.isfinite(p).all() or p.min() < 0 or p.max() > 1:
        raise ValueError(f"probs must be finite probabilities in [0, 1], got range "
                         f"[{float(p.min())}, {float(p.max())}] (did you pass logits? apply softmax first)")
    worst = float((p.sum(1) - 1).abs().max())
    if worst > _SUM_TOL:
        raise ValueError(f"each row of probs must sum to 1 (within {_SUM_TOL}); the worst row is off by {worst:.3g}")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"labels must have an integer dtype, got {y.dtype}")
    if tuple(y.shape) != (p.shape[0],):
        raise ValueError(f"labels must have shape ({p.shape[0]},) to match probs {tuple(p.shape)}, got {tuple(y.shape)}")
    y = y.to(torch.long)
    k = p.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= k:
        bad = sorted({int(v) for v in y[(y < 0) | (y >= k)].tolist()})[:5]
        raise ValueError(f"labels {bad} lie outside the label set [0, {k})")
    return p, y


def _check_bins(num_bins: object) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise ValueError(f"num_bins must be an int >= 1, got {num_bins!r}")
    return num_bins


@dataclass
class ReliabilityBins:
    """Per-bin statistics of G groups of predictions (G = 1 top-label, G = K class-wise).

    Attributes:
        counts: float64 (G, B), |B_gb| (number of predictions in the bin).
        confidence: float64 (G, B), conf(B_gb), the mean confidence (NaN for empty bins).
        accuracy: float64 (G, B), acc(B_gb), the fraction of correct predictions (NaN for empty bins).
        n: number of test rows N.
        mode: ``"top"`` or ``"classwise"``.
    """

    counts: Tensor
    confidence: Tensor
    accuracy: Tensor
    n: int
    mode: str

    @property
    def edges(self) -> Tensor:
        """Bin edges, float64 (B + 1,): 0, 1/B, ..., 1."""
        return torch.linspace(0.0, 1.0, self.counts.shape[1] + 1, dtype=torch.float64)

    def ece(self) -> float:
        """(1/G) Σ_g Σ_b (|B_gb| / N) |acc(B_gb) − conf(B_gb)| (Eq. 5.19; empty bins add 0)."""
        gap = (self.accuracy - self.confidence).abs().nan_to_num(0.0)
        return float((self.counts / self.n * gap).sum(1).mean())

    def pooled(self) -> tuple[Tensor, Tensor, Tensor]:
        """(counts, confidence, accuracy), each (B,), pooled over the G groups (count-weighted)."""
        counts = self.counts.sum(0)
        safe = counts.clamp_min(1)
        conf = (self.confidence.nan_to_num(0.0) * self.counts).sum(0) / safe
        acc = (self.accuracy.nan_to_num(0.0) * self.counts).sum(0) / safe
        empty = counts == 0
        return counts, conf.masked_fill(empty, float("nan")), acc.masked_fill(empty, float("nan"))


def calibration_bins(probs: Any, labels: Any, *, num_bins: int = ECE_NUM_BINS, mode: str = "top") -> ReliabilityBins:
    """Bin predictions by confidence: bin b = [b/B, (b+1)/B), confidence 1 in the last bin.

    Args:
        probs: (N, K) predicted probabilities (Tensor or array-like), rows summing to 1.
        labels: (N,) integer labels in [0, K).
        num_bins: B >= 1 (20 in the monograph).
        mode: ``"top"`` (max-probability prediction per row) or ``"classwise"`` (every label's
            probability is a prediction, grouped by label; Eq. 5.19).

    Returns:
        :class:`ReliabilityBins`.

    Raises:
        ValueError / TypeError: on malformed probs, labels, num_bins or mode.
    """
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    b = _check_bins(num_bins)
    p, y = _check_probs_labels(probs, labels)
    n, k = p.shape
    if mode == "top":
        conf, pred = p.max(1)  # (N,), ties go to the lowest label
        conf, correct = conf[None], (pred == y).to(torch.float64)[None]  # (1, N)
    else:
        conf = p.t()  # (K, N): p(y|x_i) for label y
        correct = (y[None, :] == torch.arange(k)[:, None]).to(torch.float64)  # (K, N): x_i has label y
    g = conf.shape[0]
    bins = (conf * b).floor().clamp(0, b - 1).long()  # (G, N)
    flat = bins + b * torch.arange(g)[:, None]  # (G, N) distinct bins per group
    counts = torch.bincount(flat.flatten(), minlength=g * b).to(torch.float64).view(g, b)
    conf_sum = torch.bincount(flat.flatten(), weights=conf.flatten(), minlength=g * b).view(g, b)
    acc_sum = torch.bincount(flat.flatten(), weights=correct.flatten(), minlength=g * b).view(g, b)
    empty = counts == 0
    safe = counts.clamp_min(1)
    return ReliabilityBins(counts=counts, confidence=(conf_sum / safe).masked_fill(empty, float("nan")),
                           accuracy=(acc_sum / safe).masked_fill(empty, float("nan")), n=n, mode=mode)


def expected_calibration_error(probs: Any, labels: Any, *, num_bins: int = ECE_NUM_BINS, mode: str = "top") -> float:
    """Expected calibration error (monograph §5.5, Eq. 5.19; B = 20 by default).

    ``mode="classwise"`` is Eq. 5.19 as written, averaging over labels y the binned gaps of the
    predictions p(y|x) for "x has label y"; ``mode="top"`` is the usual top-label ECE. See the
    module docstring for both formulas. Empty bins contribute 0.

    Args:
        probs: (N, K) predicted probabilities, rows summing to 1 (within 1e-3).
        labels: (N,) integer labels in [0, K).
        num_bins: B >= 1.
        mode: ``"top"`` or ``"classwise"``.

    Returns:
        The ECE in [0, 1] as a float.

    Raises:
        ValueError: wrong shapes, probabilities outside [0, 1] or rows not summing to 1, labels
            outside [0, K), num_bins < 1, unknown mode.
        TypeError: non-numeric inputs, integer probs or non-integer labels.
    """
    return calibration_bins(probs, labels, num_bins=num_bins, mode=mode).ece()


def reliability_diagram(probs: Any, labels: Any, path: str | Path, num_bins: int = ECE_NUM_BINS, *,
                        mode: str = "top", title: str | None = None) -> Path:
    """Write a reliability diagram (accuracy vs confidence per bin, with the gap to the diagonal)
    and a histogram of confidences as a PNG (matplotlib, Agg backend).

    In ``"classwise"`` mode the bins are pooled over labels for the plot (count-weighted); the
    ECE in the title is Eq. 5.19 in that mode.

    Args:
        probs, labels, num_bins, mode: as in :func:`expected_calibration_error`.
        path: the output PNG; parent folders are created.
        title: optional plot title prefix.

    Returns:
        The path written.
    """
    stats = calibration_bins(probs, labels, num_bins=num_bins, mode=mode)
    counts, conf, acc = stats.pooled()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = stats.edges.numpy()
    width = 1.0 / num_bins
    centres = edges[:-1] + width / 2
    filled = (counts > 0).numpy()
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(4.5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.bar(centres[filled], acc.numpy()[filled], width=width, edgecolor="black", color="tab:blue", label="accuracy")
    gap_lo = torch.minimum(acc, conf).numpy()[filled]
    gap_hi = torch.maximum(acc, conf).numpy()[filled]
    ax.bar(centres[filled], gap_hi - gap_lo, bottom=gap_lo, width=width, color="tab:red", alpha=0.35,
           edgecolor="tab:red", hatch="//", label="gap")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    label = "top-label" if mode == "top" else "class-wise"
    ax.set_title(f"{title + ': ' if title else ''}{label} ECE = {stats.ece():.4f} (B = {num_bins})", fontsize=9)
    hist.bar(centres, (counts / counts.sum()).numpy(), width=width, edgecolor="black", color="tab:gray")
    hist.set_xlabel("confidence")
    hist.set_ylabel("fraction")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def temperature_scale(logits_valid: Any, labels_valid: Any, *, max_iter: int = 100, init: float = 1.0) -> float:
    """Fit one temperature T > 0 minimising the NLL of softmax(logits / T) (Guo et al. 2017).

    Optimises log T (so T stays positive) with LBFGS (strong-Wolfe line search) in float64 on
    the validation set; calibrated probabilities are then ``softmax(logits_test / T)``.

    Args:
        logits_valid: (N, K) finite logits.
        labels_valid: (N,) integer labels in [0, K).
        max_iter: LBFGS iterations (>= 1).
        init: starting temperature (> 0).

    Returns:
        T as a float.

    Raises:
        ValueError / TypeError: malformed logits or labels, max_iter < 1, init <= 0.
    """
    z = _as_tensor("logits_valid", logits_valid)
    y = _as_tensor("labels_valid", labels_valid)
    if not z.is_floating_point():
        raise TypeError(f"logits_valid must be floating point, got {z.dtype}")
    if z.dim() != 2 or z.shape[0] < 1 or z.shape[1] < 2:
        raise ValueError(f"logits_valid must have shape (N, K) with N >= 1, K >= 2, got {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise ValueError("logits_valid must be finite")
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise TypeError(f"labels_valid must have an integer dtype, got {y.dtype}")
    if tuple(y.shape) != (z.shape[0],):
        raise ValueError(f"labels_valid must have shape ({z.shape[0]},) to match logits_valid, got {tuple(y.shape)}")
    k = z.shape[1]
    if int(y.min()) < 0 or int(y.max()) >= k:
        raise ValueError(f"labels_valid has labels outside [0, {k}): range [{int(y.min())}, {int(y.max())}]")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not (isinstance(init, (int, float)) and not isinstance(init, bool) and init > 0):
        raise ValueError(f"init must be a temperature > 0, got {init!r}")
    z, y = z.to(torch.float64), y.to(torch.long)
    log_t = torch.tensor(float(init), dtype=torch.float64).log().requires_grad_(True)
    opt = torch.optim.LBFGS([log_t], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp(), y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return float(log_t.detach().exp())


def _average_ranks(values: Tensor) -> Tensor:
    """1-based ranks of a 1-D float64 tensor, tied values sharing their mean rank (mid-ranks)."""
    sorted_vals, order = values.sort(stable=True)
    _, inverse, counts = torch.unique_consecutive(sorted_vals, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)  # last 1-based rank of each tie group
    mid = ends - (counts.to(torch.float64) - 1) / 2  # mean of ranks end-count+1 .. end
    ranks = torch.empty_like(values)
    ranks[order] = mid[inverse]
    return ranks


def ood_auroc(scores_in: Any, scores_out: Any) -> float:
    """AUROC of a score that is higher for in-distribution rows: P(s_in > s_out) + ½ P(s_in = s_out).

    Computed exactly from the Mann–Whitney statistic with mid-ranks (ties count ½):
    AUROC = (R_in − n_in (n_in + 1) / 2) / (n_in · n_out), R_in the rank sum of the in-distribution
    scores in the pooled sample. Equals ``sklearn.metrics.roc_auc_score`` with label 1 for
    in-distribution rows. For a JEM, natural scores are U_θ(x) = log Σ_y exp logit_y(x) or
    max_y p_θ(y|x).

    Args:
        scores_in: 1-D scores of in-distribution rows (n_in >= 1).
        scores_out: 1-D scores of out-of-distribution rows (n_out >= 1).

    Returns:
        AUROC in [0, 1] (0.5 = chance, 1 = every in-distribution score above every OOD one).

    Raises:
        ValueError: not 1-D, empty, or containing NaN.
        TypeError: non-numeric input.
    """
    s = []
    for name, value in (("scores_in", scores_in), ("scores_out", scores_out)):
        t = _as_tensor(name, value)
        if t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must be real numbers, got {t.dtype}")
        if t.dim() != 1 or t.numel() == 0:
            raise ValueError(f"{name} must be a non-empty 1-D array, got shape {tuple(t.shape)}")
        t = t.to(torch.float64)
        if torch.isnan(t).any():
            raise ValueError(f"{name} contains NaN")
        s.append(t)
    n_in, n_out = s[0].numel(), s[1].numel()
    ranks = _average_ranks(torch.cat(s))
    r_in = float(ranks[:n_in].sum())
    return (r_in - n_in * (n_in + 1) / 2) / (n_in * n_out)
