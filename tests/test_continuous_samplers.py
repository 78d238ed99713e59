"""Gradient-guided continuous samplers (ULA, MALA, SGLD, HMC) checked against exact moments.

Notation: C chains, D = 2 dimensions, n = C independent final states.

Target: the 2-D Gaussian mixture p(x) = Σ_k w_k N(x; μ_k, s² I) with w = (0.3, 0.7),
μ_1 = (-1.5, 0), μ_2 = (1.5, 0), s = 0.8 (bimodal, yet chains cross between the modes).
Exact moments:
    mean  m = Σ_k w_k μ_k = (0.6, 0)
    cov   Σ = s² I + Σ_k w_k μ_k μ_kᵀ - m mᵀ = [[s² + 2.25 - 0.36, 0], [0, s²]] = [[2.53, 0], [0, 0.64]]
Every chain starts from an overdispersed N(0, 2² I) draw and only its final state is used, so the
n = C final states are i.i.d. (chains are independent) and, once converged, exact draws. Standard
errors are then exact: SE(mean_i) = sqrt(Σ_ii / n) and SE(cov_ij) = sqrt(Var[(x_i - m_i)(x_j - m_j)] / n),
with the fourth moments of the mixture computed per component: for y = x - m in component k,
y ~ N(d_k, s² I), d_k = μ_k - m, so E[y_i⁴] = d⁴ + 6 d² s² + 3 s⁴ and, for i ≠ j,
E[y_i² y_j²] = (d_i² + s²)(d_j² + s²). Exact samplers (MALA, HMC) must match within 5 SE;
approximate ones (ULA, SGLD) within 5 SE plus an allowance for their O(step) bias; a sampler with
a deliberately wrong acceptance ratio must miss by more than 10 SE.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from torch import Tensor, nn

from seqebm.sampling.hamiltonian import hmc
from seqebm.sampling.langevin_dynamics import ContinuousMCMCResult, langevin, polynomial_step_sizes, sgld

langevin_module = importlib.import_module("seqebm.sampling.langevin_dynamics")  # the module, not the function
hmc_module = importlib.import_module("seqebm.sampling.hamiltonian")

C = 4000
W = torch.tensor([0.3, 0.7], dtype=torch.float64)
MU = torch.tensor([[-1.5, 0.0], [1.5, 0.0]], dtype=torch.float64)  # (K, D)
S = 0.8


def mixture_energy(x: Tensor) -> Tensor:
    """E(x) = -log Σ_k w_k exp(-|x - μ_k|² / (2 s²)) (up to a constant): (N, D) -> (N,)."""
    sq = ((x[:, None, :] - MU) ** 2).sum(-1) / (2 * S ** 2)  # (N, K)
    return -torch.logsumexp(torch.log(W) - sq, dim=1)


def exact_moments() -> tuple[Tensor, Tensor, Tensor]:
    """(mean (D,), cov (D, D), Var[(x_i - m_i)(x_j - m_j)] (D, D)) of the mixture, see the module doc."""
    mean = (W[:, None] * MU).sum(0)
    cov = S ** 2 * torch.eye(2, dtype=torch.float64) + (W[:, None, None] * MU[:, :, None] * MU[:, None, :]).sum(0) \
        - mean[:, None] * mean[None, :]
    fourth = torch.zeros(2, 2, dtype=torch.float64)
    for k in range(2):
        d = MU[k] - mean
        for i in range(2):
            for j in range(2):
                if i == j:
                    fourth[i, j] += W[k] * (d[i] ** 4 + 6 * d[i] ** 2 * S ** 2 + 3 * S ** 4)
                else:
                    fourth[i, j] += W[k] * (d[i] ** 2 + S ** 2) * (d[j] ** 2 + S ** 2)
    return mean, cov, fourth - cov ** 2


def test_exact_moments_match_closed_form() -> None:
    mean, cov, _ = exact_moments()
    assert torch.allclose(mean, torch.tensor([0.6, 0.0], dtype=torch.float64))
    assert torch.allclose(cov, torch.tensor([[S ** 2 + 1.89, 0.0], [0.0, S ** 2]], dtype=torch.float64))


def moment_errors(x: Tensor) -> tuple[Tensor, Tensor]:
    """Absolute errors of the sample mean (D,) and covariance (D, D) of i.i.d. rows x (n, D), and
    their exact standard errors, flattened to one (D + D²,) vector each."""
    mean, cov, var_prod = exact_moments()
    n = x.shape[0]
    m = x.mean(0)
    c = (x - m).T @ (x - m) / (n - 1)
    abs_err = torch.cat([(m - mean).abs(), (c - cov).abs().flatten()])
    se = torch.cat([(cov.diagonal() / n).sqrt(), (var_prod / n).sqrt().flatten()])
    return abs_err, se


def overdispersed_x0(seed: int = 1) -> Tensor:
    return 2 * torch.randn(C, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 2) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- exact samplers match tightly

def test_mala_matches_mixture_moments() -> None:
    res = langevin(mixture_energy, overdispersed_x0(), num_steps=300, step_size=0.8, metropolis=True, generator=gen())
    err, se = moment_errors(res.final)
    assert (err < 5 * se).all(), err / se
    assert 0.7 < float(res.acceptance_rate.mean()) < 0.99
    assert res.final_energy is not None and torch.allclose(res.final_energy, mixture_energy(res.final))


def test_hmc_matches_mixture_moments() -> None:
    res = hmc(mixture_energy, overdispersed_x0(), num_steps=100, step_size=0.4, num_leapfrog=4, generator=gen())
    err, se = moment_errors(res.final)
    assert (err < 5 * se).all(), err / se
    assert 0.8 < float(res.acceptance_rate.mean()) < 1.0
    assert torch.allclose(res.final_energy, mixture_energy(res.final))


def test_hmc_with_diagonal_mass_matches_mixture_moments() -> None:
    """A Tensor mass (heavier along the wide x axis) must not change the target."""
    mass = torch.tensor([0.5, 1.5], dtype=torch.float64)
    res = hmc(mixture_energy, overdispersed_x0(3), num_steps=100, step_size=0.35, num_leapfrog=4, mass=mass,
              generator=gen(4))
    err, se = moment_errors(res.final)
    assert (err < 5 * se).all(), err / se


# ---------------------------------------------------------------- approximate samplers are close

def test_ula_small_step_is_close() -> None:
    """ULA's bias is O(σ²) (σ²/4 on the variance of a unit Gaussian); allow σ²/2 on top of 5 SE."""
    sigma = 0.3
    res = langevin(mixture_energy, overdispersed_x0(), num_steps=500, step_size=sigma, generator=gen())
    err, se = moment_errors(res.final)
    assert (err < 5 * se + sigma ** 2 / 2).all(), err / se
    assert torch.equal(res.acceptance_rate, torch.ones(C, dtype=torch.float64))


