"""The single-machine simulator: config -> data and partition -> rounds of the algorithm -> results.

The data set stays resident as tensors; clients are slices by index; the
algorithm object is the same one the Flower apps drive.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..algorithms import build_algorithm
from ..algorithms.base import Algorithm
from ..config import RunConfig, load_config
from ..data import DataSet
from ..errors import CheckpointError
from ..maths import State
from ..partition import format_summary
from ..results import RunWriter
from ..seeding import numpy_rng, torch_generator
from .client import ClientData
from .experiment import Experiment, prepare
from .output import claimed_output
from .recorder import Recorder, RowCallback
from .rounds import RoundFold, plan_round
from .runner import make_runner

log = logging.getLogger("fedmr")


@dataclass
class RunOutcome:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    final_state: State
    out_dir: Path | None = None
    algorithm: Algorithm | None = field(default=None, repr=False)
    stopped_after: int | None = None  # set when a signal stopped the run after this many rounds
    stop_signal: int = 0  # that signal's number
    late_signal: int = 0  # a signal that came in the last round (or after it): the run was finished, not stopped
    train_rows: list[dict[str, Any]] = field(default_factory=list, repr=False)  # train_loss.csv: every round


def dropped_clients(seed: int, round_idx: int, clients: list[int], rate: float) -> set[int]:
    """The selected clients that fail this round: round(rate * K) of them, drawn from their own stream."""
    count = min(len(clients), math.floor(rate * len(clients) + 0.5))
    if count == 0:
        return set()
    picks = numpy_rng(seed, "dropout-select", round_idx).choice(len(clients), count, replace=False)
    return {clients[int(i)] for i in picks}


class Simulation:
    """Runs one algorithm on a prepared experiment; its ``Recorder`` evaluates, writes and checkpoints."""

    def __init__(self, experiment: Experiment, *, algorithm: str | None = None, out_dir: str | Path | None = None,
                 progress: str = "bar", label: str | None = None, resume: bool = False,
                 on_row: Iterable[RowCallback] = (), on_checkpoint: Iterable[Callable[[int], None]] = ()):
        self.exp = experiment
        self.cfg = experiment.cfg if algorithm is None else experiment.cfg.replace(algorithm=algorithm)
        self.algorithm = build_algorithm(self.cfg, experiment.federation)
        self.settings = self.cfg.local_settings
        self.model = experiment.new_model()
        self.client_data = ClientData(experiment.data.train_x, experiment.data.train_y, experiment.partition)
        self.runner = make_runner(self.cfg, self.algorithm, self.model, self.client_data, self.settings)
        self.writer = RunWriter(out_dir, resume=resume) if out_dir is not None else None
        self.resume = resume
        self.stop_requested = 0  # a signal number: finish the round, checkpoint, stop (see stop_on_signals)
        self.progress = progress
        self.label = label or self.cfg.algorithm
        # the recorder evaluates on the training model object, as the runner reuses it (no extra copy)
        self.recorder = Recorder(self.cfg, experiment, self.algorithm, self.writer, model=self.model,
                                 on_row=[self._show, *on_row], on_checkpoint=on_checkpoint)
        self._bar: Any = None
        self._round_started = 0.0
        self.round_running = -1  # the round index in progress (rounds: the run is finishing)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.recorder.rows

    # ---- one round: the shared protocol (engine/rounds.py), the clients trained by the runner ----
    def run_round(self, round_idx: int) -> dict[str, Any]:
        seed = self.cfg.seed
        plan = plan_round(self.algorithm, round_idx, seed)
        lost = dropped_clients(seed, round_idx, plan.clients, self.cfg.dropout_rate)
        live = [task for task in plan.tasks if task.client_id not in lost]
        fold = RoundFold(plan, self.exp.initial_state, float(self.cfg.max_update_norm))
        results = fold.stream(self.runner.run(round_idx, live))
        used = self.algorithm.aggregate_train(round_idx, results, torch_generator(seed, "server", round_idx))
        return fold.stats(used).as_row()

    def evaluate(self) -> tuple[float, float]:
        return self.recorder.evaluate()

    def _show(self, row: dict[str, Any]) -> None:
        """Progress after each evaluation: the bar's postfix, or a log line with --quiet."""
        if self._bar is not None:
            self._bar.set_postfix(acc=f"{row['accuracy']:.4f}", s_per_round=f"{time.perf_counter() - self._round_started:.2f}",
                                  refresh=False)
        if self.progress == "log":
            print(f"[{self.label}] round {row['round']}/{self.cfg.rounds} accuracy {row['accuracy']:.4f} "
                  f"loss {row['loss']:.4f} elapsed {row['elapsed_s']:.1f}s", file=sys.stderr, flush=True)

    # ---- the whole run -----------------------------------------------------------------
    def run(self) -> RunOutcome:
        rounds = self.cfg.rounds
        first = self.recorder.start(self.resume)
        self._bar = tqdm(total=rounds, initial=first, desc=self.label, disable=self.progress != "bar",
                         dynamic_ncols=True, file=sys.stderr, unit="round")
        stopped_after = None
        try:
            for r in range(first, rounds):
                self.round_running = r
                self._round_started = time.perf_counter()
                round_stats = self.run_round(r)
                self.recorder.record(r + 1, round_stats)
                self.recorder.checkpoint(r + 1, force=bool(self.stop_requested))  # read after the evaluation
                self._bar.update(1)
                if self.stop_requested and r + 1 < rounds:  # in the last round a stop is a finish (below)
                    stopped_after = r + 1
                    break
            self.round_running = rounds
        finally:
            self._bar.close()
            self.runner.close()
        out_dir = self.writer.dir if self.writer else None
        if stopped_after is not None:
            return RunOutcome(self.rows, {}, self.algorithm.global_state(), out_dir, self.algorithm,
                              stopped_after=stopped_after, stop_signal=int(self.stop_requested),
                              train_rows=self.recorder.train_rows)
        summary = self.recorder.finish()
        return RunOutcome(self.rows, summary, self.algorithm.global_state(), out_dir, self.algorithm,
                          late_signal=int(self.stop_requested), train_rows=self.recorder.train_rows)

    def in_last_round(self) -> bool:
        """Whether the run is in its last round or past it (writing its results): a stop asked for now
        finishes the run instead."""
        return self.round_running + 1 >= self.cfg.rounds


