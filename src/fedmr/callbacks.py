"""Callbacks: user functions called with each evaluation row (the metrics.csv row as a dict), the
place to log to TensorBoard, W&B or MLflow; and the built-in one, ``tensorboard = true``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import ConfigError

Callback = Callable[[dict[str, Any]], None]
TENSORBOARD_DIR = "tensorboard"


class TensorBoardLog:
    """Writes every number of each row as a scalar at step ``round`` to ``<results>/tensorboard``
    (view it with ``tensorboard --logdir <results>``; a comparison shows one run per variant)."""

    def __init__(self, log_dir: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError(TENSORBOARD_MISSING) from None
        self.log_dir = Path(log_dir)
        self._writer = SummaryWriter(log_dir=str(self.log_dir))

    def __call__(self, row: dict[str, Any]) -> None:
        step = int(row["round"])
        for key, value in row.items():
            if key != "round" and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def check_callbacks(callbacks: Sequence[Any]) -> list[Callback]:
    for cb in callbacks:
        if not callable(cb):
            raise ConfigError(f"callbacks must be functions called with each metrics row, got a {type(cb).__name__}")
    return list(callbacks)


TENSORBOARD_MISSING = ("tensorboard = true needs the optional tensorboard package: "
                       "pip install 'fedmr[tensorboard]' (or set tensorboard = false)")


def check_tensorboard(tensorboard: bool, out_dir: str | Path | None) -> None:
    """Before any data are loaded: ``tensorboard = true`` has its package and a results folder to write to."""
    if not tensorboard:
        return
    if out_dir is None:
        raise ConfigError(
            "tensorboard = true writes its log into the results folder; give one (--out DIR, or out= in the API)")
    import importlib.util

    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(TENSORBOARD_MISSING)


def run_callbacks(tensorboard: bool, out_dir: Path | None, callbacks: Sequence[Callback] = ()) -> list[Callback]:
    """The user's callbacks plus the built-in ones the config asks for (``tensorboard = true``)."""
    chosen = check_callbacks(callbacks)
    check_tensorboard(tensorboard, out_dir)
    if tensorboard:
        assert out_dir is not None
        chosen.append(TensorBoardLog(Path(out_dir) / TENSORBOARD_DIR))
    return chosen


def close_callbacks(callbacks: Sequence[Callback]) -> None:
    for cb in callbacks:
        close = getattr(cb, "close", None)
        if callable(close):
            close()
