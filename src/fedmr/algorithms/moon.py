"""MOON (Li et al. 2021): model-contrastive learning.  Each local step adds
mu * -log(exp(sim(z, z_glob)/tau) / (exp(sim(z, z_glob)/tau) + exp(sim(z, z_prev)/tau)))
to the cross-entropy, where z, z_glob and z_prev are the representations (``features(x)``) of
the model being trained, the received global model and the client's previous local model, and
sim is the cosine similarity: the local representation is pulled towards the global one and
pushed away from the client's own drifted one.

Choices:
  * the representation is the model's ``features`` output (the input of its classifier); the
    MOON paper adds a projection head for its own networks, here every method trains the same
    architecture, so none is added;
  * one negative (the previous local model, MOON's default buffer size 1); the global and
    previous models run in eval mode without gradients, as in the reference code;
  * a client seen for the first time: in round 0 there is no negative and the contrastive term
    is zero (the reference's pool of previous models is still empty); in a later round its
    previous model is the run's initial model, which is what the reference's never-sampled
    party networks still hold (there they are separately initialised; here every client starts
    from the same initial model);
  * previous models are kept by the server per client id (one model per client that has
    trained: the memory of MOON, reported as ``client_state_mb``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F
from torch import nn

from ..maths import State
from ..training import LocalSettings, LossFn
from .base import Options, TrainResult, TrainTask, option, prefixed, register_algorithm, unprefixed
from .client_state import ClientStore
from .fedavg import FedAvg

if TYPE_CHECKING:
    from ..models import FLModel


def contrastive_term(z: torch.Tensor, z_global: torch.Tensor, z_previous: torch.Tensor | None,
                     temperature: float) -> torch.Tensor:
    """MOON's l_con, averaged over the batch; zero when there is no negative."""
    if z_previous is None:
        return z.new_zeros(())
    positive = F.cosine_similarity(z, z_global, dim=-1)
    negative = F.cosine_similarity(z, z_previous, dim=-1)
    logits = torch.stack([positive, negative], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(z.shape[0], dtype=torch.long, device=z.device))


def frozen_copy(model: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    twin.eval()
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


def moon_loss(global_model: nn.Module, previous_model: nn.Module | None, mu: float, temperature: float) -> LossFn:
    """Cross-entropy + mu * l_con on the models' ``features``."""

    def loss_fn(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        net = cast("FLModel", model)  # every model has features and head (models.py); typed for them
        z = net.features(x)
        ce = F.cross_entropy(net.head(z), y)
        with torch.no_grad():
            z_global = cast("FLModel", global_model).features(x)
            z_previous = cast("FLModel", previous_model).features(x) if previous_model is not None else None
        return ce + mu * contrastive_term(z, z_global, z_previous, temperature)

    return loss_fn


@dataclass(frozen=True)
class MoonOptions(Options):
    mu: float = option(5.0, "weight of the model-contrastive term", low=0.0)
    temperature: float = option(0.5, "temperature of the contrastive softmax", low=0.0, low_open=True)


@register_algorithm("moon")
class Moon(FedAvg):
    description = "FedAvg with a model-contrastive loss pulling local representations to the global model's"
    reference = "Li, He and Song, Model-Contrastive Federated Learning, CVPR 2021"
    Options = MoonOptions
    batched_local_step = False  # its own local step (see local_update)
    client_held = ("previous",)  # the client's previous model, kept by the server for stateless clients

    # ---- server side -------------------------------------------------------------------
    def setup(self, initial_state: State) -> None:
        super().setup(initial_state)
        self.initial = {k: v.detach().to("cpu", copy=True) for k, v in initial_state.items()}
        self.previous = ClientStore()

    def configure_train(self, round_idx: int, clients: list[int]) -> list[TrainTask]:
        tasks = []
        for i, c in enumerate(clients):
            previous = self.previous.get(c, self.initial if round_idx > 0 else None)
            tasks.append(TrainTask(c, i, self.global_model, {"previous": previous} if previous is not None else {}))
        return tasks

    def aggregate_train(self, round_idx: int, results: Iterable[TrainResult], rng: torch.Generator) -> int:
        def remember(stream: Iterable[TrainResult]) -> Iterator[TrainResult]:
            for result in stream:
                self.previous.put(result.client_id, result.state)
                yield result

        return super().aggregate_train(round_idx, remember(results), rng)

    def round_metrics(self) -> dict[str, float]:
        return {"client_state_mb": self.previous.megabytes()}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {**super().server_state(), **prefixed("initial.", self.initial), **self.previous.to_tensors("previous.")}

    def load_server_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_server_state(tensors)
        self.initial = {k: v.cpu() for k, v in unprefixed("initial.", tensors).items()}
        self.previous = ClientStore.from_tensors("previous.", tensors)

    # ---- client side -------------------------------------------------------------------
    def local_update(self, model: nn.Module, task: TrainTask, x: torch.Tensor, y: torch.Tensor,
                     settings: LocalSettings, generator: torch.Generator) -> TrainResult:
        model.load_state_dict(task.state)
        global_model = frozen_copy(model, task.state)
        previous = task.payload.get("previous")
        previous_model = frozen_copy(model, previous) if previous is not None else None
        loss_fn = moon_loss(global_model, previous_model, self.options.mu, self.options.temperature)
        return self.sgd_result(model, task, x, y, settings, generator, loss_fn)[0]
