"""The results folder of a run, and the comparison table and plot of several runs.

    <out>/config.toml          the resolved config (re-runnable with --config)
    <out>/partition.json       the clients' indices, in the authors' format
    <out>/partition_summary.json
    <out>/metrics.csv          one row per evaluation
    <out>/train_loss.csv       one row per round: the clients' training loss and how many were used
    <out>/client_accuracy.csv  the last evaluation's accuracy on each client's local test part
    <out>/summary.json         final / best / mean-of-last-5 accuracy (``last_n``: how many evaluations
                               that mean is over, fewer than 5 on a short run), wall time
    <out>/accuracy.png         the accuracy curve (``plot_curves``, the one plot ``compare`` draws too)
    <out>/loss.png             the training loss of every round and the test loss at the evaluations
    <out>/model.safetensors    the final global model (the recorder writes it)
    <out>/final-model.safetensors  a study's kept copy of it (``keep_model``: git ignores model.safetensors
                               under docs/results, not this name)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import to_toml
from .errors import ConfigError
from .fileio import atomic_write, atomic_write_text, temporary_name
from .partition import PartitionSpec

log = logging.getLogger("fedmr")

# the global model's accuracy on each client's local test part: mean, std and worst-10% mean over the clients
CLIENT_COLUMNS = ["client_acc_mean", "client_acc_std", "client_acc_worst10"]
METRIC_COLUMNS = [
    "round", "accuracy", "loss", *CLIENT_COLUMNS, "train_loss", "clients", "rejected", "dropped", "pool_cosine",
    "client_state_mb", "down_mb", "up_mb", "down_client_state_mb", "down_total_mb", "up_total_mb", "elapsed_s",
]
TRAIN_COLUMNS = ["round", "train_loss", "clients", "rejected", "dropped"]  # train_loss.csv: every round
CLIENT_FILE_COLUMNS = ["round", "client", "test_samples", "correct", "accuracy"]  # client_accuracy.csv
MODEL_FILE = "model.safetensors"
KEPT_MODEL_FILE = "final-model.safetensors"
LAST_N = 5  # summary.json's mean_last5_accuracy: over the last LAST_N evaluations (all, if fewer)
MARKER_POINTS = 30  # a curve with at most this many evaluations is drawn with a marker at each


class RunWriter:
    """Writes one run's folder; refuses to overwrite a folder that already holds a run."""

    def __init__(self, out_dir: str | Path, *, resume: bool = False):
        self.dir = Path(out_dir)
        if self.dir.exists() and not self.dir.is_dir():
            raise ConfigError(f"output path {self.dir} exists and is not a folder")
        if (self.dir / "metrics.csv").exists() and not resume:
            raise ConfigError(f"output folder {self.dir} already holds a run; choose another --out or --resume it")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.csv"

    def write_config(self, cfg: Mapping[str, Any]) -> None:
        atomic_write_text(self.dir / "config.toml", to_toml(cfg))

    def write_partition(self, document: Mapping[str, Any], summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.dir / "partition.json", json.dumps(document))
        atomic_write_text(self.dir / "partition_summary.json", json.dumps(summary, indent=1))

    def write_metrics(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = METRIC_COLUMNS) -> None:
        """Rewrite the whole file (it is small): a resumed run never duplicates rows.  ``columns``:
        the header (the engine's recorder adds a front end's extra columns after the standard ones)."""
        def write(tmp: Path) -> None:
            with tmp.open("w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(columns), extrasaction="ignore")
                writer.writeheader()
                for row in rows:
                    writer.writerow({k: _fmt(row.get(k)) for k in columns})

        atomic_write(self.metrics_path, write)

    # ---- train_loss.csv: a row per round, appended (rewritten only when a run starts or resumes) ----
    @property
    def train_log_path(self) -> Path:
        return self.dir / "train_loss.csv"

    def start_train_log(self, through: int = 0) -> list[dict[str, float]]:
        """Begin train_loss.csv.  A resumed run (``through``: the rounds its checkpoint holds) keeps the
        file's rows of rounds 1..through and drops the later ones (rounds the checkpoint does not hold,
        trained again now) and any half-written last line; a new run starts it empty.  The rows kept."""
        kept: list[str] = []
        if through > 0 and self.train_log_path.is_file():
            lines = self.train_log_path.read_text().split("\n")[:-1]  # the part after the last newline is unfinished
            if lines and lines[0] == ",".join(TRAIN_COLUMNS):
                kept = [line for line in lines[1:] if (r := _train_round(line)) is not None and r <= through]
        text = "".join(f"{line}\n" for line in [",".join(TRAIN_COLUMNS), *kept])
        atomic_write_text(self.train_log_path, text)
        return [{k: float(v) if v else math.nan for k, v in zip(TRAIN_COLUMNS, line.split(","))} for line in kept]

    def append_train_row(self, row: Mapping[str, Any]) -> None:
        with self.train_log_path.open("a") as fh:
            fh.write(",".join(str(_fmt(row.get(k))) for k in TRAIN_COLUMNS) + "\n")

    def sync_train_log(self) -> None:
        """On disk before a checkpoint that counts its rounds is (a resumed run keeps the rows up to it)."""
        if self.train_log_path.is_file():
            with self.train_log_path.open("rb+") as fh:
                os.fsync(fh.fileno())

    def write_client_accuracy(self, done: int, correct: Iterable[int], sizes: Iterable[int]) -> None:
        """client_accuracy.csv: each client's test samples, right answers and accuracy at round ``done``
        (empty accuracy for a client without test samples); rewritten at each evaluation."""
        lines = [",".join(CLIENT_FILE_COLUMNS)]
        for client, (right, n) in enumerate(zip(correct, sizes)):
            lines.append(f"{done},{client},{int(n)},{int(right)},{_fmt(int(right) / int(n)) if n else ''}")
        atomic_write_text(self.dir / "client_accuracy.csv", "\n".join(lines) + "\n")

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=1))


