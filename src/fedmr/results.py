"""The results folder of a run, and the comparison table and plot of several runs.

    <out>/config.toml          the resolved config (re-runnable with --config)
    <out>/partition.json       the clients' indices, in the authors' format
    <out>/partition_summary.json
    <out>/metrics.csv          one row per evaluation
    <out>/summary.json         final / best / mean-of-last-5 accuracy, wall time
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import to_toml
from .errors import ConfigError
from .fileio import atomic_write, atomic_write_text

METRIC_COLUMNS = [
    "round", "accuracy", "loss", "train_loss", "clients", "rejected", "dropped", "pool_cosine", "client_state_mb", "elapsed_s",
]


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
    last5 = accs[-5:]
    return {
        "rounds": rounds,
        **({"accuracy_from": key} if key != "accuracy" else {}),
        "final_accuracy": accs[-1],
        "best_accuracy": accs[best],
        "best_round": int(rows[best]["round"]),
        "mean_last5_accuracy": sum(last5) / len(last5),
        "wall_seconds": wall_seconds,
        "rounds_per_second": rounds / wall_seconds if wall_seconds > 0 else float("inf"),
    }


def read_metrics(path: str | Path) -> list[dict[str, float]]:
    with Path(path).open() as fh:
        return [{k: float(v) if v not in ("", None) else float("nan") for k, v in row.items()} for row in csv.DictReader(fh)]


def comparison_table(summaries: Mapping[str, Mapping[str, Any]]) -> str:
    """Markdown table, one row per run label."""
    lines = [
        "| method | final acc | best acc (round) | mean of last 5 | wall s | rounds/s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, s in summaries.items():
        lines.append(
            f"| {label} | {s['final_accuracy']:.4f} | {s['best_accuracy']:.4f} ({s['best_round']}) | "
            f"{s['mean_last5_accuracy']:.4f} | {s['wall_seconds']:.1f} | {s['rounds_per_second']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(curves: Mapping[str, Sequence[Mapping[str, float]]], path: str | Path, title: str) -> None:
    """One PNG with the test-accuracy curve of each run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for label, rows in curves.items():
        ax.plot([r["round"] for r in rows], [r["accuracy"] for r in rows], label=label, linewidth=1.4)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy of the global model")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
