"""Experiment configuration: the paper's defaults, TOML files, ``--set KEY=VALUE`` overrides, validation.

A config is a plain nested dict.  Top-level keys are the run's settings; each
algorithm has a section of its own options (``[fedmr]``, ``[fedprox]``...),
whose defaults the algorithm class declares.  Everything is checked here, once,
so later code can trust it.
"""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from .errors import ConfigError, did_you_mean
from .imports import is_import_string, split_key


@dataclass(frozen=True)
class Setting:
    """One top-level config key: its default (the paper's), a line of help, and the group of
    commands that use it ("data": every command that loads data; "partition": also ``fedmr
    partition``; "run": training only).  The defaults, ``fedmr run --help`` and the checks read these."""

    name: str
    default: Any
    help: str
    group: str = "run"


# The paper's setting (see docs/fedmr-spec), on the embedded digits data by default.
SETTINGS: tuple[Setting, ...] = (
    Setting("algorithm", "fedmr", "fedmr, fedindep, fedavg, fedprox, scaffold, moon, fedgen, clustered, or pkg.mod:Class"),
    Setting("dataset", "digits", "digits, cifar10, cifar100, femnist, imagefolder, or a loader pkg.mod:function", "data"),
    Setting("data_dir", "data", "where the data set lies (a folder or archive)", "data"),
    Setting("normalization", "auto", "auto (the data set's paper default), cifar10, cifar10-stats, femnist, none", "data"),
    Setting("cache_dir", "", "decoded-data cache; \"\" = $FEDMR_CACHE, else .fedmr-cache beside the data, else "
            "~/.cache/fedmr", "data"),
    Setting("model", "auto", "cnn, resnet20, vgg16, mlp, auto (the data set's default), or pkg.mod:factory"),
    Setting("num_clients", 100, "clients the training set is split among", "partition"),
    Setting("clients_per_round", 10, "clients selected each round (K)"),
    Setting("rounds", 500, "communication rounds"),
    Setting("local_epochs", 5, "local epochs per round"),
    Setting("batch_size", 50, "local batch size"),
    Setting("lr", 0.01, "local SGD learning rate"),
    Setting("momentum", 0.5, "local SGD momentum"),
    Setting("partition", "dirichlet", "iid, dirichlet, file (partition_file) or natural (the data set's writers)",
            "partition"),
    Setting("alpha", 0.1, "Dirichlet concentration (smaller: more skewed labels)", "partition"),
    Setting("partition_file", "", "a partition JSON (fedmr partition --out) for partition = \"file\"", "partition"),
    Setting("seed", 1, "seed of the partition, the initial model and every random draw", "partition"),
    Setting("eval_every", 10, "rounds between evaluations of the global model"),
    Setting("test_batch_size", 1000, "batch size of evaluation"),
    Setting("device", "auto", "cpu, cuda or auto (the GPU when there is one)"),
    Setting("workers", "auto", "client processes: N or auto (one single-thread process per core on a CPU)"),
    Setting("vectorize", "auto", "train the round's clients as one batched computation: true, false or auto"),
    Setting("vectorize_memory_gb", "auto", "GB the vectorized path's stacked models may use; auto or 0 = from free memory"),
    Setting("client_timeout", 0.0, "seconds a client may train before it is dropped for the round; 0 = no limit"),
    Setting("max_update_norm", 0.0, "reject client updates whose norm exceeds this; 0 = off"),
    Setting("dropout_rate", 0.0, "fraction of the selected clients that fail each round (seeded)"),
    Setting("checkpoint_every", 0, "rounds between checkpoints; 0 = at every evaluation"),
    Setting("tensorboard", False, "also write the metrics to <results>/tensorboard (needs the tensorboard extra)"),
)
DEFAULTS: dict[str, Any] = {s.name: s.default for s in SETTINGS}
USES = {"data": ("data",), "partition": ("data", "partition"), "run": ("data", "partition", "run")}
"""Which setting groups each kind of command reads (and so checks)."""


def used_keys(uses: str) -> set[str]:
    return {s.name for s in SETTINGS if s.group in USES[uses]}


