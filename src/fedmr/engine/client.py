"""One client's local step: its slice of the resident data and ``train_client``.

Every path that trains a client runs this: the sequential runner, a worker process of the pool,
the vectorized path (which reads ``ClientData``) and a Flower ClientApp.  It sits below the
runners, so none of them imports another to reach it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

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


class ClientSamples(Protocol):
    """What ``train_client`` reads: a ``ClientData``, or a Flower site's ``SiteData`` (flower/sites.py)."""

    def client(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]: ...


def train_client(
    algorithm: Algorithm, model: nn.Module, task: TrainTask, data: ClientSamples,
    settings: LocalSettings, seed: int, round_idx: int,
) -> TrainResult:
    """One client's local update with its own derived random streams."""
    x, y = data.client(task.client_id)
    # dropout layers (VGG-16) draw from torch's global generator of the data's device; seeding just
    # that one is what torch.manual_seed does for it, at a tenth of the cost
    dropout_seed = derive_seed(seed, "dropout", round_idx, task.client_id)
    torch.default_generator.manual_seed(dropout_seed)
    if x.is_cuda:
        torch.cuda.manual_seed(dropout_seed)
    generator = torch_generator(seed, "client", round_idx, task.client_id)
    return algorithm.local_update(model, task, x, y, settings, generator)
