"""The single-machine simulator: config -> data and partition -> rounds of the algorithm -> results.

The data set stays resident as tensors; clients are slices by index; the
algorithm object is the same one the Flower apps drive.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..algorithms import Federation, TrainResult, TrainTask, build_algorithm
from ..algorithms.base import Algorithm
from ..data import DataSet, load_dataset
from ..errors import ConfigError
from ..maths import State
from ..models import build_model
from ..partition import Partition, config_json, format_summary, make_partition, summarize
from ..results import RunWriter, summarize_metrics
from ..seeding import derive_seed, numpy_rng, torch_generator
from ..training import LocalSettings, clone_state, evaluate
from .checkpoint import fingerprint, resume_from_checkpoint, save_checkpoint, save_tensors
from .runner import ClientData, make_runner
from .validation import update_problem

log = logging.getLogger("fedmr")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = \"cuda\" but no CUDA GPU is available (use \"cpu\" or \"auto\")")
    return torch.device(name)


@dataclass
class Experiment:
    """Everything a run needs before its first round; shared by the runs of ``compare``."""

    cfg: dict[str, Any]
    data: DataSet
    partition: Partition
    partition_summary: dict[str, Any]
    model_name: str
    initial_state: State
    device: torch.device

    @property
    def federation(self) -> Federation:
        labels = self.data.train_y.cpu().numpy()
        counts = tuple(tuple(int(c) for c in np.bincount(labels[p], minlength=self.data.num_classes)) for p in self.partition)
        return Federation(
            num_clients=self.cfg["num_clients"],
            clients_per_round=self.cfg["clients_per_round"],
            client_sizes=tuple(len(p) for p in self.partition),
            num_classes=self.data.num_classes,
            seed=self.cfg["seed"],
            label_counts=counts,
        )

    def new_model(self) -> torch.nn.Module:
        model = build_model(self.model_name, self.data.num_classes, self.data.in_channels, self.data.image_size)
        model.load_state_dict(self.initial_state)
        return model.to(self.device, memory_format=torch.channels_last)


def prepare(cfg: dict[str, Any], data: DataSet | None = None) -> Experiment:
    """Load data, draw the partition and the initial model, all from the config's seed."""
    device = resolve_device(cfg["device"])
    data = data if data is not None else load_dataset(cfg)
    labels = data.train_y.cpu().numpy()
    partition = make_partition(cfg, labels, data.natural_partition)
    summary = summarize(partition, labels, data.num_classes)
    model_name = data.default_model if cfg["model"] == "auto" else cfg["model"]
    torch.manual_seed(derive_seed(cfg["seed"], "init"))
    model = build_model(model_name, data.num_classes, data.in_channels, data.image_size)
    initial = {k: v.to(device) for k, v in clone_state(model).items()}  # so the server's pool lives on the device too
    return Experiment(cfg, data.to(device), partition, summary, model_name, initial, device)


@dataclass
class RunOutcome:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    final_state: State
    out_dir: Path | None = None
    algorithm: Algorithm | None = field(default=None, repr=False)
    stopped_after: int | None = None  # set when a signal stopped the run after this many rounds


def write_run_header(writer: RunWriter, cfg: dict[str, Any], exp: Experiment) -> None:
    """config.toml, partition.json and its summary: what every results folder starts with."""
    writer.write_config(cfg)
    writer.write_partition(config_json(exp.partition, cfg), exp.partition_summary)


def dropped_clients(seed: int, round_idx: int, clients: list[int], rate: float) -> set[int]:
    """The selected clients that fail this round: round(rate * K) of them, drawn from their own stream."""
    count = min(len(clients), math.floor(rate * len(clients) + 0.5))
    if count == 0:
        return set()
    picks = numpy_rng(seed, "dropout-select", round_idx).choice(len(clients), count, replace=False)
    return {clients[int(i)] for i in picks}


