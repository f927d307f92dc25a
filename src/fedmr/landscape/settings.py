"""What ``fedmr landscape`` computes and how: ``Settings``, whose field defaults are the command's
defaults (declared once here, read by the argument parser without importing torch)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from ..errors import ConfigError, did_you_mean

if TYPE_CHECKING:
    import torch

ONE_MODEL = ("test", "eigen", "trace", "1d", "2d")
COMPUTATIONS = (*ONE_MODEL, "path")
DEFAULT_ONE = ONE_MODEL
DEFAULT_TWO = ("path",)


@dataclass(frozen=True)
class Settings:
    """What to compute and how; each field's default is the CLI's default."""

    compute: tuple[str, ...] = DEFAULT_ONE
    samples: int = 1000  # training samples the loss, Hessian and curves are measured on
    batch_size: int = 500
    seed: int = 1  # the subset, the power iteration's start, Hutchinson's vectors, the directions
    power_iters: int = 50  # per stage (twice when the shift runs); PyHessian takes 100
    tolerance: float = 1e-3
    trace_vectors: int = 20
    directions: int = 3  # 1-D curves, one filter-normalised direction each
    points: int = 21  # steps of a 1-D curve, from -radius to radius
    radius: float = 1.0
    grid: int = 11  # the 2-D surface's points per side
    path_points: int = 11  # points on the straight line between two models, ends included
    double: bool = False  # float64 instead of the model's float32

    def check(self, models: int) -> None:
        for name in ("samples", "batch_size", "power_iters", "trace_vectors", "directions", "points", "grid"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.path_points < 2:
            raise ConfigError(f"--path-points must be at least 2 (the two ends), got {self.path_points}")
        if not self.radius > 0:
            raise ConfigError(f"--radius must be positive, got {self.radius}")
        if not self.tolerance >= 0:
            raise ConfigError(f"--tolerance must be 0 or positive, got {self.tolerance}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"--seed must be in [0, 2**32), got {self.seed}")
        for name in self.compute:
            if name not in COMPUTATIONS:
                raise ConfigError(f"--compute: unknown computation '{name}' (choose from {', '.join(COMPUTATIONS)})"
                                  f"{did_you_mean(name, COMPUTATIONS)}")
        if models == 1 and "path" in self.compute:
            raise ConfigError("--compute path needs two models: fedmr landscape MODEL_A MODEL_B")
        if models == 2 and set(self.compute) - {"path"}:
            raise ConfigError(f"two models measure only the path between them; run fedmr landscape once per model for "
                              f"{', '.join(c for c in self.compute if c != 'path')}")

    @property
    def dtype(self) -> torch.dtype:
        import torch

        return torch.float64 if self.double else torch.float32


def parse_compute(text: str | None, models: int) -> tuple[str, ...]:
    if text is None:
        return DEFAULT_ONE if models == 1 else DEFAULT_TWO
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


DEFAULTS = {f.name: f.default for f in fields(Settings)}
