"""Learning rules for energy models recover the generating parameters of an enumerable model.

The test bed is a log-linear model over sequences of T=3 tokens from V=3 (27 configurations)
with five identifiable features. N exact samples are drawn from θ*. The exact MLE θ̂ on those
samples is computed by Newton's method with enumeration; its sampling error around θ* is about
sqrt(diag(I(θ*)^{-1}) / N) ≈ 0.01-0.02 for N = 20000, so the tolerances below (0.06-0.1) leave room
for the optimiser noise of each stochastic method while failing for any method that learns the
wrong thing (e.g. a chain that never moves keeps θ = 0, at distance ~0.8 from θ*).
"""

from __future__ import annotations

import math

import pytest
import torch

from seqebm.data.batching import TensorSource, ebm_batch
from seqebm.estimators import enumerate_sequences, exact_log_partition
from seqebm.models.classic import RBM, LogLinearModel
from seqebm.models.rnn import RNNLM
from seqebm.objectives import (AutoregressiveNoise, ContrastiveDivergenceLoss, DenoisingScoreMatchingLoss, DNCELoss,
                               GaussianNoise, NCELoss, UniformSequenceNoise, robbins_monro, stochastic_approximation)
from seqebm.sampling.kernels import block_gibbs_kernel, gibbs_kernel

V, T = 3, 3
THETA_STAR = torch.tensor([0.6, -0.4, 0.7, -0.8, 0.5], dtype=torch.float64)


def features(x: torch.Tensor) -> torch.Tensor:
    """[#0s, #1s, #equal neighbours, first token is 2, #(0 then 1)] per row, float64 (N, 5)."""
    return torch.stack([(x == 0).sum(1), (x == 1).sum(1), (x[:, 1:] == x[:, :-1]).sum(1), (x[:, 0] == 2).long(),
                        ((x[:, :-1] == 0) & (x[:, 1:] == 1)).sum(1)], 1).double()


def make_model(theta=None) -> LogLinearModel:
    return LogLinearModel(features, 5, init=theta, dtype=torch.float64)


ALL = enumerate_sequences(V, T)  # (27, 3)
F_ALL = features(ALL)  # (27, 5)


def exact_log_probs(theta: torch.Tensor) -> torch.Tensor:
    u = F_ALL @ theta
    return u - torch.logsumexp(u, 0)


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    idx = torch.multinomial(exact_log_probs(THETA_STAR).exp(), 20000, replacement=True, generator=g)
    return ALL[idx]


@pytest.fixture(scope="module")
def mle(data):
    """Exact MLE on the samples by Newton's method (log-likelihood is concave in θ)."""
    f_bar = features(data).mean(0)
    theta = torch.zeros(5, dtype=torch.float64)
    for _ in range(50):
        p = exact_log_probs(theta).exp()
        mean = p @ F_ALL
        cov = (F_ALL - mean).T @ ((F_ALL - mean) * p[:, None])
        theta = theta + torch.linalg.solve(cov, f_bar - mean)
    return theta


def test_features_identifiable_and_mle_close_to_truth(mle):
    rank = torch.linalg.matrix_rank(torch.cat([F_ALL, torch.ones(27, 1, dtype=torch.float64)], 1))
    assert rank == 6  # features + constant are linearly independent: θ is identifiable
    assert (mle - THETA_STAR).abs().max() < 0.05


class Gauss(torch.nn.Module):
    """1-D Gaussian energy E(x) = (x − μ)² / (2σ²) with learnable μ and log σ² (continuous test bed)."""

    def __init__(self):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))
        self.log_var = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))

    def forward(self, x):
        return 0.5 * (x[:, 0] - self.mu) ** 2 / self.log_var.exp()


