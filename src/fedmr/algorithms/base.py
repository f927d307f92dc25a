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

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

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


class Algorithm:
    """Base class: the defaults of the local step and the hooks a method overrides."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: Mapping[str, Any], federation: Federation):
        self.options = {**self.defaults, **options}
        self.federation = federation

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> None:
        """Raise ConfigError for out-of-range options (types are checked by the config)."""

    # ---- server side -------------------------------------------------------------------
    def setup(self, initial_state: State) -> None:
        raise NotImplementedError

    def select_clients(self, round_idx: int, rng: np.random.Generator) -> list[int]:
        """K distinct clients uniformly at random; slot i goes to the i-th."""
        fed = self.federation
        return [int(c) for c in rng.choice(fed.num_clients, fed.clients_per_round, replace=False)]

    def configure_train(self, round_idx: int, clients: list[int]) -> list[TrainTask]:
        raise NotImplementedError

    def aggregate_train(self, round_idx: int, results: Iterable[TrainResult], rng: torch.Generator) -> int:
        """Fold the round's results into the server state; returns how many were used."""
        raise NotImplementedError

    def global_state(self) -> State:
        raise NotImplementedError

    def round_metrics(self) -> dict[str, float]:
        """Extra statistics logged with each evaluation (e.g. pool similarity)."""
        return {}

    def server_state(self) -> dict[str, torch.Tensor]:
        """Everything needed to continue the run, as flat named tensors (for checkpoints)."""
        raise NotImplementedError

    def load_server_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        raise NotImplementedError

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
