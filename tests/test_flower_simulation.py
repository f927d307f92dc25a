"""`flwr run` on Flower's simulation engine (Ray), 4 SuperNodes hosting 8 clients: FedMR sends
each selected client a different model and matches the in-process simulator; FedAvg sends one
model to all and survives a crashing and a NaN-returning client.  Nothing listens outside loopback."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'fedmr[flower]')")
pytestmark = pytest.mark.slow  # starts Ray / Flower processes: minutes on 2 cores

import torch  # noqa: E402
from plugin_module import write_user_module  # noqa: E402
from test_flower_helpers import (  # noqa: E402
    APP_DIR,
    START_TIMEOUT,
    FlowerProcesses,
    flower_env,
    flwr_run,
    free_port,
    wait_for,
    write_connection,
)

from fedmr.config import load_config, read_toml  # noqa: E402
from fedmr.engine import run_experiment  # noqa: E402

USER_MOD = "fedmr_user_flower"
SMALL = {"num_clients": 8, "clients_per_round": 4, "rounds": 3, "local_epochs": 1, "eval_every": 1, "seed": 3}


def run_config(out, **extra) -> str:
    items = {**SMALL, **extra}
    # a key holding ':' (a plug-in's section) is quoted, as TOML and Flower's --run-config need
    parts = [f"{json.dumps(k) if ':' in k else k}={json.dumps(v)}" for k, v in items.items()]
    return " ".join(parts + [f'flower.out="{out}"', "flower.log_messages=true"])


def metrics(out) -> list[dict[str, str]]:
    with (out / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def sent(out) -> dict[int, list[dict]]:
    rounds: dict[int, list[dict]] = {}
    for line in (out / "messages.jsonl").read_text().splitlines():
        item = json.loads(line)
        rounds.setdefault(item["round"], []).append(item)
    return rounds


@pytest.fixture(scope="module")
def simulation(tmp_path_factory):
    """One SuperLink in simulation mode on 127.0.0.1; every process it starts is stopped after."""
    work = tmp_path_factory.mktemp("flower-sim")
    env = flower_env(work / "flwr-home")
    # a user's own model, loader and algorithm, importable in every Flower process as an installed module is
    user = write_user_module(work / "user-code", USER_MOD)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(user), env.get("PYTHONPATH", "")]))
    port = free_port()
    write_connection(work / "flwr-home", "sim", port)
    procs = FlowerProcesses(work, env)
    try:
        procs.start("superlink", "flower-superlink", "--insecure", "--simulation", "--host", "127.0.0.1",
                    "--port", str(port), "--disable-runtime-dependency-installation")
        wait_for(lambda: "Uvicorn running" in procs.log("superlink"), START_TIMEOUT, "the SuperLink")
        yield work, env, procs
    finally:
        procs.stop()
        assert not procs.alive(), f"processes left running: {procs.alive()}"


def flower_sim(simulation, name: str, app_dir=APP_DIR, **extra):
    work, env, _ = simulation
    out = work / name
    flwr_run(env, "sim", run_config(out, **extra), app_dir=app_dir,
             federation_config="num-supernodes=4 client-resources-num-cpus=1 init-args-num-cpus=2")
    assert (out / "summary.json").exists(), "the ServerApp did not finish"
    return out


@pytest.fixture(scope="module")
def simulator_fedmr(tmp_path_factory):
    """The same FedMR run in the in-process simulator: what every Flower FedMR run must reproduce."""
    # One thread, as Ray runs each ClientApp (num-cpus=1 sets OMP_NUM_THREADS=1): float32 convolution gradients are
    # summed in an order that depends on the thread count, and workers = "auto" gives 8+ core machines 2+ threads.
    settings = {**SMALL, "algorithm": "fedmr", "workers": 1}
    cfg = load_config(assignments=[f"{k}={json.dumps(v)}" for k, v in settings.items()])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_experiment(cfg, out_dir=tmp_path_factory.mktemp("simulator") / "fedmr", progress="none")
    finally:
        torch.set_num_threads(threads)


def assert_matches_simulator(out, reference) -> None:
    rows = metrics(out)
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    written = metrics(reference.out_dir)
    assert list(rows[0]) == list(written[0]), "the simulator's metrics.csv columns"
    for ours, theirs, theirs_written in zip(rows, reference.rows, written):
        assert float(ours["accuracy"]) == pytest.approx(theirs["accuracy"], abs=1e-6)
        assert float(ours["loss"]) == pytest.approx(theirs["loss"], rel=1e-4)
        assert int(ours["clients"]) == theirs["clients"] == 4
        assert float(ours["pool_cosine"]) == pytest.approx(theirs["pool_cosine"], abs=1e-6)
        for key in ("down_mb", "up_mb", "down_client_state_mb", "down_total_mb", "up_total_mb"):  # the arrays sent
            # exact, as written: metrics.csv keeps 6 digits (0.941559), the simulator's rows the full 0.941558837890625
            assert ours[key] == theirs_written[key], key


def test_fedmr_sends_different_models_and_matches_the_simulator(simulation, simulator_fedmr):
    out = flower_sim(simulation, "fedmr", algorithm="fedmr")
    for name in ("config.toml", "partition.json", "partition_summary.json", "metrics.csv", "summary.json"):
        assert (out / name).exists(), name
    round2 = sent(out)[2]
    assert len(round2) == 4 and len({m["sha256"] for m in round2}) == 4, "FedMR must send 4 different models"
    assert len({m["client"] for m in round2}) == 4

    assert_matches_simulator(out, simulator_fedmr)
    assert (out / "partition.json").read_text() == (simulator_fedmr.out_dir / "partition.json").read_text()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["engine"] == "flower"
    assert summary["final_accuracy"] == pytest.approx(simulator_fedmr.summary["final_accuracy"])


def test_fedavg_sends_one_model_and_survives_failing_clients(simulation):
    out = flower_sim(simulation, "fedavg", algorithm="fedavg", **{"flower.faults": "2:0:crash,3:1:nan"})
    round2 = sent(out)[2]
    assert len(round2) == 4 and len({m["sha256"] for m in round2}) == 1, "FedAvg must send one model to all"
    rows = metrics(out)
    assert [int(r["round"]) for r in rows] == [1, 2, 3], "a failing client must not stop the run"
    assert (rows[0]["clients"], rows[0]["rejected"]) == ("4", "0")
    assert (rows[1]["clients"], rows[1]["rejected"]) == ("3", "1")  # the crash
    assert (rows[2]["clients"], rows[2]["rejected"]) == ("3", "1")  # the NaN model
    assert float(rows[2]["accuracy"]) > 0  # the average stayed finite


def test_a_flower_run_resumes_from_its_checkpoint(simulation, simulator_fedmr):
    """Two rounds, then `flower.resume` with rounds = 3: the metrics of one uninterrupted run (the
    simulator's, which the Flower run matches above), the third round sent as round 3."""
    out = flower_sim(simulation, "resumed", algorithm="fedmr", rounds=2)
    assert sorted(p.name for p in (out / "checkpoints").glob("*.json")) == ["round-000001.json", "round-000002.json"]
    flower_sim(simulation, "resumed", algorithm="fedmr", rounds=3, **{"flower.resume": True})
    assert_matches_simulator(out, simulator_fedmr)
    # rounds 1 and 2 were sent once: the second run went on from the checkpoint, it did not start over
    assert {r: len(m) for r, m in sent(out).items()} == {1: 4, 2: 4, 3: 4}
    assert json.loads((out / "summary.json").read_text())["rounds"] == 3
    assert (out / "model.safetensors").exists()


def test_plug_ins_by_import_string_run_on_flower(simulation):
    """model, dataset and algorithm named `module:attribute`, with the algorithm's own option: the
    ServerApp and every ClientApp resolve them, and the run learns the user's blobs.  Flower takes
    only run-config keys the app declares, so the option's section is added to the app's
    pyproject.toml, as docs/flower.md tells a user to."""
    algorithm = f"{USER_MOD}:ServerLR"
    work, _, _ = simulation
    app = work / "app-with-plugin"
    shutil.copytree(APP_DIR, app)
    with (app / "pyproject.toml").open("a") as fh:
        fh.write(f'\n[tool.flwr.app.config."{algorithm}"]\nserver_lr = 1.0\n')
    out = flower_sim(simulation, "plugins", app_dir=app, algorithm=algorithm, model=f"{USER_MOD}:mlp",
                     dataset=f"{USER_MOD}:blobs", **{f"{algorithm}.server_lr": 0.5})
    rows = metrics(out)
    assert [int(r["round"]) for r in rows] == [1, 2, 3]
    assert all((r["clients"], r["rejected"]) == ("4", "0") for r in rows)
    assert float(rows[-1]["accuracy"]) > 0.5  # four blobs: chance is 0.25
    cfg = read_toml(out / "config.toml")  # as written: this process cannot import the user's module
    assert (cfg["algorithm"], cfg["model"], cfg["dataset"]) == (algorithm, f"{USER_MOD}:mlp", f"{USER_MOD}:blobs")
    assert cfg[algorithm] == {"server_lr": 0.5}


def test_nothing_listened_outside_loopback(simulation):
    _, _, procs = simulation
    assert procs.listening, "the watcher saw no listening socket at all"
    assert procs.outside_loopback() == []
