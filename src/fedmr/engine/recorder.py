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
from ..errors import TrainingError
from ..fileio import atomic_write_text
from ..results import (
    CLIENT_COLUMNS,
    METRIC_COLUMNS,
    MODEL_FILE,
    TRAIN_COLUMNS,
    RunWriter,
    setting_title,
    summarize_metrics,
    write_plot,
)
from ..training import evaluate
from . import segments
from .checkpoint import fingerprint, resume_from_checkpoint, save_checkpoint, save_tensors
from .client_eval import spread

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
    * Every round: its training loss and counts, a row of ``train_loss.csv`` (``TRAIN_COLUMNS``),
      appended; a resumed run keeps the rows up to its checkpoint's round.
    * Per-client evaluation: with each evaluation, the global model's accuracy on each client's local
      test part, read from the same single pass over the test set (``engine/client_eval.py``): its
      mean, std and worst-10% mean over the clients in the row (``client_acc_*``), every client's in
      ``client_accuracy.csv`` (rewritten, so it holds the last evaluation).
    * A metrics row: ``METRIC_COLUMNS`` (round, accuracy, loss, the ``client_acc_*`` spread, then the round's ``clients``,
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
      (the accuracy curve, drawn as ``fedmr compare`` draws its curves) and ``loss.png`` (training
      loss every round, test loss at the evaluations); a plot that fails is a logged warning, never a
      lost run.

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
                 on_row: Iterable[RowCallback] = (), on_checkpoint: Iterable[Callable[[int], None]] = ()):
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
        self.on_checkpoint = list(on_checkpoint)  # called with the round of each checkpoint written (study: park)
        self.rounds, self.every = self.cfg.rounds, self.cfg.eval_every
        self.checkpoint_every = self.cfg.checkpoint_every or self.every
        self.rows: list[Row] = []
        self.train_rows: list[Row] = []  # every round's train_loss.csv row
        self.fingerprint: dict[str, Any] | None = None
        # MB exchanged so far, every round counted; None once unknown (resumed from a checkpoint of before them)
        self.totals: dict[str, float] | None = {"down_total_mb": 0.0, "up_total_mb": 0.0}
        self.idle_limit = self.cfg.max_rounds_without_update
        self.idle_since: int | None = None  # the first of the latest rounds in a row with no update accepted
        self._start = time.perf_counter()
        self.segments: list[Row] = []  # the rounds before this start or resume: where they ran (segments.py)
        self._segment: Row = {"first_round": 1}
        self._segment_start = self._start

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
            ckpt = resume_from_checkpoint(self.writer.dir, self.algorithm, self.fingerprint, self.rounds,
                                          self.exp.device) if resume else None
            if ckpt is not None:
                done, self.rows, elapsed, counters = ckpt.rounds_done, list(ckpt.rows), ckpt.elapsed_s, ckpt.counters
                self.segments = list(ckpt.segments)
                assert self.totals is not None  # as __init__ set it: start() runs once, before any round
                if not set(self.totals) <= set(counters):  # its earlier rounds' traffic was never counted
                    self.totals = None
                else:
                    self.totals.update({k: v for k, v in counters.items() if k in self.totals})
            write_run_header(self.writer, self.cfg, self.exp)
            self.train_rows = self.writer.start_train_log(done)
        self._start = time.perf_counter() - elapsed
        self._segment = segments.begin(self.cfg, self.exp.device, done + 1)
        self._segment_start = time.perf_counter()
        return done

    def segment_rows(self, done: int) -> list[Row]:
        """Where and how rounds 1..``done`` were computed: the resumed run's segments, then this one."""
        return [*self.segments, segments.close(self._segment, done, time.perf_counter() - self._segment_start)]

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
        acc, loss, _ = self._evaluate()
        return acc, loss

    def _evaluate(self) -> tuple[float, float, torch.Tensor | None]:
        """``evaluate``, and whether each test sample was right (None without a test set)."""
        y = self.exp.data.test_y
        if not len(y):
            return math.nan, math.nan, None
        self.model.load_state_dict(self.algorithm.global_state())
        hits = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        acc, loss = evaluate(self.model, self.exp.data.test_x, y, self.cfg.test_batch_size, hits=hits)
        return acc, loss, hits

    def _per_client(self, done: int, hits: torch.Tensor | None) -> dict[str, float]:
        """The row's ``client_acc_*`` from the evaluation's ``hits`` (empty cells where the clients have
        no local test parts), and client_accuracy.csv."""
        tests = self.exp.client_tests
        if hits is None or tests is None:
            return dict.fromkeys(CLIENT_COLUMNS, math.nan)
        correct = tests.correct(hits)
        if self.writer is not None:
            self.writer.write_client_accuracy(done, correct, tests.sizes)
        return spread(tests.accuracies(correct))

    def record(self, done: int, round_stats: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> Row | None:
        """After round ``done`` (1-based, whole run): keep the model when ``save_model_every`` says, add
        the round's traffic to the totals, evaluate when due and write the row; the row or None.
        Called once per round."""
        self.save_models(done)
        if self.totals is not None:
            self.totals["down_total_mb"] += float(round_stats.get("down_mb") or 0.0)
            self.totals["up_total_mb"] += float(round_stats.get("up_mb") or 0.0)
        train_row = {"round": done, **{k: round_stats.get(k) for k in TRAIN_COLUMNS[1:]}}
        self.train_rows.append(train_row)
        if self.writer is not None:
            self.writer.append_train_row(train_row)
        stalled = self._stalled(done, round_stats)
        if not self.evaluation_due(done) and not stalled:
            return None
        extra = dict(extra or {})
        unknown = [k for k in extra if k not in self.extra_columns]
        if unknown:
            raise ValueError(f"metric '{unknown[0]}' is not among the recorder's extra_columns {self.extra_columns}")
        acc, loss, hits = self._evaluate()
        row: Row = {"round": done, "accuracy": acc, "loss": loss, **self._per_client(done, hits), **round_stats,
                    "pool_cosine": None, "client_state_mb": 0.0, **self.algorithm.round_metrics(), **(self.totals or {}),
                    **{c: extra.get(c) for c in self.extra_columns}, "elapsed_s": self.elapsed()}
        self.rows.append(row)
        if self.writer is not None:
            self.writer.write_metrics(self.rows, self.columns)
        for callback in self.on_row:
            callback(row)
        if stalled:
            close_callbacks(self.on_row)
            raise TrainingError(self._stall_message(done))
        return row

    def _stalled(self, done: int, round_stats: Mapping[str, Any]) -> bool:
        """Whether round ``done`` is the ``max_rounds_without_update``-th in a row in which no client
        update was accepted (each rejected as unsound, or its client dropped): such a run no longer
        trains (a learning rate too large, a model or data that give NaN), and goes no further."""
        if int(round_stats.get("clients") or 0) > 0:
            self.idle_since = None
            return False
        if self.idle_since is None:
            self.idle_since = done
        return self.idle_limit > 0 and done - self.idle_since + 1 >= self.idle_limit

    def _stall_message(self, done: int) -> str:
        where = f"; the results so far are in {self.writer.metrics_path}" if self.writer is not None else ""
        return (f"no client update was accepted in rounds {self.idle_since}-{done} ({self.idle_limit} in a row, "
                f"max_rounds_without_update = {self.idle_limit}): every update was rejected as unsound or its "
                f"client dropped (the warnings above say why: non-finite values from a learning rate too large, "
                f"NaN in the data or the model?); the run stopped after round {done}{where}")

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
        self.writer.sync_train_log()  # its rows up to this round are on disk before the checkpoint that counts them
        ran = self.segment_rows(done)
        save_checkpoint(self.writer.dir, done, self.algorithm.server_state(), self.rows, self.elapsed(), self.fingerprint,
                        counters=self.totals or {}, segments=ran)
        atomic_write_text(self.writer.dir / segments.FILE, segments.to_csv(ran))
        for callback in self.on_checkpoint:
            callback(done)
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
            self.plot_loss()
        close_callbacks(self.on_row)
        return summary

    def plot_loss(self) -> None:
        """loss.png: the clients' mean training loss of every round and the global model's test loss at
        each evaluation (rounds where every update was rejected have no training loss, left out)."""
        assert self.writer is not None
        curves = {"training loss (clients, every round)": [{"round": r["round"], "loss": r["train_loss"]}
                                                           for r in self.train_rows],
                  "test loss (global model, at evaluations)": self.rows}
        curves = {label: rows for label, rows in curves.items()
                  if any(v is not None and math.isfinite(float(v)) for v in (r["loss"] for r in rows))}
        if curves:
            write_plot(curves, self.writer.dir / "loss.png", self.title(), key="loss")

    def title(self) -> str:
        """The plot's title: "fedavg — cnn on cifar10 (dirichlet alpha 0.1, 100 clients)".  An
        experiment whose server holds no training samples is a federation of sites on their own data."""
        exp = self.exp
        setting = setting_title(self.cfg, exp.model_name, exp.data.name, len(exp.partition),
                                clients_hold_data=not len(exp.data.train_y))
        return f"{self.cfg.algorithm} — {setting}"
