"""The one small interface every algorithm implements, shared by the simulator and the Flower apps.

Server side (like Flower's ``Strategy``):
    ``setup`` -> per round: ``select_clients`` -> ``configure_train`` (one task
    per selected client) -> ``aggregate_train`` (the results that came back,
    possibly fewer) -> ``global_state`` for evaluation.
Client side:
    ``local_update`` turns one task and the client's data into one result.  It
    reads only the task, the options and the data, so it runs the same in the
    simulator's process, in a worker process or in a Flower ClientApp.

Per-client state that must persist between rounds (control variates, previous
local models) is kept by the server side keyed by client id and travels in
``TrainTask.payload`` / ``TrainResult.payload``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any, ClassVar, TypeVar, get_type_hints

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError
from ..maths import State
from ..training import Hook, LocalSettings, LossFn, clone_state, cross_entropy, train_sgd


@dataclass(frozen=True)
class Federation:
    """What the server knows about the federation before training starts."""

    num_clients: int
    clients_per_round: int
    client_sizes: tuple[int, ...]
    num_classes: int
    seed: int
    # label counts per client (FedGen's generator needs them); shape (num_clients, num_classes)
    label_counts: tuple[tuple[int, ...], ...] = ()


@dataclass
class TrainTask:
    client_id: int
    slot: int  # position in this round's selection (FedMR: the pool slot)
    state: State  # the model state the client starts from
    payload: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    client_id: int
    slot: int
    state: State
    num_samples: int
    train_loss: float = float("nan")
    payload: dict[str, Any] = field(default_factory=dict)


# ---- options: declared once per algorithm -----------------------------------------------------
def option(default: Any, help: str, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False, choices: Sequence[str] = ()) -> Any:
    """One field of an algorithm's ``Options``: its default (the paper's), a line of help, and its
    allowed range (``low``/``high``, open or closed) or ``choices``.  The config section, its type
    and range checks, ``fedmr run --help`` and the Flower app manifest all read this."""
    return field(default=default, metadata={"help": help, "low": low, "high": high, "low_open": low_open,
                                            "high_open": high_open, "choices": tuple(choices)})


@dataclass(frozen=True)
class Options:
    """An algorithm's options as a frozen dataclass whose field defaults are the paper's; subclass it
    with ``option(...)`` fields (an algorithm without options keeps this empty one).  An algorithm
    reads its own as attributes, ``self.options.mu``; ``self.options["mu"]`` still works, for
    plug-ins written before the options were typed."""

    def __getitem__(self, key: str) -> Any:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(key)
        return getattr(self, key)

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        """name -> default, in declaration order: the algorithm's config section."""
        return {f.name: f.default for f in fields(cls)}

    @classmethod
    def describe(cls) -> list[tuple[str, Any, str]]:
        """(name, default, help) per option, for help texts."""
        return [(f.name, f.default, f.metadata.get("help", "")) for f in fields(cls)]

    def check(self, section: str) -> None:
        """Raise ConfigError for a value outside its declared range or choices (types are checked by the config)."""
        values = asdict(self)
        for f in fields(self):
            meta = f.metadata
            if meta.get("choices"):
                if values[f.name] not in meta["choices"]:
                    raise ConfigError(f"config key '{section}.{f.name}' must be one of {', '.join(meta['choices'])}, "
                                      f"got {values[f.name]!r}")
            elif meta.get("low") is not None or meta.get("high") is not None:
                low = meta["low"] if meta.get("low") is not None else float("-inf")
                high = meta["high"] if meta.get("high") is not None else float("inf")
                check_range(section, values, f.name, low, high, meta["low_open"], meta["high_open"])


def _check_declaration(options: type[Options], owner: str) -> None:
    """A field whose default disagrees with its own type would make the config check the wrong type."""
    if not (isinstance(options, type) and issubclass(options, Options) and is_dataclass(options)):
        raise TypeError(f"{owner}.Options must be a frozen dataclass subclassing fedmr.algorithms.base.Options")
    try:
        hints = get_type_hints(options)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve: only the defaults' own types are used
        hints = {}
    for f in fields(options):
        kind = hints.get(f.name)
        if f.default is MISSING:
            raise TypeError(f"{owner}.Options.{f.name} has no default (declare it with option(default, help))")
        if isinstance(kind, type) and not isinstance(f.default, kind):
            raise TypeError(f"{owner}.Options.{f.name} is declared {kind.__name__} but defaults to {f.default!r}")


# ---- the registry ------------------------------------------------------------------------------
ALGORITHMS: dict[str, type[Algorithm]] = {}  # name -> class, in registration order (= config sections' order)

A = TypeVar("A", bound=type["Algorithm"])


def register_algorithm(name: str) -> Callable[[A], A]:
    """Class decorator: ``@register_algorithm("fedavg")`` names the class and adds it to ``ALGORITHMS``,
    as ``fedmr.data.register`` does for data sets; its ``Options`` become the config section ``[name]``."""
    def wrap(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"@register_algorithm({name!r}) decorates a subclass of Algorithm, not {cls!r}")
        known = ALGORITHMS.get(name)
        if known is not None and (known.__module__, known.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"algorithm name '{name}' is taken by {known.__module__}.{known.__qualname__}")
        cls.name = name
        ALGORITHMS[name] = cls
        return cls

    return wrap


