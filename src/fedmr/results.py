"""The results folder of a run, and the comparison table and plot of several runs.

    <out>/config.toml          the resolved config (re-runnable with --config)
    <out>/partition.json       the clients' indices, in the authors' format
    <out>/partition_summary.json
    <out>/metrics.csv          one row per evaluation
    <out>/summary.json         final / best / mean-of-last-5 accuracy (``last_n``: how many evaluations
                               that mean is over, fewer than 5 on a short run), wall time
    <out>/accuracy.png         the accuracy curve (``plot_curves``, the one plot ``compare`` draws too)
    <out>/model.safetensors    the final global model (the recorder writes it)
    <out>/final-model.safetensors  a study's kept copy of it (``keep_model``: git ignores model.safetensors
                               under docs/results, not this name)
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import to_toml
from .errors import ConfigError
from .fileio import atomic_write, atomic_write_text, temporary_name
from .partition import PartitionSpec

log = logging.getLogger("fedmr")

METRIC_COLUMNS = [
    "round", "accuracy", "loss", "train_loss", "clients", "rejected", "dropped", "pool_cosine", "client_state_mb",
    "down_mb", "up_mb", "down_client_state_mb", "down_total_mb", "up_total_mb", "elapsed_s",
]
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

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        atomic_write_text(self.dir / "summary.json", json.dumps(summary, indent=1))


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


YLABELS = {"accuracy": "test accuracy of the global model",
           "fed_accuracy": "federated evaluation accuracy (the clients' test data)"}


def accuracy_figure(curves: Mapping[str, Sequence[Mapping[str, Any]]], title: str, *, key: str = "accuracy",
                    legend: bool = True) -> Any:
    """The matplotlib ``Figure`` of ``plot_curves`` (on an Agg canvas, without pyplot: no display
    needed, and the caller's own backend is left alone): the accuracy curve (column ``key``
    against ``round``) of each run, whole rounds on the x axis, a marker at every evaluation when a
    curve has few (``MARKER_POINTS``), rows without a value skipped."""
    mpl_log = logging.getLogger("matplotlib")  # the CLI logs at INFO: keep font_manager's lines out of it
    if mpl_log.level == logging.NOTSET:
        mpl_log.setLevel(logging.WARNING)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7, 4.5), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, rows in curves.items():
        points = [(float(r["round"]), float(r[key])) for r in rows if _finite(r.get(key))]
        ax.plot([p[0] for p in points], [p[1] for p in points], label=label, linewidth=1.4,
                marker="o" if len(points) <= MARKER_POINTS else None, markersize=4)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel(YLABELS.get(key, key))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend()
    fig.tight_layout()
    return fig


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, title: str, *,
                key: str = "accuracy", legend: bool = True) -> None:
    """One PNG with the accuracy curve of each run (``accuracy_figure``), written atomically (a
    crash leaves no half file).  Both ``fedmr run`` (the engine's recorder: each run's
    ``accuracy.png``) and ``fedmr compare`` (all variants in one) draw with it."""
    fig = accuracy_figure(curves, title, key=key, legend=legend)
    atomic_write(Path(path), lambda tmp: fig.canvas.print_png(str(tmp)))


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
