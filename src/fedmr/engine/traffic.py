"""What a round sends and receives, in MB (2**20 bytes) of tensors: the model states and every
tensor in the payloads (SCAFFOLD's control variates, FedGen's generator, MOON's previous model),
counted from the tasks and replies themselves, so a plug-in's extra payload counts too.

fedmr's clients keep nothing between rounds: state a client owns (MOON's previous model,
SCAFFOLD's c_i) lives on the server and travels down with the task.  An algorithm names those
payload entries in ``Algorithm.client_held``; their share of the downlink is reported on its own
(``down_client_state_mb``), so a deployment whose clients keep their state can subtract it.

The Flower strategies count the arrays of the messages they send and receive; for the same tasks
that is the same number (each tensor becomes one array of the same bytes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ..algorithms.base import TrainResult, TrainTask
from ..maths import tensors_nbytes

MB = float(2**20)
COLUMNS = ("down_mb", "up_mb", "down_client_state_mb", "down_total_mb", "up_total_mb")
"""The metrics columns: this round's MB down, up, the client-held part of down, and the run's totals."""


def task_bytes(task: TrainTask) -> int:
    return tensors_nbytes(task.state) + tensors_nbytes(task.payload)


def result_bytes(result: TrainResult) -> int:
    return tensors_nbytes(result.state) + tensors_nbytes(result.payload)


def held_bytes(task: TrainTask, held: Iterable[str]) -> int:
    return sum(tensors_nbytes(task.payload[k]) for k in held if k in task.payload)


@dataclass
class Traffic:
    """One round's bytes; the recorder adds them up over the run."""

    down: int = 0
    up: int = 0
    down_client_state: int = 0

    @classmethod
    def of_tasks(cls, tasks: Iterable[TrainTask], held: Iterable[str] = ()) -> Traffic:
        tasks, held = list(tasks), tuple(held)
        return cls(sum(task_bytes(t) for t in tasks), 0, sum(held_bytes(t, held) for t in tasks))

    def stats(self) -> dict[str, float]:
        """The round's columns (without the totals, which the recorder keeps)."""
        return {"down_mb": self.down / MB, "up_mb": self.up / MB, "down_client_state_mb": self.down_client_state / MB}
