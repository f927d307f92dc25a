"""fedmr: Federated Learning via Model Recombination, its baselines, a fast simulator and Flower apps.

The Python API (docs/api.md)::

    import fedmr
    result = fedmr.run({"rounds": 50}, model=my_factory, data=(train_x, train_y, test_x, test_y))
    result.summary["final_accuracy"], result.rows[-1]["accuracy"], result.final_state

Names are imported on first use, so ``import fedmr`` (and the ``fedmr`` command) stays quick.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # what an editor or type checker sees; at run time __getattr__ imports on demand
    from .algorithms.base import Algorithm, Federation, Options, TrainResult, TrainTask, option
    from .api import RunResult, compare, run
    from .callbacks import Callback
    from .data import Arrays, DataLoader
    from .errors import ConfigError, DataError, FedMRError, PluginError
    from .models import ModelFactory
    from .training import LocalSettings

_EXPORTS = {
    "run": "api", "compare": "api", "RunResult": "api",
    "Algorithm": "algorithms.base", "Federation": "algorithms.base", "TrainTask": "algorithms.base",
    "TrainResult": "algorithms.base", "Options": "algorithms.base", "option": "algorithms.base",
    "LocalSettings": "training",
    "ModelFactory": "models", "DataLoader": "data", "Arrays": "data", "Callback": "callbacks",
    "FedMRError": "errors", "ConfigError": "errors", "DataError": "errors", "PluginError": "errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedmr' has no attribute '{name}'")
    import importlib

    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
