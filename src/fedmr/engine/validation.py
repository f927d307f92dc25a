"""Checks every client update before it can enter the pool or an average."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..algorithms.base import TrainResult


def update_problem(
    result: TrainResult, reference: Mapping[str, torch.Tensor], max_update_norm: float = 0.0,
    start: Mapping[str, torch.Tensor] | None = None,
) -> str | None:
    """Why ``result`` must be rejected, or None if it is sound.

    Same keys, shapes and dtypes as the model; every value finite; and, when
    ``max_update_norm`` > 0, an L2 norm of (returned - start) within that bound.
    """
    state = result.state
    if not isinstance(state, Mapping):
        return "the update is not a state dict"
    missing = [k for k in reference if k not in state]
    if missing:
        return f"missing key '{missing[0]}'"
    extra = [k for k in state if k not in reference]
    if extra:
        return f"unexpected key '{extra[0]}'"
    for key, ref in reference.items():
        value = state[key]
        if not isinstance(value, torch.Tensor):
            return f"'{key}' is not a tensor"
        if value.shape != ref.shape:
            return f"'{key}' has shape {tuple(value.shape)}, expected {tuple(ref.shape)}"
        if value.dtype != ref.dtype:
            return f"'{key}' has dtype {value.dtype}, expected {ref.dtype}"
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            return f"'{key}' has non-finite values"
    if max_update_norm > 0 and start is not None:
        sq = sum(float((state[k].double() - start[k].double()).pow(2).sum())
                 for k in reference if state[k].is_floating_point())
        norm = math.sqrt(sq)
        if norm > max_update_norm:
            return f"update norm {norm:.4g} exceeds max_update_norm {max_update_norm:.4g}"
    return None
