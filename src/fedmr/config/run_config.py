"""The typed run config: ``RunConfig``, whose fields declare each top-level key once (the paper's
default, a line of help, the commands that read it), and ``validate``, which checks types and
ranges and is the one way to build it."""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import tomli_w

from ..errors import ConfigError, did_you_mean
from .sections import algorithm_sections, plugin_sections
from .values import brief, check_type

if TYPE_CHECKING:  # training imports torch, which the CLI's argument parsing must not load
    from ..training import LocalSettings


def setting(default: Any, help: str, group: str = "run") -> Any:
    """A field of ``RunConfig``: its default (the paper's), a line of help, and the group of commands
    that use it ("data": every command that loads data; "partition": also ``fedmr partition``;
    "run": training only).  The defaults, ``fedmr run --help`` and the checks all read these."""
    return field(default=default, metadata={"help": help, "group": group})


@dataclass(frozen=True)
class RunConfig(Mapping[str, Any]):
    """A checked run config: each top-level key an attribute (``config.rounds``), each algorithm's or
    plug-in's options a section (``config.section("fedmr")``).  Built only by ``validate``, so
    code that holds one can trust it.  It also reads as the mapping of the TOML file's keys
    (``config["rounds"]``, ``dict(config)``), the form user callbacks, config.toml and the
    checkpoint fingerprint see; change it with ``replace``, which checks again."""

    # The paper's setting (see docs/fedmr-spec), on the embedded digits data by default.
    algorithm: str = setting("fedmr", "fedmr, fedindep, fedavg, fedprox, scaffold, moon, fedgen, clustered, or pkg.mod:Class")
    dataset: str = setting("digits", "digits, cifar10, cifar100, cifar100-fine, femnist, imagefolder, or a loader "
                           "pkg.mod:function", "data")
    data_dir: str = setting("data", "where the data set lies (a folder or archive)", "data")
    normalization: str = setting("auto", "auto (the data set's paper default), cifar10, cifar10-stats, femnist, none", "data")
    cache_dir: str = setting("", "decoded-data cache; \"\" = $FEDMR_CACHE, else .fedmr-cache beside the data, else "
                             "~/.cache/fedmr", "data")
    model: str = setting("auto", "cnn, cnn_femnist, resnet20, vgg16, mlp, auto (the data set's default), or pkg.mod:factory")
    num_clients: int = setting(100, "clients the training set is split among", "partition")
    clients_per_round: int = setting("auto", "clients selected each round (K); auto = the paper's: 10, or 10% of "
                                     "the writers on a natural partition (FEMNIST)")  # an int once validated
    rounds: int = setting(500, "communication rounds")
    local_epochs: int = setting(5, "local epochs per round")
    batch_size: int = setting(50, "local batch size")
    lr: float = setting(0.01, "local SGD learning rate")
    momentum: float = setting(0.5, "local SGD momentum")
    partition: str = setting("dirichlet", "iid, dirichlet, file (partition_file) or natural (the data set's writers)",
                             "partition")
    alpha: float = setting(0.1, "Dirichlet concentration (smaller: more skewed labels)", "partition")
    partition_file: str = setting("", "a partition JSON (fedmr partition --out) for partition = \"file\"", "partition")
    partition_file_check: bool = setting(
        True, "refuse a partition_file that leaves training samples out or names another data set", "partition")
    seed: int = setting(1, "seed of the partition, the initial model and every random draw", "partition")
    eval_every: int = setting(10, "rounds between evaluations of the global model")
    test_batch_size: int = setting(1000, "batch size of evaluation")
    device: str = setting("auto", "cpu, cuda or auto (the GPU when there is one)")
    workers: int | str = setting("auto", "client processes: N or auto (one single-thread process per core on a CPU)")
    vectorize: bool | str = setting("auto", "train the round's clients as one batched computation: true, false or auto")
    vectorize_memory_gb: float | str = setting(
        "auto", "GB the vectorized path's stacked models may use; auto or 0 = from free memory")
    client_timeout: float = setting(0.0, "seconds a client may train before it is dropped for the round; 0 = no limit")
    max_update_norm: float = setting(0.0, "reject client updates whose norm exceeds this; 0 = off")
    dropout_rate: float = setting(0.0, "fraction of the selected clients that fail each round (seeded)")
    max_rounds_without_update: int = setting(
        5, "stop with an error after this many rounds in a row with no client update accepted; 0 = never")
    checkpoint_every: int = setting(0, "rounds between checkpoints; 0 = at every evaluation")
    precision: str = setting("fp32", "fp32, or bf16: mixed precision in local training (bf16 autocast; weights, optimizer "
                             "state, BatchNorm statistics and everything the server sees stay fp32)")
    compile: bool = setting(False, "run local training's full batches through torch.compile (forward and backward; "
                                   "needs a C++ compiler; pays on some CPUs, see docs/benchmarks.md)")
    save_model_every: int = setting(0, "rounds between copies of the global model kept as models/round-NNNNNN.safetensors "
                                       "(for fedmr landscape); 0 = none, only the final model.safetensors")
    save_pool: bool = setting(False, "with save_model_every: also keep a pool method's K models (fedmr, fedindep) as "
                                     "models/round-NNNNNN-pool.safetensors")
    tensorboard: bool = setting(False, "also write the metrics to <results>/tensorboard (needs the tensorboard extra)")
    # [fedmr], [fedprox], ..., and plug-ins' ["pkg.mod:Class"] / ["pkg.mod:loader"] tables, in file order
    sections: Mapping[str, Mapping[str, Any]] = field(default_factory=dict, repr=False)
    uses: str = field(default="run", repr=False)  # what was checked: see load_config

    def __post_init__(self) -> None:  # "auto" becomes the number it stands for (the TOML records the number)
        object.__setattr__(self, "clients_per_round", paper_clients_per_round(self))

    @classmethod
    def of(cls, cfg: Mapping[str, Any]) -> RunConfig:
        """``cfg`` itself if it is one; a plain mapping of the TOML keys is checked first."""
        return cfg if isinstance(cfg, RunConfig) else validate(cfg)

    # ---- typed views for the rooms below the config (each declares what it reads) ----
    def section(self, name: str | None = None) -> dict[str, Any]:
        """The options of algorithm ``name`` (default: the run's algorithm), or of a plug-in's table."""
        return self[name or self.algorithm]

    @property
    def local_settings(self) -> LocalSettings:
        from ..training import LocalSettings

        return LocalSettings(self.local_epochs, self.batch_size, self.lr, self.momentum, self.precision,
                             self.compile)

    def replace(self, **changes: Any) -> RunConfig:
        """This config with ``changes`` (top-level keys or whole sections by name), checked again."""
        return validate({**self.to_dict(), **changes}, self.uses)

    # ---- the TOML file's form ----
    def to_dict(self) -> dict[str, Any]:
        return {key: self[key] for key in self}

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key) if key in SETTING_NAMES else copy.deepcopy(dict(self.sections[key]))

    def __iter__(self) -> Iterator[str]:
        yield from SETTING_NAMES
        yield from self.sections

    def __len__(self) -> int:
        return len(SETTING_NAMES) + len(self.sections)

    __hash__ = None  # type: ignore[assignment]  # sections are dicts


