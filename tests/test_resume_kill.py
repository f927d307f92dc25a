"""Kill a real `fedmr run` process (SIGKILL at random points, during checkpoint writes, SIGTERM), resume it
each time, and require exactly the metrics and final model of an uninterrupted run."""

from __future__ import annotations

import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from fedmr.cli import main
from fedmr.engine.checkpoint import CHECKPOINT_DIR, TEST_DELAY_ENV, load_tensors
from fedmr.results import read_metrics

SETTINGS = ["num_clients=6", "clients_per_round=3", "rounds=10", "local_epochs=1", "eval_every=2",
            "partition=\"iid\"", "seed=5", "dropout_rate=0.3"]
ARGS = [a for s in SETTINGS for a in ("--set", s)]
# A hang guard, not a timing: each wait ends as soon as its event happens (a whole run takes ~15 s here), and a
# slow, loaded 2-core machine may need minutes to start Python and torch and train the rounds.
TIMEOUT = 600.0
# Checkpoint writes slowed to this many seconds per file where a signal must land at a given point: the window
# must outlast the test noticing the file (5 ms polls) plus a stall of its process on a loaded machine.
WINDOW_S = 2.0


def _start(args: list[str], log: Path, delay: float | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != TEST_DELAY_ENV}
    if delay is not None:
        env[TEST_DELAY_ENV] = str(delay)
    with log.open("w") as fh:
        return subprocess.Popen([sys.executable, "-m", "fedmr.cli", *args], stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)


def _wait_for(proc: subprocess.Popen, condition, what: str) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _kill(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> int:
    """SIGKILL takes the run's whole process group (as a crash of the job would); SIGTERM goes to the main process."""
    if sig == signal.SIGKILL:
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    return proc.wait(TIMEOUT)


def _manifest_rounds(run: Path) -> list[int]:
    folder = run / CHECKPOINT_DIR
    return sorted(int(p.name[6:12]) for p in folder.glob("round-*.json")) if folder.is_dir() else []


def _new_file(run: Path, pattern: str, since: float):
    def seen() -> bool:
        folder = run / CHECKPOINT_DIR
        return folder.is_dir() and any(p.stat().st_mtime > since for p in folder.glob(pattern) if p.exists())
    return seen


def _comparable(run: Path) -> list[dict[str, str]]:
    """Every column but the timing, as text (so that empty/NaN cells compare equal)."""
    return [{k: repr(v) for k, v in row.items() if k != "elapsed_s"} for row in read_metrics(run / "metrics.csv")]


def test_killed_and_resumed_run_matches_the_uninterrupted_run(tmp_path):
    rng = random.Random(int(os.environ.get("FEDMR_KILL_SEED", "7")))
    reference, run = tmp_path / "reference", tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(reference), *ARGS]) == 0
    resume = ["run", "--quiet", "--resume", str(run)]
    events = []

    # 1. SIGKILL at a random instant after the run folder exists (possibly before the first checkpoint)
    proc = _start(["run", "--quiet", "--out", str(run), *ARGS], tmp_path / "log1")
    _wait_for(proc, lambda: (run / "config.toml").exists(), "config.toml")
    time.sleep(rng.uniform(0.0, 1.5))
    _kill(proc)
    events.append(f"random kill with checkpoints {_manifest_rounds(run)}")

    # 2-3. SIGKILL while a checkpoint's tensor file, then its manifest, sits written but not renamed
    for step, pattern in ((2, "*.safetensors.*.tmp"), (3, "*.json.*.tmp")):
        since = time.time()
        proc = _start(resume, tmp_path / f"log{step}", delay=WINDOW_S)  # the kill must land in the pause
        _wait_for(proc, _new_file(run, pattern, since), f"a new {pattern}")
        _kill(proc)
        leftovers = sorted(p.name for p in (run / CHECKPOINT_DIR).glob("*.tmp"))
        assert leftovers, "the kill was meant to land mid-write"
        events.append(f"killed mid-write: {leftovers}, checkpoints {_manifest_rounds(run)}")

    # 4. SIGTERM: finish the round, write a checkpoint, exit with the exact resume command
    # slowed writes: the SIGTERM must land before the run ends by itself (round 10's two files alone take WINDOW_S)
    proc = _start(resume, tmp_path / "log4", delay=WINDOW_S / 2)
    start_rounds = max(_manifest_rounds(run), default=0)
    _wait_for(proc, lambda: max(_manifest_rounds(run), default=0) > start_rounds, "one more checkpoint")
    assert _kill(proc, signal.SIGTERM) == 128 + signal.SIGTERM
    out = (tmp_path / "log4").read_text()
    stopped = int(out.split("stopped after round ")[1].split()[0])
    assert stopped < 10 and max(_manifest_rounds(run)) == stopped, events
    command = out.split("resume with: ")[1].splitlines()[0]
    assert command == f"fedmr run --resume {shlex.quote(str(run))}"

    # 5. the printed command finishes the run
    argv = shlex.split(command)
    done = subprocess.run([sys.executable, "-m", "fedmr.cli", *argv[1:]], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr

    assert _comparable(run) == _comparable(reference), events
    for name in ("train_loss.csv", "client_accuracy.csv"):  # every round's loss, the last per-client evaluation
        assert (run / name).read_bytes() == (reference / name).read_bytes(), (name, events)
    got, want = load_tensors(run / "model.safetensors"), load_tensors(reference / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), events
    names = sorted(p.name for p in (run / CHECKPOINT_DIR).iterdir())
    assert names == ["round-000008.json", "round-000008.safetensors", "round-000010.json", "round-000010.safetensors"]
    assert [row["dropped"] for row in _comparable(run)] == ["1.0"] * 5  # round(0.3 * 3) = 1 client fails every round
