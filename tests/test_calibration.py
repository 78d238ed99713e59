"""Calibration metrics: ECE (monograph §5.5, Eq. 5.19, top-label and class-wise), reliability
diagrams, temperature scaling and OOD AUROC.

Notation: N rows, K labels, B bins.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqebm.eval.calibration import (
    ECE_NUM_BINS, calibration_bins, expected_calibration_error, ood_auroc, reliability_diagram, temperature_scale,
)

# Hand example: N = 5, K = 3, B = 4 bins [0, .25), [.25, .5), [.5, .75), [.75, 1].
PROBS = torch.tensor([[0.6, 0.3, 0.1],   # y = 0
                      [0.8, 0.1, 0.1],   # y = 1
                      [0.2, 0.7, 0.1],   # y = 1
                      [0.1, 0.2, 0.7],   # y = 0
                      [0.4, 0.4, 0.2]], dtype=torch.float64)  # y = 2 (argmax tie 0/1 -> label 0)
LABELS = torch.tensor([0, 1, 1, 0, 2])


def test_top_label_ece_hand_computed_with_empty_bin() -> None:
    # conf = [.6, .8, .7, .7, .4], pred = [0, 0, 1, 2, 0], correct = [1, 0, 1, 0, 0].
    # bin 0: empty (contributes 0).
    # bin 1: {r4}: conf .4, acc 0 -> |0 - .4| * 1/5 = .08
    # bin 2: {r0, r2, r3}: conf (.6 + .7 + .7)/3 = 2/3, acc 2/3 -> 0
    # bin 3: {r1}: conf .8, acc 0 -> .8 * 1/5 = .16
    # ECE = .08 + 0 + .16 = .24
    assert expected_calibration_error(PROBS, LABELS, num_bins=4) == pytest.approx(0.24, abs=1e-12)
    bins = calibration_bins(PROBS, LABELS, num_bins=4)
    assert bins.counts.tolist() == [[0.0, 1.0, 3.0, 1.0]]
    assert math.isnan(bins.confidence[0, 0]) and math.isnan(bins.accuracy[0, 0])
    assert bins.accuracy[0, 2].item() == pytest.approx(2 / 3)


def test_classwise_ece_hand_computed_eq_5_19() -> None:
    # Eq. 5.19: (1/|Y|) Σ_y Σ_b |B_yb|/n |acc(B_yb) − conf(B_yb)|, n = 5.
    # y=0: p = [.6, .8, .2, .1, .4], is 0 = [1, 0, 0, 1, 0]
    #   bin0 {r2, r3}: conf .15, acc 1/2 -> .35 * 2/5 = .14;  bin1 {r4}: .4 vs 0 -> .4/5 = .08
    #   bin2 {r0}: .6 vs 1 -> .4/5 = .08;  bin3 {r1}: .8 vs 0 -> .8/5 = .16;  sum = .46
    # y=1: p = [.3, .1, .7, .2, .4], is 1 = [0, 1, 1, 0, 0]
    #   bin0 {r1, r3}: .15 vs 1/2 -> .14;  bin1 {r0, r4}: .35 vs 0 -> .35 * 2/5 = .14
    #   bin2 {r2}: .7 vs 1 -> .3/5 = .06;  bin3 empty;  sum = .34
    # y=2: p = [.1, .1, .1, .7, .2], is 2 = [0, 0, 0, 0, 1]
    #   bin0 {r0, r1, r2, r4}: conf .125, acc 1/4 -> .125 * 4/5 = .10;  bin2 {r3}: .7 vs 0 -> .14
    #   bins 1 and 3 empty;  sum = .24
    # ECE = (.46 + .34 + .24) / 3 = 1.04 / 3
    ece = expected_calibration_error(PROBS, LABELS, num_bins=4, mode="classwise")
    assert ece == pytest.approx(1.04 / 3, abs=1e-12)
    bins = calibration_bins(PROBS, LABELS, num_bins=4, mode="classwise")
    assert bins.counts.shape == (3, 4) and bins.counts.sum().item() == 15  # n x |Y| predictions
    assert bins.counts[2].tolist() == [4.0, 0.0, 1.0, 0.0]


def test_confidence_one_goes_to_last_bin_and_numpy_input() -> None:
    probs = [[1.0, 0.0], [0.0, 1.0]]
    bins = calibration_bins(probs, [0, 0], num_bins=ECE_NUM_BINS)
    assert bins.counts[0, -1].item() == 2
    assert expected_calibration_error(probs, [0, 0]) == pytest.approx(0.5)  # conf 1, acc 1/2


def _calibrated(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(2.0 * torch.randn(n, k, generator=g, dtype=torch.float64), dim=1)
    labels = torch.multinomial(probs, 1, generator=g).squeeze(1)  # y ~ p(.|x): calibrated by construction
    return probs, labels


def test_perfectly_calibrated_predictor_scores_near_zero() -> None:
    # For a calibrated predictor E[acc_b] = conf_b in every bin, so only sampling noise remains:
    # E|acc_b − conf_b| <= sqrt(1 / (4 n_b)), hence E[ECE] <= Σ_b (n_b/N) / (2 sqrt(n_b))
    # = Σ_b sqrt(n_b) / (2N) <= sqrt(B/N) / 2 (Cauchy–Schwarz) = 0.0158 for N = 20000, B = 20.
    n, k = 20000, 4
    probs, labels = _calibrated(n, k, 0)
    bound = math.sqrt(ECE_NUM_BINS / n) / 2
    assert expected_calibration_error(probs, labels) < 2 * bound
    # class-wise: the same bound holds for each label's binned predictions.
    assert expected_calibration_error(probs, labels, mode="classwise") < 2 * bound


def test_overconfident_predictor_scores_its_gap() -> None:
    # Always 0.9 on the top class (the rest spread evenly), right 60% of the time: every row is
    # in one bin with conf 0.9 and acc ~ 0.6, so ECE = |0.6 − 0.9| = 0.3 up to the binomial
    # noise of acc, sd sqrt(.24 / N) = 0.0035 for N = 20000; allow 5 sd.
    n, k = 20000, 10
    g = torch.Generator().manual_seed(1)
    top = torch.randint(k, (n,), generator=g)
    probs = torch.full((n, k), 0.1 / (k - 1), dtype=torch.float64)
    probs[torch.arange(n), top] = 0.9
    right = torch.rand(n, generator=g) < 0.6
    wrong = (top + torch.randint(1, k, (n,), generator=g)) % k  # any other label
    labels = torch.where(right, top, wrong)
    acc = right.double().mean().item()
    ece = expected_calibration_error(probs, labels)
    assert ece == pytest.approx(0.9 - acc, abs=1e-9)  # exact identity for this construction
    assert abs(ece - 0.3) < 5 * math.sqrt(0.24 / n)
    # and the calibrated-predictor threshold above rejects it
    assert ece > 2 * math.sqrt(ECE_NUM_BINS / n) / 2


def test_temperature_scaling_recovers_known_temperature() -> None:
    # True logits s with y ~ softmax(s); the model reports T0 · s, so T = T0 is the MLE's target.
    # Fisher information of τ = log T: I = Σ_i Var_{p_i}(s_i) (d log p(y)/dτ = −(s_y − E_p s));
    # sd(τ̂) ≈ 1/sqrt(I); allow 5 sd.
    n, k, t0 = 5000, 5, 2.5
    g = torch.Generator().manual_seed(2)
    s = 1.5 * torch.randn(n, k, generator=g, dtype=torch.float64)
    p = torch.softmax(s, 1)
    labels = torch.multinomial(p, 1, generator=g).squeeze(1)
    fisher = ((p * s ** 2).sum(1) - (p * s).sum(1) ** 2).sum().item()
    t = temperature_scale(t0 * s, labels)
    assert abs(math.log(t) - math.log(t0)) < 5 / math.sqrt(fisher)
    # float32 logits and another starting point give the same answer
    assert temperature_scale((t0 * s).float(), labels, init=0.5) == pytest.approx(t, rel=1e-3)


def test_auroc_matches_hand_values_and_ties() -> None:
    # in = [3, 2, 2], out = [2, 1]: pairs (3,2)=1 (3,1)=1 (2,2)=.5 (2,1)=1 (2,2)=.5 (2,1)=1 -> 5/6
    assert ood_auroc([3.0, 2.0, 2.0], [2.0, 1.0]) == pytest.approx(5 / 6)
    assert ood_auroc([1.0, 1.0], [1.0, 1.0, 1.0]) == pytest.approx(0.5)  # all tied
    assert ood_auroc(torch.tensor([5, 6]), torch.tensor([1, 2, 3])) == 1.0  # integer scores
    assert ood_auroc([0.0], [1.0]) == 0.0
    assert ood_auroc([float("inf")], [0.0]) == 1.0


def test_auroc_matches_sklearn() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    g = torch.Generator().manual_seed(3)
    scores_in = torch.randint(0, 20, (300,), generator=g).double()  # many ties
    scores_out = torch.randint(-5, 12, (200,), generator=g).double()
    y = [1] * 300 + [0] * 200
    expected = metrics.roc_auc_score(y, torch.cat([scores_in, scores_out]).numpy())
    assert ood_auroc(scores_in, scores_out) == pytest.approx(expected, abs=1e-12)
    cont_in, cont_out = torch.randn(400, generator=g) + 0.5, torch.randn(250, generator=g)
    expected = metrics.roc_auc_score([1] * 400 + [0] * 250, torch.cat([cont_in, cont_out]).numpy())
    assert ood_auroc(cont_in, cont_out) == pytest.approx(expected, abs=1e-12)


def test_reliability_diagram_writes_png(tmp_path) -> None:
    probs, labels = _calibrated(500, 3, 4)
    for mode in ("top", "classwise"):
        out = reliability_diagram(probs, labels, tmp_path / "sub" / f"{mode}.png", 10, mode=mode, title="toy")
        assert out.exists() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("probs, labels, kwargs, match", [
    (torch.ones(3), torch.zeros(3, dtype=torch.long), {}, "shape"),
    (torch.full((2, 2), 0.5), torch.zeros(3, dtype=torch.long), {}, "labels must have shape"),
    (torch.full((2, 2), 0.5), torch.tensor([0, 2]), {}, r"labels \[2\] lie outside"),
    (torch.full((2, 2), 0.5), torch.tensor([-1, 0]), {}, r"labels \[-1\]"),
    (torch.tensor([[2.0, -1.0]]), torch.tensor([0]), {}, "logits"),
    (torch.tensor([[0.5, 0.2]]), torch.tensor([0]), {}, "sum to 1"),
    (torch.tensor([[float("nan"), 0.5]]), torch.tensor([0]), {}, "finite"),
    (torch.full((2, 2), 0.5), torch.tensor([0, 1]), {"num_bins": 0}, "num_bins"),
    (torch.full((2, 2), 0.5), torch.tensor([0, 1]), {"mode": "marginal"}, "mode"),
    (torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), {}, "N, K >= 1"),
])
def test_ece_validation(probs: torch.Tensor, labels: torch.Tensor, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        expected_calibration_error(probs, labels, **kwargs)


def test_validation_type_errors() -> None:
    with pytest.raises(TypeError, match="labels must have an integer dtype"):
        expected_calibration_error(torch.full((2, 2), 0.5), torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="probs must be floating"):
        expected_calibration_error(torch.ones(2, 1, dtype=torch.long), torch.tensor([0, 0]))
    with pytest.raises(TypeError, match="scores_in"):
        ood_auroc(object(), [1.0])


def test_temperature_and_auroc_validation() -> None:
    z, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    with pytest.raises(ValueError, match="labels_valid has labels outside"):
        temperature_scale(z, torch.tensor([0, 1, 3, 0]))
    with pytest.raises(ValueError, match="labels_valid must have shape"):
        temperature_scale(z, y[:3])
    with pytest.raises(ValueError, match="finite"):
        temperature_scale(torch.full((2, 3), float("inf")), y[:2])
    with pytest.raises(ValueError, match="init"):
        temperature_scale(z, y, init=0.0)
    with pytest.raises(ValueError, match="scores_out must be a non-empty 1-D"):
        ood_auroc([1.0], [])
    with pytest.raises(ValueError, match="scores_in must be a non-empty 1-D"):
        ood_auroc([[1.0]], [1.0])
    with pytest.raises(ValueError, match="NaN"):
        ood_auroc([float("nan")], [1.0])
