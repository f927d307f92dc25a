"""A run's bookkeeping, the same for every front end: when to evaluate, what a metrics row holds,
when to checkpoint, and what a finished run leaves behind.

The simulator (``Simulation.run``) and the Flower ServerApp (``CentralEvaluation``) drive rounds in
their own ways, but each hands every finished round to one ``Recorder``, so their ``metrics.csv``,
checkpoints and ``summary.json`` cannot drift apart.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..algorithms.base import Algorithm
from ..callbacks import close_callbacks, run_callbacks
from ..config import RunConfig
from ..data import IN_MEMORY
from ..results import METRIC_COLUMNS, MODEL_FILE, RunWriter, setting_title, summarize_metrics, write_plot
from ..training import evaluate
from .checkpoint import fingerprint, resume_from_checkpoint, save_checkpoint, save_tensors

if TYPE_CHECKING:  # the recorder only reads an Experiment
    from .experiment import Experiment

Row = dict[str, Any]
MODELS = "models"  # <run>/models/round-NNNNNN.safetensors: the global model every save_model_every rounds
RowCallback = Callable[[Row], None]


def write_run_header(writer: RunWriter, cfg: RunConfig, exp: Experiment) -> None:
    """config.toml, then the experiment's record of its clients' data (``Experiment.write_clients``:
    partition.json and its summary): what every results folder starts with."""
    writer.write_config(cfg)
    exp.write_clients(writer, cfg)


class Recorder:
    """One run's bookkeeping: call ``start`` once, ``end_round`` after every round, ``finish`` at the end.

    * Evaluation: the algorithm's global model on the test set after every ``eval_every``-th round
      and after the last one (``evaluation_due``; a front end that also evaluates elsewhere, e.g.
      Flower's federated evaluation, asks it too).  An experiment without test samples gets empty
      accuracy/loss cells instead of an evaluation.
    * A metrics row: ``METRIC_COLUMNS`` (round, accuracy, loss, then the round's ``clients``,
      ``rejected``, ``dropped`` and ``train_loss`` as the front end counted them, then the
      algorithm's ``round_metrics()``: ``pool_cosine``, empty when the algorithm keeps no pool, and
      ``client_state_mb``, 0 when it keeps nothing per client, then the round's traffic as the
      front end measured it (``down_mb``, ``up_mb``, ``down_client_state_mb``: see
      ``engine/traffic.py``) and the run's totals so far (``down_total_mb``, ``up_total_mb``,
      summed over every round, evaluated or not, and kept in checkpoints), then ``elapsed_s``
      since the run began, resumed runs included).
    * Checkpoints: after every ``checkpoint_every``-th round (0: at every evaluation), after the
      last one, and whenever the front end asks (``force``: a stop signal).
    * Models over rounds: with ``save_model_every = N``, the global model after every N-th round as
      ``models/round-NNNNNN.safetensors`` (and, with ``save_pool``, a pool method's K models as
      ``models/round-NNNNNN-pool.safetensors``, the tensors its checkpoints hold as ``pool.*``), for
      ``fedmr landscape``; a resumed run writes the rounds it redoes again, with the same values.
    * The end: ``model.safetensors`` (the global model), ``summary.json``, then ``accuracy.png``
      (the accuracy curve, drawn as ``fedmr compare`` draws its curves; a plot that fails is a
      logged warning, never a lost run).

    Extra columns: a front end that measures more per evaluation (e.g. Flower's federated
    evaluation, ``fed_accuracy`` / ``fed_loss``) names them once in ``extra_columns`` and passes
    their values each round as ``end_round(..., extra={"fed_accuracy": ...})``.  They are written
    after the standard columns (which stay exactly as ``fedmr run`` writes them), in the order
    named, and kept in the checkpointed rows; a column with no value in a row is left empty.
    Naming a standard column, or passing a value for a column not named, is a ValueError: an extra
    column adds a measurement, it never changes what a standard one means.

    ``on_row`` callables get each new row (a dict of the columns) after it is written: progress
    lines, TensorBoard, a user's logging.  Without a ``writer`` nothing is written to disk (the
    rows and summary are still returned).
    """

    def __init__(self, cfg: Mapping[str, Any], exp: Experiment, algorithm: Algorithm, writer: RunWriter | None,
                 *, model: torch.nn.Module | None = None, extra_columns: Sequence[str] = (),
                 on_row: Iterable[RowCallback] = ()):
        clash = [c for c in extra_columns if c in METRIC_COLUMNS]
        if clash:
            raise ValueError(f"extra column '{clash[0]}' is a standard metrics column")
        if len(set(extra_columns)) != len(extra_columns):
            raise ValueError("extra_columns lists a column twice")
        self.cfg, self.exp, self.algorithm, self.writer = RunConfig.of(cfg), exp, algorithm, writer
        self.model = model if model is not None else exp.new_model()
        self.extra_columns = tuple(extra_columns)
        self.columns = [*METRIC_COLUMNS, *self.extra_columns]
        # plus the built-ins the config asks for (tensorboard = true)
        self.on_row = run_callbacks(self.cfg.tensorboard, writer.dir if writer is not None else None, list(on_row))
        self.rounds, self.every = self.cfg.rounds, self.cfg.eval_every
        self.checkpoint_every = self.cfg.checkpoint_every or self.every
        self.rows: list[Row] = []
        self.fingerprint: dict[str, Any] | None = None
        # MB exchanged so far, every round counted; None once unknown (resumed from a checkpoint of before them)
        self.totals: dict[str, float] | None = {"down_total_mb": 0.0, "up_total_mb": 0.0}
        self._start = time.perf_counter()

    # ---- the beginning ---------------------------------------------------------------------
    def start(self, resume: bool = False) -> int:
        """Set the algorithm up; when resuming, load the newest usable checkpoint; then write the
        folder's header (after the checkpoint is accepted: a refused resume leaves config.toml as it
        was).  Returns the rounds already done."""
        self.algorithm.setup(self.exp.initial_state)
        done, elapsed = 0, 0.0
        if self.writer is not None:
            data = self.exp.data
            arrays = ({"train_x": data.train_x, "train_y": data.train_y, "test_x": data.test_x, "test_y": data.test_y}
                      if self.cfg.dataset == IN_MEMORY else None)  # nothing else names such data
            self.fingerprint = fingerprint(self.cfg, self.exp.partition, self.exp.initial_state, arrays)
            if resume:
                done, self.rows, elapsed, counters = resume_from_checkpoint(
                    self.writer.dir, self.algorithm, self.fingerprint, self.rounds, self.exp.device)
                assert self.totals is not None  # as __init__ set it: start() runs once, before any round
                if done and not set(self.totals) <= set(counters):  # its earlier rounds' traffic was never counted
                    self.totals = None
                else:
                    self.totals.update({k: v for k, v in counters.items() if k in self.totals})
            write_run_header(self.writer, self.cfg, self.exp)
        self._start = time.perf_counter() - elapsed
        return done

    def elapsed(self) -> float:
        """Seconds of this run so far, including the part before a resume."""
        return time.perf_counter() - self._start

    # ---- every round -----------------------------------------------------------------------
    def evaluation_due(self, done: int) -> bool:
        """Whether the global model is evaluated after ``done`` rounds of the whole run."""
        return done % self.every == 0 or done == self.rounds

    def checkpoint_due(self, done: int, force: bool = False) -> bool:
        return self.writer is not None and (force or done % self.checkpoint_every == 0 or done == self.rounds)

    def evaluate(self) -> tuple[float, float]:
        """(accuracy, loss) of the algorithm's global model on the test set; (NaN, NaN), written as
        empty cells, when the experiment has no test samples (a Flower federation whose server holds
        no test set: the sites evaluate, in the front end's extra columns)."""
        if not len(self.exp.data.test_y):
            return math.nan, math.nan
        self.model.load_state_dict(self.algorithm.global_state())
        return evaluate(self.model, self.exp.data.test_x, self.exp.data.test_y, self.cfg.test_batch_size)

    def record(self, done: int, round_stats: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Row | None:
        """After round ``done`` (1-based, whole run): keep the model when ``save_model_every`` says, add
        the round's traffic to the totals, evaluate when due and write the row; the row or None.
        Called once per round."""
        self.save_models(done)
        if self.totals is not None:
            self.totals["down_total_mb"] += float(round_stats.get("down_mb") or 0.0)
            self.totals["up_total_mb"] += float(round_stats.get("up_mb") or 0.0)
        if not self.evaluation_due(done):
            return None
        extra = dict(extra or {})
        unknown = [k for k in extra if k not in self.extra_columns]
        if unknown:
            raise ValueError(f"metric '{unknown[0]}' is not among the recorder's extra_columns {self.extra_columns}")
        acc, loss = self.evaluate()
        row: Row = {"round": done, "accuracy": acc, "loss": loss, **round_stats,
                    "pool_cosine": None, "client_state_mb": 0.0, **self.algorithm.round_metrics(), **(self.totals or {}),
                    **{c: extra.get(c) for c in self.extra_columns}, "elapsed_s": self.elapsed()}
        self.rows.append(row)
        if self.writer is not None:
            self.writer.write_metrics(self.rows, self.columns)
        for callback in self.on_row:
            callback(row)
        return row

    def save_models(self, done: int) -> list[Path]:
        """After round ``done``: the global model (and the pool) under models/ when ``save_model_every`` says."""
        every = self.cfg.save_model_every
        if self.writer is None or not every or done % every:
            return []
        folder = self.writer.dir / MODELS
        folder.mkdir(exist_ok=True)
        written = [folder / f"round-{done:06d}.safetensors"]
        save_tensors(written[0], self.algorithm.global_state())
        pool = {k: v for k, v in self.algorithm.server_state().items() if k.startswith("pool.")} if self.cfg.save_pool else {}
        if pool:
            written.append(folder / f"round-{done:06d}-pool.safetensors")
            save_tensors(written[1], pool)
        return written

    def checkpoint(self, done: int, force: bool = False) -> bool:
        """Write the checkpoint after round ``done`` when due (or ``force``d); whether one was written."""
        if not self.checkpoint_due(done, force):
            return False
        assert self.writer is not None and self.fingerprint is not None, "start() first"
        save_checkpoint(self.writer.dir, done, self.algorithm.server_state(), self.rows, self.elapsed(), self.fingerprint,
                        counters=self.totals or {})
        return True

    def end_round(self, done: int, round_stats: Mapping[str, Any], extra: Mapping[str, Any] | None = None,
                  force_checkpoint: bool = False) -> Row | None:
        """``record`` then ``checkpoint``: everything that follows a round."""
        row = self.record(done, round_stats, extra)
        self.checkpoint(done, force_checkpoint)
        return row

    # ---- the end ---------------------------------------------------------------------------
    def finish(self, summary_extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The run's summary (``summary_extra`` after the algorithm, data set and model); with a writer
        also ``model.safetensors`` and ``summary.json``, then ``accuracy.png``."""
        wall = self.elapsed()
        summary = {"algorithm": self.cfg.algorithm, "dataset": self.cfg.dataset, "model": self.exp.model_name,
                   **(summary_extra or {}), **summarize_metrics(self.rows, wall, self.rounds)}
        if self.writer is not None:
            save_tensors(self.writer.dir / MODEL_FILE, self.algorithm.global_state())
            self.writer.write_summary(summary)
            if "final_accuracy" in summary:  # something to draw
                write_plot({self.cfg.algorithm: self.rows}, self.writer.dir / "accuracy.png", self.title(),
                           key=summary.get("accuracy_from", "accuracy"), legend=False)
        close_callbacks(self.on_row)
        return summary

    def title(self) -> str:
        """The plot's title: "fedavg — cnn on cifar10 (dirichlet alpha 0.1, 100 clients)".  An
        experiment whose server holds no training samples is a federation of sites on their own data."""
        exp = self.exp
        setting = setting_title(self.cfg, exp.model_name, exp.data.name, len(exp.partition),
                                clients_hold_data=not len(exp.data.train_y))
        return f"{self.cfg.algorithm} — {setting}"
