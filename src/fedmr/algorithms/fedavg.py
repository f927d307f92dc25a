"""FedAvg (McMahan et al. 2017): every client starts from the global model; the new global
model is the mean of the returned models weighted by client sample count."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from ..maths import RunningMean, State
from .base import Algorithm, TrainResult, TrainTask, prefixed, register_algorithm, unprefixed


@register_algorithm("fedavg")
class FedAvg(Algorithm):
    description = "mean of the clients' models weighted by their sample counts"
    reference = "McMahan et al., Communication-Efficient Learning of Deep Networks from Decentralized Data, AISTATS 2017"

    def setup(self, initial_state: State) -> None:
        self.global_model: State = {k: v.detach().clone() for k, v in initial_state.items()}

    def configure_train(self, round_idx: int, clients: list[int]) -> list[TrainTask]:
        return [TrainTask(c, i, self.global_model) for i, c in enumerate(clients)]

    def aggregate_train(self, round_idx: int, results: Iterable[TrainResult], rng: torch.Generator) -> int:
        mean, used = RunningMean(), 0
        for result in results:
            mean.add(result.state, float(result.num_samples))
            used += 1
        if used:
            self.global_model = {k: v.to(self.global_model[k].device) for k, v in mean.result().items()}
        return used

    def global_state(self) -> State:
        return self.global_model

    def server_state(self) -> dict[str, torch.Tensor]:
        return prefixed("global.", self.global_model)

    def load_server_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.global_model = unprefixed("global.", tensors)