def _fit(objective, model, data, *, steps, batch, lr, seed=0, sgd_rm=False):
    """Minibatch training: Adam with linear decay to 0, or SGD with Robbins–Monro steps."""
    params = [*model.parameters(), *objective.parameters()]
    if sgd_rm:
        opt = torch.optim.SGD(params, lr=lr)
        gamma = robbins_monro(1.0, t0=steps / 10)
    else:
        opt = torch.optim.Adam(params, lr=lr)
    source = TensorSource(data, batch, seed=seed)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        scale = gamma(step + 1) if sgd_rm else 1 - step / steps
        for grp in opt.param_groups:
            grp["lr"] = lr * scale
        b = source.batch(step // source.num_batches(), step % source.num_batches())
        out = objective(model, b, step=step, generator=g)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model


def test_cd1_with_gibbs_recovers_parameters(data, mle):
    """CD-1 is consistent here: the data come from the model family and Gibbs leaves p_θ invariant."""
    model = _fit(ContrastiveDivergenceLoss(gibbs_kernel(V)), make_model(), data, steps=400, batch=500, lr=0.05)
    assert (model.theta.detach() - mle).abs().max() < 0.08


def test_pcd_with_robbins_monro_recovers_mle(data, mle):
    objective = ContrastiveDivergenceLoss(gibbs_kernel(V), persistent=True, num_chains=500)
    model = _fit(objective, make_model(), data, steps=600, batch=500, lr=0.5, sgd_rm=True)
    assert objective.chains.shape == (500, T)
    assert (model.theta.detach() - mle).abs().max() < 0.08


def test_cd_with_a_frozen_chain_fails(data, mle):
    """The negative check: a kernel that does not move makes the gradient vanish, θ stays at 0."""
    model = _fit(ContrastiveDivergenceLoss(lambda e, x, g: x), make_model(), data, steps=50, batch=500, lr=0.05)
    assert (model.theta.detach() - mle).abs().max() > 0.5


def test_stochastic_approximation_converges_to_the_mle(data, mle):
    """Algorithm 5 with F_θ(z) = mean f(data minibatch) − mean f(chains) (Theorem 2.3)."""
    g = torch.Generator().manual_seed(1)
    kernel = gibbs_kernel(V)

    def move(theta, z, gen):
        return kernel(make_model(theta), z, gen)

    def mean_field(theta, z):
        kappa = torch.randint(data.shape[0], (500,), generator=g)
        return features(data[kappa]).mean(0) - features(z).mean(0)

    z0 = torch.randint(V, (500, T), generator=g)
    out = stochastic_approximation(mean_field, move, torch.zeros(5, dtype=torch.float64), z0, num_iters=800,
                                   step_sizes=robbins_monro(1.0, t0=50), num_moves=1, average_from=200,
                                   generator=g, keep_trace=True)
    assert out.trace.shape == (801, 5)
    assert (out.params - mle).abs().max() < 0.05
    assert (out.params - mle).abs().max() < (out.trace[50] - mle).abs().max()


def test_robbins_monro_validation():
    with pytest.raises(ValueError, match="exponent"):
        robbins_monro(1.0, exponent=0.5)
    gamma = robbins_monro(2.0, t0=10)
    assert gamma(1) == 2.0 and gamma(11) == pytest.approx(1.0)


@pytest.mark.parametrize("nu", [1.0, 4.0])
def test_nce_recovers_parameters_and_log_z(data, mle, nu):
    """ζ → log Z(θ); with ν = 4 a missing log ν term would leave ζ off by log 4 = 1.39."""
    objective = NCELoss(UniformSequenceNoise(V, T), nu=nu)
    model = _fit(objective, make_model(), data, steps=1000, batch=1000, lr=0.2)
    theta = model.theta.detach()
    assert (theta - THETA_STAR).abs().max() < 0.1
    log_z = exact_log_partition(model, V, T)
    assert abs(objective.log_z.item() - log_z) < 0.05
    assert abs(math.log(nu)) < 0.01 or abs(objective.log_z.item() - (log_z - math.log(nu))) > 1.0


def test_dnce_with_a_trained_autoregressive_noise(data):
    """DNCE (α = 0.5, ν = 1): the noise LM learns the data by MLE, the EBM and ζ match θ*, log Z."""
    torch.manual_seed(0)
    noise_lm = RNNLM(V, cell="gru", d_model=16, hidden=32, n_layers=1, dropout=0.0)
    objective = DNCELoss(AutoregressiveNoise(noise_lm, T, bos_id=0), alpha=0.5, nu=1.0)
    model = _fit(objective, make_model(), data, steps=600, batch=500, lr=0.15)
    theta = model.theta.detach()
    assert (theta - THETA_STAR).abs().max() < 0.1
    assert abs(objective.log_z.item() - exact_log_partition(model, V, T)) < 0.06
    with torch.no_grad():  # the noise model approaches the data distribution (small KL)
        log_q = objective.noise.log_prob(ALL)
    p = exact_log_probs(THETA_STAR)
    assert float((p.exp() * (p - log_q)).sum()) < 0.02


def test_dnce_counts_follow_alpha_and_nu():
    calls = []

    class Noise(UniformSequenceNoise):
        def sample(self, n, generator=None):
            calls.append(n)
            return super().sample(n, generator)

    objective = DNCELoss(Noise(V, T), alpha=0.25, nu=2.0)
    objective(make_model(), ALL[:8])
    assert calls == [8 * 3 + 8 * 8]  # |B1| = (1-α)/α·N = 24, |B2| = ν/α·N = 64
    with pytest.raises(ValueError, match="alpha"):
        DNCELoss(UniformSequenceNoise(V, T), alpha=0.0)
    with pytest.raises(ValueError, match="nn.Module"):
        DNCELoss(object())


def test_denoising_score_matching_learns_the_smoothed_gaussian():
    """Quadratic energy E = ½(x−m)ᵀA(x−m): DSM's optimum is m = mean, A⁻¹ = Cov + σ²I (exact)."""
    g = torch.Generator().manual_seed(0)
    cov = torch.tensor([[1.0, 0.6], [0.6, 0.8]], dtype=torch.float64)
    x = torch.tensor([1.0, -2.0], dtype=torch.float64) + torch.randn(20000, 2, generator=g,
                                                                      dtype=torch.float64) @ torch.linalg.cholesky(cov).T

    class Quadratic(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
            self.L = torch.nn.Parameter(torch.eye(2, dtype=torch.float64))

        def precision(self):
            return self.L @ self.L.T

        def forward(self, x):
            d = x - self.m
            return 0.5 * ((d @ self.precision()) * d).sum(1)

    sigma = 0.5
    model = _fit(DenoisingScoreMatchingLoss(sigma), Quadratic(), x, steps=1500, batch=1000, lr=0.03)
    target = torch.cov(x.T) + sigma**2 * torch.eye(2, dtype=torch.float64)
    learned = torch.linalg.inv(model.precision().detach())
    assert (model.m.detach() - x.mean(0)).abs().max() < 0.05
    assert (learned - target).abs().max() < 0.08
    assert (learned - torch.cov(x.T)).abs().max() > 0.2  # it is the smoothed density, not the data's
    with pytest.raises(ValueError, match="continuous"):
        DenoisingScoreMatchingLoss(0.1)(model, torch.zeros(3, 2, dtype=torch.long))


def test_nce_on_continuous_data_with_gaussian_noise():
    """NCE also fits continuous models: a 1-D Gaussian energy with learnable mean and log-variance."""
    g = torch.Generator().manual_seed(0)
    x = 1.5 + 0.7 * torch.randn(20000, 1, generator=g, dtype=torch.float64)

    noise = GaussianNoise(torch.zeros(1, dtype=torch.float64), 4 * torch.eye(1, dtype=torch.float64))
    objective = NCELoss(noise, nu=2.0)
    model = _fit(objective, Gauss(), x, steps=800, batch=1000, lr=0.03)
    assert abs(model.mu.item() - 1.5) < 0.05
    assert abs(math.exp(0.5 * model.log_var.item()) - 0.7) < 0.05
    log_z = 0.5 * math.log(2 * math.pi) + 0.5 * model.log_var.item()
    assert abs(objective.log_z.item() - log_z) < 0.05


def test_cd_on_an_rbm_increases_the_exact_likelihood():
    """RBM with 6 visibles: CD-1 with block Gibbs raises the exactly enumerated log-likelihood."""
    g = torch.Generator().manual_seed(0)
    teacher = RBM(6, 4, init_std=1.5, seed=1).double()
    visibles = enumerate_sequences(2, 6)
    with torch.no_grad():
        lp_teacher = -teacher(visibles) - torch.logsumexp(-teacher(visibles), 0)
    data = visibles[torch.multinomial(lp_teacher.exp(), 5000, replacement=True, generator=g)]
    student = RBM(6, 4, init_std=0.01, seed=2).double()

    def avg_ll(model):
        with torch.no_grad():
            return float((-model(data)).mean() - torch.logsumexp(-model(visibles), 0))

    before = avg_ll(student)
    _fit(ContrastiveDivergenceLoss(block_gibbs_kernel(steps=1)), student, data, steps=300, batch=500, lr=0.05)
    after = avg_ll(student)
    best = float(lp_teacher[data @ (2 ** torch.arange(5, -1, -1))].mean())
    assert after > before + 0.5 * (best - before)


def test_objectives_validate_inputs():
    with pytest.raises(ValueError, match="kernel"):
        ContrastiveDivergenceLoss("gibbs")
    with pytest.raises(ValueError, match="persistent"):
        ContrastiveDivergenceLoss(gibbs_kernel(V), num_chains=4)
    with pytest.raises(ValueError, match="reduction"):
        ContrastiveDivergenceLoss(gibbs_kernel(V), reduction="none")
    with pytest.raises(ValueError, match="nu"):
        NCELoss(UniformSequenceNoise(V, T), nu=0)
    with pytest.raises(ValueError, match="nn.Module"):
        ContrastiveDivergenceLoss(gibbs_kernel(V))(lambda x: torch.zeros(x.shape[0]), ALL[:4])

    class TwoPerRow(torch.nn.Module):
        def forward(self, x):
            return torch.zeros(x.shape[0], 2)

    with pytest.raises(ValueError, match="shape"):
        ContrastiveDivergenceLoss(gibbs_kernel(V))(TwoPerRow(), ALL[:4])
    with pytest.raises(ValueError, match="Tensor"):
        NCELoss(UniformSequenceNoise(V, T))(make_model(), [1, 2, 3])


def test_pcd_and_nce_state_survive_a_trainer_resume(tmp_path, data):
    """The trainer optimises ζ, checkpoints PCD chains and ζ, and a resumed run matches an uninterrupted one."""
    from seqebm.training.config import OptimConfig, TrainerConfig
    from seqebm.training.trainer import Trainer

    def run(run_dir, steps, resume=False, objective_kind="pcd"):
        torch.manual_seed(0)
        model = make_model()
        if objective_kind == "pcd":
            objective = ContrastiveDivergenceLoss(gibbs_kernel(V), persistent=True, num_chains=64)
        else:
            objective = NCELoss(UniformSequenceNoise(V, T), nu=2.0)
        trainer = Trainer(model, objective, TensorSource(data[:2048], 256),
                          optim=OptimConfig(name="sgd", lr=0.2, schedule="robbins_monro", warmup_steps=0,
                                            rm_offset=5.0, clip_norm=None),
                          train=TrainerConfig(max_steps=steps, eval_every=1000, log_every=1, checkpoint_every=3,
                                              progress=False, bf16=False), run_dir=run_dir)
        trainer.fit(resume=resume)
        return model, objective

    for kind in ("pcd", "nce"):
        full_model, full_obj = run(tmp_path / f"{kind}-full", 6, objective_kind=kind)
        run(tmp_path / f"{kind}-split", 3, objective_kind=kind)
        resumed_model, resumed_obj = run(tmp_path / f"{kind}-split", 6, resume=True, objective_kind=kind)
        torch.testing.assert_close(resumed_model.theta, full_model.theta, rtol=0, atol=0)
        for (name, a), (_, b) in zip(full_obj.state_dict().items(), resumed_obj.state_dict().items()):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
        if kind == "nce":
            assert full_obj.log_z.item() != 0.0  # ζ was optimised by the trainer


def test_ebm_batch_shapes():
    b = ebm_batch(torch.zeros(5, 2))
    assert b.num_tokens == 5 and b.inputs.shape == (5, 2)
    with pytest.raises(ValueError):
        TensorSource(torch.zeros(3, 2), 4)


def test_pcd_with_mala_and_hmc_kernels_on_continuous_data():
    """PCD with MALA / HMC kernels fits a 1-D Gaussian energy's mean and variance (MLE = sample moments)."""
    from seqebm.sampling.kernels import hmc_kernel, langevin_kernel

    g = torch.Generator().manual_seed(0)
    x = -1.0 + 0.5 * torch.randn(4000, 1, generator=g, dtype=torch.float64)

    for kernel in (langevin_kernel(0.3, steps=2), hmc_kernel(0.3, 3)):
        objective = ContrastiveDivergenceLoss(kernel, persistent=True, num_chains=1000,
                                              init=lambda m, like: torch.randn(m, 1, dtype=like.dtype))
        model = _fit(objective, Gauss(), x, steps=400, batch=1000, lr=0.05)
        assert abs(model.mu.item() - x.mean().item()) < 0.05
        assert abs(math.exp(0.5 * model.log_var.item()) - x.std().item()) < 0.05


def test_dnce_with_a_tied_transformer_noise_checkpoints_and_resumes(tmp_path, data):
    """Tied embeddings inside the objective's noise model are saved once and restored (safetensors refuses aliases)."""
    from seqebm.models.transformer import TransformerLM
    from seqebm.training.config import OptimConfig, TrainerConfig
    from seqebm.training.trainer import Trainer

    def run(run_dir, steps, resume=False):
        torch.manual_seed(0)
        noise_lm = TransformerLM(V, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=T + 1, dropout=0.0,
                                 tie_embeddings=True).double()
        objective = DNCELoss(AutoregressiveNoise(noise_lm, T, bos_id=0), alpha=0.5)
        model = make_model()
        trainer = Trainer(model, objective, TensorSource(data[:1024], 128),
                          optim=OptimConfig(lr=0.05, warmup_steps=0, schedule="constant"),
                          train=TrainerConfig(max_steps=steps, eval_every=100, log_every=1, checkpoint_every=2,
                                              progress=False, bf16=False), run_dir=run_dir)
        trainer.fit(resume=resume)
        return model, objective

    full_model, full_obj = run(tmp_path / "full", 4)
    run(tmp_path / "split", 2)
    model, obj = run(tmp_path / "split", 4, resume=True)
    torch.testing.assert_close(model.theta, full_model.theta, rtol=0, atol=0)
    torch.testing.assert_close(obj.noise.model.head.weight, full_obj.noise.model.head.weight, rtol=0, atol=0)
    assert obj.noise.model.head.weight is obj.noise.model.embed.weight or \
        obj.noise.model.head.weight.data_ptr() == obj.noise.model.embed.weight.data_ptr()