@pytest.mark.parametrize("noisy", [False, True], ids=["exact_grad", "noisy_grad"])
def test_sgld_decreasing_steps_is_close(noisy: bool) -> None:
    """Theorem 2.1 schedule δ_l = (10 + l)^(-0.6); the last step δ_600 ≈ 0.02 bounds the leftover bias.
    The noisy variant uses Δ = ∇ log p + N(0, 1) noise (unbiased, as Theorem 2.1 asks)."""
    schedule = polynomial_step_sizes(1.0, 10.0, 0.6)
    num_steps = 600
    if noisy:
        noise_gen = torch.Generator().manual_seed(7)

        def grad_log_prob(x: Tensor) -> Tensor:
            x = x.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(-mixture_energy(x).sum(), x)
            return g + torch.randn(x.shape, dtype=x.dtype, generator=noise_gen)

        res = sgld(None, overdispersed_x0(), grad_log_prob=grad_log_prob, step_sizes=schedule,
                   num_steps=num_steps, generator=gen())
        assert res.final_energy is None
    else:
        res = sgld(mixture_energy, overdispersed_x0(), step_sizes=schedule, num_steps=num_steps, generator=gen())
        assert torch.allclose(res.final_energy, mixture_energy(res.final))
    err, se = moment_errors(res.final)
    assert (err < 5 * se + schedule(num_steps)).all(), err / se


# ---------------------------------------------------------------- a wrong acceptance ratio is caught