def _train_round(line: str) -> int | None:
    """The round of a complete train_loss.csv row; None for a malformed one."""
    fields = line.split(",")
    return int(fields[0]) if len(fields) == len(TRAIN_COLUMNS) and fields[0].isdigit() else None


def _fmt(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if abs(value) < 1e6 else f"{value:.1f}"
    return value


def default_run_dir(*parts: str) -> Path:
    """runs/<part>-<part>-<time>, with characters a folder name should not hold (the ':' and '.' of a
    plug-in's import string, a '/') replaced by '_'."""
    name = "-".join(re.sub(r"[^A-Za-z0-9_-]+", "_", str(p)) for p in (*parts, time.strftime("%Y%m%d-%H%M%S")))
    return Path("runs") / name


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(float(value))


def summarize_metrics(rows: Sequence[Mapping[str, Any]], wall_seconds: float, rounds: int) -> dict[str, Any]:
    """The summary of a run's evaluated rows: central test accuracy, or, where the server holds no test
    set (a Flower run on the sites' own data), the federated evaluation's ``fed_accuracy``."""
    key = "accuracy"
    if not any(_finite(r.get("accuracy")) for r in rows) and any(_finite(r.get("fed_accuracy")) for r in rows):
        key = "fed_accuracy"
    rows = [r for r in rows if _finite(r.get(key))]
    accs = [float(r[key]) for r in rows]
    if not accs:
        return {"rounds": rounds, "wall_seconds": wall_seconds}
    best = max(range(len(accs)), key=lambda i: accs[i])
    last = accs[-LAST_N:]
    return {
        "rounds": rounds,
        **({"accuracy_from": key} if key != "accuracy" else {}),
        "final_accuracy": accs[-1],
        "best_accuracy": accs[best],
        "best_round": int(rows[best]["round"]),
        "mean_last5_accuracy": sum(last) / len(last),  # the name stays (other code reads it)
        "last_n": len(last),  # how many evaluations that mean is over
        "wall_seconds": wall_seconds,
        "rounds_per_second": rounds / wall_seconds if wall_seconds > 0 else float("inf"),
    }


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    with Path(path).open() as fh:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()} for row in csv.DictReader(fh)]


def _last_n(summary: Mapping[str, Any]) -> int:
    """How many evaluations a summary's ``mean_last5_accuracy`` is over (a summary written before
    ``last_n`` existed: 5)."""
    return int(summary.get("last_n", LAST_N))


