"""`fedmr study run` on a tiny digits study: the listing, a SIGKILLed study that resumes to the numbers of
an uninterrupted run, reuse of an equal finished run, the refusals, --jobs 2 and the Ray path."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import textwrap
from pathlib import Path

import pytest
import torch
from test_resume_kill import _comparable, _kill, _start, _wait_for

from fedmr.cli import main

STUDY = """
[study]
title = "tiny"
output = "out/study"
reuse = [{reuse}]
report = "out/README.md"

[base]
dataset = "digits"
num_clients = 4
clients_per_round = 2
rounds = 6
eval_every = 2
local_epochs = 1
alpha = 0.5
workers = 1

[[grid]]
algorithm = ["fedavg", "fedmr"]
seed = [1]
{extra}
"""
CELLS = ("seed1-fedavg", "seed1-fedmr")
# the second cell as `fedmr run` settings (checkpoint_every differs: it does not change the numbers).  Not another
# workers setting: that changes the threads a client trains on, and float32 convolution gradients are summed in an
# order that depends on the thread count (1e-8 apart here), which the 6 digits of metrics.csv hide only by luck.
FEDMR_CELL = ["dataset=\"digits\"", "num_clients=4", "clients_per_round=2", "rounds=6", "eval_every=2",
              "local_epochs=1", "alpha=0.5", "algorithm=\"fedmr\"", "workers=1", "checkpoint_every=1"]


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread, monkeypatch):
    """Every run here trains on one thread, as the reference does: in this process, in the `fedmr study`
    subprocesses (OMP_NUM_THREADS), in --jobs 2's pool on 2 cores (one core each) and on Ray (--cpus-per-cell 1)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")


