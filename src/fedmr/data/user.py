"""User data loaders named ``dataset = "pkg.mod:loader"``: ``loader(**options) -> (train_x, train_y,
test_x, test_y)``, tensors or numpy arrays, labels integer classes ``0..C-1``, any sample shape and
dtype.  A loader that declares ``data_dir`` gets the config key of that name; its other keyword
parameters with defaults are its options, set in the section ``["pkg.mod:loader"]``.  Checked
here, so a bad loader is one ``fedmr: error:`` line naming the config key."""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import numpy as np
import torch

from ..errors import PluginError
from ..imports import a_noun, first_line, resolve_callable, where
from ..models import auto_model
from .base import DataSet, DataSource

Array = torch.Tensor | np.ndarray
Arrays = tuple[Array, Array, Array, Array]
"""What a data loader returns: ``(train_x, train_y, test_x, test_y)``."""


class DataLoader(Protocol):
    """``loader() -> (train_x, train_y, test_x, test_y)`` as tensors or numpy arrays."""

    def __call__(self) -> Arrays: ...


DATA_DIR = "data_dir"  # a loader that declares this parameter gets the config's data_dir
_OPTION_TYPES = (bool, int, float, str)


def _loader_parameters(spec: str, key: str) -> list[inspect.Parameter]:
    loader = resolve_callable(key, spec)
    try:
        return list(inspect.signature(loader).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: called with nothing
        return []


def loader_defaults(spec: str, key: str = "dataset") -> dict[str, Any]:
    """A loader's options: its keyword parameters with a default of a TOML type (bool, int, float,
    str), in order; ``data_dir`` is not among them (it comes from the config key of that name)."""
    options = {}
    for p in _loader_parameters(spec, key):
        if p.name == DATA_DIR or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        if p.default is p.empty:
            raise PluginError(f"{where(key)}: the loader '{spec}' requires parameter '{p.name}', which has no "
                              f"default; fedmr passes only {DATA_DIR} and the options of the config section "
                              f"['{spec}'], which take their defaults from the signature: give '{p.name}' one")
        if isinstance(p.default, _OPTION_TYPES):
            options[p.name] = p.default
    return options


def loader_arguments(spec: str, source: DataSource, key: str = "dataset") -> dict[str, Any]:
    """What a loader is called with: ``data_dir`` if it declares it, and its section's options."""
    kwargs = dict(source.options)
    if any(p.name == DATA_DIR for p in _loader_parameters(spec, key)):
        kwargs[DATA_DIR] = source.data_dir
    return kwargs


def _tensor(key: str, what: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object or not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise PluginError(f"{where(key)}: {what} is a numpy array of {value.dtype}, expected numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise PluginError(f"{where(key)}: {what} is {a_noun(type(value).__name__)}, expected a torch.Tensor or numpy array")


def _features(key: str, what: str, x: torch.Tensor) -> torch.Tensor:
    """Floating features become float32 (the models' dtype), integer ones (tokens) int64."""
    if x.dim() < 1:
        raise PluginError(f"{where(key)}: {what} is a scalar, expected one row per sample")
    if x.is_floating_point():
        return x.float()
    if x.dtype == torch.bool or x.is_complex():
        raise PluginError(f"{where(key)}: {what} has dtype {x.dtype}, expected floats or integers")
    return x.long()


def _labels(key: str, what: str, y: torch.Tensor) -> torch.Tensor:
    if y.dim() != 1:
        raise PluginError(f"{where(key)}: {what} has shape {tuple(y.shape)}, expected one integer label per sample")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise PluginError(f"{where(key)}: {what} has dtype {y.dtype}, expected integer class labels 0..C-1")
    return y.long()


def dataset_from_arrays(key: str, arrays: Any, name: str, *, loader: Any = None, given: str = "the loader returned",
                        normalization: Any = None) -> Any:
    """A loader's ``(train_x, train_y, test_x, test_y)`` checked and turned into a DataSet.  ``given``
    says where the arrays came from in a message ("got" for arrays passed to the API);
    ``normalization``: the pixel normalisation the loader declares (``declared_normalization``)."""
    if not isinstance(arrays, (tuple, list)) or len(arrays) != 4:
        got = f"a {len(arrays)}-tuple" if isinstance(arrays, (tuple, list)) else a_noun(type(arrays).__name__)
        raise PluginError(f"{where(key)}: {given} {got}, expected (train_x, train_y, test_x, test_y)")
    names = ("train_x", "train_y", "test_x", "test_y")
    tx, ty, vx, vy = (_tensor(key, n, a) for n, a in zip(names, arrays))
    tx, vx = _features(key, "train_x", tx), _features(key, "test_x", vx)
    ty, vy = _labels(key, "train_y", ty), _labels(key, "test_y", vy)
    for x, y, split in ((tx, ty, "train"), (vx, vy, "test")):
        if x.shape[0] != y.shape[0]:
            raise PluginError(f"{where(key)}: {split}_x has {x.shape[0]} samples but {split}_y {y.shape[0]} labels")
    if tx.shape[0] == 0:
        raise PluginError(f"{where(key)}: train_x holds no samples")
    if tx.shape[1:] != vx.shape[1:]:
        raise PluginError(f"{where(key)}: train and test samples differ in shape: "
                          f"{tuple(tx.shape[1:])} vs {tuple(vx.shape[1:])}")
    if tx.dtype != vx.dtype:
        raise PluginError(f"{where(key)}: train_x is {tx.dtype} but test_x {vx.dtype}")
    labels = torch.cat([ty, vy])
    low = int(labels.min())
    if low < 0:
        raise PluginError(f"{where(key)}: labels must be integer classes 0..C-1, found {low}")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise PluginError(f"{where(key)}: the labels name only one class; a classifier needs at least two")
    shape = tuple(int(s) for s in tx.shape[1:])
    default = auto_model("cnn", shape) if tx.is_floating_point() else "mlp"
    affine = declared_normalization(key, loader, shape) if loader is not None else None
    return DataSet(name, tx, ty, vx, vy, num_classes, [str(c) for c in range(num_classes)], default_model=default,
                   normalization=affine)


NORMALIZATION_ATTRIBUTE = "normalization"


def declared_normalization(key: str, loader: Any, shape: tuple[int, ...]) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """How a loader says its image samples were made from pixels in [0, 1]: an attribute
    ``loader.normalization``, a name of the config's ``normalization`` choices ("none": the pixels
    themselves, "cifar10": (x - 0.5) / 0.5, ...) or a pair ``(mean, std)`` of per-channel
    sequences (x = (pixel - mean) / std).  What ``fedmr partition --export`` needs to write the
    samples back as PNGs; None when the loader declares nothing."""
    from .normalization import NORMALIZATIONS, resolve

    declared = getattr(loader, NORMALIZATION_ATTRIBUTE, None)
    if declared is None:
        return None
    if len(shape) != 3:
        raise PluginError(f"{where(key)}: the loader declares a pixel normalization, but its samples have shape "
                          f"{shape}, not images (C, H, W)")
    channels = shape[0]
    if isinstance(declared, str):
        if declared not in NORMALIZATIONS:
            raise PluginError(f"{where(key)}: the loader's normalization = {declared!r} is none of "
                              f"{', '.join(NORMALIZATIONS)} (or give (mean, std) per channel)")
        return resolve(declared, declared, channels)
    try:
        mean, std = (tuple(float(v) for v in part) for part in declared)
    except (TypeError, ValueError):
        raise PluginError(f"{where(key)}: the loader's normalization must be a name ({', '.join(NORMALIZATIONS)}) "
                          f"or (mean, std), two sequences of one number per channel; got {declared!r}") from None
    if len(mean) == 1 and len(std) == 1:
        mean, std = mean * channels, std * channels
    if len(mean) != channels or len(std) != channels or not all(s != 0 for s in std):
        raise PluginError(f"{where(key)}: the loader's normalization (mean, std) needs {channels} values each and "
                          f"no zero std, got {declared!r}")
    return mean, std


def load_user_dataset(spec: str, key: str = "dataset", source: DataSource | None = None) -> Any:
    loader = resolve_callable(key, spec)
    kwargs = loader_arguments(spec, source, key) if source is not None else {}
    try:
        arrays = loader(**kwargs)
    except PluginError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's loader failed
        raise PluginError(f"{where(key)}: the loader '{spec}' raised {first_line(exc)}") from None
    return dataset_from_arrays(key, arrays, spec.rpartition(":")[2], loader=loader)
