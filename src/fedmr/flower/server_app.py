"""The Flower ServerApp: the fedmr algorithm behind an ``AlgorithmStrategy``; after each round the
engine's ``Recorder`` (the simulator's) evaluates the global model every ``eval_every`` rounds on
the server's test set (when it has one) and writes results and checkpoints in the folder layout of
``fedmr run``, the same columns with the same values, plus the nodes' federated evaluation on their
own test data (``flower.fraction_evaluate``) as the recorder's extra columns; ``flower.resume = true``
continues a run from its last good checkpoint.  With ``flower.data = "node"`` the server holds no
training data: the sites tell it what they hold."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from ..algorithms import Federation, build_algorithm
from ..config import RunConfig
from ..data import DataSet
from ..engine.experiment import Experiment, prepare, resolve_device
from ..engine.recorder import Recorder
from ..errors import ConfigError, FedMRError, PluginError
from ..fileio import atomic_write_text
from ..results import RunWriter, default_run_dir
from .grid import PollingGrid
from .sites import initial_state, read_site, site_federation, site_model
from .strategy import AlgorithmStrategy, discover_sites
from .task import FlowerRunConfig, split_run_config

FED_COLUMNS = ("fed_accuracy", "fed_loss", "fed_examples")  # metrics.csv: federated evaluation, beside the central accuracy/loss

log = logging.getLogger("fedmr.flower")

app = ServerApp()


def results_dir(run: FlowerRunConfig) -> Path:
    cfg = run.cfg
    return Path(run.flower["out"]) if run.flower["out"] else default_run_dir("flower", cfg.algorithm, cfg.dataset)


class CentralEvaluation:
    """The strategy's ``evaluate_fn``, called after every round: it hands the round to the run's
    ``Recorder`` (the one ``fedmr run`` uses), with the round's federated evaluation (if any) as the
    extra columns; the recorder evaluates the algorithm's global model (FedMR: the pool mean) when
    due, writes the metrics row and checkpoints, exactly as ``fedmr run`` does."""

    def __init__(self, recorder: Recorder, strategy: AlgorithmStrategy):
        self.recorder, self.strategy = recorder, strategy

    @property
    def rows(self) -> list[dict[str, Any]]:
        return self.recorder.rows

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        done = self.strategy.rounds_before + server_round  # rounds of the whole run so far
        row = self.recorder.end_round(done, self.strategy.last_round, extra=self.strategy.last_eval)
        if row is None or math.isnan(row["accuracy"]):  # not due, or no server-side test set
            return None
        log.info("round %d: accuracy %.4f loss %.4f", done, row["accuracy"], row["loss"])
        return MetricRecord({"accuracy": row["accuracy"], "loss": row["loss"]})


def run_server(grid: Grid, run_config: dict[str, Any]) -> Path:
    """Prepare the experiment exactly as ``fedmr run`` does (or, with ``flower.data = "node"``, from
    what the sites hold), then let Flower drive the rounds."""
    run = split_run_config(run_config)
    if run.cfg.dropout_rate > 0:
        raise ConfigError("dropout_rate is the simulator's stand-in for failing clients; on Flower keep it 0 "
                          "(real SuperNodes fail by themselves, and flower.faults injects failures)")
    resume = bool(run.flower["resume"])
    if resume and not run.flower["out"]:
        raise ConfigError("flower.resume needs flower.out: the folder of the run to continue")
    exp = site_experiment(run, grid) if run.flower["data"] == "node" else prepare(run.cfg)
    out = results_dir(run)
    fraction_evaluate = float(run.flower["fraction_evaluate"])
    writer = RunWriter(out, resume=resume)
    algorithm = build_algorithm(run.cfg, exp.federation)
    recorder = Recorder(exp.cfg, exp, algorithm, writer, extra_columns=FED_COLUMNS if fraction_evaluate > 0 else ())
    rounds_before = recorder.start(resume)
    strategy = AlgorithmStrategy(algorithm, seed=run.cfg.seed, reference=exp.initial_state,
                                 max_update_norm=float(run.cfg.max_update_norm),
                                 node_wait=float(run.flower["node_wait"]),
                                 message_log=out / "messages.jsonl" if run.flower["log_messages"] else None,
                                 rounds_before=rounds_before, fraction_evaluate=fraction_evaluate,
                                 evaluation_due=recorder.evaluation_due)
    if isinstance(exp, SiteExperiment):
        strategy.node_of.update(exp.node_of)
    evaluation = CentralEvaluation(recorder, strategy)
    if rounds_before < run.cfg.rounds:
        strategy.start(grid, ArrayRecord({k: v.detach().cpu() for k, v in algorithm.global_state().items()}),
                       num_rounds=run.cfg.rounds - rounds_before, timeout=float(run.flower["round_timeout"]),
                       evaluate_fn=evaluation)
    recorder.finish({"engine": "flower"})
    log.info("results in %s", out)
    return out


@dataclass
class SiteExperiment(Experiment):
    """``flower.data = "node"``: an experiment whose clients hold their data themselves.  Its data set
    has no training samples (and test samples only from ``flower.server_test_dir``); ``partition`` is
    each site's label counts (what the checkpoint fingerprint covers: the server has no sample
    indices) and ``partition_summary`` what the sites reported, written as ``sites.json`` instead of
    ``partition.json``; the federation is the sites' (client i is the i-th site, by its data-dir)."""

    site_federation: Federation | None = None
    node_of: dict[int, int] = field(default_factory=dict)  # client id -> node id

    @property
    def federation(self) -> Federation:
        assert self.site_federation is not None
        return self.site_federation

    def write_clients(self, writer: RunWriter, cfg: RunConfig) -> None:
        atomic_write_text(writer.dir / "sites.json", json.dumps(self.partition_summary, indent=1))


