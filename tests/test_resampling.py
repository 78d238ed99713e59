"""Importance resampling / reranking of candidates, checked against exact enumeration.

Oracles:
* SIR on a 5-item space: the exact distribution of the resampled item for k candidates is
  Σ_c Mult(c; k, r) · c_j w_j / Σ_i c_i w_i over all count vectors c (enumerated), which tends
  to the target p as k grows; the implementation's draws must match it.
* The E-Forcing sequence energy (E-Forcing seed §3 Eq. 3 at the last step K) from a per-row,
  token-by-token loop over ``model.step`` (a different code path from the batched forward).
* The E-Forcing sequence model p_θ(x) ∝ exp(−E_θ(x)) of a tiny GRU LM, enumerated over every
  continuation the sampler can produce.
"""

import itertools
import math

import pytest
import torch

from seqebm.estimators import effective_sample_size
from seqebm.models.rnn import RNNLM
from seqebm.models.seq2seq import EncoderDecoderTransformer
from seqebm.sampling.resampling import (ResampleResult, autoregressive_sequence_energy, energy_resample,
                                        gather_candidates, importance_resample)
from seqebm.sampling.sampler import enumerate_proposal, sample

TARGET = torch.tensor([0.05, 0.10, 0.15, 0.30, 0.40], dtype=torch.float64)  # p
PROPOSAL = torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05], dtype=torch.float64)  # r, mismatched on purpose


def tv(a, b):
    return 0.5 * float((a - b).abs().sum())


def exact_sir(p_unnorm, r, k):
    """Exact law of the SIR output with k candidates (enumerate multinomial count vectors)."""
    n = len(r)
    w = [float(p_unnorm[i] / r[i]) for i in range(n)]
    out = [0.0] * n
    for cut in itertools.combinations(range(k + n - 1), n - 1):  # stars and bars
        bounds = (-1, *cut, k + n - 1)
        c = [bounds[i + 1] - bounds[i] - 1 for i in range(n)]
        log_mult = math.lgamma(k + 1) + sum(ci * math.log(float(r[i])) - math.lgamma(ci + 1) for i, ci in enumerate(c))
        total = sum(ci * wi for ci, wi in zip(c, w))
        for j in range(n):
            out[j] += math.exp(log_mult) * c[j] * w[j] / total
    return torch.tensor(out, dtype=torch.float64)


def sir_draws(k, groups, *, use_proposal=True, seed=0):
    """Draw ``groups`` SIR results with k candidates from PROPOSAL; returns item frequencies."""
    g = torch.Generator().manual_seed(seed)
    cand = torch.multinomial(PROPOSAL.expand(groups, -1), k, replacement=True, generator=g)  # (G, k)
    log_target = (3.0 * TARGET).log()[cand]  # unnormalised on purpose
    log_proposal = PROPOSAL.log()[cand] if use_proposal else None
    res = importance_resample(log_target, log_proposal, mode="sample", generator=g)
    item = gather_candidates(cand, res.index).squeeze(1)
    return torch.bincount(item, minlength=5).double() / groups


def test_exact_sir_law_converges_to_target():
    """k = 1 returns the proposal; TV(SIR_k, p) falls monotonically with k (bias O(1/k))."""
    assert torch.allclose(exact_sir(TARGET, PROPOSAL, 1), PROPOSAL)
    tvs = [tv(exact_sir(TARGET, PROPOSAL, k), TARGET) for k in (1, 2, 4, 8, 16, 32)]
    assert all(b < a for a, b in zip(tvs, tvs[1:]))
    assert tvs[0] > 0.4 and tvs[-1] < 0.05
    assert 1.2 < 16 * tvs[-2] < 1.8 and 1.2 < 32 * tvs[-1] < 1.8  # TV ≈ 1.5 / k here


