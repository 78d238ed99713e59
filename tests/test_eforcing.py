"""E-Forcing against exact enumeration (E-Forcing seed, Eq. 3–11).

Test bed: V = 4 tokens (BOS = 3 is also a token), K = 3 steps, so all 64 sequences can be
enumerated. p_d is uniform over them and the data batch is all 64 sequences, which makes the
positive phase exact; only the negative phase is random.

* The exact gradient of Σ_k λ_k KL(p_d(x_≤k) ‖ p_θ(x_≤k)) (Eq. 5) comes from autograd through
  the enumerated objective: −log p_θ(x_≤k) = E_θ(x_k, x_<k) + log Z_k with
  Z_k = Σ_x q(x) S_k(x_<k).
* With n negatives the self-normalised estimator is biased by O(1/n). Its exact expectation at
  n = 1, 2, 3 is computed by enumerating all 64^n ordered n-tuples of negatives with the
  weights of Eq. 9 written from the definition. The gap to the exact gradient shrinks with n.
* The average of EForcingLoss gradients over R random batches of n = 2 negatives matches the
  exact n = 2 expectation within its Monte Carlo error (mean squared per-coordinate z-score
  ≈ 1.2 here, < 1.6 required; coordinates are correlated, so it fluctuates more than a χ²), and
  the same statistic reaches 3.3–670 when the weights are normalised wrongly (> 2.5 required).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from seqebm.data.batching import Batch
from seqebm.estimators import enumerate_sequences
from seqebm.models.rnn import RNNLM
from seqebm.objectives import EForcingLoss, TeacherForcingLoss, snis_step_weights
import seqebm.objectives.eforcing as eforcing_module

V, K, BOS = 4, 3, 3
LAM, DECAY = 0.7, 0.8


def make_model() -> RNNLM:
    torch.manual_seed(0)
    model = RNNLM(V, cell="gru", d_model=8, hidden=16, n_layers=1, dropout=0.0, tie_embeddings=False).double()
    with torch.no_grad():  # spread the hidden states and the raw logit offsets: S_k varies across prefixes
        model.embed.weight.mul_(20.0)
        model.proj.weight.mul_(5.0)
        model.head.weight.mul_(4.0)
    return model


SEQS = enumerate_sequences(V, K)  # (64, 3)
FULL = torch.cat([torch.full((64, 1), BOS), SEQS], 1)  # (64, 4)
DATA = Batch(inputs=FULL[:, :K], targets=FULL[:, 1:], mask=torch.ones(64, K, dtype=torch.bool))
LAMBDAS = LAM * DECAY ** torch.arange(K, dtype=torch.float64)
SCALE = 64 / (64 * K)  # D / number of target tokens, the weight of the CD term in the loss


def enumerated_terms(model):
    """E_k(x), log S_k(x_<k), log q(x) for all 64 sequences, from the definitions (Eq. 3, §3.1)."""
    logits = model(FULL[:, :K])  # (64, K, V) raw logits
    lse = torch.logsumexp(logits, -1)  # log S_k
    logit_tgt = logits.gather(-1, SEQS[..., None]).squeeze(-1)
    log_q_tok = logit_tgt - lse
    log_q_prefix = torch.cat([torch.zeros(64, 1, dtype=logits.dtype), log_q_tok.cumsum(1)[:, :-1]], 1)
    energy = -logit_tgt - log_q_prefix  # E = φ − log q(x_<k), φ = −logit
    return energy, lse, log_q_tok.sum(1)


def flat_grad(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def teacher_forcing(model):
    return TeacherForcingLoss()(model, DATA).loss


def exact_gradient(model):
    """∇ [TF + SCALE · Σ_k λ_k KL_k] through the enumerated objective (p_d uniform)."""
    energy, lse, log_q = enumerated_terms(model)
    log_z = torch.logsumexp(log_q[:, None] + lse, 0)  # (K,) log Σ_x q(x) S_k(x_<k)
    kl = (energy.mean(0) + log_z)  # up to the constant E_pd log p_d
    return flat_grad(model, teacher_forcing(model) + SCALE * (LAMBDAS * kl).sum())


def estimator_expectation(model, n, temperature=1.0):
    """Exact E[gradient] of the n-negative estimator: sum over all 64^n ordered tuples (Eq. 7–9).

    Negatives come from r = softmax(logits / temperature) (r = q_θ at temperature 1); the weight
    of negative i at step k is S_k(x_i) · q_θ(x_i,≤k) / r(x_i,≤k), normalised by its mean over the
    tuple — written here from the definitions, independently of the library.
    """
    energy, lse, log_q = enumerated_terms(model)
    with torch.no_grad():
        logits = model(FULL[:, :K])
        log_r_tok = torch.log_softmax(logits / temperature, -1).gather(-1, SEQS[..., None]).squeeze(-1)
        log_q_tok = torch.log_softmax(logits, -1).gather(-1, SEQS[..., None]).squeeze(-1)
        log_ratio = (log_q_tok - log_r_tok).cumsum(1)  # log q_θ(x_≤k) / r(x_≤k)
        tuples = torch.tensor(list(itertools.product(range(64), repeat=n)))  # (64^n, n)
        prob = log_r_tok.sum(1)[tuples].sum(1).exp()  # (M,) probability of the tuple under r
        s = (lse + log_ratio)[tuples].exp()  # (M, n, K)
        w = s / s.mean(1, keepdim=True)  # Eq. 9 with the batch mean in the denominator
        coef = torch.zeros(64, K, dtype=torch.float64)
        coef.index_put_((tuples.flatten(),), ((prob[:, None, None] * w / n).reshape(-1, K)), accumulate=True)
    neg = (coef * energy).sum(0)  # (K,) E_n[(1/n) Σ_i ŵ_i E_k(x̃_i)]
    pos = energy.mean(0)
    return flat_grad(model, teacher_forcing(model) + SCALE * (LAMBDAS * (pos - neg)).sum())


def eforcing(n, **kw):
    return EForcingLoss(lambda_base=LAM, lambda_decay=DECAY, num_steps=K, num_negatives=n, **kw)


def mc_average(model, objective, repeats, seed=0):
    g = torch.Generator().manual_seed(seed)
    grads = torch.stack([flat_grad(model, objective(model, DATA, step=0, generator=g).loss) for _ in range(repeats)])
    return grads.mean(0), grads.std(0) / math.sqrt(repeats)


def test_infinite_n_identity_and_the_gap_shrinks_with_n():
    """App. B's identity (Eq. 6 = Eq. 7 − Eq. 8 with exact Z) and the O(1/n) bias of self-normalisation."""
    model = make_model()
    exact = exact_gradient(model)
    energy, lse, log_q = enumerated_terms(model)
    w = (lse - torch.logsumexp(log_q[:, None] + lse, 0)).exp()  # exact w(x_<k) of Eq. 9
    neg = ((log_q.exp()[:, None] * w).detach() * energy).sum(0)  # Eq. 8: E_q[w ∇E], q and w held fixed
    identity = flat_grad(model, teacher_forcing(model) + SCALE * (LAMBDAS * (energy.mean(0) - neg)).sum())
    torch.testing.assert_close(identity, exact, rtol=1e-9, atol=1e-12)
    gaps = [float((estimator_expectation(model, n) - exact).norm()) for n in (1, 2, 3)]
    assert gaps[0] > 1e-3  # weights matter on this model
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[1] / gaps[0] == pytest.approx(1 / 2, abs=0.1)  # ≈ 1/n to leading order
    assert gaps[2] / gaps[0] == pytest.approx(1 / 3, abs=0.1)