def site_experiment(run: FlowerRunConfig, grid: Grid) -> SiteExperiment:
    """``flower.data = "node"``: the experiment without training data on the server; the sites say what
    they hold, client i is the i-th site (by data-dir, then counts).  Central evaluation only on
    ``flower.server_test_dir``'s test split, which also fixes the classes and shape every site must have."""
    cfg = run.cfg
    server_test = read_site(cfg, run.flower["server_test_dir"], need_train=False) if run.flower["server_test_dir"] else None
    reference = (server_test.classes, server_test.shape, f"the server's test set {server_test.path}") if server_test else None
    sites = discover_sites(grid, cfg.num_clients, float(run.flower["node_wait"]), reference)
    first = sites[0][1]
    classes, shape = list(first["classes"]), list(first["shape"])
    model_name, build = site_model(cfg, len(classes), shape, first["default-model"])
    device = resolve_device(cfg.device)
    nothing = torch.zeros(0, *shape)
    test_x, test_y = (server_test.test_x, server_test.test_y) if server_test else (nothing, torch.zeros(0, dtype=torch.long))
    data = DataSet("sites", nothing, torch.zeros(0, dtype=torch.long), test_x, test_y, len(classes), classes,
                   default_model=model_name).to(device)
    initial = {k: v.to(device) for k, v in initial_state(cfg, build).items()}
    partition = [list(info["label-counts"]) for _, info in sites]
    site_keys = ("data-dir", "num-examples", "test-examples", "label-counts")
    clients = [{"client": i, "node": node, **{k: info[k] for k in site_keys}} for i, (node, info) in enumerate(sites)]
    summary = {"clients": clients,
               "classes": classes, "shape": shape}
    return SiteExperiment(cfg, data, partition, summary, model_name, initial, device, build,
                          site_federation=site_federation(cfg, sites),
                          node_of={i: node for i, (node, _) in enumerate(sites)})


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_config = dict(context.run_config)
        poll = float(split_run_config(run_config).flower["poll_interval"])  # the default stated once, in task.py
        run_server(PollingGrid(grid, poll), run_config)
    except FedMRError as exc:  # one line for the user; Flower adds its own report of the failed run
        exc = in_flower(exc)
        log.error("fedmr: error: %s", exc)
        raise exc from None


def in_flower(exc: FedMRError) -> FedMRError:
    """The error as a Flower user needs it: a plug-in that cannot be imported is looked for in the
    SuperLink's environment (SUPERLINK_ENVIRONMENT), which is not always the user's shell."""
    if isinstance(exc, PluginError) and "on PYTHONPATH?" in str(exc):
        return PluginError(f"{exc} {SUPERLINK_ENVIRONMENT}")
    return exc


SUPERLINK_ENVIRONMENT = (
    "(in Flower, the ServerApp and the simulated ClientApps import it in the SuperLink's environment, not in "
    "that of flwr run: a local SuperLink that flwr run started by itself keeps the PYTHONPATH of the shell that "
    "first started it; stop it (pgrep -af flower-superlink, then kill PID) and flwr run again from a shell whose "
    "PYTHONPATH holds the plug-in; see docs/flower.md)")
