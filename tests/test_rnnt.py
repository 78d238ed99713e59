"""RNN-T loss and beam search against enumeration of lattice paths (monograph §4.3.1; Graves 2012)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from seqebm.structured.rnnt import rnnt_beam_search, rnnt_greedy_decode, rnnt_loss


def joint(B: int, T: int, U: int, C: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, U + 1, C, generator=g, dtype=torch.float64) * 1.5).log_softmax(-1)


def exact_log_prob(lp: torch.Tensor, y: list[int], T: int) -> torch.Tensor:
    """log sum over lattice paths: a path is an order of the T-1 inner blanks and the U labels (then the
    final blank at (T-1, U)); the move at node (t, u) scores lp[t, u, blank] or lp[t, u, y[u]]."""
    U = len(y)
    terms = []
    for labels_at in itertools.combinations(range(T - 1 + U), U):
        t = u = 0
        s = lp.new_zeros(())
        for i in range(T - 1 + U):
            if i in labels_at:
                s = s + lp[t, u, y[u]]
                u += 1
            else:
                s = s + lp[t, u, 0]
                t += 1
        terms.append(s + lp[T - 1, U, 0])
    return torch.logsumexp(torch.stack(terms), 0)


def test_loss_equals_enumeration_with_ragged_lengths_and_gradients():
    B, T, U, C = 3, 4, 3, 4
    lp = joint(B, T, U, C).requires_grad_(True)
    targets = torch.tensor([[1, 2, 3], [3, 3, 0], [2, 0, 0]])
    tl, fl = torch.tensor([3, 2, 1]), torch.tensor([4, 3, 2])
    nll = rnnt_loss(lp, targets, fl, tl, reduction="none")
    ref = torch.stack([-exact_log_prob(lp[b], targets[b, :int(tl[b])].tolist(), int(fl[b])) for b in range(B)])
    torch.testing.assert_close(nll, ref, rtol=0, atol=1e-10)
    g1 = torch.autograd.grad(nll.sum(), lp)[0]
    g2 = torch.autograd.grad(ref.sum(), lp)[0]
    torch.testing.assert_close(g1, g2, rtol=0, atol=1e-10)
    assert g1[2, 2:].abs().max() == 0  # frames past the end get no gradient


def test_probabilities_of_all_transcripts_sum_to_one():
    """Every path through the lattice yields exactly one transcript, so sum_y p(y|x) = 1. With only blank
    allowed at u = U_max, transcripts longer than U_max have probability 0 and the sum is finite."""
    T, Umax, C = 2, 3, 3
    lp = joint(1, T, Umax, C, seed=4)[0].clone()
    lp[:, Umax, 1:] = float("-inf")  # at u = U_max only blank is possible
    lp[:, Umax, 0] = 0.0
    total = []
    for n in range(Umax + 1):
        for y in itertools.product(range(1, C), repeat=n):
            tg = torch.tensor([list(y) + [1] * (Umax - n)])
            total.append(-rnnt_loss(lp.unsqueeze(0), tg, torch.tensor([T]), torch.tensor([n]), reduction="none")[0])
    assert float(torch.logsumexp(torch.stack(total), 0)) == pytest.approx(0.0, abs=1e-10)


def lse(a: float, b: float) -> float:
    return b if a == -math.inf else a if b == -math.inf else max(a, b) + math.log1p(math.exp(-abs(a - b)))


def _step_from_table(lp_table):
    """A joint that depends on (t, len(prefix)) and the last label: lp_table[t][u][last] -> (C,)."""
    def step(t, prefixes):
        return torch.stack([lp_table[t, min(len(p), lp_table.shape[1] - 1), (p[-1] if p else 0)] for p in prefixes])
    return step


def test_unpruned_beam_search_is_exact():
    T, Umax, C = 3, 3, 3
    g = torch.Generator().manual_seed(1)
    table = (torch.randn(T, Umax + 1, C, C, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    table[:, Umax, :, 1:] = float("-inf")
    table[:, Umax, :, 0] = 0.0
    step = _step_from_table(table)

    def exact(y):
        """Sum over paths by dynamic programming directly on the step function (independent of rnnt_loss)."""
        U = len(y)
        alpha = {(0, 0): 0.0}
        total = -float("inf")
        for t in range(T):
            for u in range(U + 1):
                if (t, u) not in alpha:
                    continue
                a = alpha[(t, u)]
                lp = step(t, [tuple(y[:u])])[0]
                if u < U:
                    alpha[(t, u + 1)] = lse(alpha.get((t, u + 1), -math.inf), a + float(lp[y[u]]))
                nxt = a + float(lp[0])
                if t + 1 < T:
                    alpha[(t + 1, u)] = lse(alpha.get((t + 1, u), -math.inf), nxt)
                elif u == U:
                    total = nxt
        return total

    scores = {y: exact(list(y)) for n in range(Umax + 1) for y in itertools.product(range(1, C), repeat=n)}
    hyps = rnnt_beam_search(step, T, beam_size=1000, max_symbols=Umax, nbest=len(scores))
    assert tuple(hyps[0].labels) == max(scores, key=scores.get)
    for h in hyps:
        assert h.log_prob == pytest.approx(scores[tuple(h.labels)], abs=1e-9)
    greedy = rnnt_greedy_decode(step, T, max_symbols=Umax)
    assert all(1 <= k < C for k in greedy)


def test_bad_input():
    lp = joint(1, 3, 2, 3)
    ok = dict(targets=torch.tensor([[1, 2]]), frame_lengths=torch.tensor([3]), target_lengths=torch.tensor([2]))
    with pytest.raises(ValueError, match=r"log_probs must be \(B, T, U \+ 1, C\)"):
        rnnt_loss(lp[0], **ok)
    with pytest.raises(ValueError, match="target label ids must be in 1..2"):
        rnnt_loss(lp, torch.tensor([[1, 0]]), ok["frame_lengths"], ok["target_lengths"])
    with pytest.raises(ValueError, match="frame_lengths must be in 1..3"):
        rnnt_loss(lp, ok["targets"], torch.tensor([0]), ok["target_lengths"])
    with pytest.raises(ValueError, match="target_lengths must be in 0..2"):
        rnnt_loss(lp, ok["targets"], ok["frame_lengths"], torch.tensor([3]))
    with pytest.raises(ValueError, match="reduction must be"):
        rnnt_loss(lp, **ok, reduction="avg")
    with pytest.raises(ValueError, match="beam_size and nbest must be >= 1"):
        rnnt_beam_search(lambda t, p: torch.zeros(len(p), 3), 2, beam_size=0)


def _reference_beam_search(step, num_frames, *, beam_size, max_symbols, nbest):
    """The search written plainly (dicts, one label at a time): what the vectorised version must equal."""
    beams = {(): 0.0}
    for t in range(num_frames):
        arrived, frontier = {}, dict(beams)
        for depth in range(max_symbols + 1):
            if not frontier:
                break
            prefixes = list(frontier)
            lp = step(t, prefixes).double()
            nxt = {}
            for i, p in enumerate(prefixes):
                arrived[p] = lse(arrived.get(p, -math.inf), frontier[p] + float(lp[i, 0]))
                if depth < max_symbols:
                    for k in range(1, lp.shape[1]):
                        nxt[p + (k,)] = lse(nxt.get(p + (k,), -math.inf), frontier[p] + float(lp[i, k]))
            frontier = dict(sorted(nxt.items(), key=lambda kv: kv[1], reverse=True)[: beam_size * 4])
        beams = dict(sorted(arrived.items(), key=lambda kv: kv[1], reverse=True)[:beam_size])
    return sorted(beams.items(), key=lambda kv: kv[1], reverse=True)[:nbest]


@pytest.mark.parametrize("seed", range(6))
def test_pruned_beam_search_equals_the_plain_search(seed):
    """With real pruning (small beams, long inputs) the vectorised search keeps the same hypotheses."""
    g = torch.Generator().manual_seed(seed)
    T, Umax, C = 7, 6, 5
    table = (torch.randn(T, Umax + 1, C, C, generator=g, dtype=torch.float64) * 2).log_softmax(-1)
    table[:, Umax, :, 1:] = float("-inf")
    table[:, Umax, :, 0] = 0.0
    step = _step_from_table(table)
    for beam, max_symbols in ((1, 2), (2, 3), (3, 6)):
        got = rnnt_beam_search(step, T, beam_size=beam, max_symbols=max_symbols, nbest=beam)
        want = _reference_beam_search(step, T, beam_size=beam, max_symbols=max_symbols, nbest=beam)
        assert [tuple(h.labels) for h in got] == [p for p, _ in want]
        assert [h.log_prob for h in got] == pytest.approx([s for _, s in want], abs=1e-12)