@dataclass(frozen=True)
class Setting:
    """One top-level config key as ``fedmr run --help`` lists it (from ``RunConfig``'s fields)."""

    name: str
    default: Any
    help: str
    group: str = "run"


SETTINGS: tuple[Setting, ...] = tuple(Setting(f.name, f.default, f.metadata["help"], f.metadata["group"])
                                     for f in fields(RunConfig) if "help" in f.metadata)
SETTING_NAMES: tuple[str, ...] = tuple(s.name for s in SETTINGS)
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


def default_config() -> dict[str, Any]:
    cfg = copy.deepcopy(DEFAULTS)
    cfg.update(algorithm_sections())
    return cfg


def validate(cfg: Mapping[str, Any], uses: str = "run") -> RunConfig:
    """Check the types and ranges of the keys a command ``uses`` (see ``load_config``) and build the
    typed config (numbers normalised; plug-ins' sections filled with their defaults)."""
    from ..algorithms import ALGORITHMS

    doc = dict(cfg)
    used = used_keys(uses)
    training = uses == "run"
    for key in [k for k, v in doc.items() if k not in SETTING_NAMES and not isinstance(v, Mapping)]:
        raise ConfigError(f"unknown config key '{key}'{did_you_mean(key, SETTING_NAMES)}")
    for key, default in default_config().items():
        if isinstance(default, dict):
            if training:
                doc[key] = dict(doc[key])
                for sub, sub_default in default.items():
                    doc[key][sub] = check_type(f"{key}.{sub}", doc[key][sub], sub_default)
        elif key in used:
            doc[key] = _check_setting(key, doc[key], default)
    config = RunConfig(**{name: doc[name] for name in SETTING_NAMES},
                       sections={k: v for k, v in doc.items() if k not in SETTING_NAMES}, uses=uses)
    config = dataclasses.replace(config, sections=plugin_sections(config.sections, config.dataset, config.algorithm,
                                                                  config.model, training))
    _check_ranges(config, used)
    if training:
        for name, cls in ALGORITHMS.items():
            cls.check_options(config.section(name))
    return config


PAPER_CLIENTS_PER_ROUND = 10  # K of the paper's 100 clients
NATURAL_SHARE = 10  # on a natural partition (FEMNIST) the paper selects 1 in 10 of the writers per round


