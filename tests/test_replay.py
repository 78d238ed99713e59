"""Replay buffer and persistent chains: sampling statistics, write-back, checkpoints, and moments of
persistent Langevin chains run through the buffer.

Notation: N capacity, n states drawn per call.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from seqebm.sampling.langevin_dynamics import langevin
from seqebm.sampling.replay import PersistentChains, ReplayBuffer


def uniform_init(k: int, generator: torch.Generator | None) -> Tensor:
    return torch.rand(k, 3, generator=generator)  # (k, 3) in [0, 1)


def token_init(k: int, generator: torch.Generator | None) -> Tensor:
    return torch.randint(5, (k, 4), generator=generator)  # (k, T=4) tokens in [0, 5)


def test_lazy_fill_and_distinct_indices() -> None:
    calls: list[int] = []

    def init(k: int, g: torch.Generator | None) -> Tensor:
        calls.append(k)
        return uniform_init(k, g)

    buf = ReplayBuffer(10, init, reinit_prob=0.0, generator=torch.Generator().manual_seed(0))
    assert calls == [] and set(buf.state_dict()) == {"generator_state"}
    x, index = buf.sample(10)
    assert calls == [10] and x.shape == (10, 3) and index.shape == (10,) and index.dtype == torch.long
    assert torch.equal(index.sort().values, torch.arange(10))  # n = N draws every slot once
    assert torch.equal(x, buf.buffer[index])
    x[:] = -1.0
    assert (buf.buffer >= 0).all()  # sample returns a copy


def test_reinit_fraction_matches_reinit_prob() -> None:
    """Mark every stored state with -1, then count fresh draws (values in [0, 1)) over 50 calls of
    n = 200: the count is Binomial(10⁴, 0.2); allow 5 standard deviations."""
    p, n, calls = 0.2, 200, 50
    buf = ReplayBuffer(400, uniform_init, reinit_prob=p, generator=torch.Generator().manual_seed(1))
    buf.update(torch.arange(400), torch.full((400, 3), -1.0))
    fresh = 0
    for _ in range(calls):
        x, _ = buf.sample(n)
        is_fresh = (x >= 0).all(1)
        assert (is_fresh | (x == -1).all(1)).all()  # whole rows, either fresh or stored
        fresh += int(is_fresh.sum())
    total = n * calls
    assert abs(fresh - p * total) < 5 * math.sqrt(total * p * (1 - p))
    assert (buf.buffer == -1).all()  # fresh draws are not written until update


def test_reinit_prob_extremes() -> None:
    buf = ReplayBuffer(8, uniform_init, reinit_prob=1.0, generator=torch.Generator().manual_seed(2))
    buf.update(torch.arange(8), torch.full((8, 3), -1.0))
    x, _ = buf.sample(8)
    assert (x >= 0).all()
    buf = ReplayBuffer(8, uniform_init, reinit_prob=0.0, generator=torch.Generator().manual_seed(2))
    buf.update(torch.arange(8), torch.full((8, 3), -1.0))
    assert (buf.sample(8)[0] == -1).all()


def test_update_writes_back_only_the_given_slots() -> None:
    buf = ReplayBuffer(6, token_init, reinit_prob=0.0, generator=torch.Generator().manual_seed(3))
    before = buf.buffer.clone()
    x, index = buf.sample(3)
    assert x.dtype == torch.long
    buf.update(index, x + 10)
    assert torch.equal(buf.buffer[index], x + 10)
    others = torch.ones(6, dtype=torch.bool)
    others[index] = False
    assert torch.equal(buf.buffer[others], before[others])


def test_state_dict_round_trip_through_safetensors(tmp_path) -> None:
    """A restored buffer (contents and generator) continues exactly like the original."""
    a = ReplayBuffer(32, uniform_init, reinit_prob=0.3, generator=torch.Generator().manual_seed(4))
    x, index = a.sample(8)
    a.update(index, x * 2)
    save_file(a.state_dict(), str(tmp_path / "buffer.safetensors"))
    b = ReplayBuffer(32, uniform_init, reinit_prob=0.3, generator=torch.Generator().manual_seed(99))
    b.load_state_dict(load_file(str(tmp_path / "buffer.safetensors")))
    assert torch.equal(a.buffer, b.buffer)
    for _ in range(3):
        (xa, ia), (xb, ib) = a.sample(8), b.sample(8)
        assert torch.equal(xa, xb) and torch.equal(ia, ib)
        a.update(ia, xa + 1)
        b.update(ib, xb + 1)
    assert torch.equal(a.buffer, b.buffer)


def test_persistent_chains() -> None:
    chains = PersistentChains(torch.zeros(4, 2))
    new = torch.ones(4, 2, requires_grad=True)
    chains.update(new * 3)
    assert torch.equal(chains.state, torch.full((4, 2), 3.0)) and not chains.state.requires_grad
    restored = PersistentChains(torch.zeros(4, 2))
    restored.load_state_dict(chains.state_dict())
    assert torch.equal(restored.state, chains.state)
    with pytest.raises(ValueError, match=r"shape \(4, 2\), got \(3, 2\)"):
        chains.update(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="dtype torch.float32, got torch.float64"):
        chains.update(torch.zeros(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="exactly the key 'state'"):
        restored.load_state_dict({"buffer": torch.zeros(4, 2)})
    with pytest.raises(ValueError, match="C >= 1"):
        PersistentChains(torch.zeros(0, 2))


def test_validation_errors() -> None:
    for cap in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="capacity must be an int >= 1"):
            ReplayBuffer(cap, uniform_init)
    for p in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"reinit_prob must lie in \[0, 1\]"):
            ReplayBuffer(4, uniform_init, reinit_prob=p)
    buf = ReplayBuffer(4, uniform_init, reinit_prob=0.5, generator=torch.Generator().manual_seed(0))
    for n in (0, 5):
        with pytest.raises(ValueError, match=r"n must be an int in \[1, capacity=4\]"):
            buf.sample(n)
    x, index = buf.sample(2)
    with pytest.raises(ValueError, match=r"x_new must have shape \(2, 3\), got \(2, 4\)"):
        buf.update(index, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="x_new must have dtype torch.float32, got torch.float64"):
        buf.update(index, x.double())
    with pytest.raises(ValueError, match=r"index must lie in \[0, 4\)"):
        buf.update(torch.tensor([0, 4]), x)
    with pytest.raises(ValueError, match="duplicate"):
        buf.update(torch.tensor([1, 1]), x)
    with pytest.raises(ValueError, match="1-D LongTensor"):
        buf.update(index.float(), x)
    with pytest.raises(ValueError, match=r"buffer must be a Tensor of shape \(4, \.\.\.\)"):
        buf.load_state_dict({"buffer": torch.zeros(5, 3)})
    with pytest.raises(ValueError, match="unexpected keys"):
        buf.load_state_dict({"chains": torch.zeros(4, 3)})
    bad = ReplayBuffer(4, lambda k, g: torch.zeros(k + 1, 3))
    with pytest.raises(ValueError, match=r"init_fn\(4, generator\) must return a Tensor of shape \(4, \.\.\.\)"):
        bad.sample(1)
    drift = ReplayBuffer(4, lambda k, g: torch.zeros(k, 3, dtype=torch.float64 if k == 1 else torch.float32),
                         reinit_prob=1.0)
    with pytest.raises(ValueError, match="dtype torch.float32"):
        drift.sample(1)


def test_persistent_langevin_chains_through_buffer_reach_target_moments() -> None:
    """Target N(m, diag(v)) with m = (1, -2), v = (0.25, 4); the buffer starts as U[0, 1)³ noise far
    from it (third coordinate: v = 1, m = 0). 200 rounds of: draw n = 500 of N = 2000 chains, run 10
    MALA steps, write back. Each chain gets ~25 draws (at least ~10) = 100+ exact MALA steps, ample
    for these Gaussians, and the slots drawn do not depend on the states, so the N stored states are
    i.i.d. draws from the target (reinit_prob = 0 here; reinitialised chains would not have
    converged). Check each mean within 5·sqrt(v/N) and each variance within 5·v·sqrt(2/N)."""
    m = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float64)
    v = torch.tensor([0.25, 4.0, 1.0], dtype=torch.float64)
    energy = lambda x: (0.5 * (x - m) ** 2 / v).sum(1)
    cap, n = 2000, 500
    g = torch.Generator().manual_seed(5)
    buf = ReplayBuffer(cap, lambda k, gen: torch.rand(k, 3, generator=gen, dtype=torch.float64), reinit_prob=0.0,
                       generator=g)
    for _ in range(200):
        x, index = buf.sample(n)
        buf.update(index, langevin(energy, x, num_steps=10, step_size=0.8, metropolis=True, generator=g,
                                   keep_samples=False).final)
    states = buf.buffer
    assert ((states.mean(0) - m).abs() < 5 * (v / cap).sqrt()).all()
    assert ((states.var(0) - v).abs() < 5 * v * math.sqrt(2 / cap)).all()
