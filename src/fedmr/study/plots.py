"""The study page's plots: accuracy against round, drawn by the one plotting function of runs and
comparisons (``results.plot_curves``: percent, the y axis from 0, whole rounds, the legend under the
plot), with the PNG's metadata pinned so the bytes carry no version.  A method with several seeds is
drawn as the mean over its seeds with a band from the lowest to the highest seed at each round."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..results import plot_curves

Points = list[tuple[float, float]]  # (round, accuracy)
Band = list[tuple[float, float, float]]  # (round, lowest seed, highest seed)
BAND = "band: lowest to highest seed"  # what a multi-seed curve's legend says of its band


def seed_curve(runs: Sequence[Sequence[Mapping[str, float]]]) -> tuple[Points, Band]:
    """The seeds' mean accuracy at each evaluated round that every seed reached, and their spread there."""
    by_round: dict[float, list[float]] = {}
    for rows in runs:
        for r in rows:
            by_round.setdefault(r["round"], []).append(r["accuracy"])
    full = [(r, v) for r, v in sorted(by_round.items()) if len(v) == len(runs)]
    return [(r, sum(v) / len(v)) for r, v in full], [(r, min(v), max(v)) for r, v in full]


def seed_label(label: str, seeds: int) -> str:
    return label + (f" (mean of {seeds} seeds, {BAND})" if seeds > 1 else "")


def plot(curves: Mapping[str, Points], path: Path, title: str, bands: Mapping[str, Band] | None = None) -> None:
    """Accuracy against round, one line per label (a band for a label in ``bands``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = {label: [{"round": r, "accuracy": a} for r, a in points] for label, points in curves.items()}
    plot_curves(rows, path, title, ylabel="test accuracy (%)", bands=bands, metadata={"Software": None})
