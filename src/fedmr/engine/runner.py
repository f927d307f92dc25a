"""Runners train one round's tasks and yield results as they finish.

The sequential runner is the reference path; faster runners (worker processes,
vectorised training) must yield the same results for the same seed.  Each
client's randomness comes from (seed, round, client id), never from a shared
stream, so the order in which clients are trained does not matter.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..algorithms.base import Algorithm, TrainResult, TrainTask
from ..seeding import derive_seed, torch_generator
from ..training import LocalSettings


class ClientData:
    """Each client's slice of the resident training tensors, gathered by index on demand."""

    def __init__(self, train_x: torch.Tensor, train_y: torch.Tensor, partition: Sequence[Sequence[int]]):
        self.train_x, self.train_y = train_x, train_y
        self.indices = [torch.as_tensor(p, dtype=torch.long, device=train_y.device) for p in partition]

    def __len__(self) -> int:
        return len(self.indices)

    def client(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.indices[client_id]
        return self.train_x[idx], self.train_y[idx]

    def sizes(self) -> list[int]:
        return [int(i.numel()) for i in self.indices]


def train_client(
    algorithm: Algorithm, model: nn.Module, task: TrainTask, data: ClientData,
    settings: LocalSettings, seed: int, round_idx: int,
) -> TrainResult:
    """One client's local update with its own derived random streams."""
    x, y = data.client(task.client_id)
    # dropout layers (VGG-16) draw from torch's global generator
    torch.manual_seed(derive_seed(seed, "dropout", round_idx, task.client_id))
    generator = torch_generator(seed, "client", round_idx, task.client_id)
    return algorithm.local_update(model, task, x, y, settings, generator)


class SequentialRunner:
    """Trains the clients one after another in this process, reusing one model object."""

    def __init__(self, algorithm: Algorithm, model: nn.Module, data: ClientData, settings: LocalSettings, seed: int):
        self.algorithm, self.model, self.data, self.settings, self.seed = algorithm, model, data, settings, seed

    def run(self, round_idx: int, tasks: Sequence[TrainTask]) -> Iterator[TrainResult]:
        for task in tasks:
            yield train_client(self.algorithm, self.model, task, self.data, self.settings, self.seed, round_idx)

    def close(self) -> None:
        pass
