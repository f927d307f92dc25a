"""Per-client evaluation: the global model's accuracy on each client's own local test part.

A client's local test part is the data set's test split dealt out by its label mix: each class's test
samples shared among the clients in proportion to their training samples of that class
(``export.local_test_parts``, the same parts ``fedmr partition --export`` writes as each site's
``test/`` folder).  The parts are disjoint, so the global model is evaluated **once** on the whole
test split (``training.evaluate(..., hits=...)``: whether each sample was right) and a client's
accuracy is the share of its part that was right.  In eval mode a sample's logits do not depend on
the other samples of its batch, so this is what a pass over each client's part would give, up to the
float rounding of logits computed in batches of another size.

The metrics row gets the spread over the clients that hold at least one test sample
(``CLIENT_COLUMNS``): their mean accuracy (each client counts once, whatever its size), the
population standard deviation (ddof 0, as FL-bench and PFLlib report it), and the mean of the worst
10% (the ``ceil(0.1 * n)`` lowest accuracies, at least one client).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..data import DataSet
from ..export import local_test_parts
from ..results import CLIENT_COLUMNS

WORST_PERCENT = 10  # the worst 10% of the clients: ceil(n * 10 / 100) of them, in integers (0.1 * 30 > 3 in floats)


@dataclass(frozen=True)
class ClientTests:
    """Which client's local test part each test sample is in (``owner``, -1: a class no client trains
    on), and how many test samples each client has (``sizes``)."""

    owner: np.ndarray
    sizes: np.ndarray

    @classmethod
    def deal(cls, data: DataSet, partition: Sequence[Sequence[int]], seed: int) -> ClientTests | None:
        """The local test parts of ``partition``'s clients; None where there is nothing to deal (no test
        samples, or clients that hold their data themselves: no training labels on this side)."""
        if not len(data.train_y) or not len(data.test_y) or not len(partition):
            return None
        train_y, test_y = data.train_y.cpu().numpy(), data.test_y.cpu().numpy()
        parts = local_test_parts([list(p) for p in partition], train_y, test_y, data.num_classes, seed)
        owner = np.full(len(test_y), -1, dtype=np.int64)
        for client, part in enumerate(parts):
            owner[np.asarray(part, dtype=np.int64)] = client
        return cls(owner, np.array([len(p) for p in parts], dtype=np.int64))

    def correct(self, hits: torch.Tensor) -> np.ndarray:
        """Each client's count of right answers in its part, from the whole test split's ``hits``."""
        right = hits.cpu().numpy().astype(bool)
        mine = self.owner >= 0
        return np.bincount(self.owner[mine], weights=right[mine], minlength=len(self.sizes)).astype(np.int64)

    def accuracies(self, correct: np.ndarray) -> np.ndarray:
        """Per-client accuracy; NaN for a client without test samples."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.sizes > 0, correct / np.maximum(self.sizes, 1), np.nan)


def spread(accuracies: np.ndarray) -> dict[str, float]:
    """``CLIENT_COLUMNS`` over the clients with test samples (NaN where none has any)."""
    accs = np.sort(accuracies[~np.isnan(accuracies)])
    if not len(accs):
        return dict.fromkeys(CLIENT_COLUMNS, math.nan)
    worst = accs[: max(1, -(-len(accs) * WORST_PERCENT // 100))]
    return {"client_acc_mean": float(accs.mean()), "client_acc_std": float(accs.std()),
            "client_acc_worst10": float(worst.mean())}