def test_mala_without_proposal_correction_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dropping log q(x|x') - log q(x'|x) (treating the Langevin proposal as symmetric) biases MALA."""
    monkeypatch.setattr(langevin_module, "_mala_log_ratio", lambda x, xn, e, en, g, gn, s: e - en)
    res = langevin(mixture_energy, overdispersed_x0(), num_steps=300, step_size=0.8, metropolis=True, generator=gen())
    err, se = moment_errors(res.final)
    assert (err / se).max() > 10, err / se


def test_mala_with_sign_flipped_ratio_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    original = langevin_module._mala_log_ratio
    monkeypatch.setattr(langevin_module, "_mala_log_ratio", lambda *args: -original(*args))
    res = langevin(mixture_energy, overdispersed_x0(), num_steps=300, step_size=0.8, metropolis=True, generator=gen())
    err, se = moment_errors(res.final)
    assert (err / se).max() > 10, err / se


def test_hmc_without_kinetic_energy_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """Accepting on E(x) - E(x') instead of the Hamiltonian difference biases HMC."""
    monkeypatch.setattr(hmc_module, "_kinetic_energy", lambda p, m: torch.zeros(p.shape[0], dtype=torch.float64))
    res = hmc(mixture_energy, overdispersed_x0(), num_steps=100, step_size=0.4, num_leapfrog=4, generator=gen())
    err, se = moment_errors(res.final)
    assert (err / se).max() > 10, err / se


# ---------------------------------------------------------------- ULA bias, closed form

def gaussian_energy(s: float):
    def energy(x: Tensor) -> Tensor:  # N(0, s² I): (N, D) -> (N,)
        return 0.5 * (x ** 2).flatten(1).sum(1) / s ** 2
    return energy


@pytest.mark.parametrize("sigma", [1.0, 1.2])
def test_ula_gaussian_variance_bias_closed_form(sigma: float) -> None:
    """For N(0, s²), ULA is the AR(1) chain x' = (1 - h) x + σ ε with h = σ²/(2 s²); its stationary
    variance v solves v = (1 - h)² v + σ², so v = σ² / (h (2 - h)) = s² / (1 - σ²/(4 s²)).
    From x0 = 0 the variance after t steps is v (1 - (1 - h)^(2t)), converged for t = 40.
    MALA with the same σ is exact: variance s². n = C·8 i.i.d. coordinates, SE(v̂) = v sqrt(2/n)."""
    s, d = 1.0, 8
    x0 = torch.zeros(C, d, dtype=torch.float64)
    n = C * d
    v = s ** 2 / (1 - sigma ** 2 / (4 * s ** 2))
    ula = langevin(gaussian_energy(s), x0, num_steps=40, step_size=sigma, generator=gen(3))
    v_hat = float(ula.final.pow(2).mean())
    assert abs(v_hat - v) < 5 * v * math.sqrt(2 / n)
    assert abs(v_hat - s ** 2) > 20 * s ** 2 * math.sqrt(2 / n)  # the bias is far outside the noise
    mala = langevin(gaussian_energy(s), x0, num_steps=40, step_size=sigma, metropolis=True, generator=gen(3))
    assert abs(float(mala.final.pow(2).mean()) - s ** 2) < 5 * s ** 2 * math.sqrt(2 / n)


# ---------------------------------------------------------------- fast path == slow path

def test_ula_equals_sgld_with_constant_step() -> None:
    """Eq. (2.23) with σ is Eq. (2.24) with δ = σ²/2 and the exact gradient: identical trajectories."""
    x0 = overdispersed_x0()[:64]
    a = langevin(mixture_energy, x0, num_steps=30, step_size=0.5, generator=gen())
    b = sgld(mixture_energy, x0, step_sizes=0.125, num_steps=30, generator=gen())
    assert torch.allclose(a.samples, b.samples, atol=1e-12)
    assert torch.allclose(a.final_energy, b.final_energy)


def test_hmc_one_leapfrog_equals_mala() -> None:
    """HMC with L = 1, M = 1 proposes x' = x - (ε²/2)∇E(x) + ε p and its Hamiltonian ratio equals
    MALA's density ratio with σ = ε; with the same random stream the chains coincide."""
    x0 = overdispersed_x0()[:256]
    a = langevin(mixture_energy, x0, num_steps=50, step_size=0.9, metropolis=True, generator=gen())
    b = hmc(mixture_energy, x0, num_steps=50, step_size=0.9, num_leapfrog=1, generator=gen())
    assert torch.allclose(a.samples, b.samples, atol=1e-10)
    assert torch.equal(a.acceptance_rate, b.acceptance_rate)


def test_image_shaped_states_and_keep_schedule() -> None:
    """Event shape (1, 4, 4); burn_in/thin give S = (num_steps - burn_in) // thin kept states."""
    x0 = torch.randn(5, 1, 4, 4, generator=gen(0))
    e = gaussian_energy(1.0)
    for res in (langevin(e, x0, num_steps=10, step_size=0.3, burn_in=4, thin=3, generator=gen()),
                langevin(e, x0, num_steps=10, step_size=0.3, metropolis=True, burn_in=4, thin=3, generator=gen()),
                sgld(e, x0, step_sizes=[0.1] * 10, burn_in=4, thin=3, generator=gen()),
                hmc(e, x0, num_steps=10, step_size=0.3, num_leapfrog=2, burn_in=4, thin=3, generator=gen())):
        assert isinstance(res, ContinuousMCMCResult)
        assert res.samples.shape == (2, 5, 1, 4, 4) and res.samples.dtype == torch.float32
        assert res.final.shape == (5, 1, 4, 4) and torch.equal(res.samples[-1], res.final)
        assert res.final_energy.dtype == torch.float64 and res.acceptance_rate.shape == (5,)
    none_kept = hmc(e, x0, num_steps=3, step_size=0.3, num_leapfrog=2, keep_samples=False)
    assert none_kept.samples.shape == (0, 5, 1, 4, 4)


def test_clamp_keeps_ula_and_sgld_in_bounds() -> None:
    x0 = torch.rand(50, 1, 3, 3, generator=gen(0))
    far = lambda x: 0.5 * ((x - 3.0) ** 2).flatten(1).sum(1)  # pulls every pixel towards 3 > hi
    for res in (langevin(far, x0, num_steps=20, step_size=0.5, clamp=(0.0, 1.0), generator=gen()),
                sgld(far, x0, step_sizes=1.0, num_steps=20, noise_scale=0.01, clamp=(0.0, 1.0), generator=gen())):
        assert res.final.min() >= 0 and res.final.max() <= 1
        assert (res.final == 1.0).float().mean() > 0.5


def test_sgld_noise_scale_zero_is_gradient_descent() -> None:
    """noise_scale = 0 leaves x ← x - δ ∇E(x): for E = |x|²/2 that is x ← (1 - δ) x."""
    x0 = torch.randn(3, 2, dtype=torch.float64, generator=gen(0))
    res = sgld(gaussian_energy(1.0), x0, step_sizes=0.1, num_steps=5, noise_scale=0.0)
    assert torch.allclose(res.final, 0.9 ** 5 * x0)


def test_sampler_is_deterministic_given_generator() -> None:
    x0 = overdispersed_x0()[:32]
    a = hmc(mixture_energy, x0, num_steps=5, step_size=0.3, num_leapfrog=3, generator=gen(9))
    b = hmc(mixture_energy, x0, num_steps=5, step_size=0.3, num_leapfrog=3, generator=gen(9))
    assert torch.equal(a.samples, b.samples)


def test_gradients_do_not_touch_parameters_and_work_under_no_grad() -> None:
    net = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
    energy = lambda x: net(x).squeeze(-1)
    x0 = torch.randn(16, 2, requires_grad=True)
    with torch.no_grad():
        results = [langevin(energy, x0, num_steps=3, step_size=0.1, metropolis=True, generator=gen()),
                   sgld(energy, x0, step_sizes=0.01, num_steps=3, generator=gen()),
                   hmc(energy, x0, num_steps=3, step_size=0.1, num_leapfrog=2, generator=gen())]
    assert all(p.grad is None for p in net.parameters())
    for res in results:
        assert not res.final.requires_grad and not res.samples.requires_grad
        assert res.final_energy is not None and not res.final_energy.requires_grad
    assert x0.grad is None


def test_nonfinite_energy_rejects() -> None:
    """E = |x|²/2 plus NaN where x_0 > 1 and +inf where x_1 > 1: any proposal there has a NaN or
    infinite Hamiltonian / MH ratio and must be rejected, so no chain ever leaves the region."""
    def walled(x: Tensor) -> Tensor:
        wall = torch.where(x[:, 0] > 1, float("nan"), 0.0) + torch.where(x[:, 1] > 1, float("inf"), 0.0)
        return 0.5 * (x ** 2).sum(1) + wall
    x0 = torch.zeros(500, 2, dtype=torch.float64)
    for res in (hmc(walled, x0, num_steps=30, step_size=0.5, num_leapfrog=3, generator=gen()),
                langevin(walled, x0, num_steps=30, step_size=1.0, metropolis=True, generator=gen())):
        assert (res.samples <= 1).all() and torch.isfinite(res.final_energy).all()
        assert 0.2 < float(res.acceptance_rate.mean()) < 0.95  # moves happen, some are walled off
        assert float(res.final.max()) > 0.5


# ---------------------------------------------------------------- validation

def test_polynomial_step_sizes() -> None:
    schedule = polynomial_step_sizes(0.5, 2.0, 1.0)
    assert schedule(1) == pytest.approx(0.5 / 3) and schedule(8) == pytest.approx(0.05)
    for gamma in (0.5, 0.3, 1.01, 2):
        with pytest.raises(ValueError, match="gamma must lie in"):
            polynomial_step_sizes(1.0, 1.0, gamma)
    with pytest.raises(ValueError, match="a must be"):
        polynomial_step_sizes(0.0, 1.0, 0.7)
    with pytest.raises(ValueError, match="b must be"):
        polynomial_step_sizes(1.0, -1.0, 0.7)


def test_validation_errors() -> None:
    e = gaussian_energy(1.0)
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="floating-point dtype"):
        langevin(e, torch.zeros(4, 2, dtype=torch.long), num_steps=1, step_size=0.1)
    with pytest.raises(ValueError, match=r"shape \(C, \*event\)"):
        langevin(e, torch.zeros(4), num_steps=1, step_size=0.1)
    with pytest.raises(ValueError, match="finite"):
        hmc(e, torch.full((4, 2), float("nan")), num_steps=1, step_size=0.1, num_leapfrog=1)
    with pytest.raises(ValueError, match=r"shape \(4,\) for input \(4, 2\), got \(4, 1\)"):
        langevin(lambda x: x.sum(1, keepdim=True), x0, num_steps=1, step_size=0.1)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        hmc(lambda x: x.sum(), x0, num_steps=1, step_size=0.1, num_leapfrog=1)
    with pytest.raises(ValueError, match="not depend differentiably"):
        langevin(lambda x: x.detach().sum(1), x0, num_steps=1, step_size=0.1)
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="step_size must be"):
            langevin(e, x0, num_steps=1, step_size=bad)
        with pytest.raises(ValueError, match="step_size must be"):
            hmc(e, x0, num_steps=1, step_size=bad, num_leapfrog=1)
    with pytest.raises(ValueError, match="num_leapfrog must be"):
        hmc(e, x0, num_steps=1, step_size=0.1, num_leapfrog=0)
    with pytest.raises(ValueError, match="mass must be"):
        hmc(e, x0, num_steps=1, step_size=0.1, num_leapfrog=1, mass=0.0)
    with pytest.raises(ValueError, match="broadcast to the event shape"):
        hmc(e, x0, num_steps=1, step_size=0.1, num_leapfrog=1, mass=torch.ones(3))
    with pytest.raises(ValueError, match="burn_in"):
        langevin(e, x0, num_steps=2, step_size=0.1, burn_in=3)
    with pytest.raises(ValueError, match="clamp is only supported with metropolis=False"):
        langevin(e, x0, num_steps=1, step_size=0.1, metropolis=True, clamp=(0.0, 1.0))
    with pytest.raises(ValueError, match="lo < hi"):
        langevin(e, x0, num_steps=1, step_size=0.1, clamp=(1.0, 0.0))


