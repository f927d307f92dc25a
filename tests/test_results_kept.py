"""No run loses or overwrites another's results (issue 28, items 2 and 4): runs started in the same
second get folders of their own, one folder is written by one run at a time, a finished run whose
checkpoints were deleted is never started over, refusals that need no data come before the data,
result files follow the umask, and a stop in the last round says what happened."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from test_new_user import one_error_line

import fedmr
from fedmr.cli import main
from fedmr.config import read_toml
from fedmr.errors import CheckpointError, ConfigError, PluginError
from fedmr.fileio import folder_lock

SMALL = ["--set", "rounds=2", "--set", "num_clients=4", "--set", "clients_per_round=2", "--set", "partition=\"iid\"",
         "--set", "local_epochs=1", "--set", "workers=1", "--set", "eval_every=1"]
API_SMALL = {"rounds": 2, "num_clients": 4, "clients_per_round": 2, "partition": "iid", "local_epochs": 1,
             "workers": 1, "eval_every": 1}


def blobs():
    rng = np.random.default_rng(0)
    y = np.arange(120) % 3
    x = (rng.normal(size=(120, 5)) + 2 * y[:, None]).astype("float32")
    return x, y, x[:30], y[:30]


def mlp(num_classes, input_shape):
    import torch

    return torch.nn.Sequential(torch.nn.Linear(input_shape[0], 8), torch.nn.ReLU(), torch.nn.Linear(8, num_classes))


# ---- 2a: runs started in the same second ------------------------------------------------------------
def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch, capsys):
    """Three `fedmr run` without --out at once, in threads, with the clock stopped (every one asks
    for the same runs/<name>-<time>): each claims a folder of its own and keeps its own results."""
    import fedmr.engine.output as output

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(output, "default_run_dir", lambda *parts: Path("runs") / "-".join((*parts, "20990101-000000")))
    codes: dict[int, int] = {}
    start = threading.Barrier(3)

    def one(seed: int) -> None:
        start.wait()
        codes[seed] = main(["run", "--quiet", *SMALL, "--set", f"seed={seed}"])

    threads = [threading.Thread(target=one, args=(seed,)) for seed in (1, 2, 3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert codes == {1: 0, 2: 0, 3: 0}
    out = capsys.readouterr().out
    folders = sorted(line.rsplit("-> ", 1)[1] for line in out.splitlines() if "-> " in line)
    assert folders == ["runs/fedmr-digits-20990101-000000", "runs/fedmr-digits-20990101-000000-2",
                       "runs/fedmr-digits-20990101-000000-3"]
    seeds = sorted(read_toml(tmp_path / f / "config.toml")["seed"] for f in folders)
    assert seeds == [1, 2, 3]  # each folder holds its own run
    for folder in folders:
        assert json.loads((tmp_path / folder / "summary.json").read_text())["rounds"] == 2
        assert not (tmp_path / folder / ".fedmr-lock").exists()


def test_a_folder_claimed_for_a_run_that_fails_is_removed_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--quiet", *SMALL, "--set", "dataset=\"nosuchmod:loader\""]) == 2  # before any folder
    assert main(["run", "--quiet", *SMALL, "--set", "num_clients=5000", "--set", "clients_per_round=2"]) == 2  # data too small
    assert "data set too small: 1438 training samples for 5000 clients" in capsys.readouterr().err
    assert list((tmp_path / "runs").iterdir()) == []  # the folder it claimed is gone again


def test_two_threads_writing_one_file_never_lose_a_temporary(tmp_path):
    """The temporary name carries the thread too: writers in one process never rename each other's file
    (the FileNotFoundError from os.replace that a checkpoint write once died of)."""
    from fedmr.fileio import atomic_write_text

    target = tmp_path / "round-000001.json"
    errors: list[BaseException] = []

    def write(text: str) -> None:
        try:
            for _ in range(100):
                atomic_write_text(target, text * 1000)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(c,)) for c in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_text() in {c * 1000 for c in "abcd"}
    assert not list(tmp_path.glob("*.tmp"))


def test_a_folder_another_run_is_writing_is_refused(tmp_path, capsys, no_data_loading):
    """While one run holds a folder (its lock), a second run into it, from the CLI or the API, is
    refused in one line before any data are loaded, and the lock is gone when the first ends."""
    out = tmp_path / "r"
    out.mkdir()
    with folder_lock(out) as held:
        assert held
        assert main(["run", "--quiet", "--out", str(out), *SMALL]) == 2
        assert "is being written by another fedmr run right now" in one_error_line(capsys)
        with pytest.raises(ConfigError, match="being written by another fedmr run"):
            fedmr.run(API_SMALL, out=out)
        with pytest.raises(ConfigError, match="being written by another fedmr run"):
            fedmr.compare(API_SMALL, ["fedavg"], out=out)
    assert list(out.iterdir()) == []
    with folder_lock(out) as held:
        assert held


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_killed_runs_lock_dies_with_it_not_with_its_forked_workers(tmp_path):
    """A run's round workers are forked while it holds its folder's lock; SIGKILL on the run alone frees the
    folder at once, although a worker is still alive (it closed its inherited copy of the lock)."""
    out = tmp_path / "r"
    out.mkdir()
    holder = ("import os, sys, time\nfrom pathlib import Path\nfrom fedmr.fileio import folder_lock\n"
              "with folder_lock(Path(sys.argv[1])) as held:\n"
              "    assert held\n"
              "    if os.fork() == 0:\n"
              "        print(os.getpid(), flush=True)  # said by the worker: its fork hooks have run\n"
              "        time.sleep(600)\n"
              "        os._exit(0)\n"
              "    time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", holder, str(out)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    worker = int(proc.stdout.readline())
    try:
        with folder_lock(out) as held:
            assert not held  # the run holds it
        proc.kill()
        proc.wait(60)
        os.kill(worker, 0)  # the worker is alive...
        with folder_lock(out) as held:
            assert held  # ...and the folder is free
    finally:
        proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker, signal.SIGKILL)


def test_concurrent_api_runs_into_one_folder_leave_one_run(tmp_path):
    out = tmp_path / "r"
    outcomes: list[str] = []
    start = threading.Barrier(2)

    def one(seed: int) -> None:
        start.wait()
        try:
            fedmr.run({**API_SMALL, "seed": seed}, model=mlp, data=blobs(), out=out, progress=False)
            outcomes.append("ran")
        except ConfigError as exc:
            outcomes.append(str(exc))

    threads = [threading.Thread(target=one, args=(seed,)) for seed in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert len(outcomes) == 2 and outcomes.count("ran") == 1, outcomes
    refused = next(o for o in outcomes if o != "ran")
    assert "being written by another fedmr run" in refused or "already holds a run" in refused, outcomes
    assert json.loads((out / "summary.json").read_text())["rounds"] == 2


# ---- 2b: a finished run without its checkpoints ------------------------------------------------------------
@pytest.fixture
def finished_run(tmp_path):
    out = tmp_path / "r"
    fedmr.run(API_SMALL, model=mlp, data=blobs(), out=out, progress=False)
    return out


def _files(out: Path) -> dict[str, bytes]:
    return {name: (out / name).read_bytes() for name in ("metrics.csv", "summary.json", "model.safetensors", "config.toml")}


def test_a_finished_run_without_checkpoints_is_never_started_over(finished_run, capsys, monkeypatch):
    import shutil

    import fedmr.engine.experiment as experiment

    before = _files(finished_run)
    shutil.rmtree(finished_run / "checkpoints")
    monkeypatch.setattr(experiment, "load_dataset", lambda cfg: pytest.fail("data loaded before the refusal"))
    assert main(["run", "--quiet", "--resume", str(finished_run), "--set", "rounds=6"]) == 2
    line = one_error_line(capsys)
    assert f"cannot resume {finished_run}: it holds a finished run (summary.json) but no checkpoint" in line, line
    assert "a finished run is never overwritten" in line
    with pytest.raises(CheckpointError, match="holds a finished run"):
        fedmr.run({**API_SMALL, "rounds": 6}, model=mlp, data=blobs(), out=finished_run, resume=True)
    assert _files(finished_run) == before


def test_a_resume_refused_for_a_changed_config_is_said_before_the_data(finished_run, capsys, no_data_loading):
    before = _files(finished_run)
    assert main(["run", "--quiet", "--resume", str(finished_run), "--set", "lr=0.5"]) == 2
    line = one_error_line(capsys)
    assert "belongs to a different run: config key 'lr' was 0.01, now 0.5" in line, line
    assert main(["run", "--quiet", "--resume", str(finished_run), "--set", "rounds=1"]) == 2
    assert "is after round 2 but rounds is 1" in one_error_line(capsys)
    with pytest.raises(CheckpointError, match="config key 'lr' was 0.01, now 0.5"):
        fedmr.run({**API_SMALL, "lr": 0.5}, model=mlp, data=blobs(), out=finished_run, resume=True)
    assert _files(finished_run) == before


def test_tensorboard_without_its_package_is_said_before_the_data_and_leaves_no_folder(tmp_path, capsys, monkeypatch,
                                                                                     no_data_loading):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if the extra were not installed
    out = tmp_path / "new" / "r"
    assert main(["run", "--quiet", "--out", str(out), *SMALL, "--set", "tensorboard=true"]) == 2
    assert "needs the optional tensorboard package" in one_error_line(capsys)
    assert not (tmp_path / "new").exists()
    with pytest.raises(ConfigError, match="needs the optional tensorboard package"):
        fedmr.run({**API_SMALL, "tensorboard": True}, out=out)
    assert main(["compare", "--quiet", "--out", str(out), *SMALL, "--set", "tensorboard=true",
                 "--algorithms", "fedavg"]) == 2
    assert "needs the optional tensorboard package" in one_error_line(capsys)
    assert not (tmp_path / "new").exists()


# ---- 4: file modes, progress, a stop in the last round -------------------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_result_files_and_checkpoint_tensors_follow_the_umask(tmp_path, mask):
    old = os.umask(mask)
    try:
        fedmr.run(API_SMALL, model=mlp, data=blobs(), out=tmp_path / "r", progress=False)
    finally:
        os.umask(old)
    want = 0o666 & ~mask
    files = [tmp_path / "r" / "model.safetensors", *(tmp_path / "r" / "checkpoints").glob("*.safetensors"),
             tmp_path / "r" / "metrics.csv", tmp_path / "r" / "summary.json"]
    assert len(files) == 5
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(want) for f in files}


def test_without_a_terminal_the_cli_logs_lines_instead_of_drawing_bars(tmp_path, capsys):
    assert not sys.stderr.isatty()  # as under pytest, a log file or a pipe
    assert main(["run", "--out", str(tmp_path / "r"), *SMALL]) == 0  # no --quiet
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "[fedmr] round 1/2 accuracy" in err and "[fedmr] round 2/2 accuracy" in err


@pytest.mark.parametrize("at_round, code", [(2, 0), (1, 128 + signal.SIGINT)])
def test_a_stop_in_the_last_round_finishes_the_run_and_says_so(tmp_path, capsys, monkeypatch, at_round, code):
    """SIGINT while round 2 of 2 runs: the round and the results are finished, the run is complete, and
    the message says so (exit 0); SIGINT in round 1 of 2 stops it after a checkpoint, as before."""
    from fedmr.engine.recorder import Recorder

    record = Recorder.record

    def interrupted(self, done, *args, **kwargs):
        if done == at_round:
            os.kill(os.getpid(), signal.SIGINT)  # lands in the simulator's handler, in this (main) thread
        return record(self, done, *args, **kwargs)

    monkeypatch.setattr(Recorder, "record", interrupted)
    out = tmp_path / "r"
    assert main(["run", "--quiet", "--out", str(out), *SMALL]) == code
    err = capsys.readouterr().err
    if at_round == 2:
        assert "SIGINT in the run's last round: finishing it and writing the results" in err, err
        assert "fedmr: SIGINT came in the last round, so the run was finished rather than stopped" in err
        assert json.loads((out / "summary.json").read_text())["rounds"] == 2
    else:
        assert "SIGINT: finishing this round and writing a checkpoint" in err
        assert "stopped after round 1 of 2" in err and not (out / "summary.json").exists()


# ---- 4: API wording -----------------------------------------------------------------------------------
def test_arrays_of_the_wrong_count_are_named_as_arrays_not_a_loader():
    x, y, _, _ = blobs()
    with pytest.raises(PluginError, match=r"^data=: got a 2-tuple, expected \(train_x, train_y, test_x, test_y\)$"):
        fedmr.run(API_SMALL, data=(x, y))
    with pytest.raises(PluginError, match=r"data=: the loader .*_lambda_ returned a 2-tuple"):
        fedmr.run(API_SMALL, data=lambda: (x, y))


def test_a_lambda_model_factory_warns_that_it_cannot_be_resumed_from_its_folder(caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="fedmr"):
        fedmr.run({**API_SMALL, "rounds": 1}, model=lambda num_classes, shape: mlp(num_classes, shape), data=blobs(),
                  progress=False)
    said = [r.getMessage() for r in caplog.records if "has no import string" in r.getMessage()]
    assert len(said) == 1 and "model=" in said[0] and "a lambda" in said[0] and "cannot be resumed" in said[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        fedmr.run({**API_SMALL, "rounds": 1}, model=mlp, data=blobs(), progress=False)  # a module-level function
    assert not [r for r in caplog.records if "has no import string" in r.getMessage()]


def test_a_too_small_data_set_suggests_a_client_count_that_fits_clients_per_round():
    x = np.random.default_rng(0).normal(size=(12, 3)).astype("float32")
    y = np.arange(12) % 2
    with pytest.raises(fedmr.errors.PartitionError,
                       match="supports --set num_clients=1 --set clients_per_round=1 "):
        fedmr.run({"num_clients": 100, "clients_per_round": 5}, data=(x, y, x, y))
    with pytest.raises(fedmr.errors.PartitionError, match=r"at most 12: --set num_clients=12 --set clients_per_round=12\)"):
        fedmr.run({"num_clients": 100, "clients_per_round": 20, "partition": "iid"}, data=(x, y, x, y))
    with pytest.raises(fedmr.errors.PartitionError, match=r"at most 12: --set num_clients=12\)"):
        fedmr.run({"num_clients": 100, "clients_per_round": 5, "partition": "iid"}, data=(x, y, x, y))


pytestmark = pytest.mark.usefixtures("one_torch_thread")
