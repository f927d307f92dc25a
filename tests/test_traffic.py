"""The MB each round sends and receives (issue 20): counted from the tensors exchanged, the same in
the simulator and in the Flower strategies, kept over a resume, written to metrics.csv."""

from __future__ import annotations

import csv
from types import SimpleNamespace

import pytest
import torch

import fedmr
from fedmr.algorithms import Federation, TrainResult, TrainTask, build_algorithm
from fedmr.config import load_config
from fedmr.engine.traffic import MB, Traffic, result_bytes, task_bytes
from fedmr.maths import state_nbytes, tensors_nbytes
from fedmr.models import build_model

SMALL = {"rounds": 4, "eval_every": 1, "num_clients": 8, "clients_per_round": 4, "local_epochs": 1, "workers": 1,
         "partition": "iid", "seed": 2}


def cnn_mb(num_classes=10, channels=1) -> float:
    """The digits CNN's state in MB: what FedAvg sends each client and gets back."""
    return state_nbytes(build_model("cnn", num_classes, channels, 32).state_dict()) / MB


@pytest.fixture(scope="module")
def runs():
    return {alg: fedmr.run({**SMALL, "algorithm": alg}, progress=False).rows
            for alg in ("fedavg", "fedmr", "scaffold", "moon", "fedgen")}


def column(rows, key):
    return [row[key] for row in rows]


def test_fedmr_exchanges_exactly_what_fedavg_does(runs):
    """K models down, K up, every round: recombination costs no extra communication."""
    k, model = SMALL["clients_per_round"], cnn_mb()
    for alg in ("fedavg", "fedmr"):
        assert column(runs[alg], "down_mb") == pytest.approx([k * model] * 4, rel=1e-12)
        assert column(runs[alg], "up_mb") == pytest.approx([k * model] * 4, rel=1e-12)
        assert column(runs[alg], "down_client_state_mb") == [0.0] * 4
    for key in ("down_mb", "up_mb", "down_total_mb", "up_total_mb"):
        assert column(runs["fedmr"], key) == column(runs["fedavg"], key)


def test_scaffold_sends_its_variates_up_with_every_model(runs):
    k, model = SMALL["clients_per_round"], cnn_mb()
    assert column(runs["scaffold"], "up_mb") == pytest.approx([2 * k * model] * 4, rel=1e-12)  # y_i and c_i
    down = column(runs["scaffold"], "down_mb")
    assert down[0] == pytest.approx(k * model)  # round 1: c = 0 and no c_i yet, so only the model
    assert all(d >= 2 * k * model - 1e-9 for d in down[1:])  # then the model and c, plus c_i of returning clients
    held = column(runs["scaffold"], "down_client_state_mb")
    assert [d - h for d, h in zip(down[1:], held[1:])] == pytest.approx([2 * k * model] * 3)


def test_moon_previous_models_travel_down_and_are_reported_as_client_state(runs):
    k, model = SMALL["clients_per_round"], cnn_mb()
    down, held = column(runs["moon"], "down_mb"), column(runs["moon"], "down_client_state_mb")
    assert down[0] == pytest.approx(k * model) and held[0] == 0.0  # round 1: no previous model yet
    assert down[1:] == pytest.approx([2 * k * model] * 3) and held[1:] == pytest.approx([k * model] * 3)
    assert column(runs["moon"], "up_mb") == pytest.approx([k * model] * 4)


def test_fedgen_adds_its_generator_to_the_downlink(runs):
    down, model = column(runs["fedgen"], "down_mb"), cnn_mb()
    assert down[0] == pytest.approx(4 * model)  # no generator before the first round's training
    assert all(d > 4 * model for d in down[1:])


def test_totals_sum_every_round_including_those_not_evaluated():
    rows = fedmr.run({**SMALL, "algorithm": "fedavg", "rounds": 6, "eval_every": 3}, progress=False).rows
    per_round = 4 * cnn_mb()
    assert column(rows, "round") == [3, 6]
    assert column(rows, "down_total_mb") == pytest.approx([3 * per_round, 6 * per_round])
    assert column(rows, "up_total_mb") == pytest.approx([3 * per_round, 6 * per_round])


def test_the_totals_survive_a_resume(tmp_path):
    """Stopped after round 3 (checkpoint every 3, evaluated every 2), resumed to 6: the totals go on
    from the checkpoint, not from the last metrics row (round 2) or from zero."""
    out = tmp_path / "run"
    settings = {**SMALL, "algorithm": "scaffold", "rounds": 3, "eval_every": 2, "checkpoint_every": 3}
    fedmr.run(settings, out=out, progress=False)
    resumed = fedmr.run({**settings, "rounds": 6}, out=out, progress=False, resume=True).rows
    straight = fedmr.run({**settings, "rounds": 6}, out=tmp_path / "straight", progress=False).rows
    assert column(resumed, "round") == [2, 3, 4, 6] and column(straight, "round") == [2, 4, 6]
    after = [row for row in resumed if row["round"] > 3]  # the rounds run after the resume
    for key in ("down_total_mb", "up_total_mb"):
        assert column(after, key) == pytest.approx(column(straight[1:], key), rel=1e-12)
    with (out / "metrics.csv").open() as fh:
        header = next(csv.reader(fh))
    assert {"down_mb", "up_mb", "down_client_state_mb", "down_total_mb", "up_total_mb"} <= set(header)