def settings_help() -> str:
    """The general keys and their defaults (part of the epilog of ``fedmr run --help``)."""
    lines = ["general keys (--set KEY=VALUE, or top-level keys of the config file), with their defaults:"]
    for s in SETTINGS:
        lines.append(f"  {s.name} = {tomli_w.dumps({'v': s.default})[4:].strip()}  {s.help}")
    return "\n".join(lines)


PARTITIONS = ("iid", "dirichlet", "file", "natural")

def algorithm_sections() -> dict[str, dict[str, Any]]:
    """Default options of every registered algorithm, keyed by algorithm name: each class's
    ``Options`` declaration (its field defaults), in registration order."""
    from .algorithms import ALGORITHMS

    return {name: copy.deepcopy(cls.Options.defaults()) for name, cls in ALGORITHMS.items()}


def algorithm_help() -> str:
    """Every registered algorithm, its options and their defaults, from the ``Options`` declarations
    (the epilog of ``fedmr run --help``)."""
    from .algorithms import ALGORITHMS

    lines = ["algorithms (--set algorithm=NAME) and their options (--set NAME.KEY=VALUE, or a [NAME] table "
             "in the config file; defaults are the papers'):"]
    for name, cls in ALGORITHMS.items():
        lines.append(f"  {name}: {cls.description}")
        for key, default, text in cls.Options.describe():
            lines.append(f"      {key} = {tomli_w.dumps({'v': default})[4:].strip()}  {text}")
    return "\n".join(lines)


def default_config() -> dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(algorithm_sections())
    return cfg


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (number, bool, quoted string, array) or else a bare string."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except (ValueError, RecursionError):  # TOMLDecodeError, a 5000-digit integer, 10000 nested brackets
        return text
    return doc["v"] if list(doc) == ["v"] else text  # "1\nrounds=2" is one odd string, not two settings


