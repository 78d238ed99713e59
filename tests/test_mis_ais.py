"""Metropolis independence sampler and (reverse) AIS checked against exact enumeration.

Notation: C chains, T length, V vocabulary, S kept states per chain. The test model is the
chain energy E(x) = -Σ_t θ[t, x_t] - Σ_t W[x_t, x_{t+1}] with V = 3, T = 3 (27 outcomes), as
in tests/test_mcmc_exact.py.
"""

from __future__ import annotations


import pytest
import torch
from torch import Tensor

from _exact_tv import empirical_tv

from seqebm.estimators import exact_distribution, exact_log_partition
from seqebm.estimators.ais import ais_log_partition, reverse_ais_log_partition
from seqebm.models.transformer import TransformerLM
from seqebm.sampling.mis import autoregressive_proposal, metropolis_independence

V, T = 3, 3
TV_BOUND = 0.05


class ChainEnergy:
    """E(x) = -Σ_t θ[t, x_t] - Σ_t W[x_t, x_{t+1}]; counts calls."""

    def __init__(self, seed: int = 0, scale: float = 1.0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.theta = scale * torch.randn(T, V, generator=g, dtype=torch.float64)  # (T, V)
        self.w = scale * torch.randn(V, V, generator=g, dtype=torch.float64)  # (V, V)
        self.calls = 0

    def __call__(self, x: Tensor) -> Tensor:  # (N, T) -> (N,)
        self.calls += 1
        unary = self.theta[torch.arange(x.shape[1]), x].sum(-1)
        pair = self.w[x[:, :-1], x[:, 1:]].sum(-1)
        return -(unary + pair)


class CategoricalProposal:
    """Independent categorical per position with random logits; exact log q (or 0 if ``wrong``)."""

    def __init__(self, seed: int = 1, scale: float = 1.5, wrong: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.log_probs = torch.log_softmax(scale * torch.randn(T, V, generator=g, dtype=torch.float64), -1)
        self.wrong = wrong
        self.calls = 0

    def __call__(self, n: int, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        self.calls += 1
        x = torch.multinomial(self.log_probs.exp(), n, replacement=True, generator=generator).T.contiguous()
        log_q = self.log_probs[torch.arange(T), x].sum(-1)
        return x, torch.zeros_like(log_q) if self.wrong else log_q

    def log_q_all(self, seqs: Tensor) -> Tensor:
        return self.log_probs[torch.arange(T), seqs].sum(-1)


def test_mis_matches_exact_distribution() -> None:
    energy, proposal = ChainEnergy(0), CategoricalProposal(1)
    _, log_p = exact_distribution(energy, V, T)
    energy.calls = 0
    res = metropolis_independence(energy, proposal, num_chains=512, num_steps=220, burn_in=20,
                                  generator=torch.Generator().manual_seed(0))
    assert res.samples.shape == (200, 512, T) and res.final.shape == (512, T)
    assert energy.calls == 221 and proposal.calls == 221  # one batched call per step (+ the start)
    assert 0.05 < float(res.acceptance_rate.mean()) < 1.0
    assert torch.allclose(res.final_energy, energy(res.final))
    assert empirical_tv(res.samples, log_p) < TV_BOUND


def test_mis_with_wrong_log_q_fails_the_check() -> None:
    energy, proposal = ChainEnergy(0), CategoricalProposal(1, wrong=True)
    seqs, log_p = exact_distribution(energy, V, T)
    # Omitting log q makes the chain target p·q instead of p; make sure they differ clearly.
    log_pq = torch.log_softmax(log_p + proposal.log_q_all(seqs), 0)
    assert 0.5 * float((log_pq.exp() - log_p.exp()).abs().sum()) > 0.15
    res = metropolis_independence(energy, proposal, num_chains=512, num_steps=220, burn_in=20,
                                  generator=torch.Generator().manual_seed(0))
    assert empirical_tv(res.samples, log_p) > TV_BOUND
    assert empirical_tv(res.samples, log_pq) < TV_BOUND


def test_mis_with_autoregressive_proposal_matches_exact() -> None:
    torch.manual_seed(0)
    model = TransformerLM(V, d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=8).eval()
    with torch.no_grad():
        model.embed.weight.mul_(3.0)  # a clearly non-uniform proposal (q in [0.006, 0.19])
    proposal = autoregressive_proposal(model, T, bos_id=0)
    x, log_q = proposal(5, torch.Generator().manual_seed(1))
    assert x.shape == (5, T) and log_q.shape == (5,) and log_q.dtype == torch.float64
    energy = ChainEnergy(0)
    _, log_p = exact_distribution(energy, V, T)
    res = metropolis_independence(energy, proposal, num_chains=512, num_steps=220, burn_in=20,
                                  generator=torch.Generator().manual_seed(2))
    assert empirical_tv(res.samples, log_p) < TV_BOUND
    with pytest.raises(ValueError):
        autoregressive_proposal(model, T, bos_id=0, eos_id=1)


def test_mis_validation() -> None:
    energy = ChainEnergy(0)
    with pytest.raises(ValueError):
        metropolis_independence(energy, CategoricalProposal(1), num_chains=0, num_steps=5)
    with pytest.raises(ValueError):
        metropolis_independence(energy, lambda n, g: (torch.zeros(n, T, dtype=torch.long), torch.zeros(n + 1)),
                                num_chains=4, num_steps=2)


def _exact_samples(energy: ChainEnergy, c: int, seed: int) -> Tensor:
    seqs, log_p = exact_distribution(energy, V, T)
    idx = torch.multinomial(log_p.exp(), c, replacement=True, generator=torch.Generator().manual_seed(seed))
    return seqs[idx]


def _bracket(energy: ChainEnergy, betas: list[float], seeds: range, c: int = 256) -> tuple[float, float]:
    fwd, rev = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        lo, log_w = ais_log_partition(energy, V, T, num_chains=c, betas=betas, generator=g)
        assert log_w.shape == (c,)
        hi, _ = reverse_ais_log_partition(energy, V, T, exact_samples=_exact_samples(energy, c, 100 + s),
                                          betas=betas, generator=g)
        fwd.append(lo)
        rev.append(hi)
    return sum(fwd) / len(fwd), sum(rev) / len(rev)


def test_ais_brackets_exact_log_partition() -> None:
    energy = ChainEnergy(3, scale=2.0)
    log_z = exact_log_partition(energy, V, T)
    betas = torch.linspace(0, 1, 50).tolist()
    lo, hi = _bracket(energy, betas, range(4))
    assert lo <= log_z + 0.02 and hi >= log_z - 0.02
    assert abs(lo - log_z) < 0.1 and abs(hi - log_z) < 0.1
    # β = [0, 1]: plain IS from the uniform base (forward; heavy-tailed, so no tight one-sided check)
    # and the harmonic-mean estimator (reverse, clearly above log Z): a much wider bracket.
    lo2, hi2 = _bracket(energy, [0.0, 1.0], range(4))
    assert hi2 >= log_z + 0.05
    assert hi2 - lo2 > hi - lo + 0.05


def test_ais_validation() -> None:
    energy = ChainEnergy(0)
    with pytest.raises(ValueError):
        ais_log_partition(energy, V, T, num_chains=4, betas=[0.0, 0.5])
    with pytest.raises(ValueError):
        ais_log_partition(energy, V, T, num_chains=4, betas=[0.0, 0.7, 0.5, 1.0])
    with pytest.raises(ValueError):
        reverse_ais_log_partition(energy, V, T, exact_samples=torch.zeros(4, T + 1, dtype=torch.long),
                                  betas=[0.0, 1.0])
