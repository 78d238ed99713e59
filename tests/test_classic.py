"""Ising and RBM test beds against closed forms and enumeration."""

import math

import pytest
import torch
from _exact_tv import empirical_tv

from seqebm.estimators import exact_distribution, exact_log_partition, enumerate_sequences
from seqebm.models.classic import RBM, IsingModel
from seqebm.sampling.mcmc import gibbs


@pytest.mark.parametrize("periodic", [False, True])
@pytest.mark.parametrize("n", [1, 2, 3, 6])
def test_ising_chain_transfer_matrix_equals_enumeration(n, periodic):
    model = IsingModel((n,), J=0.7, H=-0.3, beta=1.3, periodic=periodic)
    assert model.chain_log_partition() == pytest.approx(exact_log_partition(model, 2, n), abs=1e-10)


def test_ising_lattice_energy_counts_each_neighbour_pair_once():
    """3x3 open lattice: 12 edges; all spins up gives E = -β(12 J + 9 H)."""
    model = IsingModel((3, 3), J=1.0, H=0.5, beta=2.0)
    assert model.edges.shape == (12, 2)
    assert float(model(torch.ones(1, 9, dtype=torch.long))) == pytest.approx(-2.0 * (12 + 4.5))
    periodic = IsingModel((3, 3), periodic=True)
    assert periodic.edges.shape == (18, 2)
    x = torch.randint(0, 2, (5, 9))
    s = 2 * x.double() - 1
    loop = torch.zeros(5, dtype=torch.float64)
    for i in range(3):
        for j in range(3):
            loop -= s[:, 3 * i + j] * (s[:, 3 * i + (j + 1) % 3] + s[:, 3 * ((i + 1) % 3) + j])
    torch.testing.assert_close(periodic(x), loop)


def test_gibbs_on_a_small_ising_lattice_matches_exact():
    model = IsingModel((2, 3), J=0.5, H=0.2, beta=1.0)
    _, log_p = exact_distribution(model, 2, 6)
    res = gibbs(model, torch.randint(0, 2, (512, 6), generator=torch.Generator().manual_seed(0)), num_sweeps=150,
                vocab_size=2, burn_in=50, generator=torch.Generator().manual_seed(1))
    assert empirical_tv(res.samples, log_p) < 0.03


def test_rbm_free_energy_and_conditionals_by_enumerating_hidden_units():
    rbm = RBM(4, 3, seed=0).double()
    v = enumerate_sequences(2, 4)
    h = enumerate_sequences(2, 3)
    e = torch.stack([rbm.energy(v, hh.expand(16, -1)) for hh in h], 1)  # (16 visible, 8 hidden)
    torch.testing.assert_close(rbm(v), -torch.logsumexp(-e, 1))
    p_h = torch.softmax(-e, 1)  # p(h | v)
    torch.testing.assert_close(rbm.hidden_probs(v), p_h @ h.double())


def test_rbm_block_gibbs_matches_exact_visible_distribution():
    rbm = RBM(4, 3, seed=1)
    _, log_p = exact_distribution(rbm, 2, 4)
    g = torch.Generator().manual_seed(0)
    v = rbm.block_gibbs(torch.randint(0, 2, (20000, 4), generator=g), 30, generator=g)
    assert empirical_tv(v, log_p) < 0.03
    # a sampler that skips the hidden layer (v resampled from p(v | h = 0)) is far off
    wrong = torch.bernoulli(torch.sigmoid(rbm.b.detach()).expand(20000, 4), generator=g).long()
    assert empirical_tv(wrong, log_p) > 0.05


def test_bad_shapes():
    with pytest.raises(ValueError, match="shape must be"):
        IsingModel((2, 2, 2))
    with pytest.raises(ValueError, match=r"x must have shape \(N, 4\)"):
        IsingModel((4,))(torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="n_visible and n_hidden must be positive"):
        RBM(0, 2)
    assert math.isfinite(IsingModel((5,)).chain_log_partition())
