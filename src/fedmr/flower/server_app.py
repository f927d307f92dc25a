"""The Flower ServerApp: the fedmr algorithm behind an ``AlgorithmStrategy``; after each round the
engine's ``Recorder`` (the simulator's) evaluates the global model every ``eval_every`` rounds and
writes results and checkpoints in the folder layout of ``fedmr run``, the same columns with the same
values; ``flower.resume = true`` continues a run from its last good checkpoint."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..algorithms import build_algorithm
from ..engine.recorder import Recorder
from ..engine.simulator import prepare
from ..errors import ConfigError
from ..results import RunWriter
from .strategy import AlgorithmStrategy
from .task import FlowerRunConfig, split_run_config

log = logging.getLogger("fedmr.flower")

app = ServerApp()


def results_dir(run: FlowerRunConfig) -> Path:
    cfg = run.cfg
    return Path(run.flower["out"] or f"runs/flower-{cfg['algorithm']}-{cfg['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}")


class CentralEvaluation:
    """The strategy's ``evaluate_fn``, called after every round: it hands the round to the run's
    ``Recorder`` (the one ``fedmr run`` uses), which evaluates the algorithm's global model (FedMR:
    the pool mean) when due, writes the metrics row and checkpoints, exactly as ``fedmr run`` does."""

    def __init__(self, recorder: Recorder, strategy: AlgorithmStrategy):
        self.recorder, self.strategy = recorder, strategy

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.recorder.rows

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        done = self.strategy.rounds_before + server_round  # rounds of the whole run so far
        row = self.recorder.end_round(done, self.strategy.last_round)
        if row is None:
            return None
        log.info("round %d: accuracy %.4f loss %.4f", done, row["accuracy"], row["loss"])
        return MetricRecord({"accuracy": row["accuracy"], "loss": row["loss"]})


def run_server(grid: Grid, run_config: dict[str, Any]) -> Path:
    """Prepare the experiment exactly as ``fedmr run`` does, then let Flower drive the rounds."""
    run = split_run_config(run_config)
    if run.cfg["dropout_rate"] > 0:
        raise ConfigError("dropout_rate is the simulator's stand-in for failing clients; on Flower keep it 0 "
                          "(real SuperNodes fail by themselves, and flower.faults injects failures)")
    resume = bool(run.flower["resume"])
    if resume and not run.flower["out"]:
        raise ConfigError("flower.resume needs flower.out: the folder of the run to continue")
    exp = prepare(run.cfg)
    out = results_dir(run)
    writer = RunWriter(out, resume=resume)
    algorithm = build_algorithm(run.cfg, exp.federation)
    recorder = Recorder(exp.cfg, exp, algorithm, writer)
    rounds_before = recorder.start(resume)
    strategy = AlgorithmStrategy(algorithm, seed=run.cfg["seed"], reference=exp.initial_state,
                                 max_update_norm=float(run.cfg["max_update_norm"]),
                                 node_wait=float(run.flower["node_wait"]),
                                 message_log=out / "messages.jsonl" if run.flower["log_messages"] else None,
                                 rounds_before=rounds_before)
    evaluation = CentralEvaluation(recorder, strategy)
    if rounds_before < run.cfg["rounds"]:
        strategy.start(grid, ArrayRecord({k: v.detach().cpu() for k, v in algorithm.global_state().items()}),
                       num_rounds=run.cfg["rounds"] - rounds_before, timeout=float(run.flower["round_timeout"]),
                       evaluate_fn=evaluation)
    recorder.finish({"engine": "flower"})
    log.info("results in %s", out)
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))
