"""Pixel normalisations the config's ``normalization`` key picks from, and the uint8 -> tensor step.

Every loader keeps its pixels as raw arrays (uint8 0..255, or floats in [0, 1])
and turns them into the DataSet's tensors here, so the same arrays, cached or
freshly decoded, always give the same numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from ..errors import DataError
from .base import as_images

# name -> (mean, std) per channel, applied as (x - mean) / std to pixels in [0, 1].
NORMALIZATIONS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.5,), (0.5,)),  # the paper's CIFAR-10 setting: [-1, 1]
    "cifar10-stats": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),  # the paper's CIFAR-100 setting
    "femnist": ((0.5,), (-0.5,)),  # the paper's FEMNIST mapping (0.5 - x) / 0.5: ink becomes positive
    "none": ((0.0,), (1.0,)),
}
CHOICES = ("auto", *NORMALIZATIONS)

Affine = tuple[tuple[float, ...], tuple[float, ...]]


def resolve(name: str, default: str, channels: int) -> Affine:
    """The per-channel (mean, std) for ``name`` ("auto" = the data set's paper default)."""
    key = default if name == "auto" else name
    if key not in NORMALIZATIONS:
        raise DataError(f"unknown normalization '{name}' (choose from {', '.join(CHOICES)})")
    mean, std = NORMALIZATIONS[key]
    if len(mean) == 1:
        return mean * channels, std * channels
    if len(mean) != channels:
        raise DataError(f"normalization '{key}' is for {len(mean)}-channel images; this data set has {channels}")
    return mean, std


def to_tensor(pixels: np.ndarray, affine: Affine, scale: float = 1 / 255) -> torch.Tensor:
    """(N, H, W, C) raw pixels -> normalised float32 (N, C, H, W) in channels_last memory.

    ``scale`` maps the raw values to [0, 1] (1/255 for uint8, 1 for floats).
    """
    if pixels.ndim != 4:
        raise DataError(f"expected (N, H, W, C) pixels, got shape {pixels.shape}")
    mean, std = (np.asarray(v, dtype=np.float64) for v in affine)
    # (x * scale - mean) / std as one multiply-add, in place on the float copy.
    mul = torch.tensor(scale / std, dtype=torch.float32).view(1, -1, 1, 1)
    add = torch.tensor(-mean / std, dtype=torch.float32).view(1, -1, 1, 1)
    with warnings.catch_warnings():  # a read-only (memory-mapped cache) array is fine: it is only read
        warnings.simplefilter("ignore", UserWarning)
        x = torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2)  # NHWC memory = channels_last
    x = as_images(x.to(torch.float32, copy=True))  # a copy: never write into the (cached) source array
    return x.mul_(mul).add_(add)


def describe(affine: Affine) -> str:
    mean, std = affine
    return "mean " + "/".join(f"{m:g}" for m in mean) + ", std " + "/".join(f"{s:g}" for s in std)


def raw_channel_stats(x: torch.Tensor, affine: Affine | None) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the pixels in [0, 1] before normalisation (or of ``x`` itself)."""
    std, mean = torch.std_mean(x, dim=(0, 2, 3))
    mean, std = mean.double(), std.double()
    if affine is not None:
        m, s = (torch.tensor(v, dtype=torch.float64) for v in affine)
        mean, std = mean * s + m, std * s.abs()
    return mean.tolist(), std.tolist()


def channels(values: Sequence[float]) -> str:
    return " ".join(f"{v:.4f}" for v in values)