def parse_assignment(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
    key, _, value = item.partition("=")
    key = key.strip()
    parts = _key_parts(key)
    if not key or any(not part for part in parts):
        raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
    return parts, parse_value(value.strip())


def _key_parts(key: str) -> list[str]:
    """"fedmr.block_fraction" -> ["fedmr", "block_fraction"]; a plug-in algorithm's section keeps its
    dots: "pkg.mod:Algo.beta" -> ["pkg.mod:Algo", "beta"]."""
    return split_key(key)


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError is a ValueError, so is a 5000-digit integer
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def merge(base: dict[str, Any], overrides: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Merge ``overrides`` into ``base``, refusing keys that ``base`` does not have."""
    for key, value in overrides.items():
        name = f"{where}{key}"
        if key not in base and not where and isinstance(value, Mapping) and ":" in key:
            base[key] = section_defaults(key, f"[{key}]")  # a plug-in's options: its class or signature declares them
        if key not in base:
            sections = [k for k, v in base.items() if isinstance(v, dict)]
            if not where and isinstance(value, Mapping):
                raise ConfigError(f"unknown config section '{name}' (no such algorithm){did_you_mean(key, sections)}")
            known = [k for k in base if k not in sections] if not where else list(base)
            raise ConfigError(f"unknown config key '{name}'{did_you_mean(key, known, where)}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{name}' is a section; set its keys as {name}.KEY")
            merge(base[key], value, f"{name}.")
        else:
            if isinstance(value, Mapping):
                raise ConfigError(f"config key '{name}' is not a section")
            base[key] = value
    return base


def load_config(path: str | Path | None = None, assignments: Iterable[str] = (), uses: str = "run") -> dict[str, Any]:
    """Defaults, then the TOML file, then each ``--set`` in order; validated for a command that
    ``uses`` "run" (every key), "partition" or "data" (only the keys those read: see ``Setting.group``)."""
    cfg = default_config()
    if path is not None:
        merge(cfg, read_toml(path))
    for item in assignments:
        keys, value = parse_assignment(item)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        merge(cfg, nested)
    return validate(cfg, uses)


def _brief(value: Any) -> str:
    """repr for an error message: long values cut short (and huge integers, which repr refuses, named)."""
    if isinstance(value, int) and abs(value) >= 10**40:
        return f"an integer of about {int(abs(value).bit_length() * 0.30103)} digits"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_type(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config key '{key}' must be true or false, got {_brief(value)}")
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"config key '{key}' must be an integer, got {_brief(value)}")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}' must be a number, got {_brief(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise ConfigError(f"config key '{key}' must be finite, got {_brief(value)}") from None
        if not math.isfinite(value):
            raise ConfigError(f"config key '{key}' must be finite, got {value!r}")
    elif isinstance(default, str):
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' must be a string, got {_brief(value)}")
        if "\x00" in value:
            raise ConfigError(f"config key '{key}' contains a NUL character")
    return value


def validate(cfg: dict[str, Any], uses: str = "run") -> dict[str, Any]:
    """Check types and ranges of the keys a command ``uses`` (see ``load_config``); returns the
    same dict with numbers normalised."""
    from .algorithms import ALGORITHMS

    used = used_keys(uses)
    training = uses == "run"
    reference = default_config()
    for key, default in reference.items():
        if isinstance(default, dict):
            if training:
                for sub, sub_default in default.items():
                    cfg[key][sub] = _check_type(f"{key}.{sub}", cfg[key][sub], sub_default)
        elif key not in used:
            continue
        elif key == "workers":
            value = cfg[key]
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"config key 'workers' must be a positive integer or \"auto\", got {value!r}")
        elif key == "vectorize":
            if not (cfg[key] == "auto" or isinstance(cfg[key], bool)):
                raise ConfigError(f"config key 'vectorize' must be true, false or \"auto\", got {cfg[key]!r}")
        elif key == "vectorize_memory_gb":
            value = cfg[key]
            if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float))
                                    or not 0 <= value <= 1e6):
                raise ConfigError(f"config key 'vectorize_memory_gb' must be \"auto\" or a number of GB in [0, 1e6] "
                                  f"(0 = auto), got {_brief(value)}")
        else:
            cfg[key] = _check_type(key, cfg[key], default)

    _validate_plugins(cfg, training)
    for key in ("num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size", "eval_every", "test_batch_size"):
        if key in used and cfg[key] < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {cfg[key]}")
    if training and cfg["clients_per_round"] > cfg["num_clients"]:
        raise ConfigError(
            f"clients_per_round ({cfg['clients_per_round']}) cannot exceed num_clients ({cfg['num_clients']})"
        )
    if "seed" in used and not 0 <= cfg["seed"] < 2**32:  # derive_seed uses 32 bits: larger seeds would repeat smaller ones
        raise ConfigError(f"config key 'seed' must be in [0, 2**32), got {_brief(cfg['seed'])}")
    if training:
        _check_training_ranges(cfg)
    if "partition" in used:
        if cfg["partition"] not in PARTITIONS:
            raise ConfigError(f"unknown partition '{cfg['partition']}' (choose from {', '.join(PARTITIONS)})"
                              f"{did_you_mean(cfg['partition'], PARTITIONS)}")
        if cfg["partition"] == "dirichlet" and cfg["alpha"] <= 0:
            raise ConfigError(f"config key 'alpha' must be positive for a Dirichlet partition, got {cfg['alpha']}")
        if cfg["partition"] == "file" and not cfg["partition_file"]:
            raise ConfigError("partition = \"file\" needs partition_file = \"path/to/partition.json\"")
    from .data.normalization import CHOICES as NORMALIZATIONS

    if cfg["normalization"] not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization '{cfg['normalization']}' (choose from {', '.join(NORMALIZATIONS)})"
                          f"{did_you_mean(cfg['normalization'], NORMALIZATIONS)}")
    if training:
        for name, cls in ALGORITHMS.items():
            cls.check_options(cfg[name])
    return cfg


def _check_training_ranges(cfg: dict[str, Any]) -> None:
    if not 0 <= cfg["dropout_rate"] < 1:
        raise ConfigError(f"config key 'dropout_rate' must be in [0, 1), got {cfg['dropout_rate']}")
    if cfg["max_update_norm"] < 0:
        raise ConfigError(f"config key 'max_update_norm' must be 0 (off) or positive, got {cfg['max_update_norm']}")
    if cfg["checkpoint_every"] < 0:
        raise ConfigError(
            f"config key 'checkpoint_every' must be 0 (every evaluation) or positive, got {cfg['checkpoint_every']}")
    if cfg["lr"] <= 0:
        raise ConfigError(f"config key 'lr' must be positive, got {cfg['lr']}")
    if not 0 <= cfg["momentum"] < 1:
        raise ConfigError(f"config key 'momentum' must be in [0, 1), got {cfg['momentum']}")
    if cfg["client_timeout"] < 0:
        raise ConfigError(f"config key 'client_timeout' must be 0 (no limit) or positive seconds, got {cfg['client_timeout']}")
    if cfg["device"] not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"config key 'device' must be \"cpu\", \"cuda\" or \"auto\", got {cfg['device']!r}")


def _validate_plugins(cfg: dict[str, Any], training: bool = True) -> None:
    """The names of the algorithm, model and data set (built-in, or user code that must at least
    import and be callable: its contract is checked when it runs) and every plug-in's section, all
    before any data is loaded.  Without ``training``, only the data set."""
    from .algorithms import algorithm_class, algorithm_defaults
    from .data import check_dataset_name
    from .data.user import loader_defaults
    from .imports import resolve_callable
    from .models import check_model_name

    check_dataset_name(cfg["dataset"])
    if is_import_string(cfg["dataset"]):
        resolve_callable("dataset", cfg["dataset"])
        options = loader_defaults(cfg["dataset"])
        if options and cfg["dataset"] not in cfg:  # recorded in config.toml, as an algorithm's options are
            cfg[cfg["dataset"]] = options
    for name in [k for k, v in cfg.items() if is_import_string(k) and isinstance(v, dict) and is_loader_section(k)]:
        if name != cfg["dataset"]:
            raise ConfigError(f"config section '{name}' names a function, not an Algorithm class, and is not "
                              f"the data set's loader (dataset = {cfg['dataset']!r})")
        check_loader_options(name, cfg[name])
    if not training:
        return
    algorithm_class(cfg["algorithm"])
    if is_import_string(cfg["algorithm"]) and cfg["algorithm"] not in cfg:
        cfg[cfg["algorithm"]] = algorithm_defaults(cfg["algorithm"], "algorithm")
    check_model_name(cfg["model"])
    if is_import_string(cfg["model"]):
        resolve_callable("model", cfg["model"])
    for name in [k for k, v in cfg.items() if is_import_string(k) and isinstance(v, dict)
                 and not is_loader_section(k)]:
        cls = algorithm_class(name, f"[{name}]")
        for sub, sub_default in algorithm_defaults(name, f"[{name}]").items():
            cfg[name][sub] = _check_type(f"{name}.{sub}", cfg[name].get(sub, sub_default), sub_default)
        cls.Options(**cfg[name]).check(name)  # declared ranges first, named by the section as written
        cls.check_options(cfg[name])


def to_toml(cfg: Mapping[str, Any]) -> str:
    return tomli_w.dumps(dict(cfg))


def algorithm_options(cfg: Mapping[str, Any], name: str | None = None) -> dict[str, Any]:
    return dict(cfg[name or cfg["algorithm"]])


# ---- plug-in sections: ["pkg.mod:Class"] holds an algorithm's options, ["pkg.mod:loader"] a loader's
def is_loader_section(spec: str) -> bool:
    """Whether ``[spec]`` holds a data loader's options (it names a callable that is not an Algorithm)."""
    from .algorithms.base import Algorithm
    from .imports import resolve

    obj = resolve(f"[{spec}]", spec)
    return callable(obj) and not (isinstance(obj, type) and issubclass(obj, Algorithm))


def section_defaults(spec: str, key: str) -> dict[str, Any]:
    """The reference of a plug-in's config section ``[spec]``: an algorithm's options, or a data
    loader's keyword options (from its signature)."""
    from .algorithms import algorithm_defaults
    from .data.user import loader_defaults

    if is_loader_section(spec):
        return loader_defaults(spec, key)
    return algorithm_defaults(spec, key)


def check_loader_options(spec: str, options: Mapping[str, Any]) -> None:
    """The options of ``[spec]`` have the types of the loader's defaults (unknown keys are refused by the config)."""
    from .data.user import loader_defaults

    for name, default in loader_defaults(spec, f"[{spec}]").items():
        if name in options:
            _check_type(f"{spec}.{name}", options[name], default)