class Simulation:
    """Runs one algorithm on a prepared experiment, writing results as it goes."""

    def __init__(self, experiment: Experiment, *, algorithm: str | None = None, out_dir: str | Path | None = None,
                 progress: str = "bar", label: str | None = None, resume: bool = False):
        self.exp = experiment
        self.cfg = dict(experiment.cfg)
        if algorithm is not None:
            self.cfg["algorithm"] = algorithm
        self.algorithm = build_algorithm(self.cfg, experiment.federation)
        self.settings = LocalSettings.from_config(self.cfg)
        self.model = experiment.new_model()
        self.client_data = ClientData(experiment.data.train_x, experiment.data.train_y, experiment.partition)
        self.runner = make_runner(self.cfg, self.algorithm, self.model, self.client_data, self.settings)
        self.writer = RunWriter(out_dir, resume=resume) if out_dir is not None else None
        self.resume = resume
        self.stop_requested = 0  # a signal number: finish the round, checkpoint, stop (set by the CLI)
        self.progress = progress
        self.label = label or self.cfg["algorithm"]
        self.rows: list[dict[str, Any]] = []

    # ---- one round ---------------------------------------------------------------------
    def _validated(self, results: Iterable[TrainResult], tasks: list[TrainTask], counts: dict[str, Any]) -> Iterator[TrainResult]:
        limit = float(self.cfg.get("max_update_norm", 0.0))
        for result in results:
            counts["delivered"] += 1
            problem = update_problem(result, self.exp.initial_state, limit, tasks[result.slot].state)
            if problem is not None:
                log.warning("round %d: rejected the update of client %d: %s", counts["round"] + 1, result.client_id, problem)
                counts["rejected"] += 1
                continue
            counts["losses"].append(result.train_loss)
            yield result

    def run_round(self, round_idx: int) -> dict[str, Any]:
        seed = self.cfg["seed"]
        clients = self.algorithm.select_clients(round_idx, numpy_rng(seed, "select", round_idx))
        tasks = self.algorithm.configure_train(round_idx, clients)
        lost = dropped_clients(seed, round_idx, clients, self.cfg.get("dropout_rate", 0.0))
        live = [task for task in tasks if task.client_id not in lost]
        counts: dict[str, Any] = {"round": round_idx, "rejected": 0, "delivered": 0, "losses": []}
        results = self._validated(self.runner.run(round_idx, live), tasks, counts)
        used = self.algorithm.aggregate_train(round_idx, results, torch_generator(seed, "server", round_idx))
        losses = counts["losses"]
        # dropped: selected but nothing came back (dropout_rate, or a straggler past client_timeout)
        return {"clients": used, "rejected": counts["rejected"], "dropped": len(tasks) - counts["delivered"],
                "train_loss": sum(losses) / len(losses) if losses else float("nan")}

    def evaluate(self) -> tuple[float, float]:
        self.model.load_state_dict(self.algorithm.global_state())
        return evaluate(self.model, self.exp.data.test_x, self.exp.data.test_y, self.cfg["test_batch_size"])

    # ---- the whole run -----------------------------------------------------------------
    def _write_header(self) -> None:
        if self.writer is not None:
            write_run_header(self.writer, self.cfg, self.exp)

    def _restore(self) -> tuple[int, float]:
        """When resuming, load the newest usable checkpoint: (rounds already done, seconds they took)."""
        self.fingerprint = (fingerprint(self.cfg, self.exp.partition, self.exp.initial_state)
                            if self.writer is not None else None)
        if not self.resume or self.writer is None:
            return 0, 0.0
        done, self.rows, elapsed = resume_from_checkpoint(self.writer.dir, self.algorithm, self.fingerprint,
                                                          self.cfg["rounds"], self.exp.device)
        return done, elapsed

    def _checkpoint(self, rounds_done: int, elapsed_s: float) -> None:
        assert self.writer is not None and self.fingerprint is not None
        save_checkpoint(self.writer.dir, rounds_done, self.algorithm.server_state(), self.rows, elapsed_s, self.fingerprint)

    def run(self) -> RunOutcome:
        cfg = self.cfg
        rounds, every = cfg["rounds"], cfg["eval_every"]
        checkpoint_every = cfg.get("checkpoint_every") or every
        self.algorithm.setup(self.exp.initial_state)
        first, elapsed_before = self._restore()
        self._write_header()  # after the checkpoint is accepted: a refused resume leaves config.toml as it was
        bar = tqdm(total=rounds, initial=first, desc=self.label, disable=self.progress != "bar", dynamic_ncols=True,
                   file=sys.stderr, unit="round")
        start = time.perf_counter() - elapsed_before
        stopped_after = None
        try:
            for r in range(first, rounds):
                t0 = time.perf_counter()
                round_stats = self.run_round(r)
                if (r + 1) % every == 0 or r == rounds - 1:
                    acc, loss = self.evaluate()
                    row = {"round": r + 1, "accuracy": acc, "loss": loss, **round_stats,
                           "pool_cosine": None, **self.algorithm.round_metrics(),
                           "elapsed_s": time.perf_counter() - start}
                    self.rows.append(row)
                    if self.writer is not None:
                        self.writer.write_metrics(self.rows)
                    bar.set_postfix(acc=f"{acc:.4f}", s_per_round=f"{time.perf_counter() - t0:.2f}", refresh=False)
                    if self.progress == "log":
                        print(f"[{self.label}] round {r + 1}/{rounds} accuracy {acc:.4f} loss {loss:.4f} "
                              f"elapsed {row['elapsed_s']:.1f}s", file=sys.stderr, flush=True)
                if self.writer is not None and ((r + 1) % checkpoint_every == 0 or r == rounds - 1 or self.stop_requested):
                    self._checkpoint(r + 1, time.perf_counter() - start)
                bar.update(1)
                if self.stop_requested:
                    stopped_after = r + 1
                    break
        finally:
            bar.close()
            self.runner.close()
        if stopped_after is not None:
            return RunOutcome(self.rows, {}, self.algorithm.global_state(), self.writer.dir if self.writer else None,
                              self.algorithm, stopped_after=stopped_after)
        wall = time.perf_counter() - start
        summary = {"algorithm": cfg["algorithm"], "dataset": cfg["dataset"], "model": self.exp.model_name,
                   **summarize_metrics(self.rows, wall, rounds)}
        if self.writer is not None:
            save_tensors(self.writer.dir / "model.safetensors", self.algorithm.global_state())
            self.writer.write_summary(summary)
        return RunOutcome(self.rows, summary, self.algorithm.global_state(),
                          self.writer.dir if self.writer else None, self.algorithm)


def run_experiment(cfg: dict[str, Any], out_dir: str | Path | None = None, progress: str = "bar") -> RunOutcome:
    """Convenience: prepare and run one config."""
    exp = prepare(cfg)
    if progress != "none":
        print(format_summary(exp.partition_summary), file=sys.stderr)
    return Simulation(exp, out_dir=out_dir, progress=progress).run()
