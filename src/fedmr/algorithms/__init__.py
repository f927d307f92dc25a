"""One file per algorithm, all on the interface in :mod:`fedmr.algorithms.base`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import Algorithm, Federation, TrainResult, TrainTask
from .clustered import ClusteredSampling
from .fedavg import FedAvg
from .fedgen import FedGen
from .fedindep import FedIndep
from .fedmr import FedMR
from .fedprox import FedProx
from .moon import Moon
from .scaffold import Scaffold

ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (FedAvg, FedProx, Scaffold, Moon, FedGen, ClusteredSampling, FedIndep, FedMR)
}


def build_algorithm(cfg: Mapping[str, Any], federation: Federation, name: str | None = None) -> Algorithm:
    name = name or cfg["algorithm"]
    return ALGORITHMS[name](cfg[name], federation)


__all__ = ["ALGORITHMS", "Algorithm", "Federation", "TrainResult", "TrainTask", "build_algorithm"]
