"""Classic energy-based models used as test beds: the Ising model and the RBM.

Notation: N configurations, S sites (spins) or visible units, Hn hidden units.
Both follow the sequence-energy convention of :mod:`seqebm.sampling.mcmc`: configurations are
LongTensors of 0/1 values (N, S) and ``model(x)`` returns the energy (N,), p(x) ∝ exp(−E(x)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class IsingModel(nn.Module):
    """Ising model on a chain or a square lattice (monograph §2.2.1, Eq. 2.10).

    With spins s = 2x − 1 in {−1, +1}: ``E(x) = −β (J Σ_{i∼j} s_i s_j + H Σ_i s_i)`` where i ∼ j
    runs over nearest neighbours (right and down; wrapping around when ``periodic``).
    ``shape`` is ``(n,)`` for a chain or ``(rows, cols)`` for a lattice; sites are raster order.
    """

    def __init__(self, shape: tuple[int, ...], *, J: float = 1.0, H: float = 0.0, beta: float = 1.0,
                 periodic: bool = False) -> None:
        super().__init__()
        if len(shape) not in (1, 2) or min(shape) < 1:
            raise ValueError(f"shape must be (n,) or (rows, cols) with positive sizes, got {shape}")
        self.shape, self.J, self.H, self.beta, self.periodic = tuple(shape), J, H, beta, periodic
        self.num_sites = math.prod(shape)
        self.register_buffer("edges", self._edges(), persistent=False)  # (E, 2) site pairs

    def _edges(self) -> Tensor:
        rows, cols = (1, self.shape[0]) if len(self.shape) == 1 else self.shape
        idx = torch.arange(rows * cols).view(rows, cols)
        pairs = []
        for di, dj in ((0, 1), (1, 0)):
            for i in range(rows):
                for j in range(cols):
                    ni, nj = i + di, j + dj
                    if self.periodic:
                        ni, nj = ni % rows, nj % cols
                    if ni < rows and nj < cols and (ni, nj) != (i, j) and not (di == 1 and rows == 1):
                        pairs.append((int(idx[i, j]), int(idx[ni, nj])))
        # a periodic dimension of size 2 would count each pair twice: keep distinct edges only
        unique = sorted({tuple(sorted(p)) for p in pairs}) if self.periodic else pairs
        return torch.tensor(unique, dtype=torch.long).view(-1, 2)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.num_sites:
            raise ValueError(f"x must have shape (N, {self.num_sites}), got {tuple(x.shape)}")
        s = 2.0 * x.double() - 1.0
        pair = (s[:, self.edges[:, 0]] * s[:, self.edges[:, 1]]).sum(1)
        return -self.beta * (self.J * pair + self.H * s.sum(1))

    def chain_log_partition(self) -> float:
        """Exact log Z of a chain by the transfer matrix (open or periodic boundary)."""
        if len(self.shape) != 1:
            raise ValueError("the transfer-matrix formula is for chains; use exact_log_partition for lattices")
        n, b = self.shape[0], self.beta
        s = torch.tensor([-1.0, 1.0], dtype=torch.float64)
        t = torch.exp(b * self.J * s[:, None] * s[None, :] + b * self.H * (s[:, None] + s[None, :]) / 2)
        if self.periodic and n > 2:
            return float(torch.log(torch.trace(torch.linalg.matrix_power(t, n))))
        if n == 1:
            return float(torch.logsumexp(b * self.H * s, 0))
        u = torch.exp(b * self.H * s / 2)
        if self.periodic:  # n == 2: the single edge is counted once
            return float(torch.log(u @ t @ u))
        return float(torch.log(u @ torch.linalg.matrix_power(t, n - 1) @ u))


class RBM(nn.Module):
    """Restricted Boltzmann machine with binary units (monograph §2.2.2, Eq. 2.11–2.12).

    ``E(v, h) = −vᵀWh − bᵀv − aᵀh``. Hidden units are summed out in closed form, so the model
    over visible units has the free energy ``F(v) = −bᵀv − Σ_j softplus(a_j + (vW)_j)``;
    ``model(v)`` returns F(v). Block Gibbs alternates p(h|v) (Eq. 2.11) and p(v|h) (Eq. 2.12).
    """

    def __init__(self, n_visible: int, n_hidden: int, *, init_std: float = 0.5, seed: int | None = None) -> None:
        super().__init__()
        if n_visible < 1 or n_hidden < 1:
            raise ValueError(f"n_visible and n_hidden must be positive, got {n_visible}, {n_hidden}")
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.W = nn.Parameter(torch.randn(n_visible, n_hidden, generator=g) * init_std)
        self.b = nn.Parameter(torch.randn(n_visible, generator=g) * init_std)  # visible bias
        self.a = nn.Parameter(torch.randn(n_hidden, generator=g) * init_std)  # hidden bias

    def energy(self, v: Tensor, h: Tensor) -> Tensor:
        v, h = v.to(self.W.dtype), h.to(self.W.dtype)
        return -((v @ self.W) * h).sum(1) - v @ self.b - h @ self.a

    def forward(self, v: Tensor) -> Tensor:  # free energy F(v), (N,)
        if v.dim() != 2 or v.shape[1] != self.W.shape[0]:
            raise ValueError(f"v must have shape (N, {self.W.shape[0]}), got {tuple(v.shape)}")
        v = v.to(self.W.dtype)
        return -v @ self.b - F.softplus(v @ self.W + self.a).sum(1)

    def hidden_probs(self, v: Tensor) -> Tensor:  # p(h_j = 1 | v), Eq. 2.11
        return torch.sigmoid(v.to(self.W.dtype) @ self.W + self.a)

    def visible_probs(self, h: Tensor) -> Tensor:  # p(v_i = 1 | h), Eq. 2.12
        return torch.sigmoid(h.to(self.W.dtype) @ self.W.t() + self.b)

    @torch.no_grad()
    def block_gibbs(self, v: Tensor, num_steps: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Run ``num_steps`` of v -> h -> v block Gibbs for every row of ``v`` (N, S) in parallel."""
        for _ in range(num_steps):
            h = torch.bernoulli(self.hidden_probs(v), generator=generator)
            v = torch.bernoulli(self.visible_probs(h), generator=generator).long()
        return v


