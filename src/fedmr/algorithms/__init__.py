"""One file per algorithm, all on the interface in :mod:`fedmr.algorithms.base`.

Each module registers its class with ``@register_algorithm("name")`` when imported; the imports
below are in the order of ``ALGORITHMS``, which is the order of the algorithms' sections in every
config.toml (keep it: a new algorithm goes last).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ALGORITHMS, Algorithm, Federation, Options, TrainResult, TrainTask, option, register_algorithm

# registration order, see above
# isort: off
from .fedavg import FedAvg
from .fedprox import FedProx
from .scaffold import Scaffold
from .moon import Moon
from .fedgen import FedGen
from .clustered import ClusteredSampling
from .fedindep import FedIndep
from .fedmr import FedMR
# isort: on


def build_algorithm(cfg: Mapping[str, Any], federation: Federation, name: str | None = None) -> Algorithm:
    name = name or cfg["algorithm"]
    if ":" in name:  # a plug-in class named by import string (fedmr.plugins)
        from ..plugins import algorithm_class

        return algorithm_class(name)(cfg[name], federation)
    return ALGORITHMS[name](cfg[name], federation)


__all__ = ["ALGORITHMS", "Algorithm", "ClusteredSampling", "FedAvg", "FedGen", "FedIndep", "FedMR", "FedProx",
           "Federation", "Moon", "Options", "Scaffold", "TrainResult", "TrainTask", "build_algorithm", "option",
           "register_algorithm"]
