"""The engine's one place for a run's bookkeeping (engine/recorder.py), and the engine's import layout."""

from __future__ import annotations

import ast
import csv
import json
from pathlib import Path

import pytest
import torch

from fedmr.config import load_config
from fedmr.engine import Simulation, prepare
from fedmr.engine.compare import run_comparison
from fedmr.engine.recorder import Recorder
from fedmr.results import METRIC_COLUMNS, RunWriter

TINY = ["num_clients=8", "clients_per_round=4", "rounds=5", "local_epochs=1", "eval_every=2", "workers=1"]
ENGINE = Path(__file__).resolve().parents[1] / "src" / "fedmr" / "engine"


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open() as fh:
        reader = csv.DictReader(fh)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture(scope="module")
def moon():
    cfg = load_config(None, [*TINY, "algorithm=moon"])
    return cfg, prepare(cfg)


def test_schedule_evaluates_every_eval_every_and_the_last_round_and_checkpoints_at_evaluations(moon, tmp_path):
    cfg, exp = moon
    sim = Simulation(exp, out_dir=tmp_path / "run", progress="none")
    outcome = sim.run()
    assert [r["round"] for r in outcome.rows] == [2, 4, 5]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.json")) == ["round-000004.json",
                                                                                          "round-000005.json"]
    header, rows = read_rows(tmp_path / "run" / "metrics.csv")
    assert header == METRIC_COLUMNS
    assert all(float(r["client_state_mb"]) > 0 for r in rows)  # MOON keeps a model per client that trained
    assert all(r["pool_cosine"] == "" for r in rows)  # FedAvg-like: no pool
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert (summary["algorithm"], summary["rounds"], summary["best_round"]) == ("moon", 5, outcome.summary["best_round"])
    assert (tmp_path / "run" / "model.safetensors").exists()


def test_extra_columns_follow_the_standard_ones_and_are_checked(moon, tmp_path):
    cfg, exp = moon
    sim = Simulation(exp, progress="none")
    recorder = Recorder(cfg, exp, sim.algorithm, RunWriter(tmp_path / "x"), extra_columns=["fed_accuracy", "fed_loss"])
    assert recorder.start() == 0
    seen = []
    recorder.on_row.append(seen.append)
    assert recorder.end_round(1, sim.run_round(0), extra={"fed_accuracy": 0.5}) is None  # not an evaluation round
    row = recorder.end_round(2, sim.run_round(1), extra={"fed_accuracy": 0.25, "fed_loss": 2.0})
    assert row is not None and seen == [row]
    assert (row["fed_accuracy"], row["fed_loss"]) == (0.25, 2.0)
    header, rows = read_rows(tmp_path / "x" / "metrics.csv")
    assert header == [*METRIC_COLUMNS, "fed_accuracy", "fed_loss"]
    assert (rows[0]["round"], rows[0]["fed_accuracy"], rows[0]["fed_loss"]) == ("2", "0.25", "2")
    recorder.end_round(4, sim.run_round(2))  # a round without the extra values: empty cells
    assert read_rows(tmp_path / "x" / "metrics.csv")[1][1]["fed_accuracy"] == ""
    with pytest.raises(ValueError, match="not among"):
        recorder.end_round(5, sim.run_round(3), extra={"bogus": 1.0})
    with pytest.raises(ValueError, match="standard metrics column"):
        Recorder(cfg, exp, sim.algorithm, None, extra_columns=["accuracy"])


def test_an_experiment_without_test_samples_gets_empty_accuracy_cells_and_its_own_header(moon, tmp_path):
    """A front end whose server holds no test set (Flower sites, flower.data = "node"): the recorder
    evaluates nothing, writes empty accuracy/loss cells beside the extra columns, and the header
    is what the experiment writes of its clients (``Experiment.write_clients``)."""
    from dataclasses import replace

    cfg, exp = moon
    blind = replace(exp, data=replace(exp.data, test_x=exp.data.test_x[:0], test_y=exp.data.test_y[:0]))
    sim = Simulation(exp, progress="none")
    recorder = Recorder(cfg, blind, sim.algorithm, RunWriter(tmp_path / "x"), extra_columns=["fed_accuracy"])
    recorder.start()
    recorder.model = None  # evaluating would need the model: it must not happen
    row = recorder.end_round(2, sim.run_round(0), extra={"fed_accuracy": 0.5})
    assert row is not None and row["accuracy"] != row["accuracy"] and row["loss"] != row["loss"]  # NaN
    _, rows = read_rows(tmp_path / "x" / "metrics.csv")
    assert (rows[0]["accuracy"], rows[0]["loss"], rows[0]["fed_accuracy"]) == ("", "", "0.5")
    assert {"config.toml", "partition.json", "partition_summary.json"} <= {p.name for p in (tmp_path / "x").iterdir()}

    class SitesLike(type(exp)):
        def write_clients(self, writer, cfg):
            (writer.dir / "sites.json").write_text("{}")

    other = SitesLike(**{f: getattr(exp, f) for f in exp.__dataclass_fields__})
    Recorder(cfg, other, sim.algorithm, RunWriter(tmp_path / "y")).start()
    names = {p.name for p in (tmp_path / "y").iterdir()}
    assert "sites.json" in names and "partition.json" not in names and "config.toml" in names


