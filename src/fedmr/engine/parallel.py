"""Clients of a round trained concurrently by forked worker processes.

Workers are forked from the simulator, so they inherit the resident data set,
the algorithm object and a model without copying anything (copy-on-write
pages; the training tensors are only read).  Per task only the starting state
travels in and the trained state travels back, pickled through a pipe.  Each
worker trains with its own thread count (one thread per process is what
measures fastest on a small CPU: no OpenMP barriers between tiny kernels).

Results are yielded in task order, so the server folds them in the same order
as the sequential runner and a run is reproducible bit for bit on one machine.
A client that runs past ``client_timeout`` seconds is dropped for the round
(its worker is killed and replaced) and is simply not yielded.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import pickle
import signal
import time
import traceback
import weakref
from collections.abc import Iterator, Sequence
from multiprocessing.connection import Connection, wait
from typing import Any

import torch
from torch import nn

from ..algorithms.base import Algorithm, TrainResult, TrainTask
from ..errors import ConfigError, FedMRError
from ..training import LocalSettings
from .client import ClientData, train_client

log = logging.getLogger("fedmr")


class WorkerError(FedMRError):
    """A client's local update raised in a worker process."""


def _dumps(obj: Any) -> bytes:
    # plain pickle copies tensor bytes; torch's shared-memory reducers cost more for small states
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def owned(task: TrainTask) -> TrainTask:
    """The task with its state copied out of the pool: pickling a view would send the whole pool."""
    state = {k: v.detach().clone() for k, v in task.state.items()}
    return TrainTask(task.client_id, task.slot, state, task.payload)


def _die_with_parent(parent_pid: int) -> None:
    """A SIGKILLed simulator must not leave its workers behind: a forked worker holds copies of
    the parent's pipe ends, so it would never see EOF.  Linux kills it with its parent instead."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def _worker_main(conn: Connection, parent_pid: int, algorithm: Algorithm, model: nn.Module, data: ClientData,
                 settings: LocalSettings, seed: int, threads: int) -> None:
    _die_with_parent(parent_pid)
    # Ctrl-C goes to the whole process group: the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            return
        request = pickle.loads(message)
        if request is None:
            return
        round_idx, task = request
        reply: tuple[str, TrainResult | str]
        try:
            reply = ("ok", train_client(algorithm, model, task, data, settings, seed, round_idx))
        except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises
            reply = ("error", f"client {task.client_id}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        try:
            conn.send_bytes(_dumps(reply))
        except (BrokenPipeError, OSError):
            return


class _Worker:
    def __init__(self, ctx: Any, args: tuple[Any, ...]):
        self.conn, child = ctx.Pipe(duplex=True)
        self.process = ctx.Process(target=_worker_main, args=(child, os.getpid(), *args), daemon=True)
        self.process.start()
        child.close()
        self.slot: int | None = None  # index in the round's task list while busy
        self.started = 0.0

    def stop(self, graceful: bool) -> None:
        if graceful and self.process.is_alive():
            try:
                self.conn.send_bytes(_dumps(None))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout=2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5.0)
        self.conn.close()


def _stop_all(workers: list[_Worker], graceful: bool) -> None:
    for worker in workers:
        worker.stop(graceful)
    workers.clear()


class ProcessPoolRunner:
    """A pool of forked workers; ``run`` yields the round's results in task order."""

    def __init__(self, algorithm: Algorithm, model: nn.Module, data: ClientData, settings: LocalSettings,
                 seed: int, workers: int, threads_per_worker: int = 1, client_timeout: float = 0.0):
        if data.train_x.device.type != "cpu":
            raise ConfigError("workers > 1 and client_timeout need device = \"cpu\" (on a GPU use vectorize)")
        self.workers_wanted = max(1, int(workers))
        self.threads = max(1, int(threads_per_worker))
        self.timeout = float(client_timeout)
        self._data = data
        self._args = (algorithm, model, data, settings, seed, self.threads)
        self._ctx = mp.get_context("fork")
        self._workers: list[_Worker] = []
        # workers die with the runner even if close() is never called
        self._finalizer = weakref.finalize(self, _stop_all, self._workers, False)

    # ---- pool management --------------------------------------------------------------
    def _ensure_workers(self) -> None:
        self._workers[:] = [w for w in self._workers if w.process.is_alive()]
        while len(self._workers) < self.workers_wanted:
            self._workers.append(_Worker(self._ctx, self._args))

    def _replace(self, worker: _Worker) -> None:
        worker.stop(graceful=False)
        self._workers.remove(worker)
        self._workers.append(_Worker(self._ctx, self._args))

    def close(self) -> None:
        _stop_all(self._workers, graceful=True)

    # ---- one round ------------------------------------------------------------------------
    def run(self, round_idx: int, tasks: Sequence[TrainTask]) -> Iterator[TrainResult]:
        self._ensure_workers()
        tasks = list(tasks)
        # the server folds results in while the workers train: its small tensor ops run fastest on one
        # thread, and a second OpenMP thread would fight the workers for the cores
        parent_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        # largest clients first (popped from the end), so that a round does not end with one worker on a
        # big client while the others idle: Dirichlet partitions differ in size by 10x and more.  Results
        # still come out in task order below, so the order of training changes no number.
        sizes = self._data.sizes()
        pending = sorted(range(len(tasks)), key=lambda i: (sizes[tasks[i].client_id], -i))
        done: dict[int, TrainResult | None] = {}
        next_out = 0
        finished = False
        try:
            while next_out < len(tasks):
                for worker in self._workers:
                    if worker.slot is None and pending:
                        i = pending.pop()
                        worker.conn.send_bytes(_dumps((round_idx, owned(tasks[i]))))
                        worker.slot, worker.started = i, time.monotonic()
                self._collect(round_idx, tasks, done)
                while next_out in done:
                    result = done.pop(next_out)
                    next_out += 1
                    if result is not None:
                        yield result
            finished = True
        finally:
            torch.set_num_threads(parent_threads)
            if not finished:  # abandoned mid-round (exception, Ctrl-C): busy workers hold stale work
                for worker in [w for w in self._workers if w.slot is not None]:
                    worker.stop(graceful=False)
                    self._workers.remove(worker)  # the next round forks fresh ones

    def _collect(self, round_idx: int, tasks: list[TrainTask], done: dict[int, TrainResult | None]) -> None:
        busy = [w for w in self._workers if w.slot is not None]
        wait_s = None
        if self.timeout > 0:
            now = time.monotonic()
            wait_s = max(0.0, min(w.started + self.timeout for w in busy) - now)
        ready = wait([w.conn for w in busy], timeout=wait_s)
        for worker in busy:
            slot = worker.slot
            assert slot is not None  # busy; only this worker's own turn below frees its slot
            if worker.conn in ready:
                try:
                    status, payload = pickle.loads(worker.conn.recv_bytes())
                except (EOFError, OSError):
                    client = tasks[slot].client_id
                    self._replace(worker)
                    raise WorkerError(f"round {round_idx + 1}: the worker training client {client} died "
                                      f"(exit code {worker.process.exitcode})") from None
                if status == "error":
                    worker.slot = None
                    raise WorkerError(payload)
                done[slot] = payload
                worker.slot = None
            elif self.timeout > 0 and time.monotonic() - worker.started >= self.timeout:
                task = tasks[slot]
                log.warning("round %d: client %d ran past client_timeout = %gs and was dropped",
                            round_idx + 1, task.client_id, self.timeout)
                done[slot] = None
                worker.slot = None
                self._replace(worker)