def test_sgld_validation_errors() -> None:
    e = gaussian_energy(1.0)
    x0 = torch.zeros(4, 2)
    with pytest.raises(ValueError, match="exactly one of energy and grad_log_prob"):
        sgld(None, x0, step_sizes=0.1, num_steps=1)
    with pytest.raises(ValueError, match="exactly one of energy and grad_log_prob"):
        sgld(e, x0, step_sizes=0.1, num_steps=1, grad_log_prob=lambda x: -x)
    with pytest.raises(ValueError, match="num_steps is required"):
        sgld(e, x0, step_sizes=0.1)
    with pytest.raises(ValueError, match="num_steps is required"):
        sgld(e, x0, step_sizes=polynomial_step_sizes(1.0, 1.0, 0.7))
    with pytest.raises(ValueError, match=r"step_sizes\[1\] must be"):
        sgld(e, x0, step_sizes=[0.1, -0.1])
    with pytest.raises(ValueError, match="does not match len"):
        sgld(e, x0, step_sizes=[0.1, 0.1], num_steps=3)
    with pytest.raises(ValueError, match=r"step_sizes\(2\) must be"):
        sgld(e, x0, step_sizes=lambda l: 0.1 if l == 1 else 0.0, num_steps=3)
    with pytest.raises(ValueError, match="step_sizes must be a number"):
        sgld(e, x0, step_sizes="0.1", num_steps=1)
    with pytest.raises(ValueError, match="noise_scale must be"):
        sgld(e, x0, step_sizes=0.1, num_steps=1, noise_scale=-0.5)
    with pytest.raises(ValueError, match=r"grad_log_prob must return a Tensor of shape \(4, 2\)"):
        sgld(None, x0, step_sizes=0.1, num_steps=1, grad_log_prob=lambda x: x[:, 0])
    assert sgld(e, x0, step_sizes=torch.full((3,), 0.1)).samples.shape == (3, 4, 2)
