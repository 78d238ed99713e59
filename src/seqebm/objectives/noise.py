"""Noise distributions for noise-contrastive estimation (monograph §2.4–2.4.1).

Notation: N configurations, T sequence length, V vocabulary, D vector dimension.

NCE needs a noise q(x) that it can both *sample* and *evaluate exactly* (the first two of the
suggestions listed after Theorem 2.4). Every class here provides

* ``sample(n, generator) -> (x (n, ...), log_q (n,))`` — draws with their exact log q, and
* ``log_prob(x) -> (N,)`` — log q of given configurations (with gradient for trainable noise).

:class:`AutoregressiveNoise` wraps any seqebm autoregressive model; it is an ``nn.Module``
whose parameters DNCE trains by maximum likelihood (§2.4.1).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from seqebm.sampling.sampler import sample
from seqebm.sampling.scoring import sequence_log_prob


class NoiseDistribution(Protocol):
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


def _check_n(n: object) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of noise samples must be a positive int, got {n!r}")
    return n


class UniformSequenceNoise(nn.Module):
    """Uniform q over all V^T sequences: log q(x) = −T log V."""

    def __init__(self, vocab_size: int, length: int) -> None:
        super().__init__()
        if vocab_size < 1 or length < 1:
            raise ValueError(f"vocab_size and length must be positive, got {vocab_size}, {length}")
        self.vocab_size, self.length = vocab_size, length
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        _check_n(n)
        dev = self._device_probe.device
        x = torch.randint(self.vocab_size, (n, self.length), generator=generator, device=dev)
        return x, self.log_prob(x)

    def log_prob(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.length:
            raise ValueError(f"x must have shape (N, {self.length}), got {tuple(x.shape)}")
        inside = ((x >= 0) & (x < self.vocab_size)).all(1)
        lp = torch.full((x.shape[0],), -self.length * math.log(self.vocab_size), dtype=torch.float64, device=x.device)
        return lp.masked_fill(~inside, float("-inf"))


class AutoregressiveNoise(nn.Module):
    """Fixed-length sequences from an autoregressive model: q(x) = Π_t q(x_t | BOS, x_<t).

    Draws use :func:`seqebm.sampling.sample` from the model itself (no temperature / top-k /
    top-p: ``log_prob`` must score the same density that is sampled, and NCE needs q > 0
    wherever the data have mass). ``log_prob`` scores with
    :func:`seqebm.sampling.sequence_log_prob` and keeps the graph, so DNCE can train the model
    by maximum likelihood. Note that ``log_prob`` runs in the model's current mode: with dropout,
    put the noise model in eval mode if exact densities matter.

    Args:
        model: an autoregressive seqebm model (or HF adapter) whose inputs start with ``bos_id``.
        length: T, generated tokens per sequence (no EOS).
        bos_id: the start token.
        **sample_kwargs: forwarded to ``sample`` (only ``max_batch_tokens`` and ``pad_id`` make sense).
    """

    def __init__(self, model: nn.Module, length: int, *, bos_id: int, **sample_kwargs: Any) -> None:
        super().__init__()
        if length < 1 or bos_id < 0:
            raise ValueError(f"length must be positive and bos_id >= 0, got {length}, {bos_id}")
        bad = sorted({"eos_id", "min_new_tokens", "prefix", "max_new_tokens", "num_samples", "generator",
                      "temperature", "top_k", "top_p"} & set(sample_kwargs))
        if bad:
            raise ValueError(f"AutoregressiveNoise does not accept {bad}")
        self.model, self.length, self.bos_id, self.sample_kwargs = model, length, bos_id, sample_kwargs

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        _check_n(n)
        was = self.model.training
        self.model.eval()
        try:
            prefix = torch.full((1, 1), self.bos_id, dtype=torch.long, device=self._device())
            out = sample(self.model, prefix, max_new_tokens=self.length, num_samples=n, generator=generator,
                         **self.sample_kwargs)
        finally:
            self.model.train(was)
        return out.tokens, out.log_q.to(torch.float64)

    def log_prob(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.length:
            raise ValueError(f"x must have shape (N, {self.length}), got {tuple(x.shape)}")
        bos = torch.full((x.shape[0], 1), self.bos_id, dtype=torch.long, device=x.device)
        return sequence_log_prob(self.model, torch.cat([bos, x], 1), prefix_len=1)


class GaussianNoise(nn.Module):
    """Multivariate normal noise N(mean, cov) for continuous vectors (N, D)."""

    def __init__(self, mean: Tensor, cov: Tensor) -> None:
        super().__init__()
        mean, cov = torch.as_tensor(mean), torch.as_tensor(cov)
        if mean.dim() != 1 or cov.shape != (mean.shape[0], mean.shape[0]):
            raise ValueError(f"mean must be (D,) and cov (D, D), got {tuple(mean.shape)}, {tuple(cov.shape)}")
        self.register_buffer("mean", mean.clone())
        self.register_buffer("scale_tril", torch.linalg.cholesky(cov))

    def _dist(self) -> torch.distributions.MultivariateNormal:
        return torch.distributions.MultivariateNormal(self.mean, scale_tril=self.scale_tril)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        _check_n(n)
        eps = torch.randn((n, self.mean.shape[0]), generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        x = self.mean + eps @ self.scale_tril.T
        return x, self.log_prob(x)

    def log_prob(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[1] != self.mean.shape[0]:
            raise ValueError(f"x must have shape (N, {self.mean.shape[0]}), got {tuple(x.shape)}")
        return self._dist().log_prob(x.to(self.mean.dtype))
