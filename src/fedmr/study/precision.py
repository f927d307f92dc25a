"""The results page's "precision" section: each bf16 cell beside the fp32 cell of the same setting
(issue 29's fidelity check), read by stated rules, so the page says whether bf16 is safe for a model.

Rules: two finished cells agree when their late means (the page's accuracy) are within
``LATE_MARGIN`` points; a long cell, whose fp32 run may never finish, is checked early instead: the
accuracies at ``EARLY_ROUNDS`` within ``EARLY_MARGIN`` points each (this catches breakage, such as
BatchNorm statistics kept in bf16, not seed-level drift).  The renderer takes plain cells (rows
and state), not the report's entries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .text import table

LATE_MARGIN = 3.0  # points, between the late means of two finished cells
EARLY_ROUNDS = (10, 20)
EARLY_MARGIN = 5.0  # points, at each of EARLY_ROUNDS


@dataclass
class Side:
    """One cell of a pair: its state in words, its metrics rows and, when finished, its late mean."""

    state: str
    rows: list[dict[str, float]]
    late: float | None


@dataclass
class Pair:
    label: str  # model and method
    model: str
    fp32: Side
    bf16: Side


def _at(rows: Sequence[dict[str, float]], r: int) -> float | None:
    return next((float(row["accuracy"]) for row in rows if int(row["round"]) == r), None)


def reading(pair: Pair, window: str) -> tuple[list[str], bool | None]:
    """A table row for ``pair`` and whether it agrees (None: not measurable yet)."""
    a, b = pair.fp32, pair.bf16
    if a.late is not None and b.late is not None:
        diff = 100 * (b.late - a.late)
        ok = abs(diff) <= LATE_MARGIN
        return [pair.label, a.state, b.state, f"mean over rounds {window}", f"{100 * a.late:.2f}", f"{100 * b.late:.2f}",
                f"{diff:+.2f}", f"within {LATE_MARGIN:g}: {'yes' if ok else 'NO'}"], ok
    early = [(r, _at(a.rows, r), _at(b.rows, r)) for r in EARLY_ROUNDS]
    if any(x is None or y is None for _, x, y in early):
        return [pair.label, a.state, b.state, "rounds " + ", ".join(map(str, EARLY_ROUNDS)), "", "", "",
                "not yet measurable"], None
    diffs = [100 * (y - x) for _, x, y in early if x is not None and y is not None]
    ok = all(abs(d) <= EARLY_MARGIN for d in diffs)
    return [pair.label, a.state, b.state, "at rounds " + ", ".join(map(str, EARLY_ROUNDS)),
            " / ".join(f"{100 * x:.2f}" for _, x, _ in early if x is not None),
            " / ".join(f"{100 * y:.2f}" for _, _, y in early if y is not None),
            " / ".join(f"{d:+.2f}" for d in diffs), f"within {EARLY_MARGIN:g} at each: {'yes' if ok else 'NO'}"], ok


def section(pairs: Sequence[Pair], window: str, native: str) -> list[str]:
    """The section's lines (after its heading): the rules, the table and a verdict per model."""
    lines = [f"Each `precision = \"bf16\"` cell beside the fp32 cell of the same setting. bf16 here is mixed precision: "
             "bf16 autocast for the local forward and backward passes; the weights, the optimizer's momentum, "
             "BatchNorm's statistics and everything the server sees (recombination, averaging, checkpoints, "
             f"evaluation) stay fp32.{' ' + native if native else ''} "
             "Rules: two finished cells agree when their accuracies (mean over rounds "
             f"{window}) are within {LATE_MARGIN:g} points (fp32 FedMR's three seeds spread by about 1.6 points at "
             f"alpha 0.1); a long cell is checked at rounds {' and '.join(map(str, EARLY_ROUNDS))}, within "
             f"{EARLY_MARGIN:g} points at each (this catches breakage, not seed-level drift).", ""]
    rows: list[list[str]] = []
    verdicts: dict[str, list[bool | None]] = {}
    for pair in pairs:
        row, ok = reading(pair, window)
        rows.append(row)
        verdicts.setdefault(pair.model, []).append(ok)
    lines += table(["setting", "fp32", "bf16", "compared", "fp32 %", "bf16 %", "bf16 - fp32", "rule"], rows)
    for model, oks in verdicts.items():
        if any(ok is False for ok in oks):
            word = "**not safe**: at least one pair misses its rule (see the table)"
        elif all(ok for ok in oks):
            word = (f"**safe** by these checks ({len(oks)} pair{'s' if len(oks) > 1 else ''} within "
                    f"{'their rules' if len(oks) > 1 else 'its rule'})")
        else:
            done = sum(ok is True for ok in oks)
            word = f"not yet shown: {done} of {len(oks)} pairs measurable and within their rules, none outside"
        lines.append(f"- bf16 for the {model}: {word}.")
    lines.append("")
    return lines
