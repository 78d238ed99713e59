"""Adapter from Hugging Face ``transformers`` causal LMs to the seqebm model protocol.

Notation (shape comments):
    B batch, T sequence length, S tokens fed to one ``step`` call, V vocabulary.

The wrapped model is any ``AutoModelForCausalLM`` (GPT-2, Llama, ...) built from a local config
or loaded from a local folder; nothing is ever downloaded (``local_files_only=True``).

Incremental decoding keeps the model's key/value cache (a ``transformers`` ``Cache``, usually a
``DynamicCache``) and the number of tokens already fed. ``step`` and ``select_state`` are
*functional*: they never modify the state they receive, so one encoded prefix can be extended in
several ways or shared by K samples (the cache layers are shallow-copied before the model appends
to them; ``DynamicLayer`` appends by concatenation, so the old tensors are never written).

References:
    A. Radford et al. "Language Models are Unsupervised Multitask Learners". 2019 (GPT-2).
    H. Touvron et al. "LLaMA: Open and Efficient Foundation Language Models". 2023.
    T. Wolf et al. "Transformers: State-of-the-Art Natural Language Processing". EMNLP 2020.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from seqebm.models.base import check_tokens

__all__ = ["HFState", "HFCausalLM"]


@dataclass(frozen=True)
class HFState:
    """Incremental state of :class:`HFCausalLM`.

    Attributes:
        past: the ``transformers`` cache (``past_key_values``) holding ``length`` positions for
            ``batch_size`` rows (key/value tensors ``(B, heads, length, head_dim)``).
        length: number of tokens already fed (= position id of the next token).
        batch_size: number of rows ``B``.
    """

    past: Any
    length: int
    batch_size: int


def _fork_layer(layer: Any) -> Any:
    """Copy one cache layer so that updating the copy leaves ``layer`` intact.

    ``DynamicLayer`` / ``DynamicSlidingWindowLayer`` only rebind their tensors (``torch.cat``,
    slicing, ``index_select``), so a shallow copy suffices; any other layer type (static,
    quantized, linear-attention layers write in place) is deep-copied.
    """
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    if type(layer) in (DynamicLayer, DynamicSlidingWindowLayer):
        new = copy.copy(layer)
        for name, value in vars(new).items():  # containers must not be shared either
            if isinstance(value, (list, dict)):
                setattr(new, name, copy.copy(value))
        return new
    return copy.deepcopy(layer)


def _fork_cache(cache: Any) -> Any:
    """A copy of a ``transformers`` cache that can be updated without touching ``cache``."""
    layers = getattr(cache, "layers", None)
    if not isinstance(layers, list):  # older/other cache layouts: be safe
        return copy.deepcopy(cache)
    new = copy.copy(cache)
    new.layers = [_fork_layer(layer) for layer in layers]
    return new


class HFCausalLM(nn.Module):
    """A ``transformers`` causal LM seen through the seqebm protocol.

    Args:
        hf_model: an ``AutoModelForCausalLM`` instance (any decoder-only architecture).
        bos_id: BOS id to prepend to sequences; default ``config.bos_token_id`` when it lies in
            ``[0, vocab_size)``, else 0 (e.g. a tiny GPT-2 config keeps the default 50256).

    Attributes:
        vocab_size: ``config.vocab_size`` (the logits' last dimension).
        max_len: ``n_positions`` / ``max_position_embeddings`` when the config has one, else None.
        bos_id: see above.
    """

    def __init__(self, hf_model: nn.Module, bos_id: int | None = None) -> None:
        super().__init__()
        config = getattr(hf_model, "config", None)
        if config is None or not hasattr(config, "vocab_size"):
            raise ValueError(
                "HFCausalLM expects a transformers model with a .config holding vocab_size, "
                f"got {type(hf_model).__name__}"
            )
        self.model = hf_model
        self.vocab_size: int = int(config.vocab_size)
        max_len = getattr(config, "n_positions", None)
        if max_len is None:
            max_len = getattr(config, "max_position_embeddings", None)
        self.max_len: int | None = int(max_len) if max_len is not None else None
        if bos_id is None:
            cfg_bos = getattr(config, "bos_token_id", None)
            bos_id = cfg_bos if isinstance(cfg_bos, int) and 0 <= cfg_bos < self.vocab_size else 0
        if not 0 <= bos_id < self.vocab_size:
            raise ValueError(f"bos_id={bos_id} is outside the vocabulary [0, {self.vocab_size})")
        self.bos_id: int = int(bos_id)
        params = inspect.signature(hf_model.forward).parameters
        self._takes_position_ids = "position_ids" in params

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_config(
        cls, config: Any, model_type: str = "gpt2", bos_id: int | None = None, **kwargs: Any
    ) -> "HFCausalLM":
        """Build a randomly initialised model from a config.

        Args:
            config: a ``transformers`` config object, or a dict of config fields (then
                ``AutoConfig.for_model(model_type, **config)`` is used).
            model_type: architecture name for dict configs (``"gpt2"``, ``"llama"``, ...).
            bos_id: see the class docstring.
            **kwargs: extra config fields (override those of ``config``).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

        if isinstance(config, dict):
            config = AutoConfig.for_model(model_type, **{**config, **kwargs})
        elif isinstance(config, PretrainedConfig):
            config = copy.deepcopy(config)
            for key, value in kwargs.items():
                setattr(config, key, value)
        else:
            raise TypeError(
                "config must be a transformers PretrainedConfig or a dict, "
                f"got {type(config).__name__}"
            )
        return cls(AutoModelForCausalLM.from_config(config), bos_id=bos_id)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, bos_id: int | None = None, **kwargs: Any
    ) -> "HFCausalLM":
        """Load a model saved with ``save_pretrained`` from a *local* folder (never downloads).

        Raises:
            FileNotFoundError: the folder or its ``config.json`` does not exist.
        """
        from transformers import AutoModelForCausalLM

        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(
                f"HF model folder {str(folder)!r} does not exist; HFCausalLM.from_pretrained only "
                "loads local folders written by save_pretrained (no hub downloads)"
            )
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"{str(folder)!r} has no config.json: not a save_pretrained folder"
            )
        kwargs.setdefault("local_files_only", True)
        hf_model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
        return cls(hf_model, bos_id=bos_id)

    # ------------------------------------------------------------------ full forward
    def forward(self, tokens: Tensor) -> Tensor:
        """Teacher-forced logits: ``tokens (B, T)`` -> ``(B, T, V)`` float32.

        ``logits[:, t]`` scores the token that follows ``tokens[:, : t + 1]``.
        """
        check_tokens(tokens, self.vocab_size, self.max_len)
        out = self.model(input_ids=tokens.long(), use_cache=False)
        return out.logits.float()

    def features(self, tokens: Tensor, **context: Tensor) -> Tensor:
        """Top hidden states ``(B, T, D)`` float32, the input of the output head.

        The last entry of ``hidden_states`` (``output_hidden_states=True``), which is taken after
        the final norm, so ``get_output_embeddings()(features) == forward`` for architectures
        whose logits are that plain projection (not e.g. Gemma-2's soft-capped logits).
        Context keywords are accepted and ignored, as in :meth:`forward`.
        """
        check_tokens(tokens, self.vocab_size, self.max_len)
        out = self.model(input_ids=tokens.long(), use_cache=False, output_hidden_states=True)
        return out.hidden_states[-1].float()

    # ------------------------------------------------------------------ incremental
    def init_state(self, batch_size: int, device: torch.device | str = "cpu") -> HFState:
        """Empty cache for ``batch_size`` rows (``device`` is implied by the model's weights)."""
        from transformers import DynamicCache

        try:
            past = DynamicCache(config=self.model.config)
        except TypeError:  # older transformers without the config argument
            past = DynamicCache()
        return HFState(past=past, length=0, batch_size=batch_size)

    def step(self, tokens: Tensor, state: HFState) -> tuple[Tensor, HFState]:
        """Feed ``tokens (B, S)`` after the ``state.length`` cached tokens.

        Returns ``(B, S, V)`` float logits equal to the matching slice of :meth:`forward` on the
        concatenated tokens, and a new state; ``state`` itself is left unchanged.
        """
        check_tokens(tokens, self.vocab_size, None)
        b, s = tokens.shape
        if s == 0:
            raise ValueError("step needs at least one token, got shape (B, 0)")
        if b != state.batch_size:
            raise ValueError(f"step got batch {b} but the state holds {state.batch_size} rows")
        if self.max_len is not None and state.length + s > self.max_len:
            raise ValueError(
                f"sequence of length {state.length + s} is longer than the model's context "
                f"max_len={self.max_len}"
            )
        past = _fork_cache(state.past)
        kwargs: dict[str, Any] = {}
        if self._takes_position_ids:
            positions = torch.arange(state.length, state.length + s, device=tokens.device)
            kwargs["position_ids"] = positions.unsqueeze(0).expand(b, s)
        out = self.model(input_ids=tokens.long(), past_key_values=past, use_cache=True, **kwargs)
        new_past = out.past_key_values if out.past_key_values is not None else past
        return out.logits.float(), HFState(new_past, state.length + s, b)

    def select_state(self, state: HFState, index: Tensor) -> HFState:
        """New state with rows ``index`` (LongTensor, repeats allowed) of ``state``.

        The cache is forked and then reordered with ``Cache.reorder_cache`` (``index_select``
        on every key/value tensor), so ``state`` remains valid for other holders.
        """
        if index.dim() != 1:
            raise ValueError(f"index must be 1-D, got shape {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= state.batch_size):
            raise ValueError(
                f"index values must lie in [0, {state.batch_size}), got min={int(index.min())}, "
                f"max={int(index.max())}"
            )
        past = _fork_cache(state.past)
        past.reorder_cache(index.long())
        return HFState(past, state.length, int(index.numel()))
