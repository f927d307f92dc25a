"""The Python API: fedmr.run / fedmr.compare with a factory and arrays, results, callbacks, the same
numbers as the CLI, the public names and their type hints, and the TensorBoard built-in."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plugin_module import write_user_module

import fedmr
from fedmr.errors import ConfigError, PluginError

MOD = "fedmr_user_api"
CFG = {"num_clients": 10, "clients_per_round": 5, "rounds": 10, "eval_every": 5, "local_epochs": 1, "partition": "iid"}


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    folder = write_user_module(tmp_path_factory.mktemp("user"), MOD)
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module(MOD), folder
    finally:
        sys.path.remove(str(folder))


def test_run_with_a_factory_and_arrays_returns_rows_summary_and_state(user, tmp_path):
    mod, _ = user
    seen = []
    result = fedmr.run(CFG, model=mod.mlp, data=mod.blobs(), out=tmp_path / "r", callbacks=[seen.append])
    assert isinstance(result, fedmr.RunResult)
    assert [row["round"] for row in result.rows] == [5, 10]
    assert result.summary["final_accuracy"] == result.rows[-1]["accuracy"] > 0.8
    assert seen == result.rows  # the callback got every evaluation row as it came
    model = mod.mlp(4, (20,))
    model.load_state_dict(result.final_state)  # the final global model, ready to use
    assert {p.name for p in (tmp_path / "r").iterdir()} >= {"config.toml", "metrics.csv", "summary.json",
                                                           "model.safetensors", "partition.json", "checkpoints"}
    assert result.config["model"] == f"{MOD}:mlp" and result.out_dir == tmp_path / "r"
    # every round's training loss, evaluated or not: the rows of train_loss.csv
    assert [r["round"] for r in result.train_rows] == list(range(1, 11))
    with (tmp_path / "r" / "train_loss.csv").open() as fh:
        written = [float(r["train_loss"]) for r in csv.DictReader(fh)]
    assert [r["train_loss"] for r in result.train_rows] == pytest.approx(written, rel=1e-5)
    assert result.train_rows[-1]["train_loss"] < result.train_rows[0]["train_loss"]


def test_run_without_out_writes_nothing_and_accepts_a_loader(user, tmp_path, monkeypatch):
    mod, _ = user
    monkeypatch.chdir(tmp_path)
    result = fedmr.run({**CFG, "rounds": 5}, model=mod.GRUNet, data=mod.tokens)
    assert result.out_dir is None and list(tmp_path.iterdir()) == []
    assert len(result.rows) == 1 and result.config["dataset"] == f"{MOD}:tokens"


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as fh:
        return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in csv.DictReader(fh)]


def test_the_api_and_the_cli_give_the_same_metrics(user, tmp_path):
    mod, folder = user
    api = fedmr.run(CFG, model=mod.mlp, data=mod.blobs(), out=tmp_path / "api")
    settings = [f"model={MOD}:mlp", f"dataset={MOD}:blobs", *(f"{k}={v}" for k, v in CFG.items())]
    env = {**os.environ, "PYTHONPATH": str(folder)}
    proc = subprocess.run([sys.executable, "-m", "fedmr.cli", "run", "--quiet", "--out", str(tmp_path / "cli"),
                           *[a for s in settings for a in ("--set", s)]], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    cli_rows = read_csv(tmp_path / "cli" / "metrics.csv")
    assert cli_rows == read_csv(tmp_path / "api" / "metrics.csv")  # every column as written, bar the clock
    assert [float(r["accuracy"]) for r in cli_rows] == pytest.approx([r["accuracy"] for r in api.rows], abs=1e-6)


def test_compare_runs_each_variant_on_the_same_start(user, tmp_path):
    mod, _ = user
    seen = []
    results = fedmr.compare({**CFG, "rounds": 5}, ["fedavg", f"{MOD}:ServerLR@server_lr=0.5"], model=mod.mlp,
                            data=mod.blobs(), out=tmp_path / "cmp", callbacks=[seen.append])
    assert list(results) == ["fedavg", f"{MOD}:ServerLR@server_lr=0.5"]
    for result in results.values():
        assert result.rows[-1]["round"] == 5 and result.summary["rounds"] == 5
        assert set(result.final_state) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert results[f"{MOD}:ServerLR@server_lr=0.5"].config[f"{MOD}:ServerLR"] == {"server_lr": 0.5}
    assert [row["variant"] for row in seen] == list(results)
    assert (tmp_path / "cmp" / "comparison.md").is_file()
    # the same rows as fedmr.run on the same config
    alone = fedmr.run({**CFG, "rounds": 5, "algorithm": "fedavg"}, model=mod.mlp, data=mod.blobs())
    assert alone.rows[-1]["accuracy"] == results["fedavg"].rows[-1]["accuracy"]
    assert [r["train_loss"] for r in results["fedavg"].train_rows] == pytest.approx(
        [r["train_loss"] for r in alone.train_rows], rel=1e-5)  # as written (6 digits) against the run's own


def _without_clock(rows):
    return [{k: v for k, v in row.items() if k != "elapsed_s"} for row in rows]


def test_a_run_on_arrays_resumes_with_the_same_arrays_and_refuses_others(user, tmp_path):
    from fedmr.errors import CheckpointError

    mod, _ = user
    whole = fedmr.run(CFG, model=mod.mlp, data=mod.blobs(), out=tmp_path / "whole")
    fedmr.run({**CFG, "rounds": 5}, model=mod.mlp, data=mod.blobs(), out=tmp_path / "r")
    resumed = fedmr.run(CFG, model=mod.mlp, data=mod.blobs(), out=tmp_path / "r", resume=True)
    assert _without_clock(resumed.rows) == _without_clock(whole.rows)  # rounds 1-5 read back, 6-10 trained
    train_x, train_y, test_x, test_y = mod.blobs()
    with pytest.raises(CheckpointError, match="the data arrays differ"):
        fedmr.run({**CFG, "rounds": 15}, model=mod.mlp, data=(train_x + 0.01, train_y, test_x, test_y),
                  out=tmp_path / "r", resume=True)
    with pytest.raises(ConfigError, match="give out="):
        fedmr.run(CFG, model=mod.mlp, data=mod.blobs(), resume=True)
    # a comparison keeps its finished variants
    first = fedmr.compare({**CFG, "rounds": 5}, ["fedavg", "fedmr"], model=mod.mlp, data=mod.blobs(), out=tmp_path / "c")
    again = fedmr.compare({**CFG, "rounds": 5}, ["fedavg", "fedmr"], model=mod.mlp, data=mod.blobs(), out=tmp_path / "c",
                          resume=True)
    assert list(again) == list(first)
    for spec, result in again.items():  # read back from the folder (metrics.csv rounds to 6 digits)
        assert [r["round"] for r in result.rows] == [r["round"] for r in first[spec].rows]
        assert [r["accuracy"] for r in result.rows] == pytest.approx([r["accuracy"] for r in first[spec].rows], abs=1e-6)
        assert torch.equal(result.final_state["0.weight"], first[spec].final_state["0.weight"])


def test_api_errors_are_project_errors(user):
    mod, _ = user
    with pytest.raises(PluginError, match="not a built model"):
        fedmr.run(CFG, model=mod.mlp(4, (20,)), data=mod.blobs())
    with pytest.raises(PluginError, match="train and test samples differ in shape"):
        fedmr.run(CFG, model=mod.mlp, data=mod.shapes_differ())
    with pytest.raises(ConfigError, match="unknown config key 'roundz'"):
        fedmr.run({"roundz": 3})


def test_public_names_have_docstrings_and_the_package_ships_its_type_hints():
    for name in ("run", "compare", "RunResult", "Algorithm", "TrainTask", "TrainResult", "Federation",
                 "ModelFactory", "DataLoader", "FedMRError"):
        obj = getattr(fedmr, name)
        assert inspect.getdoc(obj), name
    assert "Returns" in fedmr.run.__doc__ and "Args" in fedmr.compare.__doc__
    assert (Path(fedmr.__file__).parent / "py.typed").is_file()
    with pytest.raises(AttributeError):
        fedmr.no_such_name  # noqa: B018


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="the optional tensorboard extra is not installed (pip install 'fedmr[tensorboard]')")
def test_tensorboard_true_writes_the_metrics_to_a_tensorboard_log(user, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mod, _ = user
    result = fedmr.run({**CFG, "tensorboard": True}, model=mod.mlp, data=mod.blobs(), out=tmp_path / "r")
    log = EventAccumulator(str(tmp_path / "r" / "tensorboard"))
    log.Reload()
    accuracy = log.Scalars("accuracy")
    assert [e.step for e in accuracy] == [5, 10]
    assert accuracy[-1].value == pytest.approx(result.summary["final_accuracy"])


def test_tensorboard_asked_for_but_missing_or_without_a_folder_is_a_clear_error(user, tmp_path, monkeypatch):
    mod, _ = user
    with pytest.raises(ConfigError, match="writes its log into the results folder"):
        fedmr.run({**CFG, "tensorboard": True}, model=mod.mlp, data=mod.blobs())
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if the extra were not installed
    with pytest.raises(ConfigError, match=r"needs the optional tensorboard package: pip install 'fedmr\[tensorboard\]'"):
        fedmr.run({**CFG, "tensorboard": True}, model=mod.mlp, data=mod.blobs(), out=tmp_path / "r")


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None,
                    reason="the optional tensorboard extra is not installed (pip install 'fedmr[tensorboard]')")
def test_the_recorder_shared_with_the_flower_server_writes_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fedmr.algorithms import build_algorithm
    from fedmr.config import load_config
    from fedmr.engine.experiment import prepare
    from fedmr.engine.recorder import Recorder
    from fedmr.results import RunWriter

    cfg = load_config(None, ["num_clients=10", "clients_per_round=2", "rounds=2", "eval_every=1", "partition=iid",
                             "tensorboard=true"])
    exp = prepare(cfg)
    algorithm = build_algorithm(cfg, exp.federation)
    recorder = Recorder(cfg, exp, algorithm, RunWriter(tmp_path / "f"))
    recorder.start()
    for done in (1, 2):
        recorder.end_round(done, {"clients": 2, "rejected": 0, "dropped": 0, "train_loss": 1.0})
    recorder.finish()
    log = EventAccumulator(str(tmp_path / "f" / "tensorboard"))
    log.Reload()
    assert [e.step for e in log.Scalars("accuracy")] == [1, 2]
