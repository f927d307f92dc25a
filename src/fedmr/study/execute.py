"""Running a study's cells: one at a time in this process, N at once in worker processes (each on its
own share of the cores), or as Ray tasks on a cluster.  Every path runs a cell the same way:
``run_cell`` = ``engine.prepare`` + ``engine.Simulation`` in the cell's folder, resuming from its
checkpoint when the folder already holds part of the run (as ``fedmr run --resume`` does)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig
from .index import Status

PARK_EVERY = 10  # rounds: how often a running cell refreshes its parked/ checkpoint (at its checkpoints)


@dataclass
class CellResult:
    name: str
    stopped: int  # the signal that stopped it after a checkpoint, or 0
    seconds: float  # spent on it in this sitting
    summary: dict[str, Any]
    late_mean: float | None = None
    error: str | None = None


def late_mean(rows: list[dict[str, Any]], rounds: int, fraction: float, key: str = "accuracy") -> float | None:
    """Mean test accuracy (or another column, ``key``; NaN where a row lacks it) over the evaluations in the
    last ``fraction`` of the rounds (401-500 of 500)."""
    start = rounds - round(rounds * fraction)
    accs = [float(r.get(key, "nan")) for r in rows if start < float(r["round"]) <= rounds]
    return sum(accs) / len(accs) if accs else None


def keep_model(folder: Path) -> str | None:
    """Copy a finished cell's final model.safetensors to final-model.safetensors, the name git does not
    ignore under docs/results (``keep_model``), once; what is wrong when it cannot, else None."""
    import shutil

    from ..fileio import atomic_write
    from ..results import KEPT_MODEL_FILE, MODEL_FILE

    kept, model = folder / KEPT_MODEL_FILE, folder / MODEL_FILE
    if kept.is_file():
        return None
    if not model.is_file():
        return (f"keep_model: {folder} holds no {MODEL_FILE} (finished elsewhere, or removed); rerun the cell in "
                "a fresh output folder to keep its model")
    atomic_write(kept, lambda tmp: shutil.copyfile(model, tmp))
    return None


def run_cell(cfg: RunConfig, folder: Path, progress: str = "none", label: str | None = None,
             handle_signals: bool = True, late_fraction: float = 0.2, keep: bool = False) -> CellResult:
    """Run (or resume) one cell in ``folder``; with ``handle_signals`` a SIGINT/SIGTERM finishes the
    round, writes a checkpoint and returns ``stopped``, as ``fedmr run`` does.  The cell parks itself
    (``parking.park``) after each checkpoint of ``PARK_EVERY`` rounds or more since the last, and
    after the one a signal forces, so a sitting killed at any moment loses at most that many rounds
    of what is committed; a finished cell removes its ``parked/``.  ``keep``: keep the final model
    (``keep_model``)."""
    import contextlib

    from ..engine import Simulation, prepare
    from ..engine.simulator import stop_on_signals
    from .parking import park, unpark

    start = time.perf_counter()
    parked_at = unpark(folder)  # a checkpoint parked by another sitting (another machine) resumes here

    def park_now(done: int) -> None:
        nonlocal parked_at
        if done - parked_at >= PARK_EVERY or simulation.stop_requested:
            park(folder, finished=False)
            parked_at = done

    simulation = Simulation(prepare(cfg), out_dir=folder, progress=progress, label=label or folder.name,
                            resume=(folder / "config.toml").is_file(), on_checkpoint=[park_now])
    with stop_on_signals(simulation) if handle_signals else contextlib.nullcontext():
        outcome = simulation.run()
    seconds = time.perf_counter() - start
    if outcome.stopped_after is not None:
        return CellResult(folder.name, int(simulation.stop_requested) or signal.SIGTERM, seconds, {})
    park(folder, finished=True)
    if keep:
        problem = keep_model(folder)
        if problem:
            print(f"fedmr: warning: {problem}", file=sys.stderr)
    return CellResult(folder.name, 0, seconds, outcome.summary, late_mean(outcome.rows, cfg.rounds, late_fraction))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """One line per finished cell: its accuracy and time, the cells left and an estimate of the time left."""

    def __init__(self, todo: int, parallel: int):
        self.left, self.parallel = todo, max(1, parallel)
        self.times: list[float] = []
        self.done = 0
        self.failures = 0

    def finished(self, result: CellResult) -> None:
        self.left -= 1
        self.done += 1
        self.times.append(result.seconds)
        s = result.summary
        late = f", late mean {result.late_mean:.4f}" if result.late_mean is not None else ""
        if self.left:
            per_cell = sum(self.times) / len(self.times)
            eta = (f"about {_duration(per_cell * self.left / min(self.parallel, self.left))} remaining "
                   f"({_duration(per_cell)} a cell, {self.parallel} at a time)")
        else:
            eta = "none remaining"
        print(f"[{self.done} done] {result.name}: accuracy {s['final_accuracy']:.4f} (best {s['best_accuracy']:.4f}"
              f"{late}) in {_duration(result.seconds)}; {self.left} cell{'s' if self.left != 1 else ''} left, {eta}",
              flush=True)

    def failed(self, name: str, error: str) -> None:
        self.left -= 1
        self.failures += 1
        print(f"[failed] {name}: {error}", flush=True)


# ---- one at a time, in this process -------------------------------------------------------------------
def run_here(todo: list[Status], progress: Progress, on_done: Callable[[Status, CellResult], None],
             bar: str, late_fraction: float) -> int:
    """Returns the signal that stopped the study, or 0."""
    for status in todo:
        result = run_cell(status.cell.cfg, status.folder, bar, status.cell.name, late_fraction=late_fraction,
                          keep=status.cell.keep_model)
        if result.stopped:
            return result.stopped
        progress.finished(result)
        on_done(status, result)
    return 0


# ---- N at once, in worker processes ---------------------------------------------------------------------
def core_slots(jobs: int) -> list[list[int]]:
    """Disjoint sets of this process's cores, one per job (shared round-robin when jobs exceed cores)."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    share = max(1, len(cores) // jobs)
    return [cores[i * share:(i + 1) * share] if (i + 1) * share <= len(cores) else [cores[i % len(cores)]]
            for i in range(jobs)]