class Algorithm(abc.ABC):
    """Base class: the defaults of the local step and the hooks a method overrides.

    A method subclasses it, implements the abstract server-side methods (``setup``,
    ``configure_train``, ``aggregate_train``, ``global_state``, ``server_state``,
    ``load_server_state``), declares its options as ``Options`` (a frozen dataclass of
    ``option(...)`` fields) and registers itself with ``@register_algorithm("name")``.  Building a
    class that leaves an abstract method out raises ConfigError naming the missing methods.
    """

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = Options
    defaults: ClassVar[dict[str, Any]] = {}  # derived from Options (name -> default); never set by hand
    # True: the local step is the plain ``local_update`` below (cross-entropy SGD from the task's
    # state), so the simulator may train a round's clients as one batched computation
    # (engine/vectorized.py).  A class whose own ``local_update`` differs declares False; one that
    # overrides it without declaring True again is treated as False.
    batched_local_step: ClassVar[bool] = True
    # Payload entries of a task that are the client's own state (MOON's previous model, SCAFFOLD's
    # c_i): fedmr's clients are stateless, so the server keeps them and sends them down with the
    # task; the traffic counts report their share of the downlink apart (engine/traffic.py).
    client_held: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "defaults" in cls.__dict__:
            raise TypeError(f"{cls.__qualname__} sets defaults by hand; declare its options as an Options dataclass "
                            "(see fedmr.algorithms.base.option)")
        _check_declaration(cls.Options, cls.__qualname__)
        cls.defaults = cls.Options.defaults()

    def __new__(cls, *args: Any, **kwargs: Any) -> Algorithm:
        missing = sorted(getattr(cls, "__abstractmethods__", ()))
        if missing:
            raise ConfigError(f"algorithm class {cls.__module__}.{cls.__qualname__} is incomplete: it does not "
                              f"implement {', '.join(missing)} (see fedmr.algorithms.base.Algorithm)")
        return super().__new__(cls)

    def __init__(self, options: Mapping[str, Any], federation: Federation):
        # the config section (or the defaults) as the algorithm's own typed Options
        self.options: Any = self.Options(**{**self.defaults, **options})
        self.federation = federation

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Raise ConfigError for out-of-range options (types are checked by the config): the ranges and
        choices declared on ``Options``; a subclass may add checks that involve several options."""
        cls.Options(**options).check(cls.name)

    # ---- server side -------------------------------------------------------------------
    @abc.abstractmethod
    def setup(self, initial_state: State) -> None:
        """Once, before the first round (or before a checkpoint is loaded)."""

    def select_clients(self, round_idx: int, rng: np.random.Generator) -> list[int]:
        """K distinct clients uniformly at random; slot i goes to the i-th."""
        fed = self.federation
        return [int(c) for c in rng.choice(fed.num_clients, fed.clients_per_round, replace=False)]

    @abc.abstractmethod
    def configure_train(self, round_idx: int, clients: list[int]) -> list[TrainTask]:
        """One task per selected client."""

    @abc.abstractmethod
    def aggregate_train(self, round_idx: int, results: Iterable[TrainResult], rng: torch.Generator) -> int:
        """Fold the round's results into the server state; returns how many were used."""

    @abc.abstractmethod
    def global_state(self) -> State:
        """The model evaluated (and saved) as the run's result."""

    def round_metrics(self) -> dict[str, float]:
        """Extra statistics logged with each evaluation: ``client_state_mb`` (the memory kept per
        client between rounds; 0 here, for a method that keeps none), ``pool_cosine`` where a method
        keeps a pool of models.  An override returns what it measures; a column it leaves out is
        written as the recorder's default (``client_state_mb`` 0, ``pool_cosine`` empty)."""
        return {"client_state_mb": 0.0}

    @abc.abstractmethod
    def server_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue the run, as flat named tensors (for checkpoints)."""

    @abc.abstractmethod
    def load_server_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Restore what ``server_state`` returned."""

    # ---- client side -------------------------------------------------------------------
    def local_update(
        self,
        model: nn.Module,
        task: TrainTask,
        x: torch.Tensor,
        y: torch.Tensor,
        settings: LocalSettings,
        generator: torch.Generator,
    ) -> TrainResult:
        """Plain local SGD with cross-entropy from the task's state."""
        model.load_state_dict(task.state)
        return self.sgd_result(model, task, x, y, settings, generator)[0]

    @staticmethod
    def sgd_result(model: nn.Module, task: TrainTask, x: torch.Tensor, y: torch.Tensor, settings: LocalSettings,
                   generator: torch.Generator, loss_fn: LossFn = cross_entropy,
                   after_backward: Hook | None = None) -> tuple[TrainResult, int]:
        """The local step every method shares once its hooks are built: the spec's SGD on the
        already loaded model, then (result, steps taken)."""
        loss, steps = train_sgd(model, x, y, settings, generator, loss_fn=loss_fn, after_backward=after_backward)
        return TrainResult(task.client_id, task.slot, clone_state(model), int(y.shape[0]), loss), steps


def check_range(section: str, options: Mapping[str, Any], key: str, low: float, high: float,
                low_open: bool = False, high_open: bool = False) -> None:
    value = options[key]
    ok_low = value > low if low_open else value >= low
    ok_high = value < high if high_open else value <= high
    if not (ok_low and ok_high):
        lo, hi = ("(" if low_open else "["), (")" if high_open else "]")
        raise ConfigError(f"config key '{section}.{key}' must be in {lo}{low}, {high}{hi}, got {value}")


def prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


def unprefixed(prefix: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
