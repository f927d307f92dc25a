"""A comparison is several long runs: killed or stopped part-way, `fedmr compare --resume` keeps the
finished runs, continues the interrupted one from its checkpoint and ends with exactly the results of
an uninterrupted comparison."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
from test_resume_kill import ARGS, _comparable, _kill, _start, _wait_for

from fedmr.cli import main

ALGORITHMS = "fedavg,fedmr@first_stage_rounds=2"
FOLDERS = ("fedavg", "fedmr_first_stage_rounds-2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference") / "cmp"
    assert main(["compare", "--quiet", "--algorithms", ALGORITHMS, "--out", str(out), *ARGS]) == 0
    return out


def _same_results(run: Path, reference: Path) -> None:
    for folder in FOLDERS:
        assert _comparable(run / folder) == _comparable(reference / folder), folder
    got, want = (json.loads((p / "comparison.json").read_text()) for p in (run, reference))
    assert got.keys() == want.keys()
    for label in want:
        for key in ("rounds", "final_accuracy", "best_accuracy", "best_round", "mean_last5_accuracy"):
            assert got[label][key] == want[label][key], (label, key)
    assert (run / "accuracy.png").stat().st_size > 0


def test_a_killed_comparison_resumes_to_the_uninterrupted_result(tmp_path, reference):
    run = tmp_path / "cmp"
    # checkpoints slowed down so that the kill lands inside the second variant
    proc = _start(["compare", "--quiet", "--algorithms", ALGORITHMS, "--out", str(run), *ARGS], tmp_path / "log1", delay=0.2)
    second = run / FOLDERS[1]
    _wait_for(proc, lambda: (second / "checkpoints").is_dir(), "the second variant's first checkpoint")
    _kill(proc)
    assert (run / FOLDERS[0] / "summary.json").exists() and not (second / "summary.json").exists()
    first_metrics = (run / FOLDERS[0] / "metrics.csv").stat().st_mtime_ns

    assert main(["compare", "--quiet", "--resume", str(run)]) == 0
    assert (run / FOLDERS[0] / "metrics.csv").stat().st_mtime_ns == first_metrics  # not run again
    _same_results(run, reference)


def test_sigterm_stops_a_comparison_with_its_resume_command(tmp_path, reference):
    run = tmp_path / "cmp"
    proc = _start(["compare", "--quiet", "--algorithms", ALGORITHMS, "--out", str(run), *ARGS], tmp_path / "log", delay=0.2)
    _wait_for(proc, lambda: (run / FOLDERS[0] / "checkpoints").is_dir(), "the first checkpoint")
    assert _kill(proc, signal.SIGTERM) == 128 + signal.SIGTERM
    log = (tmp_path / "log").read_text()
    assert f"resume with: fedmr compare --resume {run}" in log
    assert not (run / "comparison.json").exists()
    assert main(["compare", "--quiet", "--resume", str(run)]) == 0
    _same_results(run, reference)


def test_a_finished_comparison_extends_its_rounds(tmp_path):
    run = tmp_path / "cmp"
    short = [a.replace("rounds=10", "rounds=4") for a in ARGS]
    assert main(["compare", "--quiet", "--algorithms", ALGORITHMS, "--out", str(run), *short]) == 0
    # continued, not started over: proved by round 4's checkpoint staying untouched, not by a time limit (a rerun of
    # 6 tiny rounds stays far under any limit, and a loaded machine can be slow without anything being wrong)
    round4 = {f: (run / f / "checkpoints" / "round-000004.json").stat().st_mtime_ns for f in FOLDERS}
    assert main(["compare", "--quiet", "--resume", str(run), "--set", "rounds=6"]) == 0
    assert {f: (run / f / "checkpoints" / "round-000004.json").stat().st_mtime_ns for f in FOLDERS} == round4
    summaries = json.loads((run / "comparison.json").read_text())
    assert [s["rounds"] for s in summaries.values()] == [6, 6]
    for folder in FOLDERS:
        assert [row["round"] for row in _comparable(run / folder)] == ["2.0", "4.0", "6.0"]


def test_compare_refuses_to_overwrite_and_bad_resumes(tmp_path, capsys, reference):
    cases = [
        (["compare", "--algorithms", "fedavg", "--out", str(reference)], "already holds a comparison"),
        (["compare", "--resume", str(reference), "--algorithms", "fedavg"], "drop --config/--out/--algorithms"),
        (["compare", "--resume", str(tmp_path / "nothing")], "no comparison to resume"),
        (["compare", "--set", "rounds=2"], "compare needs --algorithms"),
    ]
    cases.append((["compare", "--resume", str(reference), "--set", "lr=0.1"], "a resumed comparison keeps its config: 'lr'"))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "compare.json").write_text("{not json")
    cases.append((["compare", "--resume", str(damaged)], "compare.json is damaged"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
