"""Plug-ins by import string: a user's model, data set and algorithm run through the CLI (PYTHONPATH, as a
user runs them), compare, --resume and the Flower run config; every bad plug-in is one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from plugin_module import write_user_module

from fedmr.cli import main
from fedmr.config import load_config, read_toml

MOD = "fedmr_user_plugins"  # a name no other test uses, so sys.modules holds one version of it
SMALL = ["num_clients=10", "clients_per_round=5", "rounds=10", "eval_every=5", "local_epochs=1", "partition=iid"]


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    return write_user_module(tmp_path_factory.mktemp("user"), MOD)


@pytest.fixture
def on_path(user_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(user_dir))
    return user_dir


def fedmr_cli(user_dir: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(user_dir)}
    return subprocess.run([sys.executable, "-m", "fedmr.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=600)


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def summary(folder: Path) -> dict:
    return json.loads((folder / "summary.json").read_text())


@pytest.mark.parametrize("algorithm", ["fedavg", "fedmr"])
def test_cli_trains_a_user_mlp_on_user_tabular_data(user_dir, tmp_path, algorithm):
    out = tmp_path / algorithm
    proc = fedmr_cli(user_dir, "run", "--quiet", "--out", str(out),
                     *sets(f"model={MOD}:mlp", f"dataset={MOD}:blobs", f"algorithm={algorithm}", *SMALL), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = summary(out)
    assert s["model"] == f"{MOD}:mlp" and s["dataset"] == f"{MOD}:blobs"
    assert s["final_accuracy"] > 0.8, s  # 4 classes: chance is 0.25


def test_cli_trains_a_gru_on_token_sequences_under_fedmr_and_resumes(user_dir, tmp_path):
    out = tmp_path / "gru"
    settings = [f"model={MOD}:GRUNet", f"dataset={MOD}:tokens", "lr=0.1", "local_epochs=2", "num_clients=10",
                "clients_per_round=5", "partition=iid", "eval_every=5"]
    proc = fedmr_cli(user_dir, "run", "--quiet", "--out", str(out), *sets(*settings, "rounds=10"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert read_toml(out / "config.toml")["model"] == f"{MOD}:GRUNet"
    proc = fedmr_cli(user_dir, "run", "--quiet", "--resume", str(out), *sets("rounds=20"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    s = summary(out)
    assert s["rounds"] == 20 and s["final_accuracy"] > 0.7, s  # 4 classes: chance is 0.25


def test_a_user_algorithm_with_its_own_section_in_run_compare_and_resume(on_path, tmp_path, capsys):
    algo = f"{MOD}:ServerLR"
    base = [f"model={MOD}:mlp", f"dataset={MOD}:blobs", *SMALL]
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(out), *sets(*base, f"algorithm={algo}", f"{algo}.server_lr=0.8")]) == 0
    written = read_toml(out / "config.toml")
    assert written["algorithm"] == algo and written[algo] == {"server_lr": 0.8}
    assert summary(out)["final_accuracy"] > 0.8

    cmp = tmp_path / "cmp"
    variants = f"fedmr,{algo}@server_lr=0.5"
    assert main(["compare", "--quiet", "--algorithms", variants, "--out", str(cmp), *sets(*base, "rounds=5")]) == 0
    folder = cmp / f"{algo}_server_lr-0.5"
    assert read_toml(folder / "config.toml")[algo] == {"server_lr": 0.5}
    assert main(["compare", "--quiet", "--resume", str(cmp), *sets("rounds=10")]) == 0
    results = json.loads((cmp / "comparison.json").read_text())
    assert set(results) == {"fedmr", f"{algo}@server_lr=0.5"}
    assert all(r["rounds"] == 10 and r["final_accuracy"] > 0.6 for r in results.values()), results


def test_plugin_sections_parse_with_dotted_module_names(on_path):
    pkg = on_path / "fedmr_user_pkg"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "algos.py").write_text(f"from {MOD} import ServerLR\n")
    algo = "fedmr_user_pkg.algos:ServerLR"
    cfg = load_config(None, [f"algorithm={algo}", f"{algo}.server_lr=0.25"])
    assert cfg[algo] == {"server_lr": 0.25}
    assert load_config(None, [f"algorithm={algo}"])[algo] == {"server_lr": 1.0}  # defaults fill the section


def test_flower_run_config_takes_plugin_strings(on_path):
    pytest.importorskip("flwr")
    from fedmr.flower.task import split_run_config

    algo = f"{MOD}:ServerLR"
    run = split_run_config({"algorithm": algo, f"{algo}.server_lr": 0.5, "model": f"{MOD}:mlp",
                            "dataset": f"{MOD}:blobs", "num_clients": 10, "clients_per_round": 5})
    assert run.cfg[algo] == {"server_lr": 0.5} and run.cfg["model"] == f"{MOD}:mlp"


def test_user_model_falls_back_from_the_vectorized_path_with_one_logged_reason(on_path, tmp_path, caplog):
    args = ["run", "--quiet", "--out", str(tmp_path / "r"),
            *sets(f"model={MOD}:Branchy", f"dataset={MOD}:blobs", "vectorize=true", "workers=1",
                  *SMALL[:2], "rounds=2", "eval_every=1", "local_epochs=1", "partition=iid")]
    with caplog.at_level("INFO", logger="fedmr"):
        assert main(args) == 0
    reasons = [r.getMessage() for r in caplog.records if "cannot be trained batched" in r.getMessage()]
    assert len(reasons) == 1 and "vmap" in reasons[0]


def test_recurrent_models_take_the_vectorized_path_and_match_the_sequential_one(on_path, tmp_path):
    from fedmr.api import run

    cfg = {"model": f"{MOD}:GRUNet", "dataset": f"{MOD}:tokens", "num_clients": 10, "clients_per_round": 5,
           "rounds": 2, "eval_every": 1, "local_epochs": 1, "partition": "iid", "lr": 0.1, "workers": 1}
    batched = run({**cfg, "vectorize": True})
    plain = run({**cfg, "vectorize": False})
    for key, value in plain.final_state.items():
        assert torch.allclose(batched.final_state[key], value, atol=1e-4), key


# ---- bad plug-ins: one line, exit code 2 ------------------------------------------------------
BAD = [
    (["model=fedmr_no_such_module:f"], "config key 'model': cannot import module 'fedmr_no_such_module'"),
    ([f"model={MOD}_broken:f"], f"config key 'model': importing module '{MOD}_broken' failed: RuntimeError: half-written"),
    ([f"model={MOD}:nothing"], f"config key 'model': module '{MOD}' has no attribute 'nothing'"),
    ([f"model={MOD}:CONSTANT"], "config key 'model': '" + MOD + ":CONSTANT' is an int, not a function or class"),
    (["model=mine:"], "config key 'model': 'mine:' is not an import string"),
    ([f"model={MOD}:returns_int"], "returned an int, expected a torch.nn.Module"),
    ([f"model={MOD}:factory_raises"], "raised ValueError: no such layer size"),
    ([f"model={MOD}:wrong_output"], "gives output of shape (2, 5) on a batch of 2; expected (batch, num_classes) = (2, 4)"),
    ([f"model={MOD}:flat_output"], "gives output of shape (2,) on a batch of 2"),
    ([f"dataset={MOD}:CONSTANT"], "config key 'dataset': '" + MOD + ":CONSTANT' is an int, not a function or class"),
    ([f"dataset={MOD}:nothing"], f"config key 'dataset': module '{MOD}' has no attribute 'nothing'"),
    ([f"dataset={MOD}:three_tuple"],
     "config key 'dataset': the loader returned a 3-tuple, expected (train_x, train_y, test_x, test_y)"),
    ([f"dataset={MOD}:strings"], "config key 'dataset': train_y is a list, expected a torch.Tensor or numpy array"),
    ([f"dataset={MOD}:float_labels"],
     "config key 'dataset': train_y has dtype torch.float64, expected integer class labels 0..C-1"),
    ([f"dataset={MOD}:negative_labels"], "config key 'dataset': labels must be integer classes 0..C-1, found -1"),
    ([f"dataset={MOD}:shapes_differ"], "config key 'dataset': train and test samples differ in shape: (20,) vs (19,)"),
    ([f"dataset={MOD}:loader_raises"], "the loader '" + MOD + ":loader_raises' raised OSError: disk not mounted"),
    ([f"algorithm={MOD}:NotAnAlgorithm"],
     "config key 'algorithm': '" + MOD + ":NotAnAlgorithm' is class NotAnAlgorithm, not a subclass of fedmr.Algorithm"),
    ([f"algorithm={MOD}:mlp"], "is a function, not a subclass of fedmr.Algorithm"),
    ([f"algorithm={MOD}:nothing"], f"config key 'algorithm': module '{MOD}' has no attribute 'nothing'"),
    ([f"{MOD}:nothing.x=1"], f"config section '{MOD}:nothing': module '{MOD}' has no attribute 'nothing'"),
    ([f"algorithm={MOD}:ServerLR", f"{MOD}:ServerLR.nope=1"], f"unknown config key '{MOD}:ServerLR.nope'"),
    ([f"algorithm={MOD}:ServerLR", f"{MOD}:ServerLR.server_lr=\"big\""],
     f"config key '{MOD}:ServerLR.server_lr' must be a number"),
    ([f"algorithm={MOD}:ServerLR", f"{MOD}:ServerLR.server_lr=2"],
     f"config key '{MOD}:ServerLR.server_lr' must be in (0.0, 1.0], got 2.0"),  # the section as the user wrote it
    (["model=vgg16"], "model 'vgg16' needs images, samples of shape (C, H, W); the data set's samples are (20,)"),
]


@pytest.mark.parametrize("settings, message", BAD, ids=[m[:40] for _, m in BAD])
def test_every_bad_plugin_is_one_error_line_and_exit_code_2(on_path, tmp_path, capsys, settings, message):
    defaults = {"model": f"model={MOD}:mlp", "dataset": f"dataset={MOD}:blobs"}
    given = {s.partition("=")[0] for s in settings}
    base = [v for k, v in defaults.items() if k not in given]
    code = main(["run", "--out", str(tmp_path / "r"), *sets(*base, *settings, *SMALL)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines() == [err.strip()] and err.startswith("fedmr: error: "), err
    assert message in err, err
    assert not (tmp_path / "r" / "metrics.csv").exists()


def test_a_bad_plugin_through_the_real_command_has_no_traceback(user_dir, tmp_path):
    proc = fedmr_cli(user_dir, "run", *sets(f"model={MOD}:wrong_output", f"dataset={MOD}:blobs", *SMALL), cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fedmr: error: config key 'model': ")


def test_data_info_and_partition_work_on_a_user_loader(on_path, tmp_path, capsys):
    assert main(["data", "info", f"{MOD}:tokens"]) == 0
    out = capsys.readouterr().out
    assert "train: 1200 samples, test: 300 samples, of shape (8,) torch.int64" in out
    assert "classes: 4" in out and "default model: mlp" in out
    part = tmp_path / "p.json"
    assert main(["partition", "--out", str(part), *sets(f"dataset={MOD}:blobs", "num_clients=10")]) == 0
    doc = json.loads(part.read_text())
    assert sum(len(v) for v in doc["train_data"].values()) == 1000
