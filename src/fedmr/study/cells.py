"""The study page's cells: what one cell's run folder gives the page (a finished cell's statistics, an
unfinished one's parked rows) and an ``Entry``, one cell as one section of the page sees it.

An unfinished cell is read only from what its folder commits: ``parked/`` (the newest checkpoint's
round and ``parked/metrics.csv``, the rows up to it), never from its local metrics.csv or checkpoints,
so the page is the same from any checkout."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..results import read_metrics
from .index import Status
from .parking import PARKED
from .spec import NOT_RESULTS, Membership, heterogeneity


def first_reach(rows: Sequence[dict[str, float]], threshold: float) -> int | None:
    """The first evaluated round at or above the threshold."""
    return next((int(r["round"]) for r in rows if r["accuracy"] >= threshold), None)


@dataclass
class Stats:
    """What the page needs from one finished cell."""

    late: float  # mean accuracy over the last late_fraction of the rounds
    best: float
    best_round: int
    reach: dict[float, int | None]  # threshold -> first evaluated round at or above it
    seconds_per_round: float
    rows: list[dict[str, float]]


def cell_stats(folder: Path, rounds: int, fraction: float, thresholds: Sequence[float]) -> Stats:
    import json

    from .execute import late_mean

    rows = read_metrics(folder / "metrics.csv")
    summary = json.loads((folder / "summary.json").read_text())
    late = late_mean(rows, rounds, fraction)
    best = max(range(len(rows)), key=lambda i: rows[i]["accuracy"])
    reach = {t: first_reach(rows, t) for t in thresholds}
    return Stats(late if late is not None else float("nan"), rows[best]["accuracy"], int(rows[best]["round"]), reach,
                 float(summary["wall_seconds"]) / rounds, rows)


@dataclass
class Parked:
    """What an unfinished cell's folder commits: its parked checkpoint's round and the rows up to it."""

    rounds_done: int
    rows: list[dict[str, float]]


def parked(folder: Path) -> Parked | None:
    directory = folder / PARKED
    if not (directory / "metrics.csv").is_file():
        return None
    rows = read_metrics(directory / "metrics.csv")
    manifests = sorted(directory.glob("round-*.json"))
    done = int(manifests[-1].stem.split("-")[1]) if manifests else int(rows[-1]["round"]) if rows else 0
    return Parked(done, rows)


@dataclass
class Entry:
    """One finished, partial (parked) or missing cell as seen from one section of the page."""

    membership: Membership
    status: Status
    stats: Stats | None
    parked: Parked | None = None

    @property
    def rows(self) -> list[dict[str, float]]:
        """A finished cell's metrics, a partial one's parked rows, else none."""
        return self.stats.rows if self.stats else self.parked.rows if self.parked else []

    @property
    def done_stats(self) -> Stats:
        """``stats``, of an entry picked as finished (``stats is not None``)."""
        assert self.stats is not None
        return self.stats

    @property
    def rounds(self) -> int:
        return self.status.cell.cfg.rounds

    @property
    def variant(self) -> str:
        """The algorithm variant as declared (``fedmr@first_stage_rounds=50``), without the other settings."""
        return self.membership.method or self.status.cell.cfg.algorithm

    @property
    def state(self) -> str:
        if self.stats:
            return "finished"
        return f"partial: {self.parked.rounds_done} of {self.rounds} rounds" if self.parked else "not started"

    @property
    def seed(self) -> int:
        return self.status.cell.cfg.seed

    @property
    def het(self) -> str:
        return heterogeneity(self.status.cell.cfg)

    @property
    def others(self) -> list[str]:
        """The cell's declared settings beside its method, seed and heterogeneity that change results
        (``model=resnet20``; not ``save_model_every`` or ``save_pool``: a rerun that keeps its models is the
        same cell)."""
        return [f"{k}={v}" for k, v in self.membership.settings.items()
                if k not in ("algorithm", "seed", "alpha", "partition") and k not in NOT_RESULTS]

    @property
    def method(self) -> str:
        """The cell's method as the page names it: the variant and its other settings."""
        others = self.others
        return self.variant + (f" ({', '.join(others)})" if others else "")

