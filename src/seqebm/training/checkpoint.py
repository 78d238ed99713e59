"""Atomic, pickle-free checkpoints.

A training checkpoint is ONE safetensors file holding the model weights (``model.*``), the
optimizer's tensors (``optim.*``) and RNG states (``rng.*``); everything else (optimizer
hyper-parameters, step, epoch, data position, config) is JSON in the file's metadata. It is
written to a temporary file in the same folder and renamed over the target, so a crash never
leaves a half-written checkpoint behind. Loading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn


CHECKPOINT_FORMAT = "seqebm-ckpt-1"
WEIGHTS_FORMAT = "seqebm-weights-1"


def _atomic_save_tensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _state_tensors(model: nn.Module) -> dict[str, Tensor]:
    """State dict with tied (shared-storage) weights kept once: safetensors refuses aliases."""
    out: dict[str, Tensor] = {}
    seen: dict[tuple[int, int, tuple], str] = {}
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = t.detach().contiguous().cpu()
    return out


def save_model(model: nn.Module, path: str | Path, metadata: dict[str, Any] | None = None) -> None:
    """Weights only (safetensors), atomically; ``metadata`` is stored as JSON strings."""
    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    meta["format"] = WEIGHTS_FORMAT
    _atomic_save_tensors(_state_tensors(model), Path(path), meta)


def _read(path: Path, tensors: bool = True) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; ``tensors=False`` reads the header only."""
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return (load_file(str(path)) if tensors else {}), meta
    except (SafetensorError, OSError, ValueError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} is corrupt or truncated ({e})") from None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state (step, epoch, best...) of a training checkpoint, without loading its tensors."""
    path = Path(path)
    meta = _read(path, tensors=False)[1]
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a seqebm training checkpoint (no 'format' metadata)")
    try:
        return json.loads(meta["trainer_state"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} is corrupt: bad metadata ({e})") from None


def load_model(model: nn.Module, path: str | Path, strict: bool = True) -> dict[str, Any]:
    """Load weights into ``model`` from a weights file or a training checkpoint.

    Returns the JSON metadata. Clear errors on shape/vocabulary mismatch.
    """
    tensors, meta = _read(Path(path))
    fmt = meta.pop("format", WEIGHTS_FORMAT)
    if fmt == CHECKPOINT_FORMAT:  # a training checkpoint: weights are the "model." entries
        weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
        meta = {}
    else:
        weights = tensors
    _load_weights(model, weights, Path(path), strict)
    try:
        return {k: json.loads(v) for k, v in meta.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"checkpoint {path} is corrupt: bad metadata ({e})") from None


def _load_weights(model: nn.Module, weights: dict[str, Tensor], path: Path, strict: bool) -> None:
    own = model.state_dict()
    for name, t in weights.items():
        if name in own and own[name].shape != t.shape:
            raise ValueError(
                f"checkpoint {path} does not fit this model: '{name}' has shape {tuple(t.shape)} in the "
                f"checkpoint but {tuple(own[name].shape)} in the model (vocabulary or size mismatch?)"
            )
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # tied weights are stored once; their aliases show up as "missing" but are already loaded
    alias = {n for n in missing if any(own[n].data_ptr() == own[m].data_ptr() for m in weights if m in own)}
    missing = [n for n in missing if n not in alias]
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint {path} does not fit this model: missing {missing}, unexpected {unexpected}")


def rng_state() -> dict[str, Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def set_rng_state(tensors: dict[str, Tensor]) -> None:
    if "rng.cpu" in tensors:
        torch.set_rng_state(tensors["rng.cpu"])
    cuda = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])


def _flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[k] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, v in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = v
    for pid, sc in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], extra_tensors: dict[str, Tensor] | None = None) -> None:
    """Model + optimizer + RNG + trainer state in one atomically written safetensors file."""
    tensors = {f"model.{k}": v for k, v in _state_tensors(model).items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)
    tensors.update(opt_tensors)
    tensors.update(rng_state())
    tensors.update(extra_tensors or {})
    meta = {"trainer_state": json.dumps(trainer_state), "optimizer": json.dumps(opt_meta), "format": CHECKPOINT_FORMAT}
    _atomic_save_tensors(tensors, Path(path), meta)


def load_checkpoint(path: str | Path, *, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    restore_rng: bool = True) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote; returns the trainer state."""
    path = Path(path)
    tensors, meta = _read(path)
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a seqebm training checkpoint (no 'format' metadata)")
    try:
        trainer_state = json.loads(meta["trainer_state"])
        opt_meta = json.loads(meta["optimizer"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {path} is corrupt: bad metadata ({e})") from None
    _load_weights(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path, strict=True)
    if optimizer is not None:
        opt = _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")}, opt_meta)
        optimizer.load_state_dict(opt)
    if restore_rng:
        set_rng_state(tensors)
    trainer_state["extra_tensors"] = {k: v for k, v in tensors.items() if k.startswith("extra.")}
    return trainer_state
