"""Distributional control (GDC-style, monograph §4.4.2 on ref. [72]) against exact enumeration.

The base a and the policy π are tiny Transformer LMs over V = 4 tokens generating L = 3 tokens
after BOS (64 continuations), so a(x), π(x), the target P(x) ∝ a(x)·exp(λ·φ(x)) (or
a(x)·1[b(x) = 1]), its moments E_P[φ] and KL(P || π) are all computed exactly by enumeration.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from seqebm.estimators import enumerate_sequences
from seqebm.models.transformer import TransformerLM
from seqebm.objectives.distributional import (DPGLoss, DistributionalTarget, constraint_moments, dpg_loss,
                                              fit_lambda, kl_from_samples)
from seqebm.sampling.sampler import sample
from seqebm.sampling.scoring import sequence_log_prob

V, L, BOS = 4, 3, 0
ALL = enumerate_sequences(V, L)  # (64, 3)


def lm(seed):
    torch.manual_seed(seed)
    model = TransformerLM(V, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=L + 1, dropout=0.0)
    with torch.no_grad():  # make the LM far from uniform so the constraints matter
        model.embed.weight.mul_(8.0)
    return model.eval()


def features(tokens, mask=None):
    """φ(x) = (fraction of 3s, 1[x_1 = 1]), (N, 2) float64."""
    return torch.stack([(tokens == 3).double().mean(1), (tokens[:, 0] == 1).double()], 1)


def has_three(tokens, mask=None):
    return (tokens == 3).any(1)


def log_probs_all(model):
    rows = torch.cat([torch.full((ALL.shape[0], 1), BOS), ALL], 1)
    with torch.no_grad():
        return sequence_log_prob(model, rows)  # (64,) float64


def exact_moments(log_a, lam, phi=None):
    """E_{P_λ}[φ] by a plain Python sum over the 64 sequences (independent of fit_lambda)."""
    phi = features(ALL) if phi is None else phi
    w = [math.exp(float(log_a[i]) + float(phi[i] @ lam)) for i in range(ALL.shape[0])]
    z = sum(w)
    return torch.tensor([sum(w[i] * float(phi[i, k]) for i in range(len(w))) / z for k in range(phi.shape[1])],
                        dtype=torch.float64)


def test_fit_lambda_is_exact_with_enumeration_weights():
    log_a = log_probs_all(lm(0))
    target = torch.tensor([0.5, 0.4], dtype=torch.float64)
    fit = fit_lambda(features(ALL), log_a, target)
    assert fit.converged and fit.iterations < 50
    assert torch.allclose(exact_moments(log_a, fit.lam), target, atol=1e-6, rtol=0)
    assert torch.allclose(fit.moments, target, atol=1e-8, rtol=0)
    # log Z(λ) / Z(0) = log Σ_x a(x) exp(λ·φ(x)) − log Σ_x a(x) (the last term is 0 up to float32 rounding)
    log_z = torch.logsumexp(log_a + features(ALL) @ fit.lam, 0) - torch.logsumexp(log_a, 0)
    assert math.isclose(fit.log_partition, float(log_z), abs_tol=1e-9)
    scalar = fit_lambda(features(ALL)[:, 0], log_a, 0.2)
    assert scalar.lam.shape == (1,)
    moment = exact_moments(log_a, scalar.lam, features(ALL)[:, :1])
    assert torch.allclose(moment, torch.tensor([0.2], dtype=torch.float64), atol=1e-6, rtol=0)


def test_fit_lambda_from_samples_is_approximately_right():
    """From 20000 draws of a (equal weights) and of another LM q (weights a/q): the exact moments under
    the fitted λ are within Monte Carlo error (a few 1/sqrt(ESS)) of the target."""
    a, q = lm(0), lm(5)
    log_a = log_probs_all(a)
    target = torch.tensor([0.5, 0.4], dtype=torch.float64)
    prefix = torch.full((1, 1), BOS)
    draws = sample(a, prefix, max_new_tokens=L, num_samples=20000, generator=torch.Generator().manual_seed(0))
    fit = fit_lambda(features(draws.tokens), None, target)
    assert fit.converged
    assert torch.allclose(exact_moments(log_a, fit.lam), target, atol=0.02, rtol=0)
    other = sample(q, prefix, max_new_tokens=L, num_samples=20000, generator=torch.Generator().manual_seed(1))
    rows = torch.cat([prefix.expand(20000, 1), other.tokens], 1)
    with torch.no_grad():
        log_w = sequence_log_prob(a, rows) - other.log_q
    fit_q = fit_lambda(features(other.tokens), log_w, target)
    assert fit_q.converged and fit_q.ess > 100
    assert torch.allclose(exact_moments(log_a, fit_q.lam), target, atol=0.04, rtol=0)


def test_fit_lambda_rejects_bad_inputs():
    phi = features(ALL)
    with pytest.raises(ValueError, match=r"target\[1\] = 1.0 is not strictly inside.*pointwise"):
        fit_lambda(phi, None, [0.5, 1.0])
    with pytest.raises(ValueError, match="target must have 2 value"):
        fit_lambda(phi, None, [0.5])
    with pytest.raises(ValueError, match=r"log_weights must have shape \(64,\)"):
        fit_lambda(phi, torch.zeros(3), [0.5, 0.4])
    with pytest.raises(ValueError, match="every log weight is -inf"):
        fit_lambda(phi, torch.full((64,), -math.inf), [0.5, 0.4])
    with pytest.raises(ValueError, match="must be finite"):
        fit_lambda(phi.clone().fill_(math.nan), None, [0.5, 0.4])
    with pytest.raises(ValueError, match="NaN"):
        fit_lambda(phi, torch.full((64,), math.nan), [0.5, 0.4])


def exact_target_log_probs(log_a, lam=None, pointwise=None):
    lp = log_a.clone()
    if lam is not None:
        lp = lp + features(ALL) @ lam
    if pointwise is not None:
        lp = torch.where(pointwise(ALL), lp, torch.full_like(lp, -math.inf))
    return lp - torch.logsumexp(lp, 0)


def exact_kl(log_p, log_q):
    p = log_p.exp()
    return float(torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum())


def run_dpg(target, policy, steps, lr=0.05, seed=0):
    loss_fn = DPGLoss(target, num_samples=256, max_new_tokens=L, bos_id=BOS, seed=seed)
    opt = torch.optim.Adam(policy.parameters(), lr=lr)
    for step in range(steps):
        out = loss_fn(policy, None, step=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return out


def test_dpg_moves_the_policy_toward_the_moment_constrained_target():
    a = lm(0)
    log_a = log_probs_all(a)
    target_mu = torch.tensor([0.5, 0.4], dtype=torch.float64)
    lam = fit_lambda(features(ALL), log_a, target_mu).lam
    log_p = exact_target_log_probs(log_a, lam)
    policy = copy.deepcopy(a).train()
    before = exact_kl(log_p, log_probs_all(policy))
    out = run_dpg(DistributionalTarget(a, features=features, lam=lam), policy, steps=40)
    after = exact_kl(log_p, log_probs_all(policy))
    assert after < 0.3 * before
    mu_pi = torch.softmax(log_probs_all(policy), 0) @ features(ALL)
    mu_a = torch.softmax(log_a, 0) @ features(ALL)
    assert float((mu_pi - target_mu).abs().max()) < 0.5 * float((mu_a - target_mu).abs().max())
    assert set(out.metrics) == {"ess_sum", "accept_sum", "tokens"}


def test_dpg_with_a_pointwise_constraint():
    """P ∝ a(x)·1[x contains a 3]: DPG raises π(constraint holds) and lowers KL(P || π)."""
    a = lm(0)
    log_a = log_probs_all(a)
    log_p = exact_target_log_probs(log_a, pointwise=has_three)
    policy = copy.deepcopy(a).train()
    before = exact_kl(log_p, log_probs_all(policy))
    sat_before = float(torch.softmax(log_probs_all(policy), 0) @ has_three(ALL).double())
    run_dpg(DistributionalTarget(a, pointwise=has_three), policy, steps=40)
    sat_after = float(torch.softmax(log_probs_all(policy), 0) @ has_three(ALL).double())
    assert exact_kl(log_p, log_probs_all(policy)) < 0.3 * before
    assert sat_after > sat_before + 0.5 * (1 - sat_before)


def test_target_dpg_loss_and_helpers_by_hand():
    a = lm(0)
    lam = torch.tensor([1.0, -2.0], dtype=torch.float64)
    target = DistributionalTarget(a, features=features, lam=lam, pointwise=has_three)
    prompt = torch.full((1, 1), BOS)
    lt = target.log_unnormalized(prompt, ALL)
    expected = log_probs_all(a) + features(ALL) @ lam
    assert torch.equal(torch.isinf(lt), ~has_three(ALL))
    assert torch.allclose(lt[has_three(ALL)], expected[has_three(ALL)])
    # dpg_loss: Σ ω (−log π), ω = softmax(log P̃ − log q); its gradient is −Σ ω ∇ log π
    log_pi = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    log_t, log_q = torch.tensor([0.0, -math.inf, 1.0]), torch.tensor([-1.0, -1.0, -2.0])
    omega = torch.softmax(log_t - log_q, 0)
    loss = dpg_loss(log_pi, log_t, log_q)
    assert math.isclose(loss.item(), (-(omega * log_pi).sum()).item(), rel_tol=1e-6)
    (grad,) = torch.autograd.grad(loss, log_pi)
    assert torch.allclose(grad, -omega)
    assert dpg_loss(log_pi, log_t, log_q, reduction="none").shape == (3,)
    assert math.isclose(dpg_loss(log_pi, log_t, log_q, reduction="sum").item(), 3 * loss.item(), rel_tol=1e-6)
    dead = dpg_loss(log_pi, torch.full((3,), -math.inf), log_q)
    assert dead.item() == 0.0 and dead.requires_grad
    # helpers: exact enumeration as weighted "samples"
    log_pi_all, log_a = log_probs_all(lm(3)), log_probs_all(a)
    assert math.isclose(float(kl_from_samples(log_pi_all, log_a, log_weights=log_pi_all)),
                        exact_kl(log_pi_all, log_a), rel_tol=1e-6)  # π sums to 1 up to float32 rounding
    assert torch.allclose(constraint_moments(features(ALL), log_a), torch.softmax(log_a, 0) @ features(ALL))
    draws = sample(lm(3), prompt, max_new_tokens=L, num_samples=20000, generator=torch.Generator().manual_seed(2))
    rows = torch.cat([prompt.expand(20000, 1), draws.tokens], 1)
    with torch.no_grad():
        mc = kl_from_samples(sequence_log_prob(lm(3), rows), sequence_log_prob(a, rows))
    assert abs(float(mc) - exact_kl(log_pi_all, log_a)) < 0.1


def test_distributional_bad_inputs():
    a = lm(0)
    with pytest.raises(ValueError, match="features and lam together"):
        DistributionalTarget(a, features=features)
    with pytest.raises(ValueError, match="needs features with lam"):
        DistributionalTarget(a)
    target = DistributionalTarget(a, features=features, lam=torch.zeros(3))
    with pytest.raises(ValueError, match=r"features returned \(64, 2\), expected \(64, 3\)"):
        target.log_unnormalized(torch.full((1, 1), BOS), ALL)
    with pytest.raises(ValueError, match="log_q must be finite"):
        dpg_loss(torch.zeros(2), torch.zeros(2), torch.tensor([0.0, math.inf]))
    with pytest.raises(ValueError, match="one shape"):
        dpg_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2))
    with pytest.raises(ValueError, match="reduction"):
        dpg_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), reduction="avg")
    with pytest.raises(TypeError, match="DistributionalTarget"):
        DPGLoss(a, num_samples=4, max_new_tokens=2)
    with pytest.raises(ValueError, match="num_samples"):
        DPGLoss(target, num_samples=0, max_new_tokens=2, bos_id=BOS)