def test_comparison_api_returns_its_data_and_writes_nothing_without_a_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, [*TINY, "rounds=2"])
    seen: list[tuple[str, int]] = []
    outcome = run_comparison(cfg, ["fedavg", "fedmr@block_fraction=0.5"], None, "none",
                             on_row=lambda label, row: seen.append((label, row["round"])))
    assert list(outcome.summaries) == ["fedavg", "fedmr@block_fraction=0.5"]
    assert outcome.stop_signal == 0 and outcome.out_dir is None
    assert [r["round"] for r in outcome.rows["fedavg"]] == [2]
    assert seen == [("fedavg", 2), ("fedmr@block_fraction=0.5", 2)]
    assert list(tmp_path.iterdir()) == []


def _engine_imports() -> dict[str, set[str]]:
    """engine module -> the engine modules it imports (relative imports inside the package; an
    ``if TYPE_CHECKING:`` block is for type checkers only and not counted)."""
    graph = {}
    for path in ENGINE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
                node.body = []
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module.split(".")[0])
                else:
                    deps.update(a.name for a in node.names)
        graph[path.stem] = deps - {path.stem}
    return graph


def test_the_engine_has_no_import_cycle():
    graph = _engine_imports()
    assert "runner" not in graph["parallel"] and "runner" not in graph["vectorized"]
    assert {"parallel", "vectorized"} <= graph["runner"] and "client" in graph["parallel"] and "client" in graph["vectorized"]
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        if state.get(node) == 1:
            raise AssertionError("import cycle: " + " -> ".join([*trail, node]))
        if state.get(node) == 2 or node not in graph:
            return
        state[node] = 1
        for dep in sorted(graph[node]):
            visit(dep, [*trail, node])
        state[node] = 2

    for module in sorted(graph):
        visit(module, [])


# ---- per-client evaluation and every round's training loss (issue 28.5) ------------------------------------
def _float(cell: str) -> float:
    return float(cell) if cell else float("nan")


@pytest.fixture(scope="module")
def fedmr_run(tmp_path_factory):
    cfg = load_config(None, [*TINY, "algorithm=fedmr", "num_clients=10", "clients_per_round=5"])
    exp = prepare(cfg)
    out = tmp_path_factory.mktemp("clients") / "run"
    outcome = Simulation(exp, out_dir=out, progress="none").run()
    return cfg, exp, out, outcome


def test_each_clients_accuracy_is_read_from_one_pass_over_its_own_local_test_part(fedmr_run):
    """The parts are `fedmr partition --export`'s (the same function, the same seed); a client's accuracy
    from the single pass equals a pass over its part alone, to one sample: in eval mode a sample's logits
    do not depend on its batch-mates, but batches of another size may round the logits differently and
    turn a near tie (a float32 CPU difference, see the house rules)."""
    import numpy as np

    from fedmr.export import local_test_parts
    from fedmr.training import evaluate

    cfg, exp, out, outcome = fedmr_run
    data = exp.data
    parts = local_test_parts(exp.partition, data.train_y.numpy(), data.test_y.numpy(), data.num_classes, cfg.seed)
    header, rows = read_rows(out / "client_accuracy.csv")
    assert header == ["round", "client", "test_samples", "correct", "accuracy"]
    assert [int(r["client"]) for r in rows] == list(range(10)) and {r["round"] for r in rows} == {"5"}  # the last
    assert [int(r["test_samples"]) for r in rows] == [len(p) for p in parts]
    assert sum(len(p) for p in parts) == len(data.test_y)  # every class is trained on by someone: all dealt
    model = exp.new_model()
    model.load_state_dict(outcome.final_state)
    for row, part in zip(rows, parts):
        if not part:
            assert row["accuracy"] == ""
            continue
        alone, _ = evaluate(model, data.test_x[part], data.test_y[part], cfg.test_batch_size)
        assert abs(_float(row["accuracy"]) - alone) <= 1 / len(part) + 1e-12, row
        assert int(row["correct"]) / len(part) == pytest.approx(_float(row["accuracy"]), rel=1e-5)
    # the parts together are the test set: the sample-weighted mean of the clients' is the test accuracy
    right = sum(int(r["correct"]) for r in rows)
    assert right / len(data.test_y) == pytest.approx(outcome.rows[-1]["accuracy"], abs=1e-12)
    # the row's spread is the file's accuracies' (mean, population std, the worst ceil(10%) = 1 of 10)
    accs = np.array([int(r["correct"]) / int(r["test_samples"]) for r in rows if int(r["test_samples"])])
    last = outcome.rows[-1]
    assert last["client_acc_mean"] == pytest.approx(accs.mean(), abs=1e-12)
    assert last["client_acc_std"] == pytest.approx(accs.std(), abs=1e-12)
    assert last["client_acc_worst10"] == pytest.approx(np.sort(accs)[:1].mean(), abs=1e-12)
    _, written = read_rows(out / "metrics.csv")
    assert [_float(w["client_acc_mean"]) for w in written] == pytest.approx([r["client_acc_mean"] for r in outcome.rows],
                                                                            rel=1e-5)  # 6 significant digits


