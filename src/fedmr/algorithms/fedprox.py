"""FedProx (Li et al. 2020): FedAvg whose local loss adds a proximal term that keeps each client's
weights near the global model it started from, limiting client drift on non-IID data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..training import LocalSettings, LossFn, cross_entropy
from .base import Options, TrainResult, TrainTask, option, register_algorithm
from .fedavg import FedAvg


def proximal_loss(mu: float, anchor: Sequence[torch.Tensor], base: LossFn = cross_entropy) -> LossFn:
    """``base + (mu / 2) * ||w - anchor||^2`` over the model's parameters (in ``parameters()`` order)."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        squared = sum((p - a).pow(2).sum() for p, a in zip(model.parameters(), anchor))
        return base(model, x, y) + 0.5 * mu * squared

    return loss_fn


@dataclass(frozen=True)
class FedProxOptions(Options):
    mu: float = option(0.01, "weight of the proximal term (mu/2)||w - w_global||^2", low=0.0)


@register_algorithm("fedprox")
class FedProx(FedAvg):
    description = "FedAvg with a proximal term (mu/2)||w - w_global||^2 in every local loss"
    reference = "Li et al., Federated Optimization in Heterogeneous Networks, MLSys 2020"
    Options = FedProxOptions
    batched_local_step = False  # its own local step (see local_update)

    def local_update(self, model: nn.Module, task: TrainTask, x: torch.Tensor, y: torch.Tensor,
                     settings: LocalSettings, generator: torch.Generator) -> TrainResult:
        model.load_state_dict(task.state)
        anchor = [p.detach().clone() for p in model.parameters()]
        return self.sgd_result(model, task, x, y, settings, generator, proximal_loss(self.options.mu, anchor))[0]

    def round_metrics(self) -> dict[str, float]:
        return {"client_state_mb": 0.0}  # nothing is kept per client