def _z_scores(model, objective, repeats=1000, temperature=1.0):
    """Mean squared per-coordinate z-score, and the z-scores along the directions E_2 − E_1 and
    E_2 − exact, of the averaged loss gradient against the exact n = 2 expectation E_2."""
    e1, e2 = estimator_expectation(model, 1, temperature), estimator_expectation(model, 2, temperature)
    exact = exact_gradient(model)
    g = torch.Generator().manual_seed(0)
    grads = torch.stack([flat_grad(model, objective(model, DATA, step=0, generator=g).loss) for _ in range(repeats)])
    mean, se = grads.mean(0), grads.std(0) / math.sqrt(repeats)
    keep = se > 1e-10
    mean_sq = float((((mean - e2)[keep] / se[keep]) ** 2).mean())
    zs = []
    for d in (e2 - e1, e2 - exact):
        proj = grads @ (d / d.norm())
        zs.append(float((proj.mean() - e2 @ (d / d.norm())) / (proj.std() / math.sqrt(repeats))))
    return mean_sq, zs


def test_averaged_gradient_matches_the_exact_expectation_at_n2():
    mean_sq, zs = _z_scores(make_model(), eforcing(2))
    assert mean_sq < 1.6 and max(abs(z) for z in zs) < 4.0


def test_tempered_proposal_is_corrected_exactly():
    """Negatives at temperature 1.5 with the q_θ/r correction: the n → ∞ limit is the exact gradient
    (the definitions-based oracle at temperature 1.5 with n = 3 is closer than with n = 1), and the
    averaged gradient matches the exact n = 2 expectation of the tempered estimator."""
    model = make_model()
    exact = exact_gradient(model)
    gaps = [float((estimator_expectation(model, n, 1.5) - exact).norm()) for n in (1, 3)]
    assert gaps[1] < 0.5 * gaps[0]
    mean_sq, zs = _z_scores(model, eforcing(2, temperature=1.5), repeats=600, temperature=1.5)
    assert mean_sq < 1.6 and max(abs(z) for z in zs) < 4.0


