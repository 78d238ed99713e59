"""Nowozin's lower/upper log Z estimates (residual-EBM seed Thm. 2) against exact expectations.

On a two-state space the n weights are determined by k, the number of draws of state A, with
k ~ Binomial(n, q_A); so E[T_n] and E[U_n] are finite sums over k = 0..n: exact oracles with no
Monte Carlo error.
"""

from __future__ import annotations

import math

import pytest
import torch

from seqebm.estimators import exact_log_partition, log_partition_bounds
from seqebm.estimators.nowozin import leave_one_out_logsumexp


def test_leave_one_out_matches_the_quadratic_definition_with_extreme_values():
    lw = torch.tensor([[1e4, 0.0, -1e4, float("-inf"), 3.0], [0.5, 0.5, 0.5, 0.5, 0.5],
                       [-700.0, -700.0, 50.0, 49.0, -1.0]], dtype=torch.float64)
    got = leave_one_out_logsumexp(lw)
    n = lw.shape[1]
    want = torch.stack([torch.logsumexp(lw[:, [i for i in range(n) if i != j]], 1) for j in range(n)], 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def _two_state_expectations(log_w_a: float, log_w_b: float, q_a: float, n: int) -> tuple[float, float, float]:
    """Exact E[T_n], E[U_n], E[jackknife] by summing over k = #draws of state A.

    Terms with Binomial probability below 1e-18 are dropped (their total is far below the
    tolerances used), which keeps the (k, n) table small for large n.
    """
    k_all = torch.arange(n + 1)
    pmf = torch.distributions.Binomial(n, torch.tensor(q_a, dtype=torch.float64)).log_prob(k_all.double()).exp()
    k = k_all[pmf > 1e-18]
    rows = torch.where(torch.arange(n)[None, :] < k[:, None], log_w_a, log_w_b).double()  # (K, n)
    est = log_partition_bounds(rows)
    w = pmf[k]
    return float(w @ est.lower), float(w @ est.upper), float(w @ est.jackknife)


@pytest.mark.parametrize("n", [3, 10, 100, 1000])
def test_bracket_with_light_tailed_weights(n):
    """p = (0.6, 0.4) and q = (0.5, 0.5): weights 1.2 and 0.8, Z = 1; E[T_n] < 0 < E[U_n] for every n here."""
    lo, up, jk = _two_state_expectations(math.log(1.2), math.log(0.8), 0.5, n)
    assert lo < 0 < up
    assert abs(jk) < min(abs(lo), abs(up))  # the jackknife is closer than either side


def test_gaps_shrink_like_one_over_n():
    gaps = {n: _two_state_expectations(math.log(1.2), math.log(0.8), 0.5, n)[:2] for n in (100, 400)}
    for side in (0, 1):
        ratio = gaps[100][side] / gaps[400][side]
        assert 3.5 < ratio < 4.5  # the leading term is ±Var(w)/(2 n μ²): a 4x larger n, a 4x smaller gap
    # and the leading term matches the delta method: Var(w)/(2nμ²) with Var(w) = 0.04, μ = 1
    assert gaps[400][0] == pytest.approx(-0.04 / 800, rel=0.05)
    assert gaps[400][1] == pytest.approx(+0.04 / 800, rel=0.05)


def test_upper_estimate_can_fall_below_log_z_with_heavy_tails_at_small_n():
    """p = (0.9, 0.1), q = (0.001, 0.999): w_A = 900 is rare. U_n is not an upper bound at n = 5,
    but it is once n is large; T_n is a lower bound throughout (Jensen)."""
    args = (math.log(900.0), math.log(0.1 / 0.999), 0.001)
    lo_small, up_small, _ = _two_state_expectations(*args, n=5)
    assert lo_small < 0 and up_small < 0
    lo_big, up_big, _ = _two_state_expectations(*args, n=20_000)
    assert lo_big < 0 < up_big


def test_monte_carlo_bracket_on_an_enumerable_sequence_ebm():
    """R = 3000 independent estimates with n = 64 uniform-proposal draws on V = 3, T = 3."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(3, 3, generator=g, dtype=torch.float64)

    def energy(x):
        return -table[x[:, :-1], x[:, 1:]].sum(1)

    log_z = exact_log_partition(energy, 3, 3)
    r, n = 3000, 64
    x = torch.randint(3, (r * n, 3), generator=g)
    log_w = (-energy(x) + 3 * math.log(3)).view(r, n)  # log p̃(x) − log q(x), q uniform
    est = log_partition_bounds(log_w)
    se_lo = float(est.lower.std() / math.sqrt(r))
    se_up = float(est.upper.std() / math.sqrt(r))
    assert float(est.lower.mean()) < log_z - 3 * se_lo
    assert float(est.upper.mean()) > log_z + 3 * se_up
    assert abs(float(est.jackknife.mean()) - log_z) < 4 * se_up


def test_validation():
    with pytest.raises(ValueError, match="n >= 2"):
        log_partition_bounds(torch.zeros(3, 1))
    with pytest.raises(ValueError, match="NaN"):
        log_partition_bounds(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="zero"):
        log_partition_bounds(torch.full((2, 3), float("-inf")))
    est = log_partition_bounds(torch.zeros(4, 5, 7))
    assert est.lower.shape == (4, 5) and est.n == 7
    torch.testing.assert_close(est.upper, torch.zeros(4, 5, dtype=torch.float64))  # equal weights: exact