def _study(folder: Path, reuse: str = "", extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.toml"
    path.write_text(STUDY.format(reuse=reuse, extra=textwrap.dedent(extra)))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The fedmr cell run on its own with `fedmr run` (another checkpoint_every), in a folder named otherwise."""
    out = tmp_path_factory.mktemp("earlier") / "runs" / "fedmr-by-hand"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as every cell it is compared with (a module fixture runs before _one_thread)
    try:
        assert main(["run", "--quiet", "--out", str(out), *[a for s in FEDMR_CELL for a in ("--set", s)]]) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def test_killed_study_skips_finished_cells_and_resumes_the_interrupted_one(tmp_path, reference, monkeypatch, caplog,
                                                                           capsys):
    monkeypatch.chdir(tmp_path)
    _study(tmp_path)
    cells = [tmp_path / "out" / "study" / c for c in CELLS]
    # checkpoint writes slowed so the kill lands inside the second cell, after its first checkpoint: its 2 checkpoints
    # left, 4 pauses of 0.5 s, give the kill 2 s to land even if this process stalls on a loaded machine
    proc = _start(["study", "run", "study.toml", "--quiet"], tmp_path / "log1", delay=0.5)
    _wait_for(proc, lambda: (cells[1] / "checkpoints" / "round-000002.json").exists(), "the second cell's first checkpoint")
    _kill(proc)
    assert (cells[0] / "summary.json").exists() and not (cells[1] / "summary.json").exists()
    finished_at = (cells[0] / "metrics.csv").stat().st_mtime_ns

    assert main(["study", "run", "study.toml", "--dry-run"]) == 0
    rows = {line.split()[3]: line.split()[:3] for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert rows[CELLS[0]] == ["1", "done", "6/6"]
    assert rows[CELLS[1]][:2] == ["1", "partial"] and rows[CELLS[1]][2] != "0/6", rows  # resumes from its checkpoint
    caplog.set_level(logging.INFO, logger="fedmr")
    assert main(["study", "run", "study.toml", "--quiet"]) == 0
    assert (cells[0] / "metrics.csv").stat().st_mtime_ns == finished_at  # skipped, not run again
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    assert len(resumed) == 1 and CELLS[1] in resumed[0], resumed
    after = int(resumed[0].split("after round ")[1].split()[0])
    assert after >= 2  # lost at most the rounds since the last checkpoint
    assert _comparable(cells[1]) == _comparable(reference)  # the numbers of an uninterrupted run
    index = json.loads((tmp_path / "out" / "study" / "cells.json").read_text())
    assert [(c["name"], c["state"], c["folder"]) for c in index["cells"]] == [(n, "done", n) for n in CELLS]


def test_a_cell_with_a_checkpoint_runs_before_the_cells_not_started(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _study(tmp_path)
    started = tmp_path / "out" / "study" / CELLS[1]  # the second cell, 2 of its 6 rounds done
    settings = [s for s in FEDMR_CELL if not s.startswith("rounds=")] + ["rounds=2"]
    assert main(["run", "--quiet", "--out", str(started), *[a for s in settings for a in ("--set", s)]]) == 0
    (started / "summary.json").unlink()  # as a cell stopped at its checkpoint leaves it
    capsys.readouterr()
    assert main(["study", "run", "study.toml", "--quiet"]) == 0
    done = [line.split("] ")[1].split(":")[0] for line in capsys.readouterr().out.splitlines() if " done] " in line]
    assert done == [CELLS[1], CELLS[0]]


def test_sigterm_stops_a_study_at_a_checkpoint_with_the_command_that_continues(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _study(tmp_path)
    cell = tmp_path / "out" / "study" / CELLS[0]
    proc = _start(["study", "run", "study.toml", "--quiet"], tmp_path / "log", delay=0.3)
    _wait_for(proc, lambda: (cell / "checkpoints" / "round-000002.json").exists(), "the first checkpoint")
    assert _kill(proc, signal.SIGTERM) == 128 + signal.SIGTERM
    log = (tmp_path / "log").read_text()
    assert "continue with: fedmr study run study.toml" in log, log
    assert not (cell / "summary.json").exists() and (cell / "checkpoints").is_dir()


def test_dry_run_lists_cells_and_an_equal_finished_run_is_reused(tmp_path, reference, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _study(tmp_path, reuse=json.dumps(str(reference.parent)))
    assert main(["study", "run", "study.toml", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[3]: line.split() for line in out.splitlines()[2:-1]}
    assert rows["seed1-fedmr"][:3] == ["1", "reused", "6/6"] and rows["seed1-fedmr"][4] == str(reference)
    assert rows["seed1-fedavg"][:3] == ["1", "missing", "0/6"]
    assert out.splitlines()[-1] == "1 to run: fedmr study run study.toml"
    assert not (tmp_path / "out").exists()  # a dry run writes nothing
    (tmp_path / "out" / "study").mkdir(parents=True)  # a reused run beside the study's folder: shown without ".."
    (tmp_path / "out" / "study" / "cells.json").write_text(json.dumps(
        {"cells": [{"name": "seed1-fedmr", "state": "reused",
                    "folder": os.path.relpath(reference, tmp_path / "out" / "study")}]}))
    assert main(["study", "run", "study.toml", "--dry-run"]) == 0
    listed = {line.split()[3]: line.split()[4] for line in capsys.readouterr().out.splitlines()[2:-1]}
    assert ".." in os.path.relpath(reference, tmp_path / "out" / "study")
    assert os.path.samefile(listed["seed1-fedmr"], reference) and "study/.." not in listed["seed1-fedmr"]
    assert listed["seed1-fedmr"] == os.path.normpath(listed["seed1-fedmr"])
    shutil.rmtree(tmp_path / "out")

    assert main(["study", "run", "study.toml", "--quiet", "--only", "algorithm=fedmr"]) == 0
    assert not (tmp_path / "out" / "study" / "seed1-fedmr").exists()  # read in place, not rerun or copied
    index = json.loads((tmp_path / "out" / "study" / "cells.json").read_text())
    states = {c["name"]: (c["state"], c["folder"]) for c in index["cells"]}
    assert states["seed1-fedmr"] == ("reused", os.path.relpath(reference, tmp_path / "out" / "study"))
    assert states["seed1-fedavg"] == ("missing", "seed1-fedavg")


def test_only_selects_by_config_key_and_by_algorithm_option(tmp_path, monkeypatch, capsys):
    """--only seed=2 (a config key of the cell) and fedmr.first_stage_rounds=50 (a key of a section);
    repeated, every filter must hold; a key no cell has is one error line."""
    monkeypatch.chdir(tmp_path)
    _study(tmp_path, extra="""
        [[grid]]
        algorithm = ["fedavg", "fedmr@first_stage_rounds=50"]
        seed = [2, 3]
        """)

    def listed(*only: str) -> list[str]:
        assert main(["study", "run", "study.toml", "--dry-run", *[a for o in only for a in ("--only", o)]]) == 0
        return [line.split()[3] for line in capsys.readouterr().out.splitlines()[2:-1]]

    assert listed("seed=2") == ["seed2-fedavg", "seed2-fedmr_first_stage_rounds-50"]
    assert listed("seed=3", "algorithm=fedavg") == ["seed3-fedavg"]
    assert listed("alpha=0.5", "seed=1") == list(CELLS)
    assert listed("fedmr.first_stage_rounds=50") == ["seed2-fedmr_first_stage_rounds-50",
                                                     "seed3-fedmr_first_stage_rounds-50"]
    assert main(["study", "run", "study.toml", "--dry-run", "--only", "colour=red"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "fedmr: error: --only colour=...: no such config key (or name, priority, section, state)"]


BAD = [
    ("[base]\nlr = 0.0\n", "[base]: config key 'lr' must be positive"),
    ("[base]\nlearning_rate = 0.1\n", "[base]: unknown config key 'learning_rate'"),
    ("[study]\noutputs = 'x'\n", "unknown key 'study.outputs'"),
    ("[[grid]]\nalpah = [0.1]\n", "unknown config key 'alpah'"),
    ("[[grid]]\nalpha = [0.5, -1.0]\n", "cell alpha = -1.0: config key 'alpha' must be positive"),
    ("[[grid]]\nalgorithm = [\"fedmr@first_stage=5\"]\n", "unknown config key 'fedmr.first_stage'"),
    ("[[grid]]\nalgorithm = [\"fedmx\"]\n", "unknown algorithm 'fedmx'"),
    ("[[grid]]\nmodel = [\"resnet21\"]\n", "unknown model 'resnet21'"),
    ("[[grid]]\nseed = 3\n", "'seed' must be a non-empty list"),
    ("[[cell]]\nseed = [3]\n", "a [[cell]] takes single values"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_study_files_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(tmp_path)
    text = STUDY.format(reuse="", extra="")
    if extra.startswith("[base]"):
        text = text.replace("[base]\n", extra)
    elif extra.startswith("[study]"):
        text = text.replace("[study]\n", extra)
    else:
        text += extra
    (tmp_path / "study.toml").write_text(text)
    assert main(["study", "run", "study.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmr: error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_study_folder_of_another_base_config_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _study(tmp_path)
    study = tmp_path / "out" / "study"
    study.mkdir(parents=True)
    (study / "base.toml").write_text('dataset = "digits"\nnum_clients = 4\nclients_per_round = 2\neval_every = 2\n'
                                     'local_epochs = 1\nalpha = 0.5\nlr = 0.05\n')
    for argv in (["study", "run", "study.toml"], ["study", "run", "study.toml", "--dry-run"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "holds runs of a different base config ('lr' was 0.05, now 0.01)" in err and len(err.splitlines()) == 1
    (study / "base.toml").unlink()
    (study / "seed1-fedavg").mkdir()
    (study / "seed1-fedavg" / "config.toml").write_text('dataset = "digits"\nalgorithm = "fedavg"\nseed = 7\n')
    assert main(["study", "run", "study.toml"]) == 2
    assert "holds a run of a different config ('alpha' was 0.1, now 0.5)" in capsys.readouterr().err
    assert sorted(p.name for p in study.iterdir()) == ["seed1-fedavg"]


@pytest.mark.slow  # two fresh interpreters (spawn) on top of the cells
def test_jobs_two_runs_cells_side_by_side_with_the_same_numbers(tmp_path, reference, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _study(tmp_path)
    assert main(["study", "run", "study.toml", "--jobs", "2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " done] " in line]
    assert len(lines) == 2 and lines[-1].endswith("0 cells left, none remaining"), lines
    assert any("1 cell left, about" in line for line in lines)
    study = tmp_path / "out" / "study"
    assert _comparable(study / "seed1-fedmr") == _comparable(reference)
    assert all((study / c / "summary.json").exists() for c in CELLS)


@pytest.mark.slow
def test_ray_runs_the_cells_as_tasks_on_a_local_cluster(tmp_path, reference, monkeypatch, capsys):
    pytest.importorskip("ray")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.chdir(tmp_path)
    _study(tmp_path)
    assert main(["study", "run", "study.toml", "--ray", "local", "--only", "algorithm=fedmr"]) == 0
    import ray

    assert not ray.is_initialized()  # the command shut down the instance it started
    assert "[1 done] seed1-fedmr: accuracy" in capsys.readouterr().out
    assert _comparable(tmp_path / "out" / "study" / "seed1-fedmr") == _comparable(reference)


def test_which_config_differences_count_when_matching_a_finished_run():
    from fedmr.config import default_config
    from fedmr.study.spec import difference

    cell = default_config()
    cell.update(algorithm="fedmr", dataset="digits", alpha=0.5)
    older = {k: v for k, v in cell.items() if k not in ("dropout_rate", "checkpoint_every")}  # keys added later
    assert difference(older, cell) is None
    how = {**cell, "workers": 2, "device": "cpu", "vectorize": True, "cache_dir": "/tmp/c", "data_dir": "elsewhere",
           "checkpoint_every": 5, "rounds": 7, "fedprox": {"mu": 0.5}}  # how/where it ran; another algorithm's options
    assert difference(how, cell) is None
    assert difference({**cell, "lr": 0.05}, cell) == "'lr' was 0.05, now 0.01"
    assert difference({**cell, "fedmr": {"first_stage_rounds": 50, "block_fraction": 0.0}}, cell) == \
        "'fedmr.first_stage_rounds' was 50, now 0"
    assert difference({**cell, "client_timeout": 30.0}, cell) == "'client_timeout' was 30.0, now 0.0"  # can drop clients
    assert difference({**cell, "algorithm": "fedavg"}, cell) == "'algorithm' was 'fedavg', now 'fedmr'"


def test_a_parked_checkpoint_resumes_the_cell_on_another_machine(tmp_path, reference, monkeypatch, capsys, caplog):
    """`study park` keeps the newest checkpoint of an unfinished cell in its folder (committed); a
    fresh checkout without checkpoints/ (another machine) resumes from it, to the uninterrupted
    run's numbers; once the cell is finished, the run (or else `park`) removes it."""
    first, second = tmp_path / "first", tmp_path / "second"
    _study(first)
    monkeypatch.chdir(first)
    started = first / "out" / "study" / CELLS[1]
    settings = [s for s in FEDMR_CELL if not s.startswith("rounds=")] + ["rounds=2"]
    assert main(["run", "--quiet", "--out", str(started), *[a for s in settings for a in ("--set", s)]]) == 0
    (started / "summary.json").unlink()  # as a cell stopped at its checkpoint leaves it
    assert main(["study", "park", "study.toml"]) == 0
    assert f"{CELLS[1]}: parked at round 2" in capsys.readouterr().out
    parked = started / "parked"
    assert sorted(p.name for p in parked.iterdir()) == ["README.md", "metrics.csv", "round-000002.json",
                                                        "round-000002.safetensors", "segments.csv", "train_loss.csv"]
    assert [line.split(",")[0] for line in (parked / "metrics.csv").read_text().splitlines()] == ["round", "2"]
    assert [line.split(",")[0] for line in (parked / "train_loss.csv").read_text().splitlines()] == ["round", "1", "2"]
    # what a commit carries to the next machine: everything but checkpoints/ (git ignores it) and the live
    # train_loss.csv (which may be ahead of the checkpoint: the parked one is not)
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("checkpoints"))
    (second / "out" / "study" / CELLS[1] / "train_loss.csv").unlink()
    monkeypatch.chdir(second)
    caplog.set_level(logging.INFO, logger="fedmr")
    assert main(["study", "run", "study.toml", "--quiet", "--only", f"name={CELLS[1]}"]) == 0
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    assert len(resumed) == 1 and "after round 2" in resumed[0], resumed
    cell = second / "out" / "study" / CELLS[1]
    assert _comparable(cell) == _comparable(reference)
    assert (cell / "train_loss.csv").read_bytes() == (reference / "train_loss.csv").read_bytes()  # every round's
    assert not (cell / "parked").exists()  # the finished cell removed it itself
    (cell / "parked").mkdir()  # as a commit of the parked cell, pulled after the cell finished elsewhere, leaves it
    capsys.readouterr()
    assert main(["study", "park", "study.toml"]) == 0
    assert f"{CELLS[1]}: finished: parked checkpoint removed" in capsys.readouterr().out
    assert not (cell / "parked").exists()


