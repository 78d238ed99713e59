"""Exact enumeration, importance sampling and MCMC samplers checked against each other.

Notation: C chains, T length, V vocabulary, K samples, S kept states per chain.
The test model is a tiny chain energy E(x) = -Σ_t θ[t, x_t] - Σ_t W[x_t, x_{t+1}] with V = 3,
T = 3 (27 outcomes), so every estimate has an exact ground truth.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from _exact_tv import empirical_tv, index_of

from seqebm.estimators import (effective_sample_size, enumerate_sequences, exact_distribution, exact_log_partition,
                               importance_log_partition, snis_expectation, snis_weights)
from seqebm.sampling.mcmc import MCMCResult, gibbs, metropolis_hastings

V, T = 3, 3
TV_BOUND = 0.05


class ChainEnergy:
    """E(x) = -Σ_t θ[t, x_t] - Σ_t W[x_t, x_{t+1}]; counts calls and rows."""

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.theta = scale * torch.randn(T, V, generator=g, dtype=torch.float64)  # (T, V)
        self.w = scale * torch.randn(V, V, generator=g, dtype=torch.float64)  # (V, V)
        self.calls: list[int] = []

    def __call__(self, x: Tensor) -> Tensor:  # (N, T) -> (N,)
        self.calls.append(x.shape[0])
        unary = self.theta[torch.arange(x.shape[1]), x].sum(-1)
        pair = self.w[x[:, :-1], x[:, 1:]].sum(-1)
        return -(unary + pair)

    def scalar(self, seq: tuple[int, ...]) -> float:
        u = sum(float(self.theta[t, s]) for t, s in enumerate(seq))
        p = sum(float(self.w[a, b]) for a, b in zip(seq[:-1], seq[1:]))
        return -(u + p)


def random_x0(c: int, seed: int) -> Tensor:
    return torch.randint(V, (c, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- exact enumeration

def test_enumerate_sequences_order_and_count() -> None:
    seqs = enumerate_sequences(V, T)
    assert seqs.shape == (V**T, T) and seqs.dtype == torch.long
    assert torch.equal(index_of(seqs, V), torch.arange(V**T))
    assert seqs.unique(dim=0).shape[0] == V**T


def test_exact_log_partition_zero_energy_closed_form() -> None:
    zero = lambda x: torch.zeros(x.shape[0])  # noqa: E731
    for v, t in [(3, 3), (5, 4), (2, 10)]:
        assert exact_log_partition(zero, v, t) == pytest.approx(t * math.log(v), abs=1e-12)


def test_exact_log_partition_matches_brute_force_loop() -> None:
    energy = ChainEnergy(seed=1)
    brute = math.log(sum(math.exp(-energy.scalar(s)) for s in itertools.product(range(V), repeat=T)))
    assert exact_log_partition(energy, V, T, batch_size=5) == pytest.approx(brute, abs=1e-12)
    seqs, log_p = exact_distribution(energy, V, T)
    assert float(torch.logsumexp(log_p, 0)) == pytest.approx(0.0, abs=1e-12)
    for i in [0, 7, 26]:
        assert float(log_p[i]) == pytest.approx(-energy.scalar(tuple(seqs[i].tolist())) - brute, abs=1e-12)


def test_enumeration_guard() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        enumerate_sequences(10, 7)
    with pytest.raises(ValueError, match="exceeds"):
        exact_log_partition(lambda x: torch.zeros(x.shape[0]), 50, 4)
    with pytest.raises(ValueError):
        enumerate_sequences(0, 3)


# ---------------------------------------------------------------- importance sampling

def uniform_draws(r: int, k: int, seed: int) -> tuple[Tensor, Tensor]:
    x = torch.randint(V, (r * k, T), generator=torch.Generator().manual_seed(seed))
    log_q = torch.full((r * k,), -T * math.log(V), dtype=torch.float64)
    return x, log_q


def test_importance_log_partition_converges() -> None:
    energy = ChainEnergy(seed=2)
    log_z = exact_log_partition(energy, V, T)
    reps = 20
    rms = []
    for k in (200, 20_000):
        x, log_q = uniform_draws(reps, k, seed=k)
        lu, lq = (-energy(x)).view(reps, k), log_q.view(reps, k)
        est = torch.stack([importance_log_partition(lu[i], lq[i]) for i in range(reps)])
        rms.append(float(((est - log_z) ** 2).mean().sqrt()))
    assert rms[1] < rms[0] / 4  # ~1/sqrt(K): a 100x larger K shrinks the error ~10x
    k = 200_000
    x, log_q = uniform_draws(1, k, seed=3)
    lu = -energy(x)
    est = float(importance_log_partition(lu, log_q))
    w = torch.exp(lu - log_q - log_z)  # weights / Z, mean 1
    se = float(w.std() / math.sqrt(k))  # delta method: sd(log Ẑ) ≈ sd(w)/(Z·sqrt(K))
    assert abs(est - log_z) < 4 * se
    assert se < 0.01


def test_snis_expectation_converges() -> None:
    energy = ChainEnergy(seed=4)
    seqs, log_p = exact_distribution(energy, V, T)
    g_all = torch.stack([(seqs[:, 0] == 0).double(), seqs.sum(-1).double()], dim=1)  # (27, 2)
    exact = (log_p.exp()[:, None] * g_all).sum(0)  # (2,)
    k = 200_000
    x, log_q = uniform_draws(1, k, seed=5)
    g = torch.stack([(x[:, 0] == 0).double(), x.sum(-1).double()], dim=1)  # (K, 2)
    lu = -energy(x)
    est = snis_expectation(g, lu, log_q)
    w = snis_weights(lu, log_q + 123.0)  # an unnormalised q gives the same weights
    assert torch.allclose(w, snis_weights(lu, log_q), atol=1e-15)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    se = ((w[:, None] ** 2) * (g - est) ** 2).sum(0).sqrt()  # (2,)
    assert torch.all((est - exact).abs() < 4 * se), (est, exact, se)
    small = snis_expectation(g[:500], lu[:500], log_q[:500])
    assert float((est - exact).abs().sum()) < float((small - exact).abs().sum()) + 1e-3


def test_effective_sample_size() -> None:
    k = 1000
    assert float(effective_sample_size(torch.full((k,), -3.7, dtype=torch.float64))) == pytest.approx(k)
    assert float(effective_sample_size(torch.full((k,), 900.0, dtype=torch.float64))) == pytest.approx(k)
    dominant = torch.full((k,), -1000.0, dtype=torch.float64)
    dominant[17] = 0.0
    assert float(effective_sample_size(dominant)) == pytest.approx(1.0, abs=1e-9)
    two = torch.tensor([0.0, 0.0, float("-inf")], dtype=torch.float64)
    assert float(effective_sample_size(two)) == pytest.approx(2.0)


def test_importance_bad_inputs() -> None:
    with pytest.raises(ValueError):
        importance_log_partition(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError):
        importance_log_partition(torch.zeros(2, 3), torch.zeros(2, 3))
    with pytest.raises(ValueError):
        snis_weights(torch.zeros(3), torch.tensor([0.0, float("-inf"), 0.0]))
    with pytest.raises(ValueError):
        snis_expectation(torch.zeros(5), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError):
        effective_sample_size(torch.zeros(0))


# ---------------------------------------------------------------- MCMC vs exact

CHAINS, BURN_IN, KEPT = 512, 100, 200


def skewed_log_q() -> Tensor:
    """Per-position log probabilities (T, V) of a deliberately skewed independent proposal."""
    return torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]], dtype=torch.float64))


def independent_proposal(include_log_q: bool):
    log_q_tv = skewed_log_q()

    def seq_log_q(x: Tensor) -> Tensor:  # (C, T) -> (C,)
        return log_q_tv[torch.arange(T), x].sum(-1)

    def propose(x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        c = x.shape[0]
        probs = log_q_tv.exp()[None].expand(c, T, V).reshape(c * T, V)
        x_new = torch.multinomial(probs, 1, generator=generator).view(c, T)
        if include_log_q:
            return x_new, seq_log_q(x_new), seq_log_q(x)  # log q(x'|x) = log q(x'), log q(x|x') = log q(x)
        zeros = torch.zeros(c, dtype=torch.float64)
        return x_new, zeros, zeros  # WRONG: the proposal is not symmetric

    return propose


def run_mh(energy: ChainEnergy, proposal, seed: int, thin: int = 2) -> MCMCResult:
    return metropolis_hastings(energy, random_x0(CHAINS, seed), num_steps=BURN_IN + KEPT * thin, proposal=proposal,
                               vocab_size=V, generator=torch.Generator().manual_seed(seed), burn_in=BURN_IN,
                               thin=thin)


def test_mh_uniform_site_matches_exact() -> None:
    energy = ChainEnergy(seed=6)
    _, log_p = exact_distribution(energy, V, T)
    res = run_mh(energy, "uniform_site", seed=7, thin=3)
    assert res.samples.shape == (KEPT, CHAINS, T)
    assert torch.equal(res.final, res.samples[-1])
    assert torch.allclose(res.final_energy, energy(res.final))
    assert 0.1 < float(res.acceptance_rate.mean()) < 1.0
    assert empirical_tv(res.samples, log_p) < TV_BOUND


def test_mh_independent_proposal_matches_exact() -> None:
    energy = ChainEnergy(seed=8)
    _, log_p = exact_distribution(energy, V, T)
    res = run_mh(energy, independent_proposal(include_log_q=True), seed=9)
    assert empirical_tv(res.samples, log_p) < TV_BOUND


def test_mh_missing_proposal_correction_fails_tv() -> None:
    energy = ChainEnergy(seed=8)
    _, log_p = exact_distribution(energy, V, T)
    res = run_mh(energy, independent_proposal(include_log_q=False), seed=9)
    assert empirical_tv(res.samples, log_p) > TV_BOUND
    # The uncorrected chain targets p·q instead: confirm it is the wrong chain, not a noisy one.
    seqs = enumerate_sequences(V, T)
    wrong = log_p + skewed_log_q()[torch.arange(T), seqs].sum(-1)
    assert empirical_tv(res.samples, wrong - torch.logsumexp(wrong, 0)) < TV_BOUND


@pytest.mark.parametrize("scan", ["systematic", "random"])
def test_gibbs_matches_exact(scan: str) -> None:
    energy = ChainEnergy(seed=10)
    _, log_p = exact_distribution(energy, V, T)
    energy.calls.clear()
    burn, kept = 20, 200
    res = gibbs(energy, random_x0(CHAINS, 11), num_sweeps=burn + kept, vocab_size=V, scan=scan,
                generator=torch.Generator().manual_seed(12), burn_in=burn)
    assert res.samples.shape == (kept, CHAINS, T)
    assert torch.all(res.acceptance_rate == 1)
    # one batched energy call of C·V rows per site update (+ one for the final energies)
    assert energy.calls[:-1] == [CHAINS * V] * ((burn + kept) * T)
    assert empirical_tv(res.samples, log_p) < TV_BOUND


def test_gibbs_systematic_exact_one_site_conditional() -> None:
    """With T = 1 one Gibbs update is an exact draw from p, whatever the start."""
    theta = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    energy = lambda x: -theta[x[:, 0]]  # noqa: E731
    res = gibbs(energy, torch.zeros(20_000, 1, dtype=torch.long), num_sweeps=1, vocab_size=4,
                generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(res.final[:, 0], minlength=4).double() / 20_000
    assert torch.allclose(freq, torch.softmax(theta, 0), atol=0.015)


def test_thinning_schedule() -> None:
    energy = ChainEnergy(seed=0)
    res = metropolis_hastings(energy, random_x0(4, 0), num_steps=23, vocab_size=V, burn_in=3, thin=5,
                              generator=torch.Generator().manual_seed(0))
    assert res.samples.shape == (4, 4, T)
    assert torch.equal(res.samples[-1], res.final)  # step 23 = 3 + 4·5 is kept
    res = gibbs(energy, random_x0(4, 0), num_sweeps=5, vocab_size=V, keep_samples=False)
    assert res.samples.shape == (0, 4, T)


def test_mcmc_bad_inputs() -> None:
    energy = ChainEnergy(seed=0)
    good = random_x0(4, 0)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        metropolis_hastings(energy, good + 1, num_steps=5, vocab_size=V)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        gibbs(energy, good - 1, num_sweeps=2, vocab_size=V)
    with pytest.raises(ValueError, match="shape"):
        metropolis_hastings(energy, good[0], num_steps=5, vocab_size=V)
    with pytest.raises(ValueError, match="shape"):
        gibbs(energy, good[None], num_sweeps=2, vocab_size=V)
    with pytest.raises(ValueError, match="dtype"):
        gibbs(energy, good.float(), num_sweeps=2, vocab_size=V)
    with pytest.raises(ValueError, match="vocab_size"):
        metropolis_hastings(energy, good, num_steps=5)
    with pytest.raises(ValueError, match="scan"):
        gibbs(energy, good, num_sweeps=2, vocab_size=V, scan="diagonal")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="proposal"):
        metropolis_hastings(energy, good, num_steps=5, vocab_size=V, proposal="gaussian")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="thin"):
        metropolis_hastings(energy, good, num_steps=5, vocab_size=V, thin=0)
    with pytest.raises(ValueError, match="burn_in"):
        gibbs(energy, good, num_sweeps=2, vocab_size=V, burn_in=3)
    with pytest.raises(ValueError, match="num_steps"):
        metropolis_hastings(energy, good, num_steps=-1, vocab_size=V)
    with pytest.raises(ValueError, match="energy must return"):
        metropolis_hastings(lambda x: torch.zeros(x.shape[0], 1), good, num_steps=1, vocab_size=V)
    bad_prop = lambda x, g: (x, torch.zeros(2), torch.zeros(4))  # noqa: E731
    with pytest.raises(ValueError, match="log_q_forward"):
        metropolis_hastings(energy, good, num_steps=1, vocab_size=V, proposal=bad_prop)