@pytest.mark.parametrize("k", [1, 4, 16])
def test_sir_draws_match_exact_law(k):
    """Empirical frequencies of 40000 groups within 5 binomial standard errors of the exact law."""
    groups = 40000
    freq = sir_draws(k, groups)
    exact = exact_sir(TARGET, PROPOSAL, k)
    se = (exact * (1 - exact) / groups).sqrt()
    assert ((freq - exact).abs() < 5 * se).all(), (freq, exact)


def test_sir_approaches_target_and_needs_the_proposal():
    """With log_proposal the draws approach p; without it they target p·r (far from p).

    At k = 64 the SIR bias is TV ≈ 1.5 / 64 ≈ 0.024 (see above) and the Monte Carlo floor of
    20000 groups ≈ 0.006, so 0.05 has room; the wrong limit p·r / Σ p·r is at TV 0.29 from p.
    """
    good = sir_draws(64, 20000)
    assert tv(good, TARGET) < 0.05
    forgot = sir_draws(64, 20000, use_proposal=False)
    wrong_limit = TARGET * PROPOSAL / (TARGET * PROPOSAL).sum()
    assert tv(forgot, TARGET) > 0.2 and tv(forgot, wrong_limit) < 0.05


def test_uniform_proposal_is_a_constant_shift():
    """A constant log_proposal cancels in the self-normalised weights."""
    lt = torch.randn(6, 5, dtype=torch.float64)
    a = importance_resample(lt, torch.full_like(lt, math.log(0.2)))
    b = importance_resample(lt)
    assert torch.allclose(a.log_weights, b.log_weights) and torch.allclose(a.ess, b.ess)
    assert torch.allclose(a.log_weights, torch.log_softmax(lt, 1))


def test_draws_within_one_group_follow_the_weights():
    """num_draws draws of one group are i.i.d. from ω = softmax(log_target − log_proposal)."""
    lt = torch.tensor([[0.0, 1.0, -2.0, float("-inf"), 0.5]])
    lp = torch.tensor([[-1.0, -0.5, -3.0, -1.0, 0.0]])
    m = 200000
    res = importance_resample(lt, lp, num_draws=m, generator=torch.Generator().manual_seed(3))
    assert res.index.shape == (1, m) and res.index.dtype == torch.long
    omega = torch.softmax((lt - lp).double(), 1)[0]
    freq = torch.bincount(res.index[0], minlength=5).double() / m
    assert freq[3] == 0  # -inf never picked
    assert ((freq - omega).abs() <= 5 * (omega * (1 - omega) / m).sqrt() + 1e-12).all()


def test_log_weights_and_ess_formulae():
    """log ω normalised per group; ESS = (Σw)²/Σw²: k for equal weights, 1 for a single live one."""
    g = torch.Generator().manual_seed(0)
    lt = torch.randn(4, 7, generator=g, dtype=torch.float64) * 3
    lp = torch.randn(4, 7, generator=g, dtype=torch.float64)
    res = importance_resample(lt, lp, generator=g)
    assert res.log_weights.dtype == torch.float64 and res.ess.dtype == torch.float64
    assert torch.allclose(torch.logsumexp(res.log_weights, 1), torch.zeros(4, dtype=torch.float64))
    for b in range(4):
        assert torch.allclose(res.ess[b], effective_sample_size(lt[b] - lp[b]))
        w = (lt[b] - lp[b]).exp()
        assert math.isclose(float(res.ess[b]), float(w.sum() ** 2 / (w ** 2).sum()), rel_tol=1e-9)
    flat = importance_resample(torch.zeros(2, 5))
    assert torch.allclose(flat.ess, torch.full((2,), 5.0, dtype=torch.float64))
    one = importance_resample(torch.tensor([[float("-inf"), 2.0, float("-inf")]]))
    assert float(one.ess) == pytest.approx(1.0) and int(one.index) == 1


