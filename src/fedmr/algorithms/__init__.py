"""One file per algorithm, all on the interface in :mod:`fedmr.algorithms.base`.

Each module registers its class with ``@register_algorithm("name")`` when imported; the imports
below are in the order of ``ALGORITHMS``, which is the order of the algorithms' sections in every
config.toml (keep it: a new algorithm goes last).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError, PluginError, did_you_mean
from ..imports import a_noun, is_import_string, resolve, where
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


def algorithm_class(spec: str, key: str = "algorithm") -> type[Algorithm]:
    """The Algorithm subclass a built-in name or an import string names."""
    if not is_import_string(spec):
        if spec not in ALGORITHMS:
            raise ConfigError(f"unknown algorithm '{spec}' (choose from {', '.join(ALGORITHMS)}, or name your own "
                              f"as 'package.module:Class'){did_you_mean(spec, ALGORITHMS)}")
        return ALGORITHMS[spec]
    cls = resolve(key, spec)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        what = f"class {cls.__name__}" if isinstance(cls, type) else a_noun(type(cls).__name__)
        raise PluginError(f"{where(key)}: '{spec}' is {what}, not a subclass of fedmr.Algorithm")
    return cls


def algorithm_defaults(spec: str, key: str) -> dict[str, Any]:
    """The option defaults of the plug-in algorithm ``spec`` (its config section's reference)."""
    return copy.deepcopy(dict(getattr(algorithm_class(spec, key), "defaults", {}) or {}))



def build_algorithm(cfg: Mapping[str, Any], federation: Federation, name: str | None = None) -> Algorithm:
    name = name or cfg["algorithm"]
    return algorithm_class(name)(cfg[name], federation)


__all__ = ["ALGORITHMS", "Algorithm", "ClusteredSampling", "FedAvg", "FedGen", "FedIndep", "FedMR", "FedProx",
           "Federation", "Moon", "Options", "Scaffold", "TrainResult", "TrainTask", "algorithm_class", "algorithm_defaults",
           "build_algorithm", "option", "register_algorithm"]
