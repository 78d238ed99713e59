"""Joint energy-based models (monograph §5.2, Eq. 5.1–5.4): the JEM potentials, the
semi-supervised loss with replay-buffer SGLD, class-conditional sampling and input validation.

Notation: B rows, K labels, D input dimension, U(x, y) = logit_y(x), U(x) = logsumexp_y U(x, y).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from seqebm.models.jem import JointEnergyClassifier, digits_classifier, digits_to_inputs
from seqebm.objectives.base import ObjectiveOutput
from seqebm.objectives.jem import JEMLoss, generative_surrogate, sample, sgld_chains


def tiny_mlp(d: int = 4, k: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d, 8), nn.SiLU(), nn.Linear(8, k))


class GaussianClasses(nn.Module):
    """U(x, y) = −|x − μ_y|² / (2 σ_y²) + b_y, so p(x|y) = N(μ_y, σ_y² I) exactly."""

    def __init__(self, mu: Tensor, var: Tensor, bias: Tensor) -> None:
        super().__init__()
        self.mu, self.var, self.bias = nn.Parameter(mu), nn.Parameter(var), nn.Parameter(bias)

    def forward(self, x: Tensor) -> Tensor:  # (B, D) -> (B, K)
        sq = (x[:, None, :] - self.mu[None]).pow(2).sum(-1)
        return -sq / (2 * self.var) + self.bias


# ---------------------------------------------------------------- potentials


def test_marginal_and_conditional_match_direct_computation() -> None:
    net = tiny_mlp()
    jem = JointEnergyClassifier(net)
    x = torch.randn(6, 4, dtype=torch.float64)
    net.double()
    logits = net(x)
    direct_u = torch.log(torch.exp(logits).sum(1))  # U(x) = log Σ_y exp U(x, y), Eq. 5.3
    torch.testing.assert_close(jem.log_marginal(x), direct_u)
    torch.testing.assert_close(jem.energy(x), -direct_u)
    torch.testing.assert_close(jem(x), -direct_u)  # forward = energy (house protocol)
    y = torch.tensor([0, 2, 1, 1, 0, 2])
    torch.testing.assert_close(jem.log_joint(x, y), logits[torch.arange(6), y])  # Eq. 5.1
    torch.testing.assert_close(jem.log_joint(x, 2), logits[:, 2])
    # p(y|x) = exp U(x, y) / Σ_y' exp U(x, y') (Eq. 5.2) = exp(U(x, y) − U(x))
    direct_p = torch.exp(logits) / torch.exp(logits).sum(1, keepdim=True)
    torch.testing.assert_close(jem.log_prob_y(x).exp(), direct_p)
    torch.testing.assert_close(jem.log_joint(x, y) - jem.log_marginal(x), direct_p[torch.arange(6), y].log())


def test_digits_classifier_shapes_and_input_scaling() -> None:
    images = torch.tensor([[0] * 32 + [16] * 32, [8] * 64])
    x = digits_to_inputs(images)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1 and (x[1] == 0).all()
    for arch in ("mlp", "cnn"):
        net = digits_classifier(16, arch=arch)
        assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
        assert net(x).shape == (2, 10) and net(x.view(2, 1, 8, 8)).shape == (2, 10)
    with pytest.raises(ValueError, match="pixel levels"):
        digits_to_inputs(torch.tensor([[17]]))


# ---------------------------------------------------------------- the generative surrogate


def _param_grads(model: nn.Module, loss: Tensor) -> list[Tensor]:
    return list(torch.autograd.grad(loss, list(model.parameters())))


def test_surrogate_gradient_is_data_minus_model_expectation() -> None:
    jem = JointEnergyClassifier(tiny_mlp().double())
    g = torch.Generator().manual_seed(0)
    x_data = torch.randn(7, 4, generator=g, dtype=torch.float64)
    x_model = torch.rand(5, 4, generator=g, dtype=torch.float64) * 2 - 1
    grads = _param_grads(jem, generative_surrogate(jem.log_marginal(x_data), jem.log_marginal(x_model)))
    # direct: −(mean_i ∇U(x_i) − mean_j ∇U(x̃_j)), one row at a time
    data = [_param_grads(jem, jem.log_marginal(x_data[i:i + 1]).sum()) for i in range(7)]
    model = [_param_grads(jem, jem.log_marginal(x_model[j:j + 1]).sum()) for j in range(5)]
    for p, got in enumerate(grads):
        expected = -(torch.stack([d[p] for d in data]).mean(0) - torch.stack([m[p] for m in model]).mean(0))
        torch.testing.assert_close(got, expected)


def test_jem_loss_gradient_matches_direct_formula() -> None:
    """The full loss: α_d ∇CE + ∇(−[mean U(data) − mean U(samples)]) with the samples the loss
    drew (SGLD must not leak gradients into the parameters), plus λ ∇(U_data² + U_model²)."""
    jem = JointEnergyClassifier(tiny_mlp().double())
    g = torch.Generator().manual_seed(1)
    xl, yl = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 2, 1, 0])
    xu = torch.randn(9, 4, generator=g, dtype=torch.float64)
    loss_fn = JEMLoss(alpha_d=0.7, sgld_steps=3, buffer_size=20, energy_reg=0.1, seed=0)
    jem.zero_grad()
    out = loss_fn(jem, xl, yl, xu, generator=g)
    out.loss.backward()
    got = [p.grad.clone() for p in jem.parameters()]
    xm = loss_fn.last_model_samples
    assert xm is not None and xm.shape == (9, 4)
    ce = nn.functional.cross_entropy(jem.logits(xl), yl)
    u_d, u_m = jem.log_marginal(xu), jem.log_marginal(xm)
    direct = 0.7 * ce - (u_d.mean() - u_m.mean()) + 0.1 * (u_d.pow(2).mean() + u_m.pow(2).mean())
    for a, b in zip(got, _param_grads(jem, direct)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(out.loss, direct)
    # the chains were written back into the buffer
    assert loss_fn.replay is not None
    assert any(torch.equal(row, xm[0]) for row in loss_fn.replay.buffer)


# ---------------------------------------------------------------- SGLD on a known joint


def test_class_conditional_sgld_recovers_gaussians() -> None:
    """p(x|y) ∝ exp U(x, y) = N(μ_y, σ_y² I). Exact-noise SGLD with a constant step δ is ULA:
    x' = x − (δ/σ²)(x − μ) + sqrt(2δ) η, whose stationary law is N(μ, v) with
    v = σ² / (1 − δ/(2σ²)); after L steps the start is forgotten up to (1 − δ/σ²)^L < 1e-5.
    With n independent chains the mean of each coordinate has sd sqrt(v/n) and the sample
    variance sd v sqrt(2/(n − 1)); allow 5 sd."""
    mu = torch.tensor([[1.5, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    var = torch.tensor([0.5, 0.25], dtype=torch.float64)
    jem = JointEnergyClassifier(GaussianClasses(mu, var, torch.tensor([0.3, -0.2], dtype=torch.float64)))
    n, delta, steps = 3000, 0.01, 600
    g = torch.Generator().manual_seed(2)
    for y in (0, 1):
        s2 = var[y].item()
        assert (1 - delta / s2) ** steps < 1e-5
        x = sample(jem, n, steps, event_shape=(2,), y=y, step_size=delta, noise_std=None,
                   data_range=(-3.0, 3.0), clamp=False, generator=g)
        assert x.shape == (n, 2) and x.dtype == torch.float64
        v = s2 / (1 - delta / (2 * s2))
        assert ((x.mean(0) - mu[y]).abs() < 5 * math.sqrt(v / n)).all()
        assert ((x.var(0) - v).abs() < 5 * v * math.sqrt(2 / (n - 1))).all()
    # a label tensor per chain works too, and parameters receive no gradient from sampling
    labels = torch.tensor([0, 1] * 5)
    x = sgld_chains(jem, torch.zeros(10, 2, dtype=torch.float64), 5, y=labels, step_size=0.01, noise_std=None)
    assert x.shape == (10, 2) and all(p.grad is None for p in jem.parameters())


def test_sample_clamps_and_clips() -> None:
    jem = JointEnergyClassifier(tiny_mlp(d=3, k=2))
    g = torch.Generator().manual_seed(3)
    x = sample(jem, 16, 10, event_shape=(3,), step_size=50.0, noise_std=0.5, generator=g)
    assert x.shape == (16, 3) and x.min() >= -1 and x.max() <= 1
    # with grad_clip c and no noise, one step moves each chain by at most δ c
    x0 = torch.zeros(16, 3)
    x1 = sample(jem, 16, 1, x0=x0, step_size=1.0, noise_std=0.0, grad_clip=1e-3, clamp=False)
    assert (x1 - x0).norm(dim=1).max() <= 1e-3 + 1e-7


# ---------------------------------------------------------------- semi-supervised digits run


def test_semi_supervised_digits_run(tmp_path) -> None:
    from seqebm.data.digits import load_digits_dataset

    data = load_digits_dataset(tmp_path)
    x_all, y_all = digits_to_inputs(data.train), data.train_labels
    xl, yl = x_all[:100], y_all[:100]  # 100 labeled
    xu = x_all[:500]  # 500 observations D (labeled ones included, as p_emp is over D)
    torch.manual_seed(0)
    jem = JointEnergyClassifier(digits_classifier(32, depth=1))
    loss_fn = JEMLoss(sgld_steps=5, buffer_size=500, energy_reg=0.1, data_noise=0.03, seed=0)
    opt = torch.optim.Adam(jem.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        il = torch.randint(100, (32,), generator=g)
        iu = torch.randint(500, (64,), generator=g)
        out = loss_fn(jem, xl[il], yl[il], xu[iu], generator=g)
        assert isinstance(out, ObjectiveOutput) and torch.isfinite(out.loss)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    m = out.metrics
    assert set(m) == {"tokens", "ce_sum", "accuracy_sum", "gen_sum", "u_data_sum", "u_model_sum"}
    assert m["tokens"] == 32 and 0 <= m["accuracy_sum"] <= 32
    assert all(math.isfinite(float(v)) for v in m.values())
    buf = loss_fn.replay.buffer  # type: ignore[union-attr]
    assert buf.shape == (500, 64) and buf.min() >= -1 and buf.max() <= 1
    with torch.no_grad():  # 30 steps already beat chance (10%) on the test split (0.78 here)
        acc = (jem.logits(digits_to_inputs(data.test)).argmax(1) == data.test_labels).double().mean()
    assert acc > 0.4
    # supervised baseline through the same loss: alpha_g = 0 needs no unlabeled batch
    sup = JEMLoss(alpha_g=0.0)(jem, xl[:8], yl[:8], None)
    assert set(sup.metrics) == {"tokens", "ce_sum", "accuracy_sum"}


# ---------------------------------------------------------------- validation


def test_bad_inputs() -> None:
    jem = JointEnergyClassifier(tiny_mlp())
    loss_fn = JEMLoss(sgld_steps=1, buffer_size=16)
    x, y = torch.randn(4, 4), torch.tensor([0, 1, 2, 1])
    with pytest.raises(ValueError, match=r"labeled_y has labels \[3\] outside the label set \[0, 3\)"):
        loss_fn(jem, x, torch.tensor([0, 1, 3, 1]), x)
    with pytest.raises(ValueError, match=r"labels \[-1\]"):
        loss_fn(jem, x, torch.tensor([0, -1, 2, 1]), x)
    with pytest.raises(ValueError, match=r"y=3 is outside the label set \[0, 3\)"):
        jem.log_joint(x, 3)
    with pytest.raises(ValueError, match=r"labeled_y has shape \(3,\) but labeled_x has 4 rows"):
        loss_fn(jem, x, y[:3], x)
    with pytest.raises(ValueError, match=r"labeled_x rows have shape \(4,\) but unlabeled_x rows \(5,\)"):
        loss_fn(jem, x, y, torch.randn(4, 5))
    with pytest.raises(ValueError, match="unlabeled_x is empty"):
        loss_fn(jem, x, y, torch.randn(0, 4))
    with pytest.raises(ValueError, match="unlabeled batch is required when alpha_g > 0"):
        loss_fn(jem, x, y, None)
    with pytest.raises(ValueError, match="labeled batch is required when alpha_d > 0"):
        loss_fn(jem, None, None, x)
    with pytest.raises(ValueError, match="both labeled_x and labeled_y"):
        loss_fn(jem, x, None, x)
    with pytest.raises(TypeError, match="labeled_y must have an integer dtype"):
        loss_fn(jem, x, y.float(), x)
    with pytest.raises(TypeError, match="unlabeled_x must have a floating-point dtype"):
        loss_fn(jem, x, y, torch.zeros(4, 4, dtype=torch.long))
    loss_fn(jem, x, y, x)  # fixes the buffer's event shape (4,)
    with pytest.raises(ValueError, match=r"replay buffer holds \(4,\)"):
        loss_fn(jem, torch.randn(2, 6, 1), torch.tensor([0, 1]), torch.randn(2, 6, 1))
    with pytest.raises(ValueError, match=r"logits of shape \(4, K\)"):
        JointEnergyClassifier(nn.Identity()).logits(torch.randn(4, 2, 2))
    with pytest.raises(TypeError, match="classifier must be an nn.Module"):
        JointEnergyClassifier(lambda x: x)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="alpha_d and alpha_g are both 0"):
        JEMLoss(alpha_d=0.0, alpha_g=0.0)
    with pytest.raises(ValueError, match="reinit_prob must lie in"):
        JEMLoss(reinit_prob=1.5)
    with pytest.raises(ValueError, match="num_model_samples"):
        JEMLoss(buffer_size=4, num_model_samples=5)
    with pytest.raises(ValueError, match="give event_shape"):
        sample(jem, 3, 1)
