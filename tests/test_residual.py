"""Residual EBM (residual-EBM seed §3) against exact enumeration.

Test bed: a tiny GRU LM over V = 4 tokens (BOS = 3 is also a token), sequences [BOS, x1, x2, x3]
(prefix = BOS, continuation length 3, 64 continuations), and a tabular energy with one value per
continuation. The exact joint P(x) ∝ P_LM(x)·exp(−E(x)) and all its marginals come from
enumerating the 64 sequences.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from _exact_tv import empirical_tv
from seqebm.data.batching import PairBatch
from seqebm.estimators import enumerate_sequences
from seqebm.estimators.residual import (joint_log_prob_bounds, last_position_distribution, perplexity_bounds,
                                        position_log_prob, residual_log_weights, sample_log_weights)
from seqebm.models.residual import ResidualEBM
from seqebm.models.rnn import RNNLM
from seqebm.objectives.conditional_nce import ConditionalNCELoss
from seqebm.sampling.resampling import joint_sample
from seqebm.sampling.sampler import sample

V, L, BOS = 4, 3, 3
SEQS = enumerate_sequences(V, L)  # (64, 3)
FULL = torch.cat([torch.full((64, 1), BOS), SEQS], 1)  # (64, 4)


class TableEnergy(nn.Module):
    """E(x) = table[index of the continuation x_{1..3}] (one free value per continuation)."""

    def __init__(self, values=None):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(64, dtype=torch.float64) if values is None else values.clone())

    def forward(self, tokens, mask):
        idx = (tokens[:, 1:4] * torch.tensor([16, 4, 1])).sum(1)
        return self.table[idx]


def make_model(scale=1.5, seed=0):
    torch.manual_seed(seed)
    lm = RNNLM(V, cell="gru", d_model=8, hidden=16, n_layers=1, dropout=0.0, tie_embeddings=False).double()
    with torch.no_grad():
        lm.embed.weight.mul_(10.0)
        lm.head.weight.mul_(3.0)
    e_true = scale * torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1))
    return ResidualEBM(lm, TableEnergy(e_true)), e_true


def exact_joint(model):
    with torch.no_grad():
        log_p_lm = torch.log_softmax(model.lm(FULL[:, :3]), -1).gather(-1, SEQS[..., None]).squeeze(-1).sum(1)
        e = model.energy(FULL, torch.ones_like(FULL, dtype=torch.bool)).double()
    joint = log_p_lm - e
    return log_p_lm, e, joint - torch.logsumexp(joint, 0), float(torch.logsumexp(joint, 0))


def test_last_position_distribution_is_exact_and_normalised():
    model, _ = make_model()
    _, _, log_joint, _ = exact_joint(model)
    got = last_position_distribution(model, FULL)  # (64, V): P(x_3 = v | x_1, x_2)
    torch.testing.assert_close(got.exp().sum(1), torch.ones(64, dtype=torch.float64))
    p = log_joint.exp().view(4, 4, 4)  # P(x1, x2, x3)
    cond = p / p.sum(2, keepdim=True)  # P(x3 | x1, x2) from the enumerated joint
    torch.testing.assert_close(got.exp(), cond.reshape(16, 4).repeat_interleave(4, 0))


def test_joint_log_prob_and_position_bounds_bracket_the_exact_values():
    """Averaged over 20000 repetitions (rows) with n = 4 LM samples each: E[lower] < exact < E[upper]
    by more than 3 standard errors (the biases are ±Var(w)/(2nμ²) ≈ ±0.03 here)."""
    model, _ = make_model(scale=0.5)
    log_p_lm, e, log_joint, _ = exact_joint(model)
    r, n = 20000, 4
    g = torch.Generator().manual_seed(0)
    i = 27  # one sequence, evaluated r times with independent samples
    lw = sample_log_weights(model, torch.full((r, 1), BOS), num_samples=n, max_new_tokens=L, generator=g)
    b = joint_log_prob_bounds(log_p_lm[i].expand(r), e[i].expand(r), lw)
    exact = float(log_joint[i])
    se_lo, se_up = float(b.lower.std()) / math.sqrt(r), float(b.upper.std()) / math.sqrt(r)
    assert float(b.lower.mean()) < exact - 3 * se_lo and float(b.upper.mean()) > exact + 3 * se_up
    # per position t = 2 (middle): exact log P(x_2 | x_1) from the enumerated joint
    p = log_joint.exp().view(4, 4, 4)
    x1, x2 = int(SEQS[i, 0]), int(SEQS[i, 1])
    exact = math.log(float(p[x1, x2].sum() / p[x1].sum()))
    pos = position_log_prob(model, FULL[i].expand(r, 4), 2, num_samples=n, generator=g)
    se_lo, se_up = float(pos.lower.std()) / math.sqrt(r), float(pos.upper.std()) / math.sqrt(r)
    assert float(pos.lower.mean()) < exact - 3 * se_lo and float(pos.upper.mean()) > exact + 3 * se_up
    assert abs(float(pos.estimate.mean()) - exact) < abs(float(pos.lower.mean()) - exact)
    last = position_log_prob(model, FULL[i:i + 1], 3, num_samples=n)
    assert float(last.lower) == float(last.upper)  # exact at the last position
    # sampled bounds at the last position (exact_last=False) bracket the enumerated value on average
    exact = float(last.lower)
    est = position_log_prob(model, FULL[i].expand(r, 4), 3, num_samples=n, generator=g, exact_last=False)
    se_lo, se_up = float(est.lower.std()) / math.sqrt(r), float(est.upper.std()) / math.sqrt(r)
    assert float(est.lower.mean()) < exact - 3 * se_lo and float(est.upper.mean()) > exact + 3 * se_up
    many = position_log_prob(model, FULL[i].expand(64, 4), 3, num_samples=4096, generator=g, exact_last=False)
    assert abs(float(many.estimate.mean()) - exact) < 0.01


def test_perplexity_bounds_order():
    lo, up = torch.tensor([-5.0, -6.0]), torch.tensor([-4.0, -5.5])
    out = perplexity_bounds(lo, up, 4)
    assert out["ppl_lower"] == pytest.approx(math.exp(9.5 / 4)) and out["ppl_upper"] == pytest.approx(math.exp(11 / 4))
    with pytest.raises(ValueError):
        residual_log_weights(torch.zeros(2), log_p=torch.zeros(2))


def test_joint_sampling_matches_the_exact_joint_and_reduces_to_top_k_when_e_is_zero():
    model, _ = make_model(scale=0.7)
    log_p_lm, _, log_joint, _ = exact_joint(model)
    lm_vs_joint = 0.5 * float((log_p_lm.exp() - log_joint.exp()).abs().sum())  # what n = 1 would give
    g = torch.Generator().manual_seed(0)
    prefix = torch.full((20000, 1), BOS)
    draws, res = joint_sample(model, prefix, num_candidates=64, max_new_tokens=L, generator=g)
    assert draws.shape == (20000, 1, 4) and res.ess.shape == (20000,)
    tv = empirical_tv(draws[:, 0, 1:], log_joint)
    assert tv < 0.04 and tv < 0.3 * lm_vs_joint
    zero = ResidualEBM(model.lm, TableEnergy())
    top, _ = joint_sample(zero, prefix, num_candidates=8, max_new_tokens=L, top_k=2, generator=g)
    ref = sample(model.lm, prefix[:1], max_new_tokens=L, num_samples=40000, top_k=2, generator=g)
    lq = torch.full((64,), float("-inf"), dtype=torch.float64)
    idx = (ref.tokens * torch.tensor([16, 4, 1])).sum(1)
    lq[idx] = ref.log_q  # exact top-k proposal log-probabilities of the sequences it can produce
    assert empirical_tv(top[:, 0, 1:], lq) < 0.03


def test_conditional_nce_recovers_the_true_residual_up_to_log_z():
    """Theorem 1: at the optimum log P_LM − E_θ = log P_data, i.e. E_θ = E_true + log Z_true."""
    model, e_true = make_model(scale=1.0)
    _, _, log_joint, log_z = exact_joint(model)
    g = torch.Generator().manual_seed(0)
    student = ResidualEBM(model.lm, TableEnergy())
    opt = torch.optim.Adam(student.energy_net.parameters(), lr=0.05)
    loss_fn = ConditionalNCELoss()
    for step in range(600):
        real = FULL[torch.multinomial(log_joint.exp(), 512, replacement=True, generator=g)]
        fake = torch.cat([torch.full((512, 1), BOS),
                          sample(model.lm, torch.full((1, 1), BOS), max_new_tokens=L, num_samples=512,
                                 generator=g).tokens], 1)
        ones = torch.ones_like(real, dtype=torch.bool)
        out = loss_fn(student, PairBatch(real, ones, fake, ones))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    diff = student.energy_net.table.detach() - e_true
    weight = log_joint.exp()  # judge where the data have mass
    mean = float((weight * diff).sum())
    spread = float((weight * (diff - mean) ** 2).sum().sqrt())
    assert abs(mean - log_z) < 0.1 and spread < 0.15
    assert 0.5 < float(out.metrics["accuracy_sum"]) / 512 < 0.75  # near chance at the optimum


def test_residual_ebm_freezes_the_lm_and_validates():
    model, _ = make_model()
    assert all(not p.requires_grad for p in model.lm.parameters())
    model.train()
    assert not model.lm.training
    with pytest.raises(ValueError, match="shape"):
        model.energy(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="PairBatch"):
        ConditionalNCELoss()(model, FULL)
    lp = model.unnormalized_log_prob(FULL, prefix_len=1)
    log_p_lm, e, _, _ = exact_joint(model)
    torch.testing.assert_close(lp, log_p_lm - e, rtol=0, atol=1e-5)  # LM scoring runs in float32
