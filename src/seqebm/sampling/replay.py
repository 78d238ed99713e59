"""Persistent chains for EBM training: a replay buffer and a plain persistent-chain holder.

Notation: N buffer capacity, n states drawn per step, C chains, ``state`` the shape of one
chain's state (continuous (D,), images (1, 8, 8), or token sequences (T,) as LongTensor).

Maximum-likelihood EBM training (monograph "Energy-based models for speech and language", §2.3,
"Learning EBMs by Maximum Likelihood") needs samples from the current model at every parameter
update. Persistent contrastive divergence (PCD) keeps the MCMC chains alive across updates, so
each update only runs a few transitions from where the chains stopped:

* :class:`PersistentChains` — the PCD holder: C chains, all advanced every update.
* :class:`ReplayBuffer` — the Du & Mordatch (2019) / JEM (Grathwohl et al., 2020) variant: N stored
  chain states, of which a random batch of n is advanced per update and written back; each drawn
  state is replaced, with probability ``reinit_prob``, by a fresh draw from ``init_fn`` (e.g. uniform
  noise), which keeps the buffer from collapsing onto a few modes.

Both are samplers' state, not samplers: pair them with any transition (e.g.
:func:`seqebm.sampling.langevin_dynamics.langevin` for continuous states, :func:`seqebm.sampling.mcmc.gibbs`
for tokens). Their ``state_dict()`` holds plain tensors only, so it can be stored in a
safetensors checkpoint for resumable runs.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

#: ``init_fn(k, generator) -> Tensor (k, *state)``: k fresh chain states (e.g. uniform noise).
InitFn = Callable[[int, Optional[torch.Generator]], Tensor]


def _check_batch(name: str, x: object, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a Tensor of shape {shape} and dtype {dtype}, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if x.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {x.dtype}")
    return x


class ReplayBuffer:
    """A buffer of N persistent chain states with random reinitialisation (Du & Mordatch 2019; JEM).

    Typical use, one training step::

        x, index = buffer.sample(n)                                   # (n, *state), (n,)
        x = langevin(energy, x, num_steps=20, step_size=0.01).final   # advance the chains
        buffer.update(index, x)                                       # write them back

    The buffer fills itself with ``init_fn(N, generator)`` on first use. :meth:`sample` draws n
    distinct stored states uniformly (without replacement, so :meth:`update` never writes one
    slot twice) and independently replaces each by a fresh ``init_fn`` draw with probability
    ``reinit_prob``. The buffer lives on the device and dtype of ``init_fn``'s output.

    Args:
        capacity: N >= 1 stored chains.
        init_fn: ``init_fn(k, generator) -> Tensor (k, *state)``; called with the buffer's generator.
        reinit_prob: probability in [0, 1] that a drawn state is replaced by a fresh one
            (0.05 in JEM).
        generator: torch random generator for index draws, reinitialisation coins and
            ``init_fn``; its state is part of :meth:`state_dict`.

    Raises:
        ValueError: capacity < 1 or reinit_prob outside [0, 1].
    """

    def __init__(self, capacity: int, init_fn: InitFn, reinit_prob: float = 0.05,
                 generator: torch.Generator | None = None) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an int >= 1, got {capacity!r}")
        if not callable(init_fn):
            raise ValueError(f"init_fn must be a callable (k, generator) -> Tensor (k, ...), "
                             f"got {type(init_fn).__name__}")
        ok = isinstance(reinit_prob, (int, float)) and not isinstance(reinit_prob, bool) and 0 <= reinit_prob <= 1
        if not ok:
            raise ValueError(f"reinit_prob must lie in [0, 1], got {reinit_prob!r}")
        self.capacity = capacity
        self.init_fn = init_fn
        self.reinit_prob = float(reinit_prob)
        self.generator = generator
        self._buffer: Tensor | None = None

    @property
    def buffer(self) -> Tensor:
        """The stored states, Tensor (N, *state) (filled with ``init_fn`` on first access)."""
        if self._buffer is None:
            self._buffer = self._init(self.capacity)
        return self._buffer

    def _init(self, k: int) -> Tensor:
        x = self.init_fn(k, self.generator)
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[0] != k:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"init_fn({k}, generator) must return a Tensor of shape ({k}, ...), got {got}")
        if self._buffer is not None:
            _check_batch(f"init_fn({k}, generator)", x, (k, *self._buffer.shape[1:]), self._buffer.dtype)
            x = x.to(self._buffer.device)
        return x.detach().clone().contiguous()

    def _rng_device(self) -> torch.device:
        return self.generator.device if self.generator is not None else torch.device("cpu")

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """Draw n distinct stored chains, each reinitialised with probability ``reinit_prob``.

        Args:
            n: 1 <= n <= N.

        Returns:
            (x, index): x Tensor (n, *state), a copy (the buffer is unchanged until :meth:`update`);
            index LongTensor (n,) on the buffer's device, the slots to pass to :meth:`update`.

        Raises:
            ValueError: n outside [1, N], or ``init_fn`` output of the wrong shape or dtype.
        """
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= self.capacity:
            raise ValueError(f"n must be an int in [1, capacity={self.capacity}], got {n!r}")
        buf = self.buffer
        dev = self._rng_device()
        index = torch.randperm(self.capacity, generator=self.generator, device=dev)[:n].to(buf.device)  # (n,)
        x = buf[index]  # (n, *state), advanced indexing copies
        if self.reinit_prob > 0:
            fresh = torch.rand(n, generator=self.generator, device=dev) < self.reinit_prob  # (n,)
            k = int(fresh.sum())
            if k:
                x[fresh.to(buf.device)] = self._init(k)
        return x, index

    def update(self, index: Tensor, x_new: Tensor) -> None:
        """Write chains back: ``buffer[index] = x_new`` (detached, moved to the buffer's device).

        Args:
            index: LongTensor (n,) of distinct slots in [0, N), as returned by :meth:`sample`.
            x_new: Tensor (n, *state) with the buffer's dtype.

        Raises:
            ValueError: on a malformed or out-of-range index, or a shape/dtype mismatch.
        """
        buf = self.buffer
        if not isinstance(index, Tensor) or index.dtype != torch.long or index.dim() != 1:
            got = (tuple(index.shape), index.dtype) if isinstance(index, Tensor) else type(index).__name__
            raise ValueError(f"index must be a 1-D LongTensor, got {got}")
        if index.numel() and (index.min() < 0 or index.max() >= self.capacity):
            raise ValueError(f"index must lie in [0, {self.capacity}), "
                             f"got range [{int(index.min())}, {int(index.max())}]")
        if index.unique().numel() != index.numel():
            raise ValueError("index must not contain duplicate slots")
        _check_batch("x_new", x_new, (index.numel(), *buf.shape[1:]), buf.dtype)
        buf[index.to(buf.device)] = x_new.detach().to(buf.device)

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors for a (safetensors) checkpoint: ``"buffer"`` (N, *state) once filled, and
        ``"generator_state"`` (uint8) when the buffer has a generator. Like ``nn.Module.state_dict``
        the buffer tensor is returned by reference, not copied."""
        out: dict[str, Tensor] = {}
        if self._buffer is not None:
            out["buffer"] = self._buffer
        if self.generator is not None:
            out["generator_state"] = self.generator.get_state()
        return out

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict` (the buffer is copied; an absent ``"buffer"`` leaves it
        to be filled lazily).

        Raises:
            ValueError: on unknown keys or a buffer whose first dimension is not the capacity.
        """
        unknown = set(state) - {"buffer", "generator_state"}
        if unknown:
            raise ValueError(f"unexpected keys in replay buffer state: {sorted(unknown)}")
        if "buffer" in state:
            b = state["buffer"]
            if not isinstance(b, Tensor) or b.dim() < 1 or b.shape[0] != self.capacity:
                got = tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                raise ValueError(f"buffer must be a Tensor of shape ({self.capacity}, ...), got {got}")
            self._buffer = b.detach().clone().contiguous()
        else:
            self._buffer = None
        if "generator_state" in state and self.generator is not None:
            self.generator.set_state(state["generator_state"].cpu())


class PersistentChains:
    """The C chain states of persistent contrastive divergence (PCD): all chains advance every update.

    Args:
        x0: Tensor (C, *state), the initial states (copied).
    """

    def __init__(self, x0: Tensor) -> None:
        if not isinstance(x0, Tensor) or x0.dim() < 1 or x0.shape[0] < 1:
            got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
            raise ValueError(f"x0 must be a Tensor of shape (C, ...) with C >= 1, got {got}")
        self._state = x0.detach().clone()

    @property
    def state(self) -> Tensor:
        """The current states, Tensor (C, *state)."""
        return self._state

    def update(self, x: Tensor) -> None:
        """Replace the states by x (C, *state) of the same shape and dtype (detached).

        Raises:
            ValueError: on a shape or dtype mismatch.
        """
        self._state = _check_batch("x", x, tuple(self._state.shape), self._state.dtype).detach()

    def state_dict(self) -> dict[str, Tensor]:
        """``{"state": Tensor (C, *state)}`` (by reference)."""
        return {"state": self._state}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore from :meth:`state_dict` (copied). Raises ValueError on a key, shape or dtype mismatch."""
        if set(state) != {"state"}:
            raise ValueError(f"persistent chain state must have exactly the key 'state', got {sorted(state)}")
        x = _check_batch("state", state["state"], tuple(self._state.shape), self._state.dtype)
        self._state = x.detach().clone()