def paper_clients_per_round(doc: Mapping[str, Any]) -> Any:
    """``clients_per_round = "auto"`` resolved: 10, or 10% of num_clients (at least 1) on a natural
    partition; a given value, or one that cannot be resolved yet (keys a command does not check), as is."""
    k, n = doc["clients_per_round"], doc["num_clients"]
    if k != "auto":
        return k
    if doc["partition"] != "natural":
        return PAPER_CLIENTS_PER_ROUND
    return max(1, n // NATURAL_SHARE) if isinstance(n, int) and not isinstance(n, bool) else k


def _check_setting(key: str, value: Any, default: Any) -> Any:
    """A top-level key's type; the four keys that also take "auto" are checked by their own rule."""
    if key == "workers":
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"config key 'workers' must be a positive integer or \"auto\", got {value!r}")
    elif key == "clients_per_round":
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"config key 'clients_per_round' must be an integer or \"auto\", got {brief(value)}")
    elif key == "vectorize":
        if not (value == "auto" or isinstance(value, bool)):
            raise ConfigError(f"config key 'vectorize' must be true, false or \"auto\", got {value!r}")
    elif key == "vectorize_memory_gb":
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1e6):
            raise ConfigError(f"config key 'vectorize_memory_gb' must be \"auto\" or a number of GB in [0, 1e6] "
                              f"(0 = auto), got {brief(value)}")
    else:
        return check_type(key, value, default)
    return value


AT_LEAST_ONE = ("num_clients", "clients_per_round", "rounds", "local_epochs", "batch_size", "eval_every", "test_batch_size")


def _check_ranges(c: RunConfig, used: set[str]) -> None:
    for key in AT_LEAST_ONE:
        if key in used and getattr(c, key) < 1:
            raise ConfigError(f"config key '{key}' must be at least 1, got {getattr(c, key)}")
    training = c.uses == "run"
    if training and c.clients_per_round > c.num_clients:
        raise ConfigError(f"clients_per_round ({c.clients_per_round}) cannot exceed num_clients ({c.num_clients})")
    if "seed" in used and not 0 <= c.seed < 2**32:  # derive_seed uses 32 bits: larger seeds would repeat smaller ones
        raise ConfigError(f"config key 'seed' must be in [0, 2**32), got {brief(c.seed)}")
    if training:
        _check_training_ranges(c)
    if "partition" in used:
        if c.partition not in PARTITIONS:
            raise ConfigError(f"unknown partition '{c.partition}' (choose from {', '.join(PARTITIONS)})"
                              f"{did_you_mean(c.partition, PARTITIONS)}")
        if c.partition == "dirichlet" and c.alpha <= 0:
            raise ConfigError(f"config key 'alpha' must be positive for a Dirichlet partition, got {c.alpha}")
        if c.partition == "file" and not c.partition_file:
            raise ConfigError("partition = \"file\" needs partition_file = \"path/to/partition.json\"")
    from ..data.normalization import CHOICES as NORMALIZATIONS

    if c.normalization not in NORMALIZATIONS:
        raise ConfigError(f"unknown normalization '{c.normalization}' (choose from {', '.join(NORMALIZATIONS)})"
                          f"{did_you_mean(c.normalization, NORMALIZATIONS)}")


def _check_training_ranges(c: RunConfig) -> None:
    if not 0 <= c.dropout_rate < 1:
        raise ConfigError(f"config key 'dropout_rate' must be in [0, 1), got {c.dropout_rate}")
    if math.floor(c.dropout_rate * c.clients_per_round + 0.5) >= c.clients_per_round:  # the count dropped_clients() drops
        raise ConfigError(f"dropout_rate = {c.dropout_rate:g} drops round({c.dropout_rate:g} x {c.clients_per_round}) = "
                          f"all {c.clients_per_round} clients selected each round, so none would train; with "
                          f"clients_per_round = {c.clients_per_round} it must be below {1 - 0.5 / c.clients_per_round:g}")
    if c.max_rounds_without_update < 0:
        raise ConfigError(f"config key 'max_rounds_without_update' must be 0 (never stop) or positive, "
                          f"got {c.max_rounds_without_update}")
    if c.max_update_norm < 0:
        raise ConfigError(f"config key 'max_update_norm' must be 0 (off) or positive, got {c.max_update_norm}")
    if c.checkpoint_every < 0:
        raise ConfigError(f"config key 'checkpoint_every' must be 0 (every evaluation) or positive, got {c.checkpoint_every}")
    if c.save_model_every < 0:
        raise ConfigError(f"config key 'save_model_every' must be 0 (none) or positive, got {c.save_model_every}")
    if c.lr <= 0:
        raise ConfigError(f"config key 'lr' must be positive, got {c.lr}")
    if not 0 <= c.momentum < 1:
        raise ConfigError(f"config key 'momentum' must be in [0, 1), got {c.momentum}")
    if c.client_timeout < 0:
        raise ConfigError(f"config key 'client_timeout' must be 0 (no limit) or positive seconds, got {c.client_timeout}")
    if c.device not in ("cpu", "cuda", "auto"):
        raise ConfigError(f"config key 'device' must be \"cpu\", \"cuda\" or \"auto\", got {c.device!r}")
    from ..training import PRECISIONS

    if c.precision not in PRECISIONS:
        raise ConfigError(f"config key 'precision' must be \"fp32\" or \"bf16\", got {c.precision!r}"
                          f"{did_you_mean(c.precision, PRECISIONS)}")
    if c.compile and c.vectorize is True:
        raise ConfigError("config key 'compile' speeds up the per-client loop; it cannot be combined with "
                          "vectorize = true")


