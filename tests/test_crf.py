"""LinearChainCRF (seqebm.structured.crf) against brute-force enumeration and pytorch-crf.

Oracle: every tag sequence of a row (K <= 4, L <= 4, so at most 256 sequences) scored by a
pure-Python loop, U(y) = start[y1] + sum_t em[t, y_t] + sum_t trans[y_{t-1}, y_t] + end[y_L],
with disallowed sequences removed (probability exactly 0). Then log Z = logsumexp U,
p(y) = exp(U - log Z), marginals are sums of p over the sequences through a node/edge, Viterbi
is the argmax, k-best the sorted list.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from seqebm.structured import LinearChainCRF, bio_constraints
from seqebm.structured import crf as crf_mod

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# -------------------------------------------------------------------------------- helpers


def make_crf(K, constrained=False, seed=0, scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if constrained:
        allowed = torch.rand(K, K, generator=g) > 0.35
        allowed[0, :] = True  # tag 0 can go anywhere and start/end: some paths always exist
        allowed[:, 0] = True
        start_ok = torch.rand(K, generator=g) > 0.4
        end_ok = torch.rand(K, generator=g) > 0.4
        start_ok[0] = end_ok[0] = True
        kw = {"constraints": allowed, "start_allowed": start_ok, "end_allowed": end_ok}
    crf = LinearChainCRF(K, **kw).to(dtype)
    with torch.no_grad():
        for p in (crf.transitions, crf.start, crf.end):
            p.copy_(torch.randn(p.shape, generator=g, dtype=dtype) * scale)
    return crf


def make_batch(B, T, K, seed=0, scale=1.0, dtype=torch.float64, ragged=True):
    g = torch.Generator().manual_seed(seed + 100)
    em = torch.randn(B, T, K, generator=g, dtype=dtype) * scale
    lengths = torch.randint(1, T + 1, (B,), generator=g) if ragged else torch.full((B,), T)
    lengths[0] = T
    mask = torch.arange(T)[None, :] < lengths[:, None]
    return em, mask


def brute(crf, em, mask, b):
    """All feasible sequences of row b with their scores (pure Python)."""
    L = int(mask[b].sum())
    K = crf.num_tags
    tr, st_, en = crf.transitions.tolist(), crf.start.tolist(), crf.end.tolist()
    al, sa, ea = crf.allowed.tolist(), crf.start_allowed.tolist(), crf.end_allowed.tolist()
    e = em[b].tolist()
    seqs, scores = [], []
    for y in itertools.product(range(K), repeat=L):
        if not sa[y[0]] or not ea[y[-1]] or not all(al[y[t - 1]][y[t]] for t in range(1, L)):
            continue
        s = st_[y[0]] + en[y[-1]] + sum(e[t][y[t]] for t in range(L)) + sum(tr[y[t - 1]][y[t]] for t in range(1, L))
        seqs.append(y)
        scores.append(s)
    return seqs, scores


def logsumexp(xs):
    m = max(xs)
    return m + math.log(sum(math.exp(x - m) for x in xs))


CASES = [(K, T, c) for K, T in [(2, 4), (3, 3), (4, 4), (1, 3)] for c in (False, True) if not (K == 1 and c)]


# -------------------------------------------------------------------------------- exact inference


@pytest.mark.parametrize("K,T,constrained", CASES)
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_log_partition_likelihood_marginals_match_brute_force(K, T, constrained, scale):
    """scale=300 makes exp-space underflow certain, so it also checks the log-space fallback."""
    crf = make_crf(K, constrained, seed=K * 10 + T, scale=scale)
    em, mask = make_batch(5, T, K, seed=K + T, scale=scale)
    logz = crf.log_partition(em, mask)
    node = crf.marginals(em, mask)
    edge = crf.edge_marginals(em, mask)
    assert edge.shape == (5, T - 1, K, K)
    for b in range(5):
        seqs, scores = brute(crf, em, mask, b)
        lz = logsumexp(scores)
        assert logz[b].item() == pytest.approx(lz, rel=1e-12, abs=1e-9)
        probs = [math.exp(s - lz) for s in scores]
        L = int(mask[b].sum())
        want_node = torch.zeros(T, K, dtype=torch.float64)
        want_edge = torch.zeros(max(T - 1, 0), K, K, dtype=torch.float64)
        for y, p in zip(seqs, probs):
            for t in range(L):
                want_node[t, y[t]] += p
            for t in range(L - 1):
                want_edge[t, y[t], y[t + 1]] += p
        torch.testing.assert_close(node[b], want_node, atol=1e-10, rtol=0)
        torch.testing.assert_close(edge[b], want_edge, atol=1e-10, rtol=0)
        # log-likelihood of every feasible sequence, row by row
        tags = torch.zeros(len(seqs), T, dtype=torch.long)
        for n, y in enumerate(seqs):
            tags[n, :L] = torch.tensor(y)
        rows = mask[b:b + 1].expand(len(seqs), T)
        llh = crf.log_likelihood(em[b:b + 1].expand(len(seqs), T, K), tags, rows, reduction="none")
        torch.testing.assert_close(llh, torch.tensor(scores, dtype=torch.float64) - lz, atol=1e-9, rtol=1e-12)


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_gradients_are_brute_force_marginals(constrained, scale):
    """d log Z / d em = node marginals; d / d trans = summed edge marginals; start/end = first/last nodes."""
    K, T, B = 3, 4, 4
    crf = make_crf(K, constrained, seed=3, scale=scale)
    em, mask = make_batch(B, T, K, seed=5, scale=scale)
    em.requires_grad_(True)
    w = torch.linspace(0.5, 2.0, B, dtype=torch.float64)
    (crf.log_partition(em, mask) * w).sum().backward()
    g_em = torch.zeros(B, T, K, dtype=torch.float64)
    g_tr = torch.zeros(K, K, dtype=torch.float64)
    g_st = torch.zeros(K, dtype=torch.float64)
    g_en = torch.zeros(K, dtype=torch.float64)
    for b in range(B):
        seqs, scores = brute(crf, em.detach(), mask, b)
        lz = logsumexp(scores)
        for y, s in zip(seqs, scores):
            p = math.exp(s - lz) * w[b].item()
            for t in range(len(y)):
                g_em[b, t, y[t]] += p
            for t in range(1, len(y)):
                g_tr[y[t - 1], y[t]] += p
            g_st[y[0]] += p
            g_en[y[-1]] += p
    torch.testing.assert_close(em.grad, g_em, atol=1e-9, rtol=0)
    torch.testing.assert_close(crf.transitions.grad, g_tr, atol=1e-9, rtol=0)
    torch.testing.assert_close(crf.start.grad, g_st, atol=1e-9, rtol=0)
    torch.testing.assert_close(crf.end.grad, g_en, atol=1e-9, rtol=0)
    if constrained:  # disallowed entries are fixed: zero gradient
        assert (crf.transitions.grad[~crf.allowed] == 0).all()


@pytest.mark.parametrize("constrained", [False, True])
@pytest.mark.parametrize("scale", [1.0, 200.0])
def test_gradcheck_custom_function(constrained, scale):
    K, T, B = 3, 4, 3
    crf = make_crf(K, constrained, seed=7, scale=scale)
    em, mask = make_batch(B, T, K, seed=8, scale=scale)
    tr, st_, en = crf._scores(torch.float64, crf_mod.NEG)
    args = [em, tr.detach(), st_.detach(), en.detach()]
    for a in args:
        a.requires_grad_(True)

    def f(e, t, s, n):
        return crf_mod._LogPartition.apply(e, t, s, n, mask, crf.allowed, crf.start_allowed, crf.end_allowed)

    if constrained:  # perturbing a NEG entry by 1e-6 is invisible; check the allowed ones only
        def f_masked(e, t, s, n):
            return f(e, t.masked_fill(~crf.allowed, crf_mod.NEG), s.masked_fill(~crf.start_allowed, crf_mod.NEG),
                     n.masked_fill(~crf.end_allowed, crf_mod.NEG))
        assert torch.autograd.gradcheck(f_masked, args)
    else:
        assert torch.autograd.gradcheck(f, args)


def test_fast_path_is_certified_and_fallback_triggers():
    """The scaled (exp-space) path runs on ordinary scores and is refused on huge ranges."""
    crf = make_crf(4, True, seed=1)
    em, mask = make_batch(6, 9, 4, seed=2)
    assert crf._cache(em, mask).fast
    em_big = em * 1e4
    assert not crf._cache(em_big, mask).fast
    # both recursions agree where both apply
    tr, st_, en = crf._scores(torch.float64, crf_mod.NEG)
    _, logz_log = crf_mod._log_forward(em, mask, tr, st_, en)
    torch.testing.assert_close(crf.log_partition(em, mask), logz_log, atol=1e-11, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_scores_stay_finite_and_exact(dtype):
    """Scores of size 1e4: log Z, gradients, marginals finite; log Z equals the float64 log-space value."""
    K, T, B = 5, 12, 4
    crf = make_crf(K, True, seed=4, scale=1e4, dtype=dtype)
    em, mask = make_batch(B, T, K, seed=4, scale=1e4, dtype=dtype)
    em.requires_grad_(True)
    tags = crf.viterbi(em, mask)[0].clamp_min(0)
    llh = crf.log_likelihood(em, tags, mask, reduction="sum")
    llh.backward()
    assert torch.isfinite(llh) and torch.isfinite(em.grad).all() and torch.isfinite(crf.transitions.grad).all()
    assert llh.item() <= 1e-3 * abs(em.detach().abs().max().item())  # log p <= 0 up to float rounding
    node = crf.marginals(em, mask)
    # exponents of size |U| ~ 1e5 carry an absolute rounding error ~ eps * 1e5 (6e-3 in float32)
    tol = 0.1 if dtype == torch.float32 else 1e-8
    torch.testing.assert_close(node.sum(-1), mask.to(dtype), atol=tol, rtol=0)
    tr, st_, en = crf.double()._scores(torch.float64, crf_mod.NEG)
    ref = crf_mod._log_forward(em.detach().double(), mask, tr, st_, en)[1]
    torch.testing.assert_close(crf.log_partition(em.detach().double(), mask), ref)


def test_float32_matches_float64():
    crf64 = make_crf(6, True, seed=9)
    em, mask = make_batch(8, 20, 6, seed=9)
    crf32 = make_crf(6, True, seed=9).float()
    torch.testing.assert_close(crf32.log_partition(em.float(), mask).double(), crf64.log_partition(em, mask),
                               rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(crf32.marginals(em.float(), mask).double(), crf64.marginals(em, mask),
                               rtol=0, atol=1e-5)
    torch.testing.assert_close(crf32.edge_marginals(em.float(), mask).double(), crf64.edge_marginals(em, mask),
                               rtol=0, atol=1e-5)


# -------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("K,T,constrained", CASES)
def test_viterbi_and_kbest_match_brute_force(K, T, constrained):
    crf = make_crf(K, constrained, seed=K + 2 * T)
    em, mask = make_batch(4, T, K, seed=K * T)
    tags, scores = crf.viterbi(em, mask)
    kmax = K ** T
    ktags, kscores = crf.kbest(em, mask, k=kmax)
    assert ktags.shape == (4, kmax, T) and kscores.shape == (4, kmax)
    for b in range(4):
        seqs, sc = brute(crf, em, mask, b)
        L = int(mask[b].sum())
        order = sorted(range(len(seqs)), key=lambda n: -sc[n])
        assert tuple(tags[b, :L].tolist()) == seqs[order[0]]
        assert (tags[b, L:] == -1).all()
        assert scores[b].item() == pytest.approx(sc[order[0]], abs=1e-10)
        n = len(seqs)
        torch.testing.assert_close(kscores[b, :n], torch.tensor([sc[i] for i in order], dtype=torch.float64))
        assert [tuple(r[:L]) for r in ktags[b, :n].tolist()] == [seqs[i] for i in order]
        assert (ktags[b, :n, L:] == -1).all()
        assert (kscores[b, n:] == -math.inf).all() and (ktags[b, n:] == -1).all()
        for k in range(1, min(n, 5) + 1):  # smaller k: a prefix of the full list
            t2, s2 = crf.kbest(em[b:b + 1], mask[b:b + 1], k=k)
            torch.testing.assert_close(s2[0], kscores[b, :k])


@pytest.mark.parametrize("constrained", [False, True])
def test_sampling_frequencies_match_brute_force(constrained):
    """Total variation to the exact p(y|x): with S samples over N sequences,
    E[TV] <= 0.5 * sum_y sqrt(p(1-p)/S) <= 0.5 * sqrt(N / S) = 0.026 for N=27, S=10000; bound 0.06."""
    K, T, S = 3, 3, 10000
    crf = make_crf(K, constrained, seed=11)
    em, mask = make_batch(3, T, K, seed=12)
    samples = crf.sample(em, mask, S, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, S, T)
    for b in range(3):
        seqs, sc = brute(crf, em, mask, b)
        L = int(mask[b].sum())
        lz = logsumexp(sc)
        counts: dict = {}
        for row in samples[b].tolist():
            assert all(v == -1 for v in row[L:])
            counts[tuple(row[:L])] = counts.get(tuple(row[:L]), 0) + 1
        assert set(counts) <= set(seqs)  # never an infeasible sequence
        tv = 0.5 * sum(abs(counts.get(y, 0) / S - math.exp(s - lz)) for y, s in zip(seqs, sc))
        assert tv < 0.06, tv


def test_sampling_reproducible_with_generator():
    crf = make_crf(4, False, seed=0)
    em, mask = make_batch(2, 6, 4, seed=0)
    a = crf.sample(em, mask, 5, generator=torch.Generator().manual_seed(3))
    b = crf.sample(em, mask, 5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


# -------------------------------------------------------------------------------- pytorch-crf


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "token_mean"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_equals_pytorch_crf(reduction, batch_first):
    torchcrf = pytest.importorskip("torchcrf")
    K, T, B = 7, 15, 9
    ref = torchcrf.CRF(K, batch_first=batch_first).double()
    ours = LinearChainCRF(K).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(generator=torch.Generator().manual_seed(p.numel()))
        ours.transitions.copy_(ref.transitions)
        ours.start.copy_(ref.start_transitions)
        ours.end.copy_(ref.end_transitions)
    em, mask = make_batch(B, T, K, seed=21)
    tags = torch.randint(0, K, (B, T), generator=torch.Generator().manual_seed(1))

    def tb(x):  # pytorch-crf is time-major unless batch_first
        return x if batch_first else x.transpose(0, 1)

    want = ref(tb(em), tb(tags), tb(mask), reduction=reduction)
    got = ours.log_likelihood(em, tags, mask, reduction=reduction)
    torch.testing.assert_close(got, want)
    decoded = ref.decode(tb(em), tb(mask))
    best = ours.viterbi(em, mask)[0]
    assert [row[row >= 0].tolist() for row in best] == decoded


# -------------------------------------------------------------------------------- constraints, validation


def test_bio_constraints_and_decoding_respect_them():
    names = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
    c = bio_constraints(names)
    allowed = c["constraints"]
    assert allowed[1, 2] and allowed[2, 2] and not allowed[0, 2] and not allowed[3, 2] and not allowed[2, 4]
    assert allowed[4, 0] and allowed[0, 1] and allowed[2, 3]
    assert c["start_allowed"].tolist() == [True, True, False, True, False]
    assert c["end_allowed"].all()
    crf = LinearChainCRF(5, **c)
    em = torch.randn(16, 10, 5, generator=torch.Generator().manual_seed(0)) * 3
    em[:, :, 2] += 5.0  # push hard towards I-PER everywhere
    for seq in [crf.viterbi(em)[0], *crf.kbest(em, k=4)[0].unbind(1), *crf.sample(em, None, 4).unbind(1)]:
        for row in seq.tolist():
            assert names[row[0]][:2] != "I-"
            for a, b in zip(row, row[1:]):
                assert allowed[a, b], (row, a, b)
    with pytest.raises(ValueError, match="BIO tag names"):
        bio_constraints(["O", "X"])


def test_validation_errors():
    crf = LinearChainCRF(3, constraints=torch.tensor([[1, 1, 0], [1, 1, 1], [1, 1, 1]]).bool(),
                         start_allowed=torch.tensor([True, True, False]))
    em = torch.randn(2, 4, 3)
    ok = torch.ones(2, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"emissions must be \(B, T, K\)"):
        crf.log_partition(em[0])
    with pytest.raises(ValueError, match="emissions have 4 tags"):
        crf.log_partition(torch.randn(2, 4, 4))
    with pytest.raises(ValueError, match=r"mask must have shape \(2, 4\)"):
        crf.log_partition(em, ok[:, :3])
    with pytest.raises(TypeError, match="mask must be a bool"):
        crf.log_partition(em, ok.long())
    with pytest.raises(ValueError, match="mask row 1 is empty"):
        crf.log_partition(em, torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0]]).bool())
    with pytest.raises(ValueError, match="mask row 0 has a hole: position 2"):
        crf.log_partition(em, torch.tensor([[1, 0, 1, 0], [1, 1, 1, 1]]).bool())
    with pytest.raises(ValueError, match=r"tags must have shape \(2, 4\)"):
        crf.log_likelihood(em, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="tag 3 at row 1, position 2 is out of range"):
        crf.log_likelihood(em, torch.tensor([[0, 0, 0, 0], [0, 0, 3, 0]]))
    # out-of-range tags at padded positions are ignored
    pad = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]).bool()
    assert torch.isfinite(crf.log_likelihood(em, torch.tensor([[0, 0, 0, 0], [0, 0, 7, -1]]), pad))
    with pytest.raises(ValueError, match=r"transition 0 -> 2 is not allowed \(row 1, position 3\)"):
        crf.log_likelihood(em, torch.tensor([[0, 1, 2, 2], [1, 1, 0, 2]]))
    with pytest.raises(ValueError, match=r"tag 2 may not start a sequence \(row 0, position 0\)"):
        crf.log_likelihood(em, torch.tensor([[2, 1, 1, 1], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="reduction must be one of"):
        crf.log_likelihood(em, torch.zeros(2, 4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match="constraints must be a bool tensor of shape"):
        LinearChainCRF(3, constraints=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="k must be a positive int"):
        crf.kbest(em, k=0)


def test_padding_content_is_ignored():
    """Non-finite emissions at padded positions change nothing."""
    crf = make_crf(4, True, seed=2)
    em, mask = make_batch(5, 7, 4, seed=3)
    junk = em.masked_fill(~mask.unsqueeze(-1), float("nan"))
    junk[~mask] = float("inf")
    for f in (crf.log_partition, crf.marginals, crf.edge_marginals, lambda e, m: crf.viterbi(e, m)[0],
              lambda e, m: crf.kbest(e, m, 3)[1]):
        torch.testing.assert_close(f(junk, mask), f(em, mask))
    tags = crf.viterbi(em, mask)[0].clamp_min(0)
    torch.testing.assert_close(crf.log_likelihood(junk, tags, mask), crf.log_likelihood(em, tags, mask))
    junk.requires_grad_(True)
    crf.log_partition(junk, mask).sum().backward()
    assert torch.isfinite(junk.grad).all() and (junk.grad[~mask] == 0).all()


def test_all_zero_scores_count_sequences():
    """All-zero scores, no constraints: log Z = L log K per row; marginals uniform 1/K."""
    crf = LinearChainCRF(4)
    with torch.no_grad():
        for p in crf.parameters():
            p.zero_()
    em = torch.zeros(3, 5, 4)
    mask = torch.tensor([[1] * 5, [1, 1, 0, 0, 0], [1, 0, 0, 0, 0]]).bool()
    torch.testing.assert_close(crf.log_partition(em, mask), torch.tensor([5.0, 2.0, 1.0]) * math.log(4))
    torch.testing.assert_close(crf.marginals(em, mask), mask[..., None].float().expand(3, 5, 4) / 4)


# -------------------------------------------------------------------------------- properties


@settings(max_examples=25, deadline=None)
@given(K=st.integers(1, 5), T=st.integers(1, 6), B=st.integers(1, 4), seed=st.integers(0, 10_000),
       constrained=st.booleans())
def test_padded_batch_equals_per_row_and_log_space(K, T, B, seed, constrained):
    """Fast path == log-space path; padded+mask == each row alone, unpadded."""
    crf = make_crf(K, constrained and K > 1, seed=seed)
    em, mask = make_batch(B, T, K, seed=seed, scale=2.0)
    logz = crf.log_partition(em, mask)
    node = crf.marginals(em, mask)
    tags, scores = crf.viterbi(em, mask)
    tr, st_, en = crf._scores(torch.float64, crf_mod.NEG)
    _, ref_node, _ = crf_mod._log_marginals(em, mask, tr, st_, en, False)
    torch.testing.assert_close(node, ref_node, atol=1e-10, rtol=0)
    for b in range(B):
        L = int(mask[b].sum())
        torch.testing.assert_close(crf.log_partition(em[b:b + 1, :L]), logz[b:b + 1])
        torch.testing.assert_close(crf.marginals(em[b:b + 1, :L]), node[b:b + 1, :L])
        t1, s1 = crf.viterbi(em[b:b + 1, :L])
        torch.testing.assert_close(s1, scores[b:b + 1])
        assert torch.equal(t1[0], tags[b, :L])