@pytest.mark.parametrize("wrong", ["unweighted", "not_per_step", "unnormalised"])
def test_wrong_weight_normalisation_fails(monkeypatch, wrong):
    def bad_weights(log_s, alive):
        if wrong == "unweighted":  # w = 1: plain scheduled-sampling-like negatives
            return alive.double() / alive.sum(0).clamp_min(1)
        if wrong == "not_per_step":  # one normalisation over all steps jointly
            logits = log_s.double().masked_fill(~alive, float("-inf"))
            return torch.softmax(logits.flatten(), 0).view_as(logits) * logits.shape[1]
        return (log_s.double().exp() / alive.shape[0]) * alive  # S_k without dividing by its mean

    monkeypatch.setattr(eforcing_module, "snis_step_weights", bad_weights)
    mean_sq, zs = _z_scores(make_model(), eforcing(2))
    assert mean_sq > 2.5 or max(abs(z) for z in zs) > 6.0


def test_lambda_zero_and_before_start_equal_teacher_forcing_exactly():
    model = make_model()
    tf = flat_grad(model, teacher_forcing(model))
    for objective in (EForcingLoss(lambda_base=0.0, num_steps=K), EForcingLoss(lambda_base=0.5, num_steps=K,
                                                                                   start_step=10)):
        out = objective(model, DATA, step=3)
        assert float(out.loss) == float(teacher_forcing(model))
        torch.testing.assert_close(flat_grad(model, out.loss), tf, rtol=0, atol=0)
    ls = EForcingLoss(lambda_base=0.0, num_steps=K, label_smoothing=0.1)(make_model(), DATA)
    assert float(ls.loss) == pytest.approx(float(TeacherForcingLoss(label_smoothing=0.1)(make_model(), DATA).loss))


def test_weights_finite_nonnegative_normalised_with_huge_logits():
    g = torch.Generator().manual_seed(0)
    log_s = 1e4 * torch.randn(16, 5, generator=g)
    alive = torch.ones(16, 5, dtype=torch.bool)
    alive[10:, 3:] = False
    alive[:, 4] = False
    w = snis_step_weights(log_s, alive)
    assert torch.isfinite(w).all() and (w >= 0).all()
    torch.testing.assert_close(w.sum(0)[:4], torch.ones(4, dtype=torch.float64))
    assert float(w[:, 4].sum()) == 0.0 and float(w[10:, 3].sum()) == 0.0
    # the loss itself stays finite when the raw logits are ~1e4
    model = make_model()
    with torch.no_grad():
        model.head.weight.mul_(1e3)
    out = eforcing(8)(model, DATA, step=0, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out.loss)
    assert torch.isfinite(flat_grad(model, out.loss)).all()


