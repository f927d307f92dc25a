"""A Grid that notices replies sooner.

Deployed, a ServerApp's Grid (flwr 1.42's ``HttpGrid``) pushes a round's messages and then looks
for replies every 3 s, so every exchange with the nodes rounds up to the next 3 s (the simulation
engine's grid polls every 0.1 s).  ``PollingGrid(grid)`` does the same push and pull through the
Grid's public ``push_messages``/``pull_messages`` and polls every ``interval`` seconds; it changes
nothing else, so any strategy's ``start(grid=PollingGrid(grid), ...)`` runs as before, sooner.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class PollingGrid(Grid):
    def __init__(self, grid: Grid, interval: float = 0.1):
        self.grid, self.interval = grid, interval

    def set_run(self, run) -> None:  # noqa: ANN001  (flwr's Run)
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:  # noqa: ANN002, ANN003  (deprecated in flwr, kept for Grid)
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """``Grid.send_and_receive``: push, then pull until every reply is in or ``timeout`` passed."""
        pending = set(self.push_messages(messages))
        end = time.monotonic() + (timeout if timeout is not None else 0.0)
        replies: list[Message] = []
        while pending:
            got = list(self.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if not pending or (timeout is not None and time.monotonic() >= end):
                break
            time.sleep(self.interval)
        return replies