def test_a_running_cell_parks_itself_every_ten_rounds(tmp_path, monkeypatch, caplog):
    """Without `study park`: a cell killed with SIGKILL after round 12 has parked/ at round 10, and a fresh
    checkout holding only what would be committed (no checkpoints/, no live metrics.csv) resumes from
    round 10, to the numbers of an uninterrupted run; the finished cell removes its parked/."""
    first, second = tmp_path / "first", tmp_path / "second"
    _study(first, extra="rounds = [14]\n")
    monkeypatch.chdir(first)
    cell = first / "out" / "study" / "seed1-rounds-14-fedavg"
    proc = _start(["study", "run", "study.toml", "--quiet", "--only", "algorithm=fedavg"], first / "log", delay=0.5)
    _wait_for(proc, lambda: (cell / "checkpoints" / "round-000012.json").exists(), "the checkpoint of round 12")
    _kill(proc)
    assert not (cell / "summary.json").exists()
    parked = sorted(p.name for p in (cell / "parked").iterdir())
    assert parked == ["README.md", "metrics.csv", "round-000010.json", "round-000010.safetensors", "segments.csv",
                      "train_loss.csv"], parked
    # what a commit carries: config, partition and parked/ (checkpoints/ is ignored; the live files, ahead of
    # the parked checkpoint, are left out)
    shutil.copytree(first, second, ignore=shutil.ignore_patterns("checkpoints", "metrics.csv", "train_loss.csv", "log"))
    for name in ("metrics.csv", "train_loss.csv"):
        shutil.copy2(cell / "parked" / name, second / "out" / "study" / cell.name / "parked" / name)
    monkeypatch.chdir(second)
    caplog.set_level(logging.INFO, logger="fedmr")
    assert main(["study", "run", "study.toml", "--quiet", "--only", "algorithm=fedavg"]) == 0
    resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resuming")]
    assert len(resumed) == 1 and "after round 10" in resumed[0], resumed
    resumed_cell = second / "out" / "study" / cell.name
    reference = tmp_path / "reference"
    settings = [s for s in FEDMR_CELL if not s.startswith(("rounds=", "algorithm="))]
    assert main(["run", "--quiet", "--out", str(reference), "--set", "rounds=14", "--set", "algorithm=\"fedavg\"",
                 *[a for s in settings for a in ("--set", s)]]) == 0
    assert _comparable(resumed_cell) == _comparable(reference)
    assert (resumed_cell / "train_loss.csv").read_bytes() == (reference / "train_loss.csv").read_bytes()
    assert not (resumed_cell / "parked").exists()
    # which rounds ran in which sitting: the parked checkpoint carried rounds 1-10 to the second machine
    spans = [line.split(",")[:2] for line in (resumed_cell / "segments.csv").read_text().splitlines()[1:]]
    assert spans == [["1", "10"], ["11", "14"]]


