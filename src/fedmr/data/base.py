"""What every data set is: in-memory tensors (:class:`DataSet`), the registry of built-in loaders
that the config's ``dataset`` key picks from, and the checks on a loaded set."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, cast

import numpy as np
import torch

from ..errors import ConfigError, DataError, did_you_mean


@dataclass
class DataSet:
    name: str
    train_x: torch.Tensor  # (N, *sample_shape); built-in images: (N, C, H, W) float32, channels_last
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    classes: list[str] = field(default_factory=list)
    # Writers' own split where the data have one (FEMNIST): one index list per client.
    natural_partition: list[list[int]] | None = None
    default_model: str = "cnn"
    # Per-channel (mean, std) the loader applied to pixels in [0, 1]; None where unknown.
    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    # What `fedmr data info` should say about this copy beyond its counts: provenance and caveats.
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.train_x.shape[0] != self.train_y.shape[0] or self.test_x.shape[0] != self.test_y.shape[0]:
            raise DataError(f"data set '{self.name}': samples and labels differ in number")
        if self.train_x.dim() < 2 or self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(f"data set '{self.name}': train and test samples must share one shape, got "
                            f"{tuple(self.train_x.shape)} and {tuple(self.test_x.shape)}")

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape, without the batch dimension: (C, H, W) for images, (F,) for features."""
        return tuple(int(s) for s in self.train_x.shape[1:])

    @property
    def is_images(self) -> bool:
        return self.train_x.dim() == 4

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])

    def to(self, device: torch.device | str) -> DataSet:
        """The same data on another device (the GPU keeps the whole data set resident)."""
        def move(x: torch.Tensor) -> torch.Tensor:
            x = x.to(device)
            return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x

        return DataSet(self.name, move(self.train_x), move(self.train_y), move(self.test_x), move(self.test_y),
                       self.num_classes, self.classes, self.natural_partition, self.default_model,
                       self.normalization, self.notes)


def check_trainable(data: DataSet) -> list[str]:
    """Refuse data on which a run cannot mean anything (an empty training or test set, samples of
    two shapes, fewer than two classes to train on); return warnings for label slips that still
    allow a run (classes with no training samples: one-based labels leave class 0 empty, and a
    class seen only in the test set can never be predicted)."""
    where = f"data set '{data.name}'"
    if not len(data.train_y):
        raise DataError(f"{where}: the training set holds no samples")
    if not len(data.test_y):
        raise DataError(f"{where}: the test set holds no samples; a run evaluates the global model on it")
    if data.train_x.shape[1:] != data.test_x.shape[1:]:
        raise DataError(f"{where}: train and test samples differ in shape: {tuple(data.train_x.shape[1:])} vs "
                        f"{tuple(data.test_x.shape[1:])}")
    for split, x in (("train_x", data.train_x), ("test_x", data.test_x)):
        bad = non_finite(x)
        if bad:
            raise DataError(f"{where}: {split} holds {bad} non-finite value{'s' if bad != 1 else ''} (NaN or inf); "
                            "no model trains on them: clean or drop those samples first")
    train = torch.bincount(data.train_y.cpu(), minlength=data.num_classes)[: data.num_classes]
    test = torch.bincount(data.test_y.cpu(), minlength=data.num_classes)[: data.num_classes]
    present = int((train > 0).sum())
    if present < 2:
        raise DataError(f"{where}: the training set holds only {present} class; a classifier needs at least two")
    seen = int(((train + test) > 0).sum())
    absent = data.num_classes - seen
    if absent > MAX_ABSENT_CLASSES and absent > ABSENT_CLASSES_RATIO * seen:
        largest = int(torch.cat([data.train_y, data.test_y]).max())
        raise DataError(f"{where}: the labels run to {largest}, so the model would have {data.num_classes} outputs, "
                        f"but only {seen} classes have samples ({absent} have none); number the classes 0..{seen - 1}")
    warnings = []
    empty = [c for c in range(data.num_classes) if train[c] == 0]
    test_only = [c for c in empty if test[c] > 0]
    unused = [c for c in empty if test[c] == 0]
    if unused:
        hint = " (are the labels one-based? they must be 0..C-1)" if unused[0] == 0 else ""
        warnings.append(f"{where}: {_classes(unused, data)} no samples at all, though the labels run to "
                        f"{data.num_classes - 1}{hint}; the model still has {data.num_classes} outputs")
    if test_only:
        count = int(test[test_only].sum())
        warnings.append(f"{where}: {_classes(test_only, data)} samples in the test set only ({count} test "
                        f"sample{'s' if count != 1 else ''}): no client can learn {'it' if len(test_only) == 1 else 'them'}")
    return warnings