def test_rerank_picks_the_argmax():
    lt = torch.tensor([[0.0, 3.0, 1.0, 3.0], [float("-inf"), -1.0, -5.0, -2.0]])
    lp = torch.tensor([[-9.0, 0.0, 5.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    res = importance_resample(lt, lp, mode="rerank")
    assert res.index.tolist() == [[1], [1]]  # ties -> first; the proposal is ignored
    top3 = importance_resample(lt, mode="rerank", num_draws=3)
    assert top3.index.tolist() == [[1, 3, 2], [1, 3, 2]]
    with pytest.raises(ValueError, match="num_draws=4 needs that many finite"):
        importance_resample(lt, mode="rerank", num_draws=4)


def test_minus_inf_and_bad_inputs():
    lt = torch.tensor([[float("-inf"), 0.0], [float("-inf"), float("-inf")]])
    with pytest.raises(ValueError, match=r"group\(s\) \[1\].*nothing to choose"):
        importance_resample(lt)
    with pytest.raises(ValueError, match="NaN"):
        importance_resample(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match=r"\+inf"):
        importance_resample(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match="log_proposal must be finite"):
        importance_resample(torch.zeros(1, 2), torch.tensor([[0.0, float("-inf")]]))
    with pytest.raises(ValueError, match=r"log_proposal must have the shape of log_target \(2, 3\), got \(2, 4\)"):
        importance_resample(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"log_target must be a \(B, k>=1\) tensor, got \(3,\)"):
        importance_resample(torch.zeros(3))
    with pytest.raises(ValueError, match="mode must be one of"):
        importance_resample(torch.zeros(1, 2), mode="argmax")
    with pytest.raises(ValueError, match="num_draws must be an int >= 1"):
        importance_resample(torch.zeros(1, 2), num_draws=0)
    res = importance_resample(torch.tensor([[float("-inf"), 0.0, float("-inf")]]).expand(500, -1))
    assert (res.index == 1).all()


def test_gather_candidates_matches_a_loop():
    cand = torch.arange(2 * 4 * 3).view(2, 4, 3)
    idx = torch.tensor([[3, 0], [1, 1]])
    out = gather_candidates(cand, idx)
    assert out.shape == (2, 2, 3)
    for b in range(2):
        for j in range(2):
            assert torch.equal(out[b, j], cand[b, idx[b, j]])
    assert gather_candidates(cand[..., 0], idx).tolist() == [[9, 0], [15, 15]]
    with pytest.raises(ValueError, match=r"index values must lie in \[0, k=4\)"):
        gather_candidates(cand, torch.tensor([[4], [0]]))
    with pytest.raises(ValueError, match=r"index must have shape \(B=2, m\)"):
        gather_candidates(cand, torch.tensor([[0]]))


# --------------------------------------------------------------------------- sequence energies


def tiny_lm(seed=1, std=1.5, eos=False):
    torch.manual_seed(seed)
    model = RNNLM(4, cell="gru", d_model=8, n_layers=1, dropout=0.0).eval()
    torch.nn.init.normal_(model.embed.weight, std=std)  # sharp, uneven logits
    return model.double()


@torch.no_grad()
def energy_by_steps(model, row, prefix_len, length, **context):
    """E = −logit(x_K) − Σ_{i<K} log q(x_i): one token at a time through ``model.step``, floats."""
    state = model.init_state(1, "cpu", **context)
    logits, state = model.step(row[None, :prefix_len], state)
    log_q_prefix = 0.0
    for i in range(length):
        lg = logits[0, -1].double()
        tok = int(row[prefix_len + i])
        if i == length - 1:
            return -float(lg[tok]) - log_q_prefix
        log_q_prefix += float(lg[tok] - torch.logsumexp(lg, 0))
        logits, state = model.step(row[None, prefix_len + i:prefix_len + i + 1], state)


@torch.no_grad()
def test_sequence_energy_equals_per_row_loop_and_ignores_padding():
    """Batched with padding == each row alone unpadded == the step-by-step definition."""
    model = tiny_lm()
    g = torch.Generator().manual_seed(0)
    p, length = 2, 5
    tokens = torch.randint(0, 4, (6, p + length), generator=g)
    lengths = torch.tensor([5, 1, 3, 2, 5, 4])
    energy = autoregressive_sequence_energy(model, tokens, prefix_len=p, lengths=lengths)
    assert energy.shape == (6,) and energy.dtype == torch.float64
    garbage = tokens.clone()
    for r, n in enumerate(lengths.tolist()):
        garbage[r, p + n:] = torch.randint(0, 4, (length - n,), generator=g)
        alone = autoregressive_sequence_energy(model, tokens[r:r + 1, :p + n], prefix_len=p)
        assert float(alone) == pytest.approx(float(energy[r]), abs=1e-9)
        assert float(energy[r]) == pytest.approx(energy_by_steps(model, tokens[r], p, n), abs=1e-9)
    again = autoregressive_sequence_energy(model, garbage, prefix_len=p, lengths=lengths)
    assert torch.allclose(again, energy, atol=1e-12)
    full = autoregressive_sequence_energy(model, tokens, prefix_len=p)
    assert full[0] == energy[0]


@torch.no_grad()
def test_sequence_energy_of_a_conditional_model():
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(6, d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16).eval()
    src = torch.randint(1, 6, (3, 4))
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], dtype=torch.bool)
    tokens = torch.randint(1, 6, (3, 6))
    lengths = torch.tensor([5, 2, 3])
    energy = autoregressive_sequence_energy(model, tokens, prefix_len=1, lengths=lengths,
                                            context={"source": src, "source_mask": mask})
    for r in range(3):
        ref = energy_by_steps(model, tokens[r], 1, int(lengths[r]), source=src[r:r + 1], source_mask=mask[r:r + 1])
        assert float(energy[r]) == pytest.approx(ref, abs=1e-4)


def test_sequence_energy_validates():
    model = tiny_lm()
    tokens = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"prefix_len must be an int with 1 <= prefix_len < tokens.shape\[1\]=4"):
        autoregressive_sequence_energy(model, tokens, prefix_len=4)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, L=3\]"):
        autoregressive_sequence_energy(model, tokens, prefix_len=1, lengths=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(N=2,\)"):
        autoregressive_sequence_energy(model, tokens, prefix_len=1, lengths=torch.tensor([1]))


# --------------------------------------------------------------------------- energy_resample


def exact_eforcing_model(model, max_new_tokens, eos_id=None):
    """p_θ(x) ∝ exp(−E_θ(x)) over every continuation the sampler can produce (brute force)."""
    seqs = sorted(enumerate_proposal(model, torch.tensor([[3]]), max_new_tokens, eos_id=eos_id))
    row = {s: i for i, s in enumerate(seqs)}
    energy = torch.tensor([energy_by_steps(model, torch.tensor([3, *s]), 1, len(s)) for s in seqs],
                          dtype=torch.float64)
    return row, torch.softmax(-energy, 0)


def resample_frequencies(model, row, k, groups, *, eos_id=None, seed=0, **kw):
    tokens, lengths, res = energy_resample(model, torch.full((groups, 1), 3), num_candidates=k, max_new_tokens=3,
                                           eos_id=eos_id, generator=torch.Generator().manual_seed(seed), **kw)
    assert tokens.shape == (groups, 3) and lengths.shape == (groups,) and isinstance(res, ResampleResult)
    idx = torch.tensor([row[tuple(t[:n])] for t, n in zip(tokens.tolist(), lengths.tolist())])
    return torch.bincount(idx, minlength=len(row)).double() / groups


@pytest.mark.parametrize("eos_id,kw", [(None, {}), (None, {"temperature": 1.5}), (0, {})],
                         ids=["fixed-length", "tempered-proposal", "eos"])
def test_energy_resample_approaches_the_eforcing_sequence_model(eos_id, kw):
    """SIR over k samples of q (or of a tempered q) -> p_θ ∝ q(x_<K)·exp(logit_K(x_K)) as k grows.

    Tiny GRU LM, V = 4, BOS = 3 as the prefix, 3 new tokens (64 sequences; with EOS = 0: the 40
    sequences [0], [a, 0], [a, b, c] with a, b != 0). TV(q, p_θ) ≈ 0.35 here; 8000 groups give a
    Monte Carlo TV floor of ≈ 0.02.
    """
    model = tiny_lm()
    row, p = exact_eforcing_model(model, 3, eos_id)
    groups = 8000
    tvs = [tv(resample_frequencies(model, row, k, groups, eos_id=eos_id, **kw), p) for k in (1, 4, 16)]
    assert tvs[0] > 0.15, tvs  # k = 1 is the proposal itself
    assert tvs[2] < tvs[1] < tvs[0] and tvs[2] < 0.06, tvs


def test_energy_resample_rerank_takes_the_lowest_energy():
    """Same seed: the candidates are sample(num_samples=k); rerank keeps each group's argmin energy."""
    model = tiny_lm()
    b, k = 50, 6
    prefix = torch.full((b, 1), 3)
    tokens, lengths, res = energy_resample(model, prefix, num_candidates=k, max_new_tokens=3, mode="rerank",
                                           eos_id=0, generator=torch.Generator().manual_seed(5))
    out = sample(model, prefix, max_new_tokens=3, num_samples=k, eos_id=0, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        energy = autoregressive_sequence_energy(model, torch.cat([torch.full((b * k, 1), 3), out.tokens], 1),
                                                prefix_len=1, lengths=out.lengths).view(b, k)
    best = energy.argmin(1)
    assert torch.equal(res.index[:, 0], best)
    assert torch.equal(tokens, out.tokens.view(b, k, 3)[torch.arange(b), best])
    assert torch.equal(lengths, out.lengths.view(b, k)[torch.arange(b), best])
    assert res.log_weights.shape == (b, k) and res.ess.shape == (b,)


@pytest.mark.parametrize("k", [0, 1])
def test_energy_resample_with_one_candidate_is_plain_sampling(k):
    model = tiny_lm()
    prefix = torch.full((7, 1), 3)
    tokens, lengths, res = energy_resample(model, prefix, num_candidates=k, max_new_tokens=3, eos_id=0,
                                           generator=torch.Generator().manual_seed(2))
    out = sample(model, prefix, max_new_tokens=3, eos_id=0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(tokens, out.tokens) and torch.equal(lengths, out.lengths)
    assert res.index.shape == (7, 1) and (res.ess == 1).all()


def test_energy_resample_with_a_conditional_model_and_chunks():
    """Seq2seq: the source context is expanded to the k candidates; chunked energies agree."""
    torch.manual_seed(0)
    model = EncoderDecoderTransformer(6, d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=16).eval()
    src = torch.randint(1, 6, (3, 4))
    ctx = {"source": src, "source_mask": torch.ones(3, 4, dtype=torch.bool)}
    prefix = torch.full((3, 1), 1)
    a = energy_resample(model, prefix, num_candidates=5, max_new_tokens=6, mode="rerank", eos_id=2, context=ctx,
                        generator=torch.Generator().manual_seed(0))
    b = energy_resample(model, prefix, num_candidates=5, max_new_tokens=6, mode="rerank", eos_id=2, context=ctx,
                        generator=torch.Generator().manual_seed(0), max_batch_tokens=14)
    assert torch.equal(a[0], b[0]) and torch.allclose(a[2].log_weights, b[2].log_weights, atol=1e-5)
    with pytest.raises(ValueError, match="num_candidates must be an int >= 0"):
        energy_resample(model, prefix, num_candidates=-1, max_new_tokens=3, context=ctx)
