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