@contextlib.contextmanager
def stop_on_signals(simulation: Simulation) -> Iterator[None]:
    """First SIGINT/SIGTERM: finish the round, write a checkpoint, stop. A second one aborts at once.
    Outside the main thread (where Python cannot take signals) it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked worker inherited this handler: die as by default
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if simulation.stop_requested:
            raise KeyboardInterrupt
        simulation.stop_requested = signum
        name = signal.Signals(signum).name
        if simulation.in_last_round():
            print(f"\nfedmr: {name} in the run's last round: finishing it and writing the results, so the run "
                  "ends complete (send it again to abort without them)", file=sys.stderr, flush=True)
        else:
            print(f"\nfedmr: {name}: finishing this round and writing a checkpoint "
                  "(send it again to abort without one)", file=sys.stderr, flush=True)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def resumed_config(folder: str | Path, assignments: Iterable[str] = ()) -> RunConfig:
    """The config of the run in ``folder`` (its config.toml) with ``assignments`` applied: what
    ``fedmr run --resume`` continues.  Only the keys in ``RESUMABLE_CHANGES`` may differ from the
    saved ones, which the checkpoint's fingerprint checks."""
    folder = Path(folder)
    if not (folder / "config.toml").is_file():
        raise CheckpointError(f"no run to resume in {folder} (no config.toml); start it with: "
                              f"fedmr run --out {shlex.quote(str(folder))}")
    return load_config(folder / "config.toml", assignments)


def run_experiment(cfg: Mapping[str, Any], out_dir: str | Path | None = None, progress: str = "bar", *,
                   resume: bool = False, data: DataSet | None = None,
                   on_row: Iterable[RowCallback] = (), fresh: bool = False) -> RunOutcome:
    """Prepare and run one config (``fedmr run``): the partition summary on stderr unless
    ``progress`` is "none", the first SIGINT/SIGTERM stops it after a checkpoint (``stopped_after``,
    ``stop_signal``).  ``resume`` continues the run in ``out_dir``; ``data`` replaces the config's
    data set; ``on_row`` callables get each metrics row; ``fresh``: ``out_dir`` was just created
    for this run (``new_run_folder``), and is removed if the run fails before writing to it."""
    cfg = RunConfig.of(cfg)
    with claimed_output(out_dir, cfg, resume=resume, fresh=fresh):
        exp = prepare(cfg, data)
        if progress != "none":
            print(format_summary(exp.partition_summary), file=sys.stderr)
        simulation = Simulation(exp, out_dir=out_dir, progress=progress, resume=resume, on_row=on_row)
        with stop_on_signals(simulation):
            return simulation.run()
