"""The results page's per-client section: how the global model does on each client's own local test
part (``engine/client_eval.py``), for the main cells whose runs record it in metrics.csv
(``client_acc_mean``, ``client_acc_std``, ``client_acc_worst10``).  Runs from before those columns
have none; where no main cell has them the page has no such section, so older pages stay as they were."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from ..results import CLIENT_COLUMNS
from .execute import late_mean
from .text import table, with_spread

TITLE = "## Per-client accuracy"
HEADER = ["method", "heterogeneity", "mean over clients", "std over clients", "worst 10% of clients", "seeds"]


def client_spread(rows: list[dict[str, float]], rounds: int, fraction: float) -> list[float] | None:
    """``CLIENT_COLUMNS``, each its mean over the run's evaluations in the late window; None where an
    evaluation there lacks them (a run from before the columns, or resumed across them)."""
    means = [late_mean(rows, rounds, fraction, key) for key in CLIENT_COLUMNS]
    if any(m is None or math.isnan(m) for m in means):
        return None
    return [float(m) for m in means if m is not None]


def section(runs: Mapping[tuple[str, str], Sequence[tuple[list[dict[str, float]], int]]], methods: Sequence[str],
            hets: Sequence[str], fraction: float, window: str) -> list[str]:
    """The section's lines: one row per method and heterogeneity over its finished seeds' ``runs``
    (metrics rows, rounds); no lines at all when no run records the columns."""
    rows = []
    for method in methods:
        for het in hets:
            seeds = runs.get((method, het), [])
            spreads = [s for s in (client_spread(r, n, fraction) for r, n in seeds) if s is not None]
            if spreads:
                rows.append([method, het, *[with_spread([s[i] for s in spreads]) for i in range(len(CLIENT_COLUMNS))],
                             f"{len(spreads)}" + (f" of {len(seeds)}" if len(spreads) < len(seeds) else "")])
    if not rows:
        return []
    return [TITLE, "",
            "The global model's accuracy on each client's own local test part (the test split dealt out class by class "
            "in proportion to each client's training samples of that class, as `fedmr partition --export` writes it), "
            "read from each evaluation's single pass over the test set: the mean over the clients (each client counts "
            "once), their standard deviation, and the mean of the worst 10% of the clients, each averaged over the "
            f"evaluations of rounds {window}, in percent. Where a cell has several seeds: mean ± standard deviation "
            "over the seeds. Only runs that record it are shown (runs from before it do not).", "",
            *table(HEADER, rows)]