# Labels whose classes mostly have no sample (one label 999999 among 0..9) are refused: more than this
# many classes without a sample, and more than ABSENT_CLASSES_RATIO times as many as have one.
MAX_ABSENT_CLASSES = 1000
ABSENT_CLASSES_RATIO = 10


def non_finite(x: torch.Tensor, rows: int = 4096) -> int:
    """How many values of ``x`` are NaN or infinite (0 for integer data), counted a block of rows at a
    time, so a large data set needs no second copy of itself."""
    if not x.is_floating_point():
        return 0
    return sum(int((~torch.isfinite(x[i:i + rows])).sum()) for i in range(0, x.shape[0], rows))


def _classes(indices: list[int], data: DataSet) -> str:
    names = [str(data.classes[c]) if c < len(data.classes) else str(c) for c in indices]
    shown = ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")
    return f"class {shown} has" if len(names) == 1 else f"classes {shown} have"


def as_images(x: torch.Tensor) -> torch.Tensor:
    """float32 in channels_last memory: max-pool and convolutions run several times faster so on CPU."""
    return x.float().contiguous(memory_format=torch.channels_last)


IN_MEMORY = "python-arrays"  # the dataset value recorded for data passed as arrays from Python

@dataclass(frozen=True)
class DataSource:
    """The config keys a data set is loaded by (the fields bear their names); ``cache_dir`` "" and
    a loader's ``options`` {} mean none given."""

    dataset: str
    data_dir: str
    normalization: str
    cache_dir: str = ""
    options: Mapping[str, Any] = field(default_factory=dict)  # a user loader's [pkg.mod:loader] table

    @classmethod
    def of(cls, cfg: DataSource | Mapping[str, Any]) -> DataSource:
        """From a run config (or any mapping of its keys)."""
        if isinstance(cfg, cls):
            return cfg
        mapping = cast(Mapping[str, Any], cfg)  # not a DataSource: mypy does not narrow on isinstance(cfg, cls)
        given = {f.name: mapping[f.name] for f in fields(cls) if f.name in mapping and f.name != "options"}
        return cls(**given, options=dict(mapping.get(given["dataset"]) or {}))


Loader = Callable[[DataSource], DataSet]
DATASETS: dict[str, Loader] = {}


def register(name: str) -> Callable[[Loader], Loader]:
    def wrap(fn: Loader) -> Loader:
        DATASETS[name] = fn
        return fn

    return wrap


def check_dataset_name(name: str) -> None:
    """A built-in data set's name or an import string (which the plug-in checks resolve)."""
    if ":" not in name and name not in DATASETS and name != IN_MEMORY:
        raise ConfigError(f"unknown dataset '{name}' (choose from {', '.join(sorted(DATASETS))}, or name your own "
                          f"loader as 'package.module:loader'){did_you_mean(name, DATASETS)}")


def size_summary(counts: list[int]) -> str:
    """min / median / mean / max of per-client (per-writer) sample counts, for `fedmr data info`."""
    a = np.asarray(counts, dtype=np.float64)
    return f"min {a.min():g} / median {np.median(a):g} / mean {a.mean():.1f} / max {a.max():g}"
