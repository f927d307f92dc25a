"""Curvature from Hessian-vector products alone: the top eigenvalue by power iteration and the trace
by Hutchinson's estimator.  Pure maths on *vectors* (tuples of tensors shaped like a model's
parameters) and an ``hvp`` callable; no models, no data, no I/O, so the tests can hand it a
quadratic whose Hessian is known exactly.

Every random draw comes from a ``torch.Generator`` the caller seeds, drawn on the CPU in float32
and then moved to each tensor's dtype and device, so the same seed gives the same vectors on every
device.  Inner products are accumulated in float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Vector = tuple[torch.Tensor, ...]
HVP = Callable[[Vector], Vector]


def dot(a: Vector, b: Vector) -> float:
    return float(sum(torch.sum(x.double() * y.double()) for x, y in zip(a, b, strict=True)))


def norm(a: Vector) -> float:
    return math.sqrt(dot(a, a))


def scaled(a: Vector, factor: float) -> Vector:
    return tuple(x * factor for x in a)


def gaussian_like(like: Vector, generator: torch.Generator) -> Vector:
    """Standard normal entries, drawn on the CPU (the same numbers on every device)."""
    return tuple(torch.randn(x.shape, generator=generator).to(x.dtype).to(x.device) for x in like)


def rademacher_like(like: Vector, generator: torch.Generator) -> Vector:
    """Entries +1 or -1 with equal probability (Hutchinson's vectors)."""
    return tuple((torch.randint(0, 2, x.shape, generator=generator) * 2 - 1).to(x.dtype).to(x.device) for x in like)


@dataclass
class Eigen:
    """The power iteration's answer: the Rayleigh quotient of its last vector."""

    value: float
    iterations: int  # Hessian-vector products, both stages together
    converged: bool  # the relative change of the last step was below the tolerance (in each stage)
    tolerance: float
    history: list[float] = field(default_factory=list)  # the Rayleigh quotient after each product
    shifted_by: float | None = None  # the first stage's (negative) answer, when a second stage ran on H - that


def power_iteration(hvp: HVP, like: Vector, generator: torch.Generator, max_iter: int = 20,
                    tol: float = 1e-3) -> Eigen:
    """The eigenvalue of largest magnitude of the Hessian behind ``hvp``, by power iteration from a
    seeded Gaussian start: v <- Hv / |Hv|, stopping when the Rayleigh quotient vᵀHv changes by less
    than ``tol`` relative to its previous value, or after ``max_iter`` products (PyHessian's rule)."""
    v = gaussian_like(like, generator)
    v = scaled(v, 1.0 / norm(v))
    history: list[float] = []
    for i in range(1, max_iter + 1):
        hv = hvp(v)
        value = dot(v, hv)
        previous = history[-1] if history else None
        history.append(value)
        if previous is not None and abs(value - previous) <= tol * max(abs(previous), 1e-12):
            return Eigen(value, i, True, tol, history)
        size = norm(hv)
        if size == 0.0:  # v lies in the kernel: the Hessian is zero along it
            return Eigen(0.0, i, True, tol, history)
        v = scaled(hv, 1.0 / size)
    return Eigen(history[-1], max_iter, False, tol, history)


def top_eigenvalue(hvp: HVP, like: Vector, generator: torch.Generator, max_iter: int = 20,
                   tol: float = 1e-3) -> Eigen:
    """The largest (algebraic) eigenvalue.  Power iteration finds the one of largest magnitude; where
    that is negative (a model far from a minimum), a second power iteration on H - lambda I, whose
    eigenvalues are then all >= 0, finds lambda_max - lambda, and lambda is added back.  Each stage
    takes at most ``max_iter`` products, from the same seeded start."""
    state = generator.get_state()
    first = power_iteration(hvp, like, generator, max_iter, tol)
    if first.value >= 0:
        return first
    shift = first.value

    def shifted(v: Vector) -> Vector:
        return tuple(h - shift * x for h, x in zip(hvp(v), v, strict=True))

    generator.set_state(state)
    second = power_iteration(shifted, like, generator, max_iter, tol)
    return Eigen(second.value + shift, first.iterations + second.iterations, first.converged and second.converged,
                 tol, first.history + [h + shift for h in second.history], shift)


@dataclass
class Trace:
    """Hutchinson's estimate: the mean of vᵀHv over Rademacher vectors v, with its standard error."""

    value: float
    standard_error: float  # sample standard deviation / sqrt(vectors); NaN with one vector
    vectors: int
    samples: list[float] = field(default_factory=list)


def hutchinson_trace(hvp: HVP, like: Vector, generator: torch.Generator, vectors: int = 20) -> Trace:
    """tr(H) ~ mean over ``vectors`` Rademacher v of vᵀHv (unbiased: E[vvᵀ] = I)."""
    samples = []
    for _ in range(vectors):
        v = rademacher_like(like, generator)
        samples.append(dot(v, hvp(v)))
    return Trace(*mean_and_error(samples), vectors, samples)


def mean_and_error(samples: Sequence[float]) -> tuple[float, float]:
    """The mean and its standard error (n - 1 in the variance); NaN error for one sample."""
    n = len(samples)
    mean = sum(samples) / n
    if n < 2:
        return mean, math.nan
    variance = sum((s - mean) ** 2 for s in samples) / (n - 1)
    return mean, math.sqrt(variance / n)
