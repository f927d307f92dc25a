"""One round's protocol, written once for every front end: the simulator, the ServerApp's
``AlgorithmStrategy`` and the drop-in ``fedmr.flower.FedMR``.

``plan_round`` decides who trains and with what (the algorithm's selection from the round's own
named stream, then its tasks); a ``RoundFold`` takes the replies as they arrive, checks each one
(asked this round, once, and sound by ``update_problem``), counts what came back, was rejected or
never came, and ends with the round's ``RoundStats``: the record the ``Recorder`` writes.  A front
end adds only what is its own: how a task travels (a worker, a vmapped batch, a Flower message)
and how a reply is decoded.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from ..algorithms.base import Algorithm, TrainResult, TrainTask
from ..seeding import numpy_rng
from .traffic import Traffic, result_bytes
from .validation import update_problem

log = logging.getLogger("fedmr")


@dataclass
class RoundPlan:
    """Round ``round_idx`` (0-based, whole run): the tasks, slot i to the i-th selected client, and
    the round's traffic (down counted from the tasks; a front end may count its messages instead)."""

    round_idx: int
    clients: list[int]  # as selected, in the selection's order
    tasks: list[TrainTask]
    traffic: Traffic


def plan_round(algorithm: Algorithm, round_idx: int, seed: int | None = None,
               clients: list[int] | None = None) -> RoundPlan:
    """The algorithm selects from the ``select`` stream of ``seed`` and this round, unless the front
    end chose the ``clients`` itself (Flower's node sampling), then builds their tasks."""
    if clients is None:
        if seed is None:
            raise ValueError("plan_round needs the run's seed to select clients")
        clients = algorithm.select_clients(round_idx, numpy_rng(seed, "select", round_idx))
    tasks = algorithm.configure_train(round_idx, clients)
    return RoundPlan(round_idx, clients, tasks, Traffic.of_tasks(tasks, algorithm.client_held))


@dataclass(frozen=True)
class RoundStats:
    """What one round did, as the metrics row's columns (``as_row``)."""

    clients: int  # results the algorithm used
    rejected: int  # replies refused: failed, malformed, not asked, twice, or unsound
    dropped: int  # selected, but nothing came back (dropout_rate, a straggler past its timeout, a lost node)
    train_loss: float  # mean local training loss of the accepted results (nan: none)
    traffic: Traffic

    def as_row(self) -> dict[str, float]:
        return {"clients": self.clients, "rejected": self.rejected, "dropped": self.dropped,
                "train_loss": self.train_loss, **self.traffic.stats()}


class RoundFold:
    """Takes one round's replies as they arrive; ``offer`` returns the result when it is sound."""

    def __init__(self, plan: RoundPlan, reference: Mapping[str, torch.Tensor], max_update_norm: float = 0.0):
        self.plan = plan
        self.reference = reference  # keys, shapes and dtypes every result must match
        self.max_update_norm = max_update_norm
        self.accepted: dict[int, TrainResult] = {}  # slot -> result
        self.rejected = 0
        self.delivered = 0  # replies that came back, sound or not
        self.losses: list[float] = []

    def problem(self, result: TrainResult) -> str | None:
        tasks = self.plan.tasks
        if not 0 <= result.slot < len(tasks) or tasks[result.slot].client_id != result.client_id:
            return f"client {result.client_id} / slot {result.slot} was not asked this round"
        if result.slot in self.accepted:
            return f"a second result for slot {result.slot}"
        return update_problem(result, self.reference, self.max_update_norm, tasks[result.slot].state)

    def offer(self, result: TrainResult | None, *, received: int = 0, problem: str | None = None,
              sender: str | None = None, note: str = "") -> TrainResult | None:
        """One reply: ``received`` bytes came back; ``problem`` is what the front end already found
        wrong with it (a failed client, a reply it could not decode), else it is checked here."""
        self.delivered += 1
        self.plan.traffic.up += received
        if problem is None:
            if result is None:
                raise ValueError("offer() takes a result or the problem that kept the front end from making one")
            problem = self.problem(result)
        if problem is not None:
            self.rejected += 1
            who = sender or (f"the update of client {result.client_id}" if result is not None else "a reply")
            log.warning("round %d: rejected %s: %s%s", self.plan.round_idx + 1, who, problem, note)
            return None
        assert result is not None
        self.accepted[result.slot] = result
        self.losses.append(result.train_loss)
        return result

    def stream(self, results: Iterable[TrainResult]) -> Iterator[TrainResult]:
        """The sound results in arrival order, lazily (the simulator folds them as the runner yields)."""
        for result in results:
            if self.offer(result, received=result_bytes(result)) is not None:
                yield result

    def in_slot_order(self) -> list[TrainResult]:
        return [self.accepted[s] for s in sorted(self.accepted)]

    @property
    def dropped(self) -> int:
        return max(len(self.plan.tasks) - self.delivered, 0)

    def warn_missing(self, what: str = "clients") -> None:
        if self.dropped:
            log.warning("round %d: %d of %d %s did not reply in time; their slots keep their models",
                        self.plan.round_idx + 1, self.dropped, len(self.plan.tasks), what)

    def stats(self, used: int) -> RoundStats:
        """The round's record, once the algorithm has folded in ``used`` results."""
        loss = sum(self.losses) / len(self.losses) if self.losses else math.nan
        return RoundStats(used, self.rejected, self.dropped, loss, self.plan.traffic)
