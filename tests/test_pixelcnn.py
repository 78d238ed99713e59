"""Tests for PixelCNN / GatedPixelCNN: causality, incremental decoding, state selection, training.

Notation: B batch, T input length (BOS + pixels), L levels, N = side * side.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from seqebm.models.base import AutoregressiveModel
from seqebm.models.pixelcnn import GatedPixelCNN, PixelCNN

LEVELS, SIDE = 17, 8
N = SIDE * SIDE
MODELS = [PixelCNN, GatedPixelCNN]


def make(cls: type, **kw: int) -> torch.nn.Module:
    torch.manual_seed(0)
    kw.setdefault("channels", 16)
    return cls(levels=LEVELS, side=SIDE, **kw).eval()


def random_tokens(b: int, t: int = N, seed: int = 1) -> torch.Tensor:
    """``(B, T)``: BOS then ``T - 1`` random pixels."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, LEVELS, (b, t - 1), generator=g)
    return torch.cat([torch.full((b, 1), LEVELS), pixels], dim=1)


def dependency_matrix(model: torch.nn.Module, base: torch.Tensor) -> torch.Tensor:
    """``dep[j, t]`` is True iff changing pixel ``j`` changes the logits at position ``t``.

    Perturbs every pixel ``j`` of ``base`` (shape ``(1, N)``) in one batch of ``N - 1`` rows.
    """
    n_pix = base.shape[1] - 1
    batch = base.repeat(n_pix, 1)
    idx = torch.arange(n_pix)
    batch[idx, idx + 1] = (batch[idx, idx + 1] + 1 + idx % (LEVELS - 1)) % LEVELS
    with torch.no_grad():
        ref = model(base)  # (1, T, L)
        out = model(batch)  # (N - 1, T, L)
    return (out - ref).abs().amax(-1) > 1e-6  # (N - 1, T)


@pytest.mark.parametrize("cls", MODELS)
def test_protocol_attributes(cls: type) -> None:
    m = make(cls)
    assert isinstance(m, AutoregressiveModel)
    assert m.vocab_size == LEVELS and m.bos_id == LEVELS and m.max_len == N
    out = m(random_tokens(3))
    assert out.shape == (3, N, LEVELS)
    assert m(random_tokens(2, t=5)).shape == (2, 5, LEVELS)
    assert m(random_tokens(2, t=1)).shape == (2, 1, LEVELS)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("n_layers", [1, 3])
def test_causality(cls: type, n_layers: int) -> None:
    """Pixel j never influences logits at positions <= j (logit t predicts pixel t)."""
    m = make(cls, n_layers=n_layers)
    dep = dependency_matrix(m, random_tokens(1, seed=3))
    j = torch.arange(N - 1)[:, None]
    t = torch.arange(N)[None, :]
    leaks = dep & (t <= j)
    assert not leaks.any(), f"future pixel leaks: (pixel, position) {leaks.nonzero()[:5].tolist()}"
    # Sanity: the model does use the past (left neighbour, pixel above).
    assert dep[0, 1] and dep[0, SIDE]
    assert dep[SIDE + 2, SIDE + 3] and dep[2, SIDE + 2]


def test_gated_has_no_blind_spot() -> None:
    """The gated stacks see the upper-right neighbours that plain PixelCNN misses."""
    gated = make(GatedPixelCNN, n_layers=3, first_kernel_size=3)
    plain = make(PixelCNN, n_layers=3, first_kernel_size=3)
    r, c = 5, 3
    pos = r * SIDE + c
    base = random_tokens(1, seed=4)
    dep_g = dependency_matrix(gated, base)
    dep_p = dependency_matrix(plain, base)
    upper_right = [(r - 1) * SIDE + c + d for d in (1, 2, 3)] + [(r - 2) * SIDE + c + 3]
    assert all(dep_g[j, pos] for j in upper_right)
    # Plain PixelCNN with three 3x3 masks: pixel (r-2, c+3) is in its blind spot.
    assert not dep_p[(r - 2) * SIDE + c + 3, pos]
    # Every earlier pixel in the gated receptive field (rows r-3..r, cols c-3..c+3) is used.
    for rr in range(r - 3, r + 1):
        for cc in range(max(c - 3, 0), min(c + 4, SIDE)):
            j = rr * SIDE + cc
            if j < pos:
                assert dep_g[j, pos], (rr, cc)


