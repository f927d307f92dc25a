"""Runs that could train nothing, or train on the wrong data, are refused in one line, before any
work where that can be known (issue 28, item 3): non-finite data, a run whose client updates are all
rejected round after round (stopped, its results so far kept), a dropout rate that leaves no client,
a partition file written for another data set, a model with nothing to train, labels that are
mostly absent classes; and an option of an algorithm the run does not use is a warning."""

from __future__ import annotations

import json
import logging
import os
import textwrap

import numpy as np
import pytest
from test_new_user import one_error_line

import fedmr
from fedmr.cli import main
from fedmr.config import load_config, warn_unused_sections
from fedmr.errors import ConfigError, DataError, PartitionError, PluginError, TrainingError

SMALL = ["--set", "rounds=2", "--set", "num_clients=4", "--set", "clients_per_round=2", "--set", "partition=\"iid\"",
         "--set", "local_epochs=1", "--set", "workers=1", "--set", "eval_every=1"]
API_SMALL = {"rounds": 2, "num_clients": 4, "clients_per_round": 2, "partition": "iid", "local_epochs": 1,
             "workers": 1, "eval_every": 1}

USER = textwrap.dedent("""
    import numpy as np
    import torch
    from torch import nn


    def blobs(n=200):
        rng = np.random.default_rng(0)
        y = np.arange(n) % 3
        x = (rng.normal(size=(n, 6)) + 2 * y[:, None]).astype("float32")
        return x, y, x[:60], y[:60]


    def nan_features():
        x, y, vx, vy = blobs()
        x = x.copy()
        x[5, 2] = float("nan")
        x[7, 0] = float("inf")
        return x, y, vx, vy


    def huge_label():
        x, y, vx, vy = blobs()
        y = y.copy()
        y[0] = 999999
        return x, y, vx, vy


    def bigger():
        return blobs(300)


    def mlp(num_classes, input_shape):
        return nn.Sequential(nn.Linear(input_shape[0], 16), nn.ReLU(), nn.Linear(16, num_classes))


    def frozen(num_classes, input_shape):
        model = nn.Linear(input_shape[0], num_classes)
        model.requires_grad_(False)
        return model


    class NaNOut(nn.Module):
        def __init__(self, num_classes, input_shape):
            super().__init__()
            self.fc = nn.Linear(input_shape[0], num_classes)

        def forward(self, x):
            return self.fc(x) * float("nan")
""")


@pytest.fixture
def user(tmp_path, monkeypatch):
    name = f"fedmr_test_nothing_{os.getpid()}"
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / f"{name}.py").write_text(USER)
    monkeypatch.syspath_prepend(str(folder))
    return name


def plugin_args(name: str, loader: str = "blobs", model: str = "mlp") -> list[str]:
    return ["--set", f"dataset=\"{name}:{loader}\"", "--set", f"model=\"{name}:{model}\""]