def test_the_worst_ten_percent_is_counted_in_whole_clients():
    import math

    import numpy as np

    from fedmr.engine.client_eval import spread

    thirty = np.arange(30) / 30  # ceil(30 * 10%) = 3 clients, although 0.1 * 30 > 3 in floats
    assert spread(thirty)["client_acc_worst10"] == pytest.approx((0 + 1 + 2) / 30 / 3)
    assert spread(np.array([0.5, np.nan, 0.25]))["client_acc_worst10"] == 0.25  # a client without test samples: out
    assert spread(np.array([0.5, np.nan, 0.25]))["client_acc_std"] == pytest.approx(0.125)
    assert all(math.isnan(v) for v in spread(np.array([np.nan])).values())


def test_every_rounds_training_loss_has_its_own_file_and_metrics_keeps_its_rows(fedmr_run):
    cfg, exp, out, outcome = fedmr_run
    header, rows = read_rows(out / "train_loss.csv")
    assert header == ["round", "train_loss", "clients", "rejected", "dropped"]
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4, 5]
    _, metrics = read_rows(out / "metrics.csv")
    assert [m["round"] for m in metrics] == ["2", "4", "5"]  # evaluation rows only, as before
    by_round = {r["round"]: r for r in rows}
    for m in metrics:  # an evaluated round's training loss is the same number in both files
        assert (by_round[m["round"]]["train_loss"], by_round[m["round"]]["clients"]) == (m["train_loss"], m["clients"])
    assert all(r["clients"] == "5" and r["rejected"] == "0" for r in rows)
    image = (out / "loss.png").read_bytes()
    assert image[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_resumed_run_keeps_the_training_loss_rows_up_to_its_checkpoint(tmp_path):
    """Rows after the checkpoint's round (trained again on resume) and a half-written last line are dropped."""
    writer = RunWriter(tmp_path / "r")
    assert writer.start_train_log() == []
    for r in range(1, 6):
        writer.append_train_row({"round": r, "train_loss": 2.0 / r, "clients": 3, "rejected": 0, "dropped": 0})
    with writer.train_log_path.open("a") as fh:
        fh.write("6,0.3")  # killed mid-line
    kept = writer.start_train_log(through=4)
    assert [r["round"] for r in kept] == [1.0, 2.0, 3.0, 4.0] and kept[1]["train_loss"] == 1.0
    assert writer.train_log_path.read_text().splitlines()[-1] == "4,0.5,3,0,0"
    assert len(writer.train_log_path.read_text().splitlines()) == 5
    assert writer.start_train_log(through=0) == [] and writer.train_log_path.read_text() == \
        "round,train_loss,clients,rejected,dropped\n"  # a fresh start


def test_the_vectorized_path_and_a_run_without_a_folder_evaluate_per_client_too():
    from fedmr.engine.vectorized import VectorizedRunner

    cfg = load_config(None, [*TINY, "algorithm=fedmr", "rounds=2", "eval_every=1", "vectorize=true"])
    sim = Simulation(prepare(cfg), progress="none")
    assert isinstance(sim.runner, VectorizedRunner)
    outcome = sim.run()
    assert all(0 <= r["client_acc_worst10"] <= r["client_acc_mean"] <= 1 for r in outcome.rows)
    assert [r["round"] for r in sim.recorder.train_rows] == [1, 2]


def test_save_model_every_keeps_the_global_model_and_the_pool_of_those_rounds(tmp_path):
    """models/round-NNNNNN.safetensors every save_model_every rounds (fedmr landscape's over-rounds input);
    the last equals the final model.safetensors, and the pool's mean is the global model."""
    from fedmr.engine.checkpoint import load_tensors
    from fedmr.maths import pool_mean

    cfg = load_config(None, [*TINY, "rounds=4", "algorithm=\"fedmr\"", "save_model_every=2", "save_pool=true"])
    Simulation(prepare(cfg), out_dir=tmp_path / "run", progress="none").run()
    models = tmp_path / "run" / "models"
    assert sorted(p.name for p in models.iterdir()) == ["round-000002-pool.safetensors", "round-000002.safetensors",
                                                       "round-000004-pool.safetensors", "round-000004.safetensors"]
    final, saved = load_tensors(tmp_path / "run" / "model.safetensors"), load_tensors(models / "round-000004.safetensors")
    assert all(torch.equal(final[k], saved[k]) for k in final)
    pool = {k.removeprefix("pool."): v for k, v in load_tensors(models / "round-000004-pool.safetensors").items()}
    assert all(v.shape[0] == 4 for v in pool.values())
    assert all(torch.allclose(pool_mean(pool)[k], final[k]) for k in final)
    off = load_config(None, [*TINY, "rounds=1"])  # the default keeps no models
    Simulation(prepare(off), out_dir=tmp_path / "plain", progress="none").run()
    assert not (tmp_path / "plain" / "models").exists()
