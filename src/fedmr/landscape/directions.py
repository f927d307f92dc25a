"""Loss along lines in weight space: filter-normalised random directions (Li et al., "Visualizing the
Loss Landscape of Neural Nets", NeurIPS 2018), 1-D curves and 2-D grids along them, and the straight
line between two models with its barrier.

Filter normalisation, as in Li et al.'s code: a Gaussian direction d is rescaled filter by filter
(each slice along a weight's first dimension: a convolution's output channel, a linear layer's
output unit) to the norm of the same filter of the model, d_i <- d_i |theta_i| / |d_i|, and is zero
on one-dimensional parameters (biases, BatchNorm's weight and bias: their ``ignore = 'biasbn'``),
so a step of 1 moves every filter by its own size whatever the layer's scale.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .hessian import Vector, gaussian_like
from .objective import Objective

INTERPOLATION = ("every floating-point entry of the state (weights and BatchNorm running statistics) moves "
                 "linearly from the first model to the second; integer entries (batch counters) are the first's")


def filter_normalised(params: Vector, generator: torch.Generator) -> Vector:
    """A seeded Gaussian direction, filter-normalised to ``params`` (Li et al.)."""
    out = []
    for theta, d in zip(params, gaussian_like(params, generator), strict=True):
        if theta.dim() <= 1:
            out.append(torch.zeros_like(theta))
            continue
        dims = tuple(range(1, theta.dim()))
        scale = torch.linalg.vector_norm(theta, dim=dims, keepdim=True) / (
            torch.linalg.vector_norm(d, dim=dims, keepdim=True) + 1e-10)
        out.append(d * scale)
    return tuple(out)


def moved(params: Vector, steps: Sequence[tuple[float, Vector]]) -> Vector:
    """params + sum of alpha * direction."""
    out = list(params)
    for alpha, direction in steps:
        out = [p + alpha * d for p, d in zip(out, direction, strict=True)]
    return tuple(out)


def evenly(low: float, high: float, points: int) -> list[float]:
    """``points`` evenly spaced values from low to high, rounded so 0 is exactly 0 when it is among them."""
    if points == 1:
        return [low]
    return [round(low + (high - low) * i / (points - 1), 12) for i in range(points)]


@dataclass
class Curve:
    """Loss and accuracy at each step along each direction (rows: directions)."""

    alphas: list[float]
    loss: list[list[float]]
    accuracy: list[list[float]]


def curve_1d(objective: Objective, directions: Sequence[Vector], alphas: Sequence[float]) -> Curve:
    loss, acc = [], []
    for d in directions:
        points = [objective.evaluate(moved(objective.params, [(a, d)])) for a in alphas]
        loss.append([p[0] for p in points])
        acc.append([p[1] for p in points])
    return Curve(list(alphas), loss, acc)


def surface_2d(objective: Objective, first: Vector, second: Vector, alphas: Sequence[float]) -> Curve:
    """Loss and accuracy on the grid theta + a*first + b*second; row i is b = alphas[i], column j a = alphas[j]."""
    loss, acc = [], []
    for b in alphas:
        points = [objective.evaluate(moved(objective.params, [(a, first), (b, second)])) for a in alphas]
        loss.append([p[0] for p in points])
        acc.append([p[1] for p in points])
    return Curve(list(alphas), loss, acc)


def interpolated(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float) -> dict[str, torch.Tensor]:
    """(1 - t) a + t b on the floating-point entries; integer entries are a's."""
    return {k: torch.lerp(v, b[k], t) if v.is_floating_point() else v for k, v in a.items()}


@dataclass
class Path:
    ts: list[float]
    loss: list[float]
    accuracy: list[float]

    @property
    def ends_mean(self) -> float:
        return (self.loss[0] + self.loss[-1]) / 2

    @property
    def barrier(self) -> float:
        """The highest loss on the line above the mean of its two ends' losses (0 or less: no barrier)."""
        return max(self.loss) - self.ends_mean

    @property
    def barrier_linear(self) -> float:
        """The highest loss above the chord between the ends, max over t of L(t) - ((1 - t) L(0) + t L(1))
        (Frankle et al. 2020): 0 on a line whose loss never rises above the chord, even with unequal ends."""
        return max(loss - ((1 - t) * self.loss[0] + t * self.loss[-1]) for t, loss in zip(self.ts, self.loss))

    @property
    def barrier_at(self) -> float:
        return self.ts[max(range(len(self.loss)), key=lambda i: self.loss[i])]


def straight_path(objective: Objective, a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor],
                  ts: Sequence[float]) -> Path:
    """Loss and accuracy of the models on the straight line from ``a`` (t = 0) to ``b`` (t = 1)."""
    loss, acc = [], []
    for t in ts:
        params, fixed = objective.split(interpolated(a, b, t))
        point = objective.evaluate(params, fixed)
        loss.append(point[0])
        acc.append(point[1])
    return Path(list(ts), loss, acc)
