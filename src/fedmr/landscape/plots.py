"""The PNG plots of ``fedmr landscape``, drawn from its JSON document alone (so they can be redrawn):
the 1-D curves (mean and spread over directions), the 2-D contour, and the straight path.  PNG
metadata is pinned, as for the study's plots, so the bytes carry no version string."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, metadata={"Software": None})
    _pyplot().close(fig)


def draw_curves_1d(curves: Mapping[str, Mapping[str, Any]], path: Path, title: str) -> None:
    """One or more documents' ``curve_1d``: the mean training loss along the directions, with a band of
    one standard deviation over the directions; one line per label."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for label, curve in curves.items():
        alphas = curve["alphas"]
        mean, std = curve["loss_mean"], curve["loss_std"]
        line = ax.plot(alphas, mean, linewidth=1.4, label=f"{label} ({len(curve['loss'])} directions)")[0]
        ax.fill_between(alphas, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("step along a filter-normalised random direction")
    ax.set_ylabel("training loss (cross-entropy)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def draw_surface_2d(surface: Mapping[str, Any], path: Path, title: str) -> None:
    plt = _pyplot()
    alphas = surface["alphas"]
    fig, ax = plt.subplots(figsize=(5.2, 4.6), dpi=100)
    filled = ax.contourf(alphas, alphas, surface["loss"], levels=20, cmap="viridis")
    ax.contour(alphas, alphas, surface["loss"], levels=20, colors="white", linewidths=0.4, alpha=0.6)
    ax.plot([0], [0], marker="+", color="red", markersize=10)
    fig.colorbar(filled, ax=ax, label="training loss")
    ax.set_xlabel("direction 1 (filter-normalised)")
    ax.set_ylabel("direction 2 (filter-normalised)")
    ax.set_title(title, fontsize=10)
    _save(fig, path)


def draw_paths(paths: Mapping[str, Mapping[str, Any]], path: Path, title: str, ends: Sequence[str] = ("A", "B")) -> None:
    """Training loss (left axis) and accuracy (right axis, dashed) along straight lines, t = 0 at the first model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    right = ax.twinx()
    for label, doc in paths.items():
        chord = f", above the chord {doc['barrier_linear']:.3f}" if "barrier_linear" in doc else ""
        line = ax.plot(doc["t"], doc["loss"], marker="o", markersize=3, linewidth=1.4,
                       label=f"{label}: barrier {doc['barrier']:.3f}{chord}")[0]
        right.plot(doc["t"], [100 * a for a in doc["accuracy"]], linestyle="--", linewidth=1.0, color=line.get_color())
    ax.set_xlabel(f"t (0 = {ends[0]}, 1 = {ends[1]})")
    ax.set_ylabel("training loss (solid)")
    right.set_ylabel("training accuracy, % (dashed)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def draw_over_rounds(series: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str, ylabel: str,
                     mark: float | None = None, mark_label: str = "") -> None:
    """A quantity against the round, one line per label; ``mark`` draws a vertical line (e.g. a switch). A
    positive quantity spanning more than a factor of 20 (models of different sizes on one plot) is drawn on a
    logarithmic axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=100)
    for label, points in series.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, linewidth=1.4, label=label)
    values = [p[1] for points in series.values() for p in points]
    if values and min(values) > 0 and max(values) > 20 * min(values):
        ax.set_yscale("log")
    if mark is not None:
        ax.axvline(mark, color="grey", linestyle=":", linewidth=1.0, label=mark_label or None)
    ax.set_xlabel("round")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
