"""Data sets as in-memory tensors, and the registry the config's ``dataset`` key picks from.

A loader returns a :class:`DataSet` whose samples are tensors resident in memory (the built-in
image sets: normalised float32 in channels_last memory), so the simulator draws a batch by
indexing one tensor: no per-sample Dataset, no DataLoader, no decoding per round.  Samples may
have any shape and dtype (float features, integer tokens); ``dataset = "pkg.mod:loader"`` names a
user loader returning ``(train_x, train_y, test_x, test_y)`` (see :mod:`fedmr.data.user`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from .base import (
    DATASETS,
    IN_MEMORY,
    DataSet,
    DataSource,
    Loader,
    as_images,
    check_dataset_name,
    check_trainable,
    register,
)
from .user import Arrays, DataLoader, dataset_from_arrays, load_user_dataset


def load_dataset(cfg: DataSource | Mapping[str, Any]) -> DataSet:
    """Load the data set a config names (``dataset``, ``data_dir``, ``normalization``), a built-in
    one or a user loader named by import string."""
    source = DataSource.of(cfg)
    name = source.dataset
    check_dataset_name(name)
    if name == IN_MEMORY:
        raise ConfigError(f"dataset = \"{IN_MEMORY}\": this run's data came as arrays from Python; pass them "
                          f"again, fedmr.run(..., data=(train_x, train_y, test_x, test_y))")
    if ":" in name:
        return load_user_dataset(name, source=source)
    return DATASETS[name](source)


# registration order: the embedded data set first
# isort: off
from . import digits  # noqa: E402,F401  (registers the embedded data set)
from . import cifar, femnist, imagefolder  # noqa: E402,F401  (register the real data sets)
# isort: on

__all__ = ["DATASETS", "IN_MEMORY", "Arrays", "DataLoader", "DataSet", "DataSource", "Loader", "as_images", "check_dataset_name",
           "check_trainable", "dataset_from_arrays", "load_dataset", "load_user_dataset", "register"]
