"""How the results page writes numbers and tables: shared by its sections (``report.py`` and the
section modules beside it)."""

from __future__ import annotations

import math
from collections.abc import Sequence


def pct(x: float) -> str:
    return f"{100 * x:.2f}"


def points(x: float) -> str:
    """A difference of accuracies in percentage points, signed."""
    return f"{100 * x:+.2f}"


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def with_spread(values: Sequence[float]) -> str:
    """Percent, with ± the standard deviation over several values (seeds)."""
    m, sd = mean_std(values)
    return pct(m) if sd is None else f"{pct(m)} ± {pct(sd)}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "l") -> list[str]:
    marks = ["---"] + ["---:" if align == "r" else "---"] * (len(header) - 1)
    return ["| " + " | ".join(header) + " |", "|" + "|".join(marks) + "|", *("| " + " | ".join(r) + " |" for r in rows), ""]
