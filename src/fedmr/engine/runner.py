"""Runners train one round's tasks and yield results as they finish; ``make_runner`` picks one.

The sequential runner is the reference path; faster runners (worker processes,
vectorised training) must yield the same results for the same seed.  Each
client's randomness comes from (seed, round, client id), never from a shared
stream, so the order in which clients are trained does not matter.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..algorithms.base import Algorithm, TrainResult, TrainTask
from ..config import RunConfig
from ..errors import ConfigError
from ..machine import cpu_count
from ..training import LocalSettings
from .client import ClientData, train_client
from .parallel import ProcessPoolRunner
from .vectorized import VectorizedRunner, batching_problem, unsupported_reason

log = logging.getLogger("fedmr")


class SequentialRunner:
    """Trains the clients one after another in this process, reusing one model object."""

    def __init__(self, algorithm: Algorithm, model: nn.Module, data: ClientData, settings: LocalSettings, seed: int):
        self.algorithm, self.model, self.data, self.settings, self.seed = algorithm, model, data, settings, seed

    def run(self, round_idx: int, tasks: Sequence[TrainTask]) -> Iterator[TrainResult]:
        for task in tasks:
            yield train_client(self.algorithm, self.model, task, self.data, self.settings, self.seed, round_idx)

    def close(self) -> None:
        pass


def resolve_workers(value: int | str, device: torch.device, clients_per_round: int) -> tuple[int, int]:
    """(worker processes, threads each).  "auto": one single-thread process per core on a CPU
    (measured fastest for the paper's models on 2 cores), one process on a GPU."""
    cores = cpu_count()
    if device.type != "cpu":
        if value not in ("auto", 1):
            raise ConfigError("config key 'workers' must be 1 or \"auto\" on a GPU (use vectorize instead)")
        return 1, 1
    workers = min(cores, clients_per_round) if value == "auto" else int(value)
    workers = max(1, workers)
    return workers, max(1, cores // workers)


def make_runner(cfg: Mapping[str, Any], algorithm: Algorithm, model: nn.Module, data: ClientData,
                settings: LocalSettings):
    """The runner the config asks for: vectorized, worker processes or sequential."""
    config = RunConfig.of(cfg)
    seed, device = config.seed, data.train_x.device
    timeout = float(config.client_timeout)
    vectorize = config.vectorize
    if vectorize is True and timeout > 0:
        raise ConfigError("client_timeout needs worker processes; it cannot be combined with vectorize = true")
    if vectorize == "auto":
        # measured: on a CPU the per-model loop wins (vmap turns convolutions into grouped ones,
        # which oneDNN runs slower); on a GPU ten small models in one kernel win
        vectorize = device.type == "cuda" and timeout == 0
        reason = unsupported_reason(algorithm, model) if vectorize else None
        if reason is not None:
            log.info("runner: not vectorized: %s", reason)
            vectorize = False
    problem = batching_problem(model, data) if vectorize and unsupported_reason(algorithm, model) is None else None
    if problem is not None:  # a user model vmap cannot run: fall back, never fail
        log.warning("runner: the model cannot be trained batched (%s); training each client on its own", problem)
    elif vectorize:
        log.info("runner: vectorized (%d clients per batched step)%s", config.clients_per_round,
                 "; compile is not used on this path" if config.compile else "")
        return VectorizedRunner(algorithm, model, data, settings, seed, config.vectorize_memory_gb)
    workers, threads = resolve_workers(config.workers, device, config.clients_per_round)
    if workers > 1 or timeout > 0:  # a timeout needs a process it can stop
        log.info("runner: %d worker processes x %d threads", workers, threads)
        return ProcessPoolRunner(algorithm, model, data, settings, seed, workers, threads, timeout)
    return SequentialRunner(algorithm, model, data, settings, seed)