def comparison_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table, one row per run label.  The mean column says how many evaluations it is
    over: "mean of last 5", or fewer on a short run ("mean of last 3"); where the runs differ in
    that, the header says "mean of last 5" and each row with fewer says so ("0.8123 (last 3)")."""
    counts = {_last_n(s) for s in summaries.values()}
    shared = counts.pop() if len(counts) == 1 else None
    lines = [
        f"| method | final acc | best acc (round) | mean of last {LAST_N if shared is None else shared} "
        "| wall s | rounds/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, s in summaries.items():
        n = _last_n(s)
        note = f" (last {n})" if shared is None and n != LAST_N else ""
        lines.append(
            f"| {label} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} ({s['best_round']}) | "
            f"{s['mean_last5_accuracy']:.4f}{note} | {s['wall_seconds']:.1f} | {s['rounds_per_second']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def setting_title(cfg: Mapping[str, Any], model: str, data: str, num_clients: int | None = None,
                  clients_hold_data: bool = False) -> str:
    """The model, the data set and how it is split, as plot titles name them: "cnn on cifar10
    (dirichlet alpha 0.1, 100 clients)".  ``clients_hold_data``: each client trains on its own
    data (a Flower federation of sites), nothing was split."""
    spec = PartitionSpec.of(cfg)
    n = spec.num_clients if num_clients is None else num_clients
    partition = spec.partition
    if clients_hold_data:
        where = "the sites' own data"
    elif partition == "dirichlet":
        where = f"dirichlet alpha {spec.alpha:g}"
    elif partition == "file":
        where = f"partition {Path(spec.partition_file).name}"
    else:
        where = str(partition)
    return f"{model} on {data} ({where}, {n} clients)"


YLABELS = {"accuracy": "test accuracy of the global model (%)",
           "fed_accuracy": "federated evaluation accuracy, the clients' test data (%)",
           "loss": "cross-entropy loss"}
PERCENT = {"accuracy", "fed_accuracy", *CLIENT_COLUMNS}  # fractions in the files, drawn in percent
LEGEND_COLUMNS = 3  # legend entries per row under the plot, at most
LEGEND_CHARS = 112  # characters of the legend's 8-point font across the 7-inch figure (an entry's line and gap: 9 more)
Band = Sequence[tuple[float, float, float]]  # (round, low, high): a shaded spread around a curve


def accuracy_figure(curves: Mapping[str, Sequence[Mapping[str, Any]]], title: str, *, key: str = "accuracy",
                    legend: bool = True, bands: Mapping[str, Band] | None = None, ylabel: str | None = None) -> Any:
    """The matplotlib ``Figure`` of ``plot_curves`` (on an Agg canvas, without pyplot: no display
    needed, and the caller's own backend is left alone): the curve of column ``key`` against
    ``round`` of each run, rows without a value skipped, a marker at every point when a curve has few
    (``MARKER_POINTS``), and, for a label in ``bands``, its band shaded in the curve's colour.
    Accuracies are drawn in percent; the y axis starts at 0 (a flat curve at 11% does not look like a
    collapse), the x axis has whole rounds only, and the legend sits under the plot, never on a curve."""
    mpl_log = logging.getLogger("matplotlib")  # the CLI logs at INFO: keep font_manager's lines out of it
    if mpl_log.level == logging.NOTSET:
        mpl_log.setLevel(logging.WARNING)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scale = 100.0 if key in PERCENT else 1.0
    widest = max((len(label) for label in curves), default=0) + 9
    columns = max(1, min(LEGEND_COLUMNS, LEGEND_CHARS // widest))
    legend_rows = -(-len(curves) // columns) if legend and curves else 0
    fig = Figure(figsize=(7, 4.5 + 0.22 * legend_rows), dpi=120, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    lowest, highest = 0.0, 0.0
    for label, rows in curves.items():
        points = [(float(r["round"]), scale * float(r[key])) for r in rows if _finite(r.get(key))]
        (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1.4,
                          marker="o" if len(points) <= MARKER_POINTS else None, markersize=4)
        band = (bands or {}).get(label)
        if band:
            ax.fill_between([b[0] for b in band], [scale * b[1] for b in band], [scale * b[2] for b in band],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        values = [p[1] for p in points] + [scale * b[2] for b in band or ()]
        lowest, highest = min([lowest, *values]), max([highest, *values])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if lowest >= 0 and math.isfinite(highest):
        ax.set_ylim(0, 1.05 * highest if highest > 0 else 1.0)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel or YLABELS.get(key, key))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend_rows:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=columns, fontsize=8, frameon=False)
    return fig


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str, *,
                key: str = "accuracy", legend: bool = True, bands: Mapping[str, Band] | None = None,
                ylabel: str | None = None, metadata: Mapping[str, str | None] | None = None) -> None:
    """One PNG with the curve of each run (``accuracy_figure``), written atomically (a crash leaves
    no half file).  ``fedmr run`` (the engine's recorder: each run's ``accuracy.png`` and
    ``loss.png``), ``fedmr compare`` (all variants in one) and the study's page (``metadata``
    pinned, so the bytes carry no version) all draw with it."""
    fig = accuracy_figure(curves, title, key=key, legend=legend, bands=bands, ylabel=ylabel)
    atomic_write(Path(path), lambda tmp: fig.canvas.print_png(str(tmp), metadata=dict(metadata or {})))


def write_plot(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str, **options: Any) -> bool:
    """``plot_curves``, but a failure (no matplotlib, no fonts, a full disk) is a logged warning, not
    an error: it is called after the results it draws are written (a run's metrics.csv and
    summary.json, a comparison's table), which a plot must never lose.  Whether it was written."""
    try:
        plot_curves(curves, path, title, **options)
        return True
    except Exception as exc:  # noqa: BLE001 - any failure of the plot leaves the results as they are
        log.warning("could not draw %s (%s: %s); the results beside it are written", path, type(exc).__name__, exc)
        try:
            temporary_name(Path(path)).unlink(missing_ok=True)
        except OSError:
            pass
        return False
