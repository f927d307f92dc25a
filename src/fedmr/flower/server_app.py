"""The Flower ServerApp: the fedmr algorithm behind an ``AlgorithmStrategy``, the global model
evaluated on the server every ``eval_every`` rounds, results and checkpoints in the folder layout of
``fedmr run``; ``flower.resume = true`` continues a run from its last good checkpoint."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..algorithms import Algorithm, build_algorithm
from ..engine.checkpoint import fingerprint, resume_from_checkpoint, save_checkpoint, save_tensors
from ..engine.simulator import Experiment, prepare, write_run_header
from ..errors import ConfigError
from ..results import RunWriter, summarize_metrics
from ..training import evaluate
from .strategy import AlgorithmStrategy
from .task import FlowerRunConfig, split_run_config

log = logging.getLogger("fedmr.flower")

app = ServerApp()


def results_dir(run: FlowerRunConfig) -> Path:
    cfg = run.cfg
    return Path(run.flower["out"] or f"runs/flower-{cfg['algorithm']}-{cfg['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}")


class CentralEvaluation:
    """The strategy's ``evaluate_fn``, called after every round: the algorithm's global model (FedMR:
    the pool mean) on the test set every ``eval_every`` rounds and after the last, one metrics row
    each, written as it goes; a checkpoint every ``checkpoint_every`` rounds (default: at every
    evaluation) and after the last, exactly as ``fedmr run`` writes them."""

    def __init__(self, exp: Experiment, algorithm: Algorithm, strategy: AlgorithmStrategy, writer: RunWriter,
                 run_fingerprint: dict[str, Any], rows: list[dict[str, Any]], elapsed_before: float = 0.0):
        self.exp, self.algorithm, self.strategy, self.writer = exp, algorithm, strategy, writer
        self.fingerprint = run_fingerprint
        self.model = exp.new_model()
        self.rounds, self.every = exp.cfg["rounds"], exp.cfg["eval_every"]
        self.checkpoint_every = exp.cfg.get("checkpoint_every") or self.every
        self.rows = rows
        self.start = time.perf_counter() - elapsed_before

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        done = self.strategy.rounds_before + server_round  # rounds of the whole run so far
        record = None
        if done % self.every == 0 or done == self.rounds:
            self.model.load_state_dict(self.algorithm.global_state())
            acc, loss = evaluate(self.model, self.exp.data.test_x, self.exp.data.test_y, self.exp.cfg["test_batch_size"])
            row: dict[str, Any] = {"round": done, "accuracy": acc, "loss": loss, **self.strategy.last_round,
                                   "pool_cosine": self.algorithm.round_metrics().get("pool_cosine"),
                                   "elapsed_s": time.perf_counter() - self.start}
            self.rows.append(row)
            self.writer.write_metrics(self.rows)
            log.info("round %d: accuracy %.4f loss %.4f", done, acc, loss)
            record = MetricRecord({"accuracy": acc, "loss": loss})
        if done % self.checkpoint_every == 0 or done == self.rounds:
            save_checkpoint(self.writer.dir, done, self.algorithm.server_state(), self.rows,
                            time.perf_counter() - self.start, self.fingerprint)
        return record


def run_server(grid: Grid, run_config: dict[str, Any]) -> Path:
    """Prepare the experiment exactly as ``fedmr run`` does, then let Flower drive the rounds."""
    run = split_run_config(run_config)
    if run.cfg.get("dropout_rate", 0.0) > 0:
        raise ConfigError("dropout_rate is the simulator's stand-in for failing clients; on Flower keep it 0 "
                          "(real SuperNodes fail by themselves, and flower.faults injects failures)")
    resume = bool(run.flower["resume"])
    if resume and not run.flower["out"]:
        raise ConfigError("flower.resume needs flower.out: the folder of the run to continue")
    exp = prepare(run.cfg)
    out = results_dir(run)
    writer = RunWriter(out, resume=resume)
    algorithm = build_algorithm(run.cfg, exp.federation)
    algorithm.setup(exp.initial_state)
    run_fingerprint = fingerprint(exp.cfg, exp.partition, exp.initial_state)
    rounds_before, rows, elapsed = (resume_from_checkpoint(out, algorithm, run_fingerprint, run.cfg["rounds"], exp.device)
                                    if resume else (0, [], 0.0))
    write_run_header(writer, exp.cfg, exp)  # after the checkpoint is accepted, as fedmr run does
    strategy = AlgorithmStrategy(algorithm, seed=run.cfg["seed"], reference=exp.initial_state,
                                 max_update_norm=float(run.cfg["max_update_norm"]),
                                 node_wait=float(run.flower["node_wait"]),
                                 message_log=out / "messages.jsonl" if run.flower["log_messages"] else None,
                                 rounds_before=rounds_before)
    evaluation = CentralEvaluation(exp, algorithm, strategy, writer, run_fingerprint, rows, elapsed)
    if rounds_before < run.cfg["rounds"]:
        strategy.start(grid, ArrayRecord({k: v.detach().cpu() for k, v in algorithm.global_state().items()}),
                       num_rounds=run.cfg["rounds"] - rounds_before, timeout=float(run.flower["round_timeout"]),
                       evaluate_fn=evaluation)
    wall = time.perf_counter() - evaluation.start
    save_tensors(out / "model.safetensors", algorithm.global_state())
    writer.write_summary({"algorithm": run.cfg["algorithm"], "dataset": run.cfg["dataset"], "model": exp.model_name,
                          "engine": "flower", **summarize_metrics(evaluation.rows, wall, run.cfg["rounds"])})
    log.info("results in %s", out)
    return out


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, dict(context.run_config))