@pytest.mark.parametrize("cls", MODELS)
@pytest.mark.parametrize("chunks", [[1] * N, [1, 7, 20, 36], [N], [3, 5, 56]])
def test_step_matches_forward(cls: type, chunks: list[int]) -> None:
    m = make(cls)
    tokens = random_tokens(3, seed=5)
    with torch.no_grad():
        full = m(tokens)
        state = m.init_state(3, "cpu")
        outs, start = [], 0
        for size in chunks:
            logits, new_state = m.step(tokens[:, start : start + size], state)
            assert new_state.pos == start + size
            assert state.pos == start  # the old state is untouched
            outs.append(logits)
            state, start = new_state, start + size
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", MODELS)
def test_step_from_shared_state_is_functional(cls: type) -> None:
    """Two continuations from one state do not interfere."""
    m = make(cls)
    tokens = random_tokens(2, t=10, seed=6)
    other = tokens.clone()
    other[:, 6:] = (other[:, 6:] + 3) % LEVELS
    with torch.no_grad():
        _, state = m.step(tokens[:, :6], m.init_state(2, "cpu"))
        a, _ = m.step(tokens[:, 6:], state)
        b, _ = m.step(other[:, 6:], state)
        torch.testing.assert_close(a, m(tokens)[:, 6:], atol=1e-5, rtol=0)
        torch.testing.assert_close(b, m(other)[:, 6:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", MODELS)
def test_select_state(cls: type) -> None:
    m = make(cls)
    tokens = random_tokens(3, t=20, seed=7)
    index = torch.tensor([2, 0, 2, 1])
    with torch.no_grad():
        _, state = m.step(tokens[:, :12], m.init_state(3, "cpu"))
        sel = m.select_state(state, index)
        assert sel.pos == 12 and sel.canvas.shape == (4, SIDE, SIDE)
        torch.testing.assert_close(sel.canvas, state.canvas[index])
        logits, _ = m.step(tokens[index, 12:], sel)
        torch.testing.assert_close(logits, m(tokens[index])[:, 12:], atol=1e-5, rtol=0)


@pytest.mark.parametrize("cls", MODELS)
def test_training_reduces_nll(cls: type) -> None:
    m = make(cls).train()
    g = torch.Generator().manual_seed(8)
    images = torch.randint(0, 4, (16, N), generator=g) * 5 % LEVELS  # a few levels only
    inputs = torch.cat([torch.full((16, 1), LEVELS), images[:, :-1]], dim=1)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(m(inputs).reshape(-1, LEVELS), images.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize("cls", MODELS)
def test_bad_input_raises(cls: type) -> None:
    m = make(cls)
    too_long = random_tokens(1, t=N + 1)
    with pytest.raises(ValueError, match="max_len"):
        m(too_long)
    bad = random_tokens(1, t=5)
    bad[0, 3] = LEVELS + 1
    with pytest.raises(ValueError, match="outside"):
        m(bad)
    bos_in_middle = random_tokens(1, t=5)
    bos_in_middle[0, 2] = LEVELS
    with pytest.raises(ValueError, match="BOS"):
        m(bos_in_middle)
    no_bos = random_tokens(1, t=5)
    no_bos[0, 0] = 0
    with pytest.raises(ValueError, match="BOS"):
        m(no_bos)
    with pytest.raises(ValueError, match="shape"):
        m(torch.zeros(5, dtype=torch.long))
    state = m.init_state(1, "cpu")
    _, state = m.step(random_tokens(1, t=N - 2), state)
    with pytest.raises(ValueError, match="max_len"):
        m.step(torch.zeros(1, 3, dtype=torch.long), state)
    with pytest.raises(ValueError, match="batch"):
        m.step(torch.zeros(2, 1, dtype=torch.long), state)
