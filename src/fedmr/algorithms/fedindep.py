"""FedIndep: the control of the FedMR paper.  The same pool of K models and the same random
assignment of slots to clients as FedMR, but the models are never mixed or reset, so any gain
of FedMR over it comes from recombination, not from keeping several models."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch

from ..maths import Pool, State, mean_pairwise_cosine, pool_mean, replicate, resize_pool, slot
from .base import Algorithm, TrainResult, TrainTask, prefixed, register_algorithm, unprefixed


@register_algorithm("fedindep")
class FedIndep(Algorithm):
    description = "K independent models trained by random clients, never mixed (FedMR's control)"
    reference = "Hu et al., FedMR: Federated Learning via Model Recombination, arXiv:2208.07677 (control method)"

    def setup(self, initial_state: State) -> None:
        # K stacked copies: recombining and averaging are one tensor operation per key.
        self.pool: Pool = replicate(initial_state, self.federation.clients_per_round)
        self._mean: State | None = None

    def resize_pool(self, k: int) -> None:
        """Make the pool K = k models (Flower's FedMR strategy: K is the number of nodes a round
        samples, which follows nodes joining and leaving); see ``maths.resize_pool``."""
        if k != self.federation.clients_per_round:
            self.pool = resize_pool(self.pool, k)
            self.federation = replace(self.federation, clients_per_round=k)
            self._mean = None

    def configure_train(self, round_idx: int, clients: list[int]) -> list[TrainTask]:
        return [TrainTask(c, i, slot(self.pool, i)) for i, c in enumerate(clients)]

    def aggregate_train(self, round_idx: int, results: Iterable[TrainResult], rng: torch.Generator) -> int:
        used = 0
        for result in results:  # a slot with no result keeps its previous model
            for key, value in self.pool.items():
                value[result.slot].copy_(result.state[key])
            used += 1
        self._mean = None
        self.mix(round_idx, rng)
        return used

    def mix(self, round_idx: int, rng: torch.Generator) -> None:
        """FedIndep never mixes; FedMR overrides this with recombination."""

    def global_state(self) -> State:
        if self._mean is None:
            self._mean = pool_mean(self.pool)
        return self._mean

    def round_metrics(self) -> dict[str, float]:
        return {**super().round_metrics(), "pool_cosine": mean_pairwise_cosine(self.pool)}  # the pool is the server's

    def server_state(self) -> dict[str, torch.Tensor]:
        return prefixed("pool.", self.pool)

    def load_server_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.pool = {k: v.clone() for k, v in unprefixed("pool.", tensors).items()}
        self._mean = None
