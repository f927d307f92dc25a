"""FedMR (Hu et al.): the server keeps one model per slot and, after each round, shuffles every
state entry independently among the K trained models, so each client trains a different mosaic.
The evaluated global model is the unweighted mean of the pool; it is never sent for training,
except in the optional first stage, where every slot is reset to it (FedAvg with equal weights)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..maths import draw_permutations, recombine_, replicate
from .base import Options, option, register_algorithm
from .fedindep import FedIndep


@dataclass(frozen=True)
class FedMROptions(Options):
    first_stage_rounds: int = option(0, "rounds of the first stage, in which every slot is reset to the pool mean "
                                        "(two-stage FedMR); 0 = none", low=0)
    block_fraction: float = option(0.0, "0 = recombine every state entry on its own; p in (0, 1] moves blocks of "
                                        "about p*L consecutive entries (partial FedMR)", low=0.0, high=1.0)


@register_algorithm("fedmr")
class FedMR(FedIndep):
    description = "layer-wise random recombination of the K client models each round (two-stage, partial variants)"
    reference = ("Hu et al., FedMR: Federated Learning via Model Recombination, arXiv:2208.07677; "
                 "Is Aggregation the Only Choice? Federated Learning via Layer-wise Model Recombination, KDD 2024")
    Options = FedMROptions

    def mix(self, round_idx: int, rng: torch.Generator) -> None:
        k = self.federation.clients_per_round
        if round_idx < self.options.first_stage_rounds:
            self.pool = replicate(self.global_state(), k)  # first stage: every slot becomes G
            return
        block = self.options.block_fraction or None
        recombine_(self.pool, draw_permutations(list(self.pool), k, rng, block))