def test_keep_model_keeps_the_final_model_under_a_name_git_does_not_ignore(tmp_path, monkeypatch, capsys):
    """keep_model (a grid's or [study]'s): the finished cell's model.safetensors is copied to
    final-model.safetensors, at the end of the cell or, for a cell finished before, on the next run."""
    monkeypatch.chdir(tmp_path)
    text = STUDY.format(reuse="", extra="").replace("rounds = 6", "rounds = 2").replace('"fedavg", "fedmr"', '"fedavg"')
    path = tmp_path / "study.toml"
    path.write_text(text + '\n[[grid]]\nkeep_model = true\nalgorithm = ["fedmr"]\nseed = [1]\n')
    assert main(["study", "run", str(path), "--quiet"]) == 0
    out = tmp_path / "out" / "study"
    assert (out / "seed1-fedmr" / "final-model.safetensors").read_bytes() == \
        (out / "seed1-fedmr" / "model.safetensors").read_bytes()
    assert not (out / "seed1-fedavg" / "final-model.safetensors").exists()
    path.write_text(text.replace('title = "tiny"', 'title = "tiny"\nkeep_model = true')
                    + '\n[[grid]]\nalgorithm = ["fedmr"]\nseed = [1]\n')
    assert main(["study", "run", str(path), "--quiet"]) == 0  # nothing to run; the finished FedAvg cell's model is kept
    assert (out / "seed1-fedavg" / "final-model.safetensors").is_file()
    (out / "seed1-fedavg" / "model.safetensors").unlink()
    (out / "seed1-fedavg" / "final-model.safetensors").unlink()
    capsys.readouterr()
    assert main(["study", "run", str(path), "--quiet"]) == 0
    assert "fedmr: warning: keep_model: out/study/seed1-fedavg holds no model.safetensors" in capsys.readouterr().err
    path.write_text(text.replace('title = "tiny"', 'title = "tiny"\nkeep_model = 1'))
    assert main(["study", "run", str(path), "--dry-run"]) == 2
    assert "'study.keep_model' must be true or false, got 1" in capsys.readouterr().err


def test_study_run_set_changes_only_how_cells_compute(tmp_path, monkeypatch, capsys):
    """`--set` takes the keys that say how and where a cell computes (the cell and its folder stay the
    same: the run's config.toml records the setting); any other key is one error line."""
    monkeypatch.chdir(tmp_path)
    _study(tmp_path)
    assert main(["study", "run", "study.toml", "--quiet", "--set", "lr=0.1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fedmr: error: study run --set takes only keys that say how and where a cell computes (device, "
                   "workers, vectorize, vectorize_memory_gb, data_dir, cache_dir, compile), got 'lr'"]
    assert not (tmp_path / "out" / "study" / CELLS[0]).exists()
    assert main(["study", "run", "study.toml", "--quiet", "--only", "algorithm=fedavg", "--set", "vectorize=true"]) == 0
    assert "vectorize = true" in (tmp_path / "out" / "study" / CELLS[0] / "config.toml").read_text()