def _pool_init(slots: Any, parent: int) -> None:
    from ..engine.parallel import _die_with_parent

    _die_with_parent(parent)  # a SIGKILLed study takes its cells with it; rerunning resumes them
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # between cells; while one runs, it stops at a checkpoint
    cores = slots.get()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)  # workers = "auto" then sees just this share of the cores
    import torch

    torch.set_num_threads(len(cores))


def _pool_cell(cfg: RunConfig, folder: str, late_fraction: float, keep: bool) -> CellResult:
    return run_cell(cfg, Path(folder), "none", late_fraction=late_fraction, keep=keep)


def run_pool(todo: list[Status], jobs: int, progress: Progress, on_done: Callable[[Status, CellResult], None],
             late_fraction: float) -> int:
    ctx = mp.get_context("spawn")  # a fresh interpreter per job: no forked torch thread pools
    slots = ctx.Queue()
    for cores in core_slots(jobs):
        slots.put(cores)
    stop = {"signal": 0}

    def forward(signum: int, frame: Any) -> None:
        if not stop["signal"]:
            stop["signal"] = signum
            print(f"\nfedmr: {signal.Signals(signum).name}: the running cells finish their round and checkpoint",
                  file=sys.stderr, flush=True)
            if signum == signal.SIGTERM:  # Ctrl-C already reached the cells: the terminal signals the whole group
                for child in mp.active_children():
                    if child.pid is not None:
                        os.kill(child.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_pool_init, initargs=(slots, os.getpid())) as pool:
            queue = list(todo)
            running: dict[Any, Status] = {}
            while queue or running:
                while queue and len(running) < jobs and not stop["signal"]:
                    status = queue.pop(0)
                    running[pool.submit(_pool_cell, status.cell.cfg, str(status.folder), late_fraction,
                                        status.cell.keep_model)] = status
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    status = running.pop(future)
                    try:
                        result = future.result()
                    except Exception as exc:  # noqa: BLE001 - one failed cell does not stop the others
                        progress.failed(status.cell.name, f"{type(exc).__name__}: {exc}")
                        continue
                    if not result.stopped:
                        progress.finished(result)
                        on_done(status, result)
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return stop["signal"]


# ---- Ray tasks ------------------------------------------------------------------------------------------
def _ray_cell(cfg: RunConfig, folder: str, cwd: str, cpus: int, late_fraction: float, keep: bool) -> CellResult:
    """A Ray task: the study's paths are relative to the driver's directory, which every node must see
    at the same path (a shared folder); a retried task resumes from the cell's last checkpoint."""
    import torch

    os.chdir(cwd)
    torch.set_num_threads(cpus)
    return run_cell(cfg.replace(workers=1), Path(folder), "none", handle_signals=False, late_fraction=late_fraction,
                    keep=keep)


def run_ray(todo: list[Status], address: str, cpus: int, retries: int, progress: Progress,
            on_done: Callable[[Status, CellResult], None], late_fraction: float) -> int:
    import ray

    started = not ray.is_initialized()
    if started:
        if address == "local":  # a one-machine cluster for trying it out, on 127.0.0.1 only
            ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, configure_logging=False)
        else:
            ray.init(address=address, log_to_driver=False, configure_logging=False)
    try:
        progress.parallel = max(1, int(ray.cluster_resources().get("CPU", 1)) // cpus)  # for the estimate
        task = ray.remote(num_cpus=cpus, max_retries=retries, retry_exceptions=True)(_ray_cell)
        cwd = os.getcwd()
        pending = {task.remote(s.cell.cfg, str(s.folder), cwd, cpus, late_fraction, s.cell.keep_model): s for s in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            status = pending.pop(ready[0])
            try:
                result = ray.get(ready[0])
            except Exception as exc:  # noqa: BLE001 - after its retries; the other cells go on
                progress.failed(status.cell.name, f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1]}")
                continue
            progress.finished(result)
            on_done(status, result)
    finally:
        if started:
            ray.shutdown()
    return 0


def describe(statuses: Iterable[Status]) -> str:
    counts: dict[str, int] = {}
    for s in statuses:
        counts[s.state] = counts.get(s.state, 0) + 1
    return ", ".join(f"{counts[k]} {k}" for k in ("done", "reused", "partial", "missing") if k in counts)
