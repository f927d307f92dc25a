"""Where a long cell's rounds ran: its ``segments.csv`` (engine/segments.py, a row per start or resume of
the run) as a small table of the ResNet-20 section, and the processor each finished cell ran on, by which the
page's "Wall time per round" table groups its cells.

A finished cell is read from its folder's ``segments.csv``, a partial one from ``parked/segments.csv``
only (committed with its parked checkpoint, so the page is the same from any checkout).  Rounds no
segment covers (those run before segments.csv existed, or every round of a cell without the file) are
one "not recorded" row; a cell not started has no row."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

from ..engine.segments import FILE
from .cells import Entry
from .parking import PARKED
from .sheet import Sheet
from .text import table

BEFORE = "not recorded (before segments.csv existed)"


def read_segments(path: Path) -> list[dict[str, str]]:
    """The rows of a segments.csv, in round order; none without the file."""
    if not path.is_file():
        return []
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r.get("first_round") and r.get("last_round")]
    return sorted(rows, key=lambda r: int(r["first_round"]))


def s_per_round(row: dict[str, str]) -> str:
    value = row.get("s_per_round") or ""
    try:
        return f"{float(value):.2f}"
    except ValueError:  # empty (a segment closed before its first round) or not a number: as written
        return value


def processor(e: Entry) -> str:
    """The processor a finished cell ran on, from its segments.csv: the one named if every segment names the
    same, "several" when they differ, "not recorded" when none does (cells from before the file existed)."""
    names = {seg.get("processor", "") for seg in read_segments(e.status.folder / FILE)} - {""}
    return names.pop() if len(names) == 1 else "several (see the cell's segments.csv)" if names else "not recorded"


def stretches(e: Entry) -> list[list[str]]:
    """The table's rows for one cell: its segments, with "not recorded" rows for the rounds none covers."""
    if e.stats is not None:
        done, path = e.rounds, e.status.folder / FILE
    elif e.parked is not None:
        done, path = e.parked.rounds_done, e.status.folder / PARKED / FILE
    else:
        return []
    rows, upto = [], 0
    for seg in read_segments(path):
        first, last = int(seg["first_round"]), int(seg["last_round"])
        if first > upto + 1:
            rows.append([e.variant, f"{upto + 1}-{first - 1}", BEFORE if upto == 0 else "not recorded", "", "", ""])
        rows.append([e.variant, f"{first}-{last}", seg.get("processor", ""), seg.get("precision", ""),
                     seg.get("compile", ""), s_per_round(seg)])
        upto = max(upto, last)
    if upto < done:
        rows.append([e.variant, f"{upto + 1}-{done}", BEFORE if upto == 0 else "not recorded", "", "", ""])
    return rows


def section(page: Sheet, entries: Sequence[Entry]) -> None:
    """The table of every started cell's stretches of rounds; nothing when no cell has started."""
    rows = [row for e in entries for row in stretches(e)]
    if not rows:
        return
    page.add("Where the rounds ran: one row per start or resume of a run, from the cell's `segments.csv` (a partial "
             "cell's `parked/segments.csv`); rounds run before that file existed, or all of a cell's rounds when it "
             "has none, are one \"not recorded\" row. s/round: that stretch's own clock.", "")
    page.add(*table(["method", "rounds", "processor", "precision", "compile", "s/round"], rows))
