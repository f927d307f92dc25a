"""The round protocol every front end shares (engine/rounds.py): selection, checks and counts."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from fedmr.algorithms import ALGORITHMS, Federation, TrainResult
from fedmr.engine.rounds import RoundFold, plan_round
from fedmr.engine.traffic import MB
from fedmr.seeding import numpy_rng

FED = Federation(num_clients=8, clients_per_round=4, client_sizes=(10,) * 8, num_classes=2, seed=0)
REFERENCE = {"w": torch.zeros(2, 2)}


def fedavg():
    algorithm = ALGORITHMS["fedavg"]({}, FED)
    algorithm.setup(REFERENCE)
    return algorithm


def test_the_plan_selects_from_the_rounds_own_stream_and_builds_one_task_per_client():
    algorithm = fedavg()
    plan = plan_round(algorithm, 3, seed=11)
    expected = [int(c) for c in numpy_rng(11, "select", 3).choice(8, 4, replace=False)]
    assert plan.clients == expected == [t.client_id for t in plan.tasks]
    assert [t.slot for t in plan.tasks] == [0, 1, 2, 3]
    assert plan.traffic.down == 4 * 16 and plan.traffic.up == 0
    given = plan_round(algorithm, 3, clients=[5, 1])  # a Flower strategy sampled its nodes itself
    assert given.clients == [5, 1] and [t.client_id for t in given.tasks] == [5, 1]
    with pytest.raises(ValueError, match="seed"):
        plan_round(algorithm, 3)


def test_the_fold_checks_counts_and_keeps_slot_order(caplog):
    plan = plan_round(fedavg(), 0, clients=[4, 6, 2, 7])
    fold = RoundFold(plan, REFERENCE, max_update_norm=10.0)

    def result(client, slot, value=1.0, loss=0.5):
        return TrainResult(client, slot, {"w": torch.full((2, 2), value)}, 10, loss)

    with caplog.at_level(logging.WARNING, logger="fedmr"):
        assert fold.offer(result(2, 2, loss=0.25), received=16) is not None
        assert fold.offer(result(4, 0, loss=0.75), received=16) is not None
        assert fold.offer(result(4, 0), received=16) is None                  # twice
        assert fold.offer(result(9, 1), received=16) is None                  # not asked
        assert fold.offer(result(6, 1, math.nan), received=16) is None        # unsound
        assert fold.offer(result(6, 1, 100.0), received=16) is None           # past max_update_norm
        assert fold.offer(None, problem="the client failed: boom", sender="a reply from node 3") is None
    assert [r.slot for r in fold.in_slot_order()] == [0, 2]
    assert (fold.rejected, fold.delivered, fold.dropped) == (5, 7, 0)
    stats = fold.stats(used=2).as_row()
    assert stats["clients"] == 2 and stats["rejected"] == 5 and stats["dropped"] == 0
    assert stats["train_loss"] == pytest.approx(0.5)
    assert stats["up_mb"] == pytest.approx(6 * 16 / MB) and stats["down_mb"] == pytest.approx(4 * 16 / MB)
    messages = [r.getMessage() for r in caplog.records]
    assert "round 1: rejected the update of client 4: a second result for slot 0" in messages
    assert "round 1: rejected the update of client 9: client 9 / slot 1 was not asked this round" in messages
    assert "round 1: rejected a reply from node 3: the client failed: boom" in messages
    assert any("exceeds max_update_norm" in m for m in messages)


def test_what_never_came_is_dropped_and_a_round_with_nothing_has_no_loss():
    plan = plan_round(fedavg(), 0, seed=1)
    fold = RoundFold(plan, REFERENCE)
    results = [TrainResult(t.client_id, t.slot, {"w": torch.ones(2, 2)}, 10, 1.0) for t in plan.tasks[:1]]
    assert len(list(fold.stream(results))) == 1
    assert fold.dropped == 3 and plan.traffic.up == 16
    empty = RoundFold(plan_round(fedavg(), 1, seed=1), REFERENCE).stats(used=0)
    assert empty.dropped == 4 and math.isnan(empty.train_loss)
    with pytest.raises(ValueError):
        RoundFold(plan, REFERENCE).offer(None)
    assert np.isfinite(fold.stats(1).train_loss)