def test_a_run_resumed_from_a_checkpoint_without_totals_leaves_them_empty(tmp_path, monkeypatch):
    """A checkpoint written before the totals existed: the rounds after the resume still get their
    per-round MB, but the totals are unknown (its earlier rounds were never counted), so they stay
    empty rather than restart from zero."""
    import fedmr.engine.recorder as recorder

    out = tmp_path / "run"
    settings = {**SMALL, "algorithm": "fedavg", "rounds": 2, "eval_every": 2}
    real = recorder.save_checkpoint
    monkeypatch.setattr(recorder, "save_checkpoint", lambda *a, counters=None, **k: real(*a, **k))
    fedmr.run(settings, out=out, progress=False)
    monkeypatch.setattr(recorder, "save_checkpoint", real)
    rows = fedmr.run({**settings, "rounds": 4}, out=out, progress=False, resume=True).rows
    assert column(rows, "round") == [2, 4]
    assert rows[1]["down_mb"] == pytest.approx(4 * cnn_mb()) and "down_total_mb" not in rows[1]
    with (out / "metrics.csv").open() as fh:
        last = list(csv.DictReader(fh))[-1]
    assert last["down_total_mb"] == "" and float(last["down_mb"]) > 0


def test_a_plugin_payload_is_counted():
    extra = torch.zeros(1000)  # 4000 bytes

    from fedmr.algorithms.fedavg import FedAvg

    class ChattyAvg(FedAvg):  # FedAvg that ships an extra tensor (and a string, which is no tensor)
        def configure_train(self, round_idx, clients):
            return [TrainTask(t.client_id, t.slot, t.state, {"extra": extra, "note": "x"})
                    for t in super().configure_train(round_idx, clients)]

    task = ChattyAvg({}, Federation(2, 2, (5, 5), 10, 1))
    task.setup({"w": torch.zeros(10)})
    tasks = task.configure_train(0, [0, 1])
    assert [task_bytes(t) for t in tasks] == [40 + 4000, 40 + 4000]
    assert result_bytes(TrainResult(0, 0, {"w": torch.zeros(10)}, 5, payload={"extra": {"a": extra}})) == 4040
    assert tensors_nbytes({"a": [torch.zeros(2, dtype=torch.float64), 3, "s"]}) == 16
    assert Traffic.of_tasks(tasks, ("extra",)).down_client_state == 8000


# ---- Flower: the strategies count the arrays of their messages ------------------------------------------
flwr = pytest.importorskip("flwr", reason="flwr is not installed (pip install 'fedmr[flower]')")


@pytest.mark.parametrize("name", ["scaffold", "moon", "fedmr", "fedgen"])
def test_the_flower_strategy_counts_what_the_simulator_counts(name, monkeypatch):
    """The ServerApp's strategy over two rounds: its MB down (the arrays of its messages) equal the
    simulator's count of the same tasks' tensors, and its MB up those of the replies' results."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedmr.flower.strategy import AlgorithmStrategy
    from fedmr.flower.task import decode_task, encode_result

    for attr, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, attr, value)
    cfg = load_config(None, ["num_clients=4", "clients_per_round=3", f"algorithm=\"{name}\""])
    fed = Federation(4, 3, (10,) * 4, 10, 1, label_counts=((3, 3, 4) + (0,) * 7,) * 4)
    algorithm = build_algorithm(cfg, fed)
    model = build_model("cnn", 10, 1, 32)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    algorithm.setup(initial)
    strategy = AlgorithmStrategy(algorithm, seed=1, reference=initial)
    strategy.node_of = {c: 100 + c for c in range(4)}

    for server_round in (1, 2):
        messages = list(strategy.configure_train(server_round, None, None, None))
        tasks = [decode_task(m.content)[0] for m in messages]  # as a ClientApp receives them
        simulated = Traffic.of_tasks(strategy.tasks, algorithm.client_held)
        assert strategy.traffic.down == simulated.down == sum(task_bytes(t) for t in tasks)
        assert strategy.traffic.down_client_state == simulated.down_client_state
        results = [algorithm.local_update(model, t, torch.randn(10, 1, 32, 32), torch.randint(0, 10, (10,)),
                                          algorithm_settings(), torch.Generator().manual_seed(0)) for t in tasks]
        replies = [SimpleNamespace(content=encode_result(r), has_error=lambda: False,
                                   metadata=SimpleNamespace(src_node_id=100 + r.client_id)) for r in results]
        strategy.aggregate_train(server_round, replies)
        assert strategy.last_round["up_mb"] == pytest.approx(sum(result_bytes(r) for r in results) / MB, rel=1e-12)
        assert strategy.last_round["down_mb"] == pytest.approx(simulated.down / MB, rel=1e-12)


def algorithm_settings():
    from fedmr.training import LocalSettings

    return LocalSettings(epochs=1, batch_size=5, lr=0.01, momentum=0.5)