def test_validation():
    with pytest.raises(ValueError, match="lambda"):
        EForcingLoss(lambda_base=-1.0)
    with pytest.raises(ValueError, match="num_steps"):
        EForcingLoss(num_steps=0)
    with pytest.raises(ValueError, match="prefix_len"):
        EForcingLoss(prefix_len=10, num_steps=2)(make_model(), DATA)


def _lm_batch(vocab, rows=6, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(4, vocab, (rows, length + 1), generator=g)
    x[:, 0] = 1
    return Batch(inputs=x[:, :-1], targets=x[:, 1:], mask=torch.ones(rows, length, dtype=torch.bool))


@pytest.mark.parametrize("arch", ["transformer", "lstm", "gru", "hf"])
def test_runs_on_every_language_model(arch):
    from seqebm.models import build_model

    if arch == "hf":
        from seqebm.models.hf import HFCausalLM

        model = HFCausalLM.from_config({"vocab_size": 40, "n_embd": 16, "n_layer": 1, "n_head": 2, "n_positions": 64,
                                        "bos_token_id": 1, "eos_token_id": 2}, model_type="gpt2")
    else:
        model = build_model(arch, 40, d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=64)
    batch = _lm_batch(40)
    out = EForcingLoss(num_steps=8, lambda_base=0.5, prefix_len=2)(model, batch, step=0,
                                                                    generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.metrics["tokens"] == 6 * 12
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_translation_negatives_follow_the_source_length_and_stop_at_eos():
    from seqebm.models.seq2seq import EncoderDecoderTransformer

    model = EncoderDecoderTransformer(30, d_model=16, n_layers=1, n_heads=2, dropout=0.0, max_len=64)
    g = torch.Generator().manual_seed(0)
    src = torch.randint(4, 30, (4, 10), generator=g)
    src_mask = torch.ones(4, 10, dtype=torch.bool)
    src_mask[0, 3:] = False  # a 3-token source
    batch = _lm_batch(30, rows=4, length=9)
    batch = Batch(batch.inputs, batch.targets, batch.mask, source=src, source_mask=src_mask)
    objective = EForcingLoss(num_steps=20, source_length_ratio=1.0, source_length_offset=2, eos_id=2)
    prefix, neg, alive, corr, ctx = objective.generate_negatives(model, batch, generator=g)
    assert alive.sum(1)[0] <= 5 and alive.sum(1).max() <= 12  # ceil(1.0 · |src|) + 2
    assert (corr == 0).all() and prefix.shape == (4, 1) and ctx["source"].shape == (4, 10)
    out = objective(model, batch, step=0, generator=g)
    out.loss.backward()
    assert torch.isfinite(out.loss)


def test_pixelcnn_and_tempered_proposal():
    from seqebm.models.pixelcnn import GatedPixelCNN

    model = GatedPixelCNN(levels=4, side=4, channels=8, n_layers=2, dropout=0.0)
    g = torch.Generator().manual_seed(0)
    img = torch.randint(0, 4, (5, 16), generator=g)
    inputs = torch.cat([torch.full((5, 1), 4), img[:, :-1]], 1)
    batch = Batch(inputs=inputs, targets=img, mask=torch.ones(5, 16, dtype=torch.bool))
    objective = EForcingLoss(num_steps=16, temperature=1.5)
    _, neg, alive, corr, _ = objective.generate_negatives(model, batch, generator=g)
    assert neg.shape == (5, 16) and alive.all() and corr.abs().sum() > 0  # q_θ / r correction is used
    out = objective(model, batch, step=0, generator=g)
    out.loss.backward()
    assert torch.isfinite(out.loss)
