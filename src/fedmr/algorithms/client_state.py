"""Per-client state kept by the server between rounds (SCAFFOLD's variates, MOON's previous
models, clustered sampling's representative updates), keyed by client id, never by slot.

Held on the CPU so that a GPU run does not pay device memory for clients that are not training;
flattened to ``<prefix><client id>.<key>`` tensors for checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import overload

import torch

from ..maths import State, state_nbytes


class ClientStore:
    """client id -> state (name -> tensor)."""

    def __init__(self) -> None:
        self._states: dict[int, State] = {}

    def __contains__(self, client_id: int) -> bool:
        return client_id in self._states

    def __len__(self) -> int:
        return len(self._states)

    def __iter__(self) -> Iterator[int]:
        return iter(sorted(self._states))

    @overload
    def get(self, client_id: int, default: State) -> State: ...
    @overload
    def get(self, client_id: int, default: State | None = None) -> State | None: ...
    def get(self, client_id: int, default: State | None = None) -> State | None:
        return self._states.get(client_id, default)

    def put(self, client_id: int, state: Mapping[str, torch.Tensor]) -> None:
        self._states[client_id] = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def megabytes(self) -> float:
        """Memory held, in MiB."""
        return sum(state_nbytes(s) for s in self._states.values()) / 2**20

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}{cid}.{k}": v for cid, state in self._states.items() for k, v in state.items()}

    @classmethod
    def from_tensors(cls, prefix: str, tensors: Mapping[str, torch.Tensor]) -> ClientStore:
        store = cls()
        for name, value in tensors.items():
            if not name.startswith(prefix):
                continue
            cid, _, key = name[len(prefix):].partition(".")
            store._states.setdefault(int(cid), {})[key] = value.detach().to("cpu", copy=True)
        return store