class LogLinearModel(nn.Module):
    """Log-linear (maximum-entropy) model over configurations: ``E(x) = −θᵀ f(x)`` (monograph §2.1).

    The potential U_θ(x) = θᵀ f(x) is linear in the parameters, so the log-likelihood gradient of
    Eq. (2.19) is the difference of feature expectations E_data[f] − E_model[f]. With an
    enumerable space this gives an exact MLE to compare the stochastic learners against.

    Args:
        features: callable ``x (N, ...) -> Tensor (N, F)`` of feature values (e.g. counts).
        num_features: F.
        init: optional initial θ (F,); zeros by default.
        dtype: parameter dtype (float64 for tests of estimators).
    """

    def __init__(self, features, num_features: int, *, init: Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if not callable(features):
            raise ValueError(f"features must be callable x -> (N, F), got {type(features).__name__}")
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        theta = torch.zeros(num_features, dtype=dtype) if init is None else torch.as_tensor(init, dtype=dtype).clone()
        if theta.shape != (num_features,):
            raise ValueError(f"init must have shape ({num_features},), got {tuple(theta.shape)}")
        self.features, self.num_features = features, num_features
        self.theta = nn.Parameter(theta)

    def feature_values(self, x: Tensor) -> Tensor:
        f = self.features(x)
        if not isinstance(f, Tensor) or f.shape != (x.shape[0], self.num_features):
            got = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
            raise ValueError(f"features must return shape ({x.shape[0]}, {self.num_features}), got {got}")
        return f.to(self.theta.dtype)

    def forward(self, x: Tensor) -> Tensor:  # (N,)
        return -(self.feature_values(x) @ self.theta)
