"""The Flower ServerApp: the fedmr algorithm behind an ``AlgorithmStrategy``, the global model
evaluated every ``eval_every`` rounds on the server's test set (when it has one) and on the nodes'
own test data (``flower.fraction_evaluate``), results and checkpoints in the folder layout of
``fedmr run``; ``flower.resume = true`` continues a run from its last good checkpoint.  With
``flower.data = "node"`` the server holds no training data: the sites tell it what they hold."""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

import torch

from ..algorithms import Algorithm, Federation, build_algorithm
from ..data import DataSet
from ..engine.checkpoint import fingerprint, resume_from_checkpoint, save_checkpoint, save_tensors
from ..engine.simulator import Experiment, prepare, resolve_device, write_run_header
from ..errors import ConfigError, FedMRError
from ..fileio import atomic_write_text
from ..results import METRIC_COLUMNS, RunWriter, summarize_metrics
from ..training import evaluate
from .grid import PollingGrid
from .sites import initial_state, read_site, site_federation
from .strategy import AlgorithmStrategy, discover_sites
from .task import FlowerRunConfig, split_run_config

FED_COLUMNS = ("fed_accuracy", "fed_loss", "fed_examples")  # metrics.csv: federated evaluation, beside the central accuracy/loss

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
                 run_fingerprint: dict[str, Any], rows: list[dict[str, Any]], elapsed_before: float = 0.0,
                 columns: list[str] = METRIC_COLUMNS):
        self.exp, self.algorithm, self.strategy, self.writer = exp, algorithm, strategy, writer
        self.fingerprint = run_fingerprint
        self.model = exp.new_model()
        self.rounds, self.every = exp.cfg["rounds"], exp.cfg["eval_every"]
        self.checkpoint_every = exp.cfg.get("checkpoint_every") or self.every
        self.rows, self.columns = rows, columns
        self.start = time.perf_counter() - elapsed_before

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        done = self.strategy.rounds_before + server_round  # rounds of the whole run so far
        record = None
        if done % self.every == 0 or done == self.rounds:
            acc = loss = math.nan  # no server-side test set (flower.data = "node" without flower.server_test_dir)
            if self.exp.data.test_y.numel():
                self.model.load_state_dict(self.algorithm.global_state())
                acc, loss = evaluate(self.model, self.exp.data.test_x, self.exp.data.test_y, self.exp.cfg["test_batch_size"])
            row: dict[str, Any] = {"round": done, "accuracy": acc, "loss": loss, **self.strategy.last_round,
                                   **self.strategy.last_eval,
                                   "pool_cosine": self.algorithm.round_metrics().get("pool_cosine"),
                                   "elapsed_s": time.perf_counter() - self.start}
            self.rows.append(row)
            self.writer.write_metrics(self.rows, self.columns)
            if not math.isnan(acc):
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
    if run.flower["data"] == "node":
        exp, federation, node_of = site_experiment(run, grid)
    else:
        exp, node_of = prepare(run.cfg), {}
        federation = exp.federation
    out = results_dir(run)
    fed_eval = float(run.flower["fraction_evaluate"]) > 0
    writer = RunWriter(out, resume=resume)
    algorithm = build_algorithm(run.cfg, federation)
    algorithm.setup(exp.initial_state)
    run_fingerprint = fingerprint(exp.cfg, exp.partition, exp.initial_state)
    rounds_before, rows, elapsed = (resume_from_checkpoint(out, algorithm, run_fingerprint, run.cfg["rounds"], exp.device)
                                    if resume else (0, [], 0.0))
    if node_of:  # after the checkpoint is accepted, as fedmr run does
        writer.write_config(exp.cfg)
        atomic_write_text(out / "sites.json", json.dumps(exp.partition_summary, indent=1))
    else:
        write_run_header(writer, exp.cfg, exp)
    strategy = AlgorithmStrategy(algorithm, seed=run.cfg["seed"], reference=exp.initial_state,
                                 max_update_norm=float(run.cfg["max_update_norm"]),
                                 node_wait=float(run.flower["node_wait"]),
                                 message_log=out / "messages.jsonl" if run.flower["log_messages"] else None,
                                 rounds_before=rounds_before, fraction_evaluate=float(run.flower["fraction_evaluate"]),
                                 eval_every=run.cfg["eval_every"], num_rounds=run.cfg["rounds"])
    strategy.node_of.update(node_of)
    evaluation = CentralEvaluation(exp, algorithm, strategy, writer, run_fingerprint, rows, elapsed,
                                   columns=METRIC_COLUMNS + list(FED_COLUMNS) if fed_eval else METRIC_COLUMNS)
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


def site_experiment(run: FlowerRunConfig, grid: Grid) -> tuple[Experiment, Federation, dict[int, int]]:
    """``flower.data = "node"``: the experiment without training data on the server; the sites say what
    they hold, client i is the i-th node (ascending id).  Central evaluation only on
    ``flower.server_test_dir``'s test split, which also fixes the classes and shape every site must have."""
    cfg = run.cfg
    server_test = read_site(cfg, run.flower["server_test_dir"], need_train=False) if run.flower["server_test_dir"] else None
    reference = (server_test.classes, server_test.shape, f"the server's test set {server_test.path}") if server_test else None
    sites = discover_sites(grid, cfg["num_clients"], float(run.flower["node_wait"]), reference)
    first = sites[0][1]
    classes, shape = list(first["classes"]), list(first["shape"])
    model_name = first["default-model"] if cfg["model"] == "auto" else cfg["model"]
    device = resolve_device(cfg["device"])
    nothing = torch.zeros(0, *shape)
    test_x, test_y = (server_test.test_x, server_test.test_y) if server_test else (nothing, torch.zeros(0, dtype=torch.long))
    data = DataSet("sites", nothing, torch.zeros(0, dtype=torch.long), test_x, test_y, len(classes), classes,
                   default_model=model_name).to(device)
    initial = {k: v.to(device) for k, v in initial_state(cfg, model_name, len(classes), shape).items()}
    # the checkpoint fingerprint's "partition": each site's label counts (the server has no sample indices)
    partition = [list(info["label-counts"]) for _, info in sites]
    summary = {"clients": [{"client": i, "node": node, **{k: info[k] for k in ("data-dir", "num-examples", "test-examples", "label-counts")}}
                           for i, (node, info) in enumerate(sites)], "classes": classes, "shape": shape}
    exp = Experiment(cfg, data, partition, summary, model_name, initial, device)
    return exp, site_federation(cfg, sites), {i: node for i, (node, _) in enumerate(sites)}


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_server(PollingGrid(grid, float(context.run_config.get("flower.poll_interval", 0.1))), dict(context.run_config))
    except FedMRError as exc:  # one line for the user; Flower adds its own report of the failed run
        log.error("fedmr: error: %s", exc)
        raise
