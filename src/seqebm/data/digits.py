"""The scikit-learn ``digits`` data set as sequences of 64 pixel intensities in ``0..16``.

Each 8x8 image is flattened in raster order (row by row) into a length-64 sequence over
``DIGITS_LEVELS = 17`` symbols, which makes it a tiny sequence-modeling benchmark.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from seqebm.data.corpora import SPLITS, _resolve_cache_dir, _try_cache_write, split_keys

__all__ = [
    "DIGITS_LEVELS",
    "DIGITS_SIDE",
    "DIGITS_LENGTH",
    "DigitsDataset",
    "load_digits_dataset",
]

DIGITS_LEVELS: int = 17
DIGITS_SIDE: int = 8
DIGITS_LENGTH: int = DIGITS_SIDE * DIGITS_SIDE
_N_IMAGES = 1797
_CACHE_VERSION = 1


@dataclass
class DigitsDataset:
    """Train/valid/test splits of the digits: ``LongTensor`` (N, 64) in ``0..16`` plus labels (N,)."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    train_labels: torch.Tensor
    valid_labels: torch.Tensor
    test_labels: torch.Tensor
    levels: int = DIGITS_LEVELS
    side: int = DIGITS_SIDE

    def split(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images, labels)`` of split ``name`` ("train", "valid" or "test")."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {', '.join(SPLITS)}")
        images: torch.Tensor = getattr(self, name)
        labels: torch.Tensor = getattr(self, f"{name}_labels")
        return images, labels

    def summary(self) -> dict[str, int]:
        """Number of images per split."""
        return {s: int(getattr(self, s).shape[0]) for s in SPLITS}


def _from_sklearn() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.asarray(bunch.data).astype(np.uint8)
    labels = np.asarray(bunch.target).astype(np.uint8)
    return images, labels


def _valid_arrays(images: np.ndarray, labels: np.ndarray) -> bool:
    return (
        images.shape == (_N_IMAGES, DIGITS_LENGTH)
        and labels.shape == (_N_IMAGES,)
        and int(images.max()) < DIGITS_LEVELS
        and int(labels.max()) <= 9
    )


def _read_cache(path: Path) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as npz:
            images, labels = npz["images"], npz["labels"]
            version = int(npz["version"])
    except Exception:  # missing, truncated or otherwise unreadable: rebuild
        return None
    if version != _CACHE_VERSION or not _valid_arrays(images, labels):
        return None
    return images, labels


def load_digits_dataset(
    cache_dir: str | os.PathLike[str] | None = None, *, seed: int = 0
) -> DigitsDataset:
    """Load the 1797 digits split 1437/180/180 (train/valid/test), deterministically.

    Pixels are ``int64`` in ``0..16`` (``DIGITS_LEVELS = 17`` levels), flattened in raster
    order. The raw arrays are cached as ``digits.v1.npz`` under ``cache_dir`` (default
    ``$SEQEBM_CACHE`` or ``~/.cache/seqebm``) so later loads skip importing scikit-learn; a
    corrupt cache is rebuilt.
    """
    path = _resolve_cache_dir(cache_dir) / "datasets" / f"digits.v{_CACHE_VERSION}.npz"
    cached = _read_cache(path)
    if cached is None:
        images, labels = _from_sklearn()
        if not _valid_arrays(images, labels):
            raise ValueError(
                f"unexpected digits data from scikit-learn: images {images.shape}, labels {labels.shape}"
            )
        buf = io.BytesIO()
        np.savez(buf, images=images, labels=labels, version=np.array(_CACHE_VERSION))
        _try_cache_write(path, buf.getvalue())
    else:
        images, labels = cached
    parts = split_keys(
        [str(i) for i in range(len(images))], seed=seed, valid_fraction=0.1, test_fraction=0.1
    )
    x = torch.from_numpy(images.astype(np.int64))
    y = torch.from_numpy(labels.astype(np.int64))
    idx = [torch.tensor(p, dtype=torch.long) for p in parts]
    return DigitsDataset(
        train=x[idx[0]],
        valid=x[idx[1]],
        test=x[idx[2]],
        train_labels=y[idx[0]],
        valid_labels=y[idx[1]],
        test_labels=y[idx[2]],
    )
