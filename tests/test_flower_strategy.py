"""fedmr.flower.FedMR / FedIndep without processes: Flower's Strategy.start driven over a stand-in
Grid whose nodes join and leave, and whose replies fail in every way the strategy must survive."""

from __future__ import annotations

import logging
import math
import random
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'fedmr[flower]')")

import torch  # noqa: E402
from flwr.app import ArrayRecord, MetricRecord, RecordDict  # noqa: E402

from fedmr.errors import ConfigError  # noqa: E402
from fedmr.flower import FedIndep, FedMR  # noqa: E402


@pytest.fixture(autouse=True)
def run_identity(monkeypatch):
    """Messages carry the run id Flower sets in a ServerApp process; here, a made-up one."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def reply(node, content=None, error=None):
    return SimpleNamespace(content=content, has_error=lambda: error is not None, error=SimpleNamespace(reason=error),
                           metadata=SimpleNamespace(src_node_id=node))


class Grid:
    """Nodes answer train messages with the received model + (their id); ``answer`` may spoil a reply."""

    def __init__(self, nodes_per_round, answer=None):
        self.nodes_per_round, self.answer = nodes_per_round, answer or (lambda node, r, ok: ok)
        self.round = 0
        self.sent: dict[int, dict[int, dict[str, torch.Tensor]]] = {}  # round -> node -> model
        self.returned: dict[int, dict[int, dict[str, torch.Tensor]]] = {}

    def get_node_ids(self):
        return list(self.nodes_per_round[min(self.round, len(self.nodes_per_round) - 1)])

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        if not messages:
            return []
        if messages[0].metadata.message_type != "train":  # evaluation: node 2 forgets "num-examples"
            return [reply(m.metadata.dst_node_id, RecordDict({"metrics": MetricRecord(
                {"eval_acc": float(m.metadata.dst_node_id), **({} if m.metadata.dst_node_id == 2 else {"num-examples": 5})})}))
                for m in messages]
        self.round += 1
        r = messages[0].content["config"]["server-round"]
        out = []
        for msg in messages:
            node = msg.metadata.dst_node_id
            state = msg.content["arrays"].to_torch_state_dict()
            self.sent.setdefault(r, {})[node] = state
            new = {k: v + node for k, v in state.items()}
            self.returned.setdefault(r, {})[node] = new
            ok = RecordDict({"arrays": ArrayRecord(new), "metrics": MetricRecord({"num-examples": 10, "loss": 1.0})})
            answer = self.answer(node, r, ok)
            out.append(reply(node, ok) if answer is ok else reply(node, *answer))
        return out


def initial():
    return ArrayRecord({"w": torch.zeros(2, 3), "b": torch.zeros(3)})


def test_fedmr_keeps_flowers_arguments_and_checks_its_own():
    import inspect

    from flwr.serverapp.strategy import FedAvg, Strategy

    ours, theirs = inspect.signature(FedMR).parameters, inspect.signature(FedAvg).parameters
    assert list(ours)[: len(theirs)] == list(theirs) and list(ours)[len(theirs):] == ["first_stage_rounds", "block_fraction"]
    assert all(ours[n].default == theirs[n].default for n in theirs)
    assert list(inspect.signature(FedMR.start).parameters) == list(inspect.signature(Strategy.start).parameters)
    assert issubclass(FedMR, Strategy) and issubclass(FedIndep, Strategy)
    with pytest.raises(ConfigError, match="block_fraction"):
        FedMR(block_fraction=2.0)


def test_the_pool_follows_nodes_joining_and_leaving():
    random.seed(0)
    grid = Grid([[1, 2, 3], [1, 2, 3, 4], [2, 4]])
    result = FedMR(min_train_nodes=1, min_available_nodes=1, fraction_evaluate=0.0).start(grid, initial(), num_rounds=3)
    assert [sorted(grid.sent[r]) for r in (1, 2, 3)] == [[1, 2, 3], [1, 2, 3, 4], [2, 4]]
    back1 = list(grid.returned[1].values())
    mean1 = {k: torch.stack([m[k] for m in back1]).mean(0) for k in back1[0]}
    sent2 = list(grid.sent[2].values())
    # K grew 3 -> 4: three recombined models and one copy of the pool mean
    assert sum(all(torch.equal(m[k], mean1[k]) for k in m) for m in sent2) >= 1
    for key in ("w", "b"):
        expected = [float(m[key].sum()) for m in back1] + [float(mean1[key].sum())]
        assert sorted(float(m[key].sum()) for m in sent2) == sorted(expected)
    # K shrank 4 -> 2: two of the four slots go on
    back2 = list(grid.returned[2].values())
    for m in grid.sent[3].values():
        for key in m:
            assert any(torch.equal(m[key], b[key]) for b in back2)
    back3 = list(grid.returned[3].values())
    final = result.arrays.to_torch_state_dict()
    assert all(torch.allclose(final[k], torch.stack([m[k] for m in back3]).mean(0)) for k in final)


def test_failed_malformed_and_unweighted_replies_keep_their_slots(caplog):
    random.seed(1)

    def spoil(node, r, ok):
        if r != 2:
            return ok
        if node == 1:
            return (None, "ClientApp raised RuntimeError")
        if node == 2:  # the quickstart's reply without "num-examples"
            return (RecordDict({"arrays": ok["arrays"], "metrics": MetricRecord({"loss": 1.0})}),)
        nan = {k: torch.full_like(v, math.nan) for k, v in ok["arrays"].to_torch_state_dict().items()}
        return (RecordDict({"arrays": ArrayRecord(nan), "metrics": MetricRecord({"num-examples": 10})}),)

    grid = Grid([[1, 2, 3]], spoil)
    strategy = FedIndep()
    with caplog.at_level(logging.WARNING, logger="fedmr.flower"):
        result = strategy.start(grid, initial(), num_rounds=2)
    counts = {k: v for k, v in strategy.last_round.items() if not k.endswith("_mb")}
    assert counts == {"clients": 0, "rejected": 3, "dropped": 0} and strategy.rejected == 3
    # traffic, from the arrays of the messages: 3 models of 9 floats down; up, the 2 replies that came back
    assert strategy.last_round["down_mb"] == pytest.approx(3 * 36 / 2**20)
    assert strategy.last_round["up_mb"] == pytest.approx(2 * 36 / 2**20)
    lines = [r.getMessage() for r in caplog.records]
    assert any('node 2: its MetricRecord has no "num-examples"' in line for line in lines), lines
    assert any("node 1: the ClientApp failed" in line for line in lines)
    assert any("node 3: 'w' has non-finite values" in line for line in lines)
    # federated evaluation: node 2's reply has no weight and is left out; nodes 1 and 3 weigh equally
    assert any('evaluation reply of node 2: its MetricRecord has no "num-examples"' in line for line in lines)
    assert result.evaluate_metrics_clientapp[2]["eval_acc"] == pytest.approx(2.0)
    # FedIndep: every slot kept its round-1 model, so the global model is round 1's mean
    back1 = list(grid.returned[1].values())
    final = result.arrays.to_torch_state_dict()
    assert all(torch.allclose(final[k], torch.stack([m[k] for m in back1]).mean(0)) for k in final)
