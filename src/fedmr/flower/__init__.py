"""FedMR on Flower (``pip install fedmr[flower]``).

``from fedmr.flower import FedMR`` (or ``FedIndep``): drop-in Flower strategies for any Flower
app, with FedAvg's arguments (``fedmr_strategy.py``); ``PollingGrid`` makes a deployed
ServerApp notice replies within 0.1 s instead of 3 s (``grid.py``).  ``server_app.app`` and ``client_app.app``
are fedmr's own ServerApp and ClientApp, which run every fedmr algorithm and which
``flower_app/pyproject.toml`` names; see docs/flower.md.  Importing this package loads nothing
until a name is used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FedIndep", "FedMR", "PollingGrid"]


def __getattr__(name: str) -> Any:
    if name == "PollingGrid":
        from .grid import PollingGrid

        return PollingGrid
    if name in __all__:
        from . import fedmr_strategy

        return getattr(fedmr_strategy, name)
    raise AttributeError(f"module 'fedmr.flower' has no attribute '{name}'")
