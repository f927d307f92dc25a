"""User code named by import string (``"pkg.mod:attribute"``, as uvicorn and celery name it), and the
checks that turn a bad plug-in into one ``fedmr: error:`` line naming the config key.

Three contracts (see docs/api.md):

* ``model = "pkg.mod:factory"``: ``factory(num_classes, input_shape) -> torch.nn.Module``, where
  ``input_shape`` is one sample's shape without the batch dimension; a class with that constructor
  is a factory too.
* ``dataset = "pkg.mod:loader"``: ``loader(**options) -> (train_x, train_y, test_x, test_y)``,
  tensors or numpy arrays, labels integer classes ``0..C-1``; any sample shape and dtype.  A
  loader that declares ``data_dir`` gets the config key of that name; its other keyword
  parameters with defaults are its options, set in the section ``["pkg.mod:loader"]``.
* ``algorithm = "pkg.mod:Class"``: a subclass of :class:`fedmr.Algorithm`; its options live in the
  config section named like the value (``["pkg.mod:Class"]`` in TOML).

Resolving an import string imports that module, i.e. runs its code: a config naming plug-ins is
code, to be trusted like code.
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from .data import IN_MEMORY  # noqa: E402,F401  (the dataset value recorded for arrays passed from Python)
from .errors import PluginError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SPEC = re.compile(rf"^({_NAME}(?:\.{_NAME})*):({_NAME}(?:\.{_NAME})*)$")

Array = torch.Tensor | np.ndarray
Arrays = tuple[Array, Array, Array, Array]
"""What a data loader returns: ``(train_x, train_y, test_x, test_y)``."""


class ModelFactory(Protocol):
    """``factory(num_classes, input_shape) -> nn.Module``; ``input_shape`` excludes the batch dimension."""

    def __call__(self, num_classes: int, input_shape: tuple[int, ...]) -> nn.Module: ...


class DataLoader(Protocol):
    """``loader() -> (train_x, train_y, test_x, test_y)`` as tensors or numpy arrays."""

    def __call__(self) -> Arrays: ...


def is_import_string(value: Any) -> bool:
    """True for a string with a ':' (no built-in name has one): it names user code."""
    return isinstance(value, str) and ":" in value


def split_key(key: str) -> list[str]:
    """A dotted config key cut into its parts, keeping an import-string section whole:
    ``"fedmr.block_fraction"`` -> 2 parts, ``"pkg.mod:Algo.beta"`` -> ``["pkg.mod:Algo", "beta"]``."""
    colon = key.find(":")
    if colon < 0:
        return key.split(".")
    dot = key.find(".", colon)
    if dot < 0:
        return [key]
    return [key[:dot], *key[dot + 1:].split(".")]


def _where(key: str) -> str:
    """How a message names the place: "config key 'model'", or "config section 'pkg.mod:Algo'" for "[pkg.mod:Algo]"."""
    return f"config section '{key[1:-1]}'" if key.startswith("[") else f"config key '{key}'"


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def resolve(key: str, spec: str) -> Any:
    """The object ``spec`` ("pkg.mod:attr") names; ``key`` is the config key, for the message."""
    match = _SPEC.match(spec)
    if match is None:
        raise PluginError(f"{_where(key)}: '{spec}' is not an import string of the form 'package.module:name'")
    module_name, attr_path = match.groups()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        where = "" if missing == module_name else f" (it imports '{missing}', which is missing)"
        raise PluginError(f"{_where(key)}: cannot import module '{module_name}'{where}; is it on PYTHONPATH?") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's module failed while importing
        raise PluginError(f"{_where(key)}: importing module '{module_name}' failed: {_first_line(exc)}") from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{_where(key)}: module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    return obj


def resolve_callable(key: str, spec: str) -> Callable[..., Any]:
    obj = resolve(key, spec)
    if not callable(obj):
        raise PluginError(f"{_where(key)}: '{spec}' is {_a(type(obj).__name__)}, not a function or class")
    return obj


# ---- algorithms --------------------------------------------------------------------------
def algorithm_class(spec: str, key: str = "algorithm") -> type:
    """The Algorithm subclass a built-in name or an import string names."""
    from .algorithms import ALGORITHMS
    from .algorithms.base import Algorithm

    if not is_import_string(spec):
        if spec not in ALGORITHMS:
            from .errors import ConfigError, did_you_mean

            raise ConfigError(f"unknown algorithm '{spec}' (choose from {', '.join(ALGORITHMS)}, or name your own "
                              f"as 'package.module:Class'){did_you_mean(spec, ALGORITHMS)}")
        return ALGORITHMS[spec]
    cls = resolve(key, spec)
    if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
        what = f"class {cls.__name__}" if isinstance(cls, type) else _a(type(cls).__name__)
        raise PluginError(f"{_where(key)}: '{spec}' is {what}, not a subclass of fedmr.Algorithm")
    return cls


def algorithm_defaults(spec: str, key: str) -> dict[str, Any]:
    """The option defaults of the plug-in algorithm ``spec`` (its config section's reference)."""
    import copy

    return copy.deepcopy(dict(getattr(algorithm_class(spec, key), "defaults", {}) or {}))


def section_defaults(spec: str, key: str) -> dict[str, Any]:
    """The reference of a plug-in's config section ``[spec]``: an algorithm's options, or a data
    loader's keyword options (from its signature)."""
    if is_loader_section(spec):
        return loader_defaults(spec, key)
    return algorithm_defaults(spec, key)


# ---- data loaders' options ---------------------------------------------------------------
DATA_DIR = "data_dir"  # a loader that declares this parameter gets the config's data_dir
_OPTION_TYPES = (bool, int, float, str)


def is_loader_section(spec: str) -> bool:
    """Whether ``[spec]`` holds a data loader's options (it names a callable that is not an Algorithm)."""
    from .algorithms.base import Algorithm

    obj = resolve(f"[{spec}]", spec)
    return callable(obj) and not (isinstance(obj, type) and issubclass(obj, Algorithm))


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
            raise PluginError(f"{_where(key)}: the loader '{spec}' requires parameter '{p.name}', which has no "
                              f"default; fedmr passes only {DATA_DIR} and the options of the config section "
                              f"['{spec}'], which take their defaults from the signature: give '{p.name}' one")
        if isinstance(p.default, _OPTION_TYPES):
            options[p.name] = p.default
    return options


def check_loader_options(spec: str, options: Mapping[str, Any]) -> None:
    """The options of ``[spec]`` have the types of the loader's defaults (unknown keys are refused by the config)."""
    from .config import _check_type

    for name, default in loader_defaults(spec, f"[{spec}]").items():
        if name in options:
            _check_type(f"{spec}.{name}", options[name], default)


def loader_arguments(spec: str, cfg: Mapping[str, Any], key: str = "dataset") -> dict[str, Any]:
    """What a loader is called with: ``data_dir`` if it declares it, and its section's options."""
    kwargs = dict(cfg.get(spec) or {})
    if any(p.name == DATA_DIR for p in _loader_parameters(spec, key)):
        kwargs[DATA_DIR] = cfg[DATA_DIR]
    return kwargs


# ---- data --------------------------------------------------------------------------------
def _tensor(key: str, what: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, np.ndarray):
        if value.dtype == object or not (np.issubdtype(value.dtype, np.number) or value.dtype == np.bool_):
            raise PluginError(f"{_where(key)}: {what} is a numpy array of {value.dtype}, expected numbers")
        return torch.from_numpy(np.ascontiguousarray(value))
    raise PluginError(f"{_where(key)}: {what} is {_a(type(value).__name__)}, expected a torch.Tensor or numpy array")


def _features(key: str, what: str, x: torch.Tensor) -> torch.Tensor:
    """Floating features become float32 (the models' dtype), integer ones (tokens) int64."""
    if x.dim() < 1:
        raise PluginError(f"{_where(key)}: {what} is a scalar, expected one row per sample")
    if x.is_floating_point():
        return x.float()
    if x.dtype == torch.bool or x.is_complex():
        raise PluginError(f"{_where(key)}: {what} has dtype {x.dtype}, expected floats or integers")
    return x.long()


def _labels(key: str, what: str, y: torch.Tensor) -> torch.Tensor:
    if y.dim() != 1:
        raise PluginError(f"{_where(key)}: {what} has shape {tuple(y.shape)}, expected one integer label per sample")
    if y.is_floating_point() or y.dtype == torch.bool or y.is_complex():
        raise PluginError(f"{_where(key)}: {what} has dtype {y.dtype}, expected integer class labels 0..C-1")
    return y.long()


def dataset_from_arrays(key: str, arrays: Any, name: str) -> Any:
    """A loader's ``(train_x, train_y, test_x, test_y)`` checked and turned into a DataSet."""
    from .data import DataSet
    from .models import auto_model

    if not isinstance(arrays, (tuple, list)) or len(arrays) != 4:
        got = f"a {len(arrays)}-tuple" if isinstance(arrays, (tuple, list)) else _a(type(arrays).__name__)
        raise PluginError(f"{_where(key)}: the loader returned {got}, expected (train_x, train_y, test_x, test_y)")
    names = ("train_x", "train_y", "test_x", "test_y")
    tx, ty, vx, vy = (_tensor(key, n, a) for n, a in zip(names, arrays))
    tx, vx = _features(key, "train_x", tx), _features(key, "test_x", vx)
    ty, vy = _labels(key, "train_y", ty), _labels(key, "test_y", vy)
    for x, y, split in ((tx, ty, "train"), (vx, vy, "test")):
        if x.shape[0] != y.shape[0]:
            raise PluginError(f"{_where(key)}: {split}_x has {x.shape[0]} samples but {split}_y {y.shape[0]} labels")
    if tx.shape[0] == 0:
        raise PluginError(f"{_where(key)}: train_x holds no samples")
    if tx.shape[1:] != vx.shape[1:]:
        raise PluginError(f"{_where(key)}: train and test samples differ in shape: "
                          f"{tuple(tx.shape[1:])} vs {tuple(vx.shape[1:])}")
    if tx.dtype != vx.dtype:
        raise PluginError(f"{_where(key)}: train_x is {tx.dtype} but test_x {vx.dtype}")
    labels = torch.cat([ty, vy])
    low = int(labels.min())
    if low < 0:
        raise PluginError(f"{_where(key)}: labels must be integer classes 0..C-1, found {low}")
    num_classes = int(labels.max()) + 1
    if num_classes < 2:
        raise PluginError(f"{_where(key)}: the labels name only one class; a classifier needs at least two")
    shape = tuple(int(s) for s in tx.shape[1:])
    default = auto_model("cnn", shape) if tx.is_floating_point() else "mlp"
    return DataSet(name, tx, ty, vx, vy, num_classes, [str(c) for c in range(num_classes)], default_model=default)


def load_user_dataset(spec: str, key: str = "dataset", cfg: Mapping[str, Any] | None = None) -> Any:
    loader = resolve_callable(key, spec)
    kwargs = loader_arguments(spec, cfg, key) if cfg is not None else {}
    try:
        arrays = loader(**kwargs)
    except PluginError:
        raise
    except Exception as exc:  # noqa: BLE001 - the user's loader failed
        raise PluginError(f"{_where(key)}: the loader '{spec}' raised {_first_line(exc)}") from None
    return dataset_from_arrays(key, arrays, spec.rpartition(":")[2])


# ---- models ------------------------------------------------------------------------------
def build_user_model(key: str, factory: Callable[..., Any], num_classes: int, input_shape: tuple[int, ...],
                     label: str) -> nn.Module:
    try:
        model = factory(num_classes, tuple(input_shape))
    except Exception as exc:  # noqa: BLE001 - the user's factory failed
        raise PluginError(f"{_where(key)}: {label}({num_classes}, {tuple(input_shape)}) raised "
                          f"{_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise PluginError(f"{_where(key)}: {label}(num_classes, input_shape) returned "
                          f"{_a(type(model).__name__)}, expected a torch.nn.Module")
    return model


def check_model_output(key: str, model: nn.Module, sample: torch.Tensor, num_classes: int, label: str) -> None:
    """One forward pass on a batch of two samples (eval mode, no gradients): the output must be
    (batch, num_classes) logits.  Run once, before round 1, so a bad model fails in a second."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(sample)
    except Exception as exc:  # noqa: BLE001 - the user's forward failed
        raise PluginError(f"{_where(key)}: {label} fails on a batch of samples of shape "
                          f"{tuple(sample.shape)}: {_first_line(exc)}") from None
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor):
        raise PluginError(f"{_where(key)}: {label} returned {_a(type(out).__name__)}, expected a tensor of logits")
    want = (sample.shape[0], num_classes)
    if tuple(out.shape) != want:
        raise PluginError(f"{_where(key)}: {label} gives output of shape {tuple(out.shape)} on a batch of "
                          f"{sample.shape[0]}; expected (batch, num_classes) = {want}")
    if not out.is_floating_point():
        raise PluginError(f"{_where(key)}: {label} gives {out.dtype} output; expected float logits")


def describe(obj: Any) -> str:
    """The import string of a function or class when it has one ("module:qualname"), for config.toml."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or type(obj).__name__
    if module and _SPEC.match(f"{module}:{qualname}"):
        return f"{module}:{qualname}"
    return f"{module or 'python'}:{re.sub(r'[^A-Za-z0-9_.]', '_', qualname)}"


def model_builder(spec: str | Callable[..., Any], data: Any,
                  key: str = "model") -> tuple[str, Callable[[], nn.Module], bool]:
    """(the model's name, a zero-argument builder, whether it is user code to check on a sample batch)
    for a built-in name, "auto", an import string or a factory object."""
    from .models import build_model, check_fits

    shape = tuple(int(s) for s in data.train_x.shape[1:])
    if isinstance(spec, str) and not is_import_string(spec):
        name = data.default_model if spec == "auto" else spec
        check_fits(name, shape)  # refuses a model that cannot take this data, before anything is built
        return name, lambda: build_model(name, data.num_classes, input_shape=shape), False
    if isinstance(spec, str):
        factory, label = resolve_callable(key, spec), spec
    else:
        if isinstance(spec, nn.Module):
            raise PluginError(f"{key}= takes a factory(num_classes, input_shape) or a class, not a built model; "
                              f"wrap it: lambda num_classes, input_shape: {type(spec).__name__}(...)")
        if not callable(spec):
            raise PluginError(f"{key}= takes a factory(num_classes, input_shape) or a class, got {_a(type(spec).__name__)}")
        factory, label = spec, describe(spec)
    return label, lambda: build_user_model(key, factory, data.num_classes, shape, label), True


def import_roots(cfg: Mapping[str, Any]) -> list[str]:
    """The folders (absolute) a fresh shell must put on PYTHONPATH to import the plug-ins ``cfg``
    names: the root of each plug-in's top-level package, unless it lies in the interpreter's own
    library or site-packages folders.  What a printed resume command prefixes."""
    import sys
    import sysconfig
    from pathlib import Path

    names = {v for k, v in cfg.items() if k in ("algorithm", "model", "dataset") and is_import_string(v)}
    names |= {k for k, v in cfg.items() if is_plugin_section(k, v)}
    system = {Path(p).resolve() for p in sysconfig.get_paths().values()} | {Path(sys.prefix).resolve(),
                                                                            Path(sys.base_prefix).resolve()}
    roots: list[str] = []
    for name in sorted(names):
        top = name.partition(":")[0].split(".")[0]
        module = sys.modules.get(top)
        origin = getattr(module, "__file__", None)
        if origin is None:
            continue
        path = Path(origin).resolve()
        root = path.parent.parent if path.name == "__init__.py" else path.parent
        if any(root == s or s in root.parents for s in system):
            continue
        if str(root) not in roots:
            roots.append(str(root))
    return roots


def is_plugin_section(key: str, value: Any) -> bool:
    return is_import_string(key) and isinstance(value, Mapping)