# ---- 3a: non-finite data; no update accepted for several rounds -----------------------------------
def test_non_finite_features_are_refused_before_any_round(user, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--quiet", "--out", str(out), *SMALL, *plugin_args(user, "nan_features")]) == 2
    line = one_error_line(capsys)
    assert "train_x holds 2 non-finite values (NaN or inf)" in line, line
    assert not out.exists()  # nothing written, no empty folder


def test_the_api_refuses_non_finite_arrays():
    x = np.zeros((40, 3), "float32")
    x[3, 1] = np.nan
    y = np.arange(40) % 2
    with pytest.raises(DataError, match="test_x holds 1 non-finite value "):
        fedmr.run(API_SMALL, data=(np.zeros((20, 3), "float32"), y[:20], x, y), progress=False)


def test_a_run_whose_updates_are_all_rejected_stops_with_its_results_kept(user, tmp_path, capsys):
    """A model whose output is NaN: every update has NaN weights and is rejected.  After
    max_rounds_without_update (5) such rounds in a row the run stops with one error line; the
    metrics so far, with a row for the round it stopped at, are written; no summary claims a finish."""
    out = tmp_path / "r"
    argv = ["run", "--quiet", "--out", str(out), *SMALL, "--set", "rounds=20", "--set", "eval_every=3",
            *plugin_args(user, model="NaNOut")]
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert "no client update was accepted in rounds 1-5 (5 in a row, max_rounds_without_update = 5)" in line, line
    assert f"the results so far are in {out / 'metrics.csv'}" in line
    rows = fedmr.results.read_metrics(out / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [3, 5]  # the due evaluation, then the round it stopped at
    assert all(r["clients"] == 0 and r["rejected"] == 2 for r in rows)
    assert not (out / "summary.json").exists() and not (out / "model.safetensors").exists()


def test_a_learning_rate_that_makes_every_update_non_finite_stops_the_api_run(user, tmp_path):
    import importlib

    mod = importlib.import_module(user)
    cfg = {**API_SMALL, "rounds": 10, "eval_every": 10, "lr": 1e30, "max_rounds_without_update": 3}
    with pytest.raises(TrainingError, match=r"rounds \d+-\d+ \(3 in a row") as caught:
        fedmr.run(cfg, model=mod.mlp, data=mod.blobs(), out=tmp_path / "r", progress=False)
    stopped = int(str(caught.value).split("stopped after round ")[1].split(";")[0])
    rows = fedmr.results.read_metrics(tmp_path / "r" / "metrics.csv")
    assert [int(r["round"]) for r in rows] == [stopped] and rows[0]["clients"] == 0


def test_max_rounds_without_update_zero_lets_such_a_run_finish(user):
    import importlib

    mod = importlib.import_module(user)
    result = fedmr.run({**API_SMALL, "rounds": 7, "max_rounds_without_update": 0}, model=mod.NaNOut, data=mod.blobs(),
                       progress=False)
    assert len(result.rows) == 7 and all(r["clients"] == 0 for r in result.rows)


def test_max_rounds_without_update_must_not_be_negative():
    with pytest.raises(ConfigError, match="'max_rounds_without_update' must be 0 .never stop. or positive"):
        load_config(None, ["max_rounds_without_update=-1"])


# ---- 3b: a dropout rate that leaves no client --------------------------------------------------------
@pytest.mark.parametrize("rate, k, refused", [(0.95, 5, True), (0.9, 5, True), (0.89, 5, False), (0.5, 1, True),
                                              (0.49, 1, False), (0.95, 10, True), (0.94, 10, False)])
def test_a_dropout_rate_that_drops_every_selected_client_is_refused(rate, k, refused):
    """dropped_clients() drops round(rate * K) of the K selected clients, so a rate of 1 - 0.5/K or
    more drops them all (0.9 with K = 5, 0.5 with K = 1)."""
    from fedmr.engine.simulator import dropped_clients

    settings = [f"dropout_rate={rate}", f"clients_per_round={k}", "num_clients=20"]
    if refused:
        with pytest.raises(ConfigError, match=f"drops round.* all {k} clients selected each round, so none would train"):
            load_config(None, settings)
        assert len(dropped_clients(1, 0, list(range(k)), rate)) == k
    else:
        load_config(None, settings)
        assert len(dropped_clients(1, 0, list(range(k)), rate)) < k


def test_the_cli_and_api_refuse_such_a_rate_in_one_line(capsys, tmp_path):
    argv = ["run", "--quiet", "--out", str(tmp_path / "r"), "--set", "dropout_rate=0.95", "--set", "clients_per_round=5",
            "--set", "num_clients=20"]
    assert main(argv) == 2
    assert "with clients_per_round = 5 it must be below 0.9" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()
    with pytest.raises(ConfigError, match="must be below 0.9"):
        fedmr.run({"dropout_rate": 0.95, "clients_per_round": 5, "num_clients": 20})


# ---- 3c: a partition file for another data set ---------------------------------------------------------
def _partition_file(path, parts, dataset="digits"):
    doc = {"dataset": dataset, "num_users": len(parts), "train_data": {str(i): p for i, p in enumerate(parts)}}
    path.write_text(json.dumps(doc))
    return path


def test_a_partition_file_written_for_another_data_set_is_refused(user, tmp_path, capsys, caplog):
    """A digits partition (its indices < 200, "dataset": "digits") on a 300-sample loader: refused by
    name; the same indices recorded for this loader but covering 200 of its 300 samples: refused by
    size; with partition_file_check = false it runs, with a warning."""
    parts = [list(range(i, 200, 4)) for i in range(4)]
    digits_file = _partition_file(tmp_path / "digits.json", parts)
    ours = _partition_file(tmp_path / "ours.json", parts, f"{user}:bigger")
    base = ["run", "--quiet", *SMALL, *plugin_args(user, "bigger"), "--set", "partition=\"file\""]
    assert main([*base, "--out", str(tmp_path / "a"), "--set", f"partition_file=\"{digits_file}\""]) == 2
    line = one_error_line(capsys)
    assert f"was written for data set 'digits', this run's is '{user}:bigger'" in line, line
    assert "set partition_file_check = false" in line
    assert main([*base, "--out", str(tmp_path / "b"), "--set", f"partition_file=\"{ours}\""]) == 2
    line = one_error_line(capsys)
    assert "gives its clients 200 samples, but the training set holds 300" in line, line
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        assert main([*base, "--out", str(tmp_path / "c"), "--set", f"partition_file=\"{ours}\"",
                     "--set", "partition_file_check=false"]) == 0
    assert any("used all the same (partition_file_check = false)" in r.getMessage() for r in caplog.records)


def test_the_api_refuses_it_too_and_a_whole_file_of_this_data_set_passes(tmp_path):
    x = np.random.default_rng(0).normal(size=(40, 3)).astype("float32")
    y = np.arange(40) % 2
    half = _partition_file(tmp_path / "half.json", [list(range(0, 20, 2)), list(range(1, 20, 2))], "python-arrays")
    with pytest.raises(PartitionError, match="gives its clients 20 samples, but the training set holds 40"):
        fedmr.run({**API_SMALL, "num_clients": 2, "partition": "file", "partition_file": str(half)},
                  data=(x, y, x, y), progress=False)
    whole = _partition_file(tmp_path / "whole.json", [list(range(0, 40, 2)), list(range(1, 40, 2))], "python-arrays")
    fedmr.run({**API_SMALL, "rounds": 1, "num_clients": 2, "partition": "file", "partition_file": str(whole)},
              data=(x, y, x, y), progress=False)


# ---- 3d: a model with nothing to train ---------------------------------------------------------------
def test_a_model_without_trainable_parameters_is_one_line_before_round_one(user, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "--quiet", "--out", str(out), *SMALL, *plugin_args(user, model="frozen")]) == 2
    line = one_error_line(capsys)
    assert f"config key 'model': {user}:frozen has no trainable parameters" in line, line
    assert not out.exists()


def test_the_api_says_the_same(user):
    import importlib

    mod = importlib.import_module(user)
    with pytest.raises(PluginError, match="has no trainable parameters"):
        fedmr.run(API_SMALL, model=mod.frozen, data=mod.blobs(), progress=False)


# ---- 3e: labels that are mostly absent classes ---------------------------------------------------------
def test_one_huge_label_is_refused_instead_of_a_million_outputs(user, tmp_path, capsys):
    """The rule: refused when more than 1000 classes have no sample and they outnumber those with
    one more than ten times (labels 0, 1, 2 and 999999: 999996 absent, 4 present)."""
    out = tmp_path / "r"
    assert main(["run", "--quiet", "--out", str(out), *SMALL, *plugin_args(user, "huge_label")]) == 2
    line = one_error_line(capsys)
    assert "the labels run to 999999, so the model would have 1000000 outputs, but only 4 classes have samples" in line
    assert "number the classes 0..3" in line and not out.exists()


@pytest.mark.parametrize("largest, refused", [(1003, False), (1004, True), (99, False)])
def test_the_absent_class_rule_at_its_edges(largest, refused):
    """Three present classes plus ``largest``: 4 present, ``largest - 3`` absent; refused past 1000 absent."""
    x = np.zeros((8, 2), "float32")
    y = np.array([0, 1, 2, largest, 0, 1, 2, largest])
    data = fedmr.data.dataset_from_arrays("data=", (x, y, x, y), "t")
    if refused:
        with pytest.raises(DataError, match="only 4 classes have samples"):
            fedmr.data.check_trainable(data)
    else:
        fedmr.data.check_trainable(data)  # warns of the absent classes, as before


# ---- 3f: an option of an algorithm that is not run -------------------------------------------------------
@pytest.mark.parametrize("settings, runs, warned", [
    (["fedprox.mu=0.1"], ["fedmr"], ["fedprox"]),
    (["fedmr.block_fraction=0.5", "algorithm=\"fedavg\""], ["fedavg"], ["fedmr"]),
    (["fedprox.mu=0.1"], ["fedavg", "fedprox"], []),  # compare runs fedprox
    (["fedmr.block_fraction=0.5"], ["fedmr"], []),
    ([], ["fedavg"], []),  # every section at its defaults, as config.toml records them: nothing to say
])
def test_an_option_of_an_algorithm_not_run_is_a_warning(settings, runs, warned, caplog):
    cfg = load_config(None, settings)
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        assert warn_unused_sections(cfg, runs) == warned
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == len(warned)
    if warned:
        assert "has no effect: it is an option of algorithm" in messages[0] and warned[0] in messages[0]


def test_the_cli_warns_once_for_run_and_compare(user, tmp_path, caplog):
    argv = ["run", "--quiet", "--out", str(tmp_path / "r"), *SMALL, "--set", "rounds=1", *plugin_args(user),
            "--set", "fedprox.mu=0.1"]
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        assert main(argv) == 0
    said = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    assert said == ["fedprox.mu = 0.1 has no effect: it is an option of algorithm fedprox, which this run does not "
                    "use (it runs fedmr)"]
    caplog.clear()
    argv = ["compare", "--quiet", "--out", str(tmp_path / "c"), *SMALL, "--set", "rounds=1", *plugin_args(user),
            "--algorithms", "fedavg,fedprox", "--set", "fedprox.mu=0.1"]
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        assert main(argv) == 0
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


def test_the_api_warns_too(user, caplog):
    import importlib

    mod = importlib.import_module(user)
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        fedmr.run({**API_SMALL, "rounds": 1, "algorithm": "fedavg", "fedmr": {"block_fraction": 0.5}}, model=mod.mlp,
                  data=mod.blobs(), progress=False)
    assert sum("fedmr.block_fraction = 0.5 has no effect" in r.getMessage() for r in caplog.records) == 1


pytestmark = pytest.mark.usefixtures("one_torch_thread")
