"""The study page being written: the study's cells read into entries, the lines so far and the plots
drawn.  ``report.Page`` is one; the section renderers beside it (``contrasts.py``, ``sections.py``)
write onto it through ``add`` and ``figure``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from . import plots
from .cells import Entry, Parked, cell_stats, parked
from .index import Status
from .plots import Band, Points
from .spec import Study


def ordered(values: Sequence[str]) -> list[str]:
    """The values in the order they first appear, each once."""
    return list(dict.fromkeys(values))


def link(target: Path, page_dir: Path) -> str:
    return Path(os.path.relpath(target, page_dir)).as_posix()


class Sheet:
    def __init__(self, study: Study, statuses: Sequence[Status], file: str, draw: bool = True):
        self.study, self.file, self.o, self.draw = study, file, study.options, draw
        self.page_dir = study.report.parent
        self.plots = study.output / "plots"
        fraction, thresholds = float(self.o["late_fraction"]), [float(t) for t in self.o["thresholds"]]
        self.thresholds = thresholds
        self.statuses = list(statuses)
        self.entries: list[Entry] = []
        self.parked: dict[str, Parked] = {}
        for s in statuses:
            stats = cell_stats(s.folder, s.cell.cfg.rounds, fraction, thresholds) if s.finished else None
            held = None if s.finished else parked(s.folder)
            if held:
                self.parked[s.cell.name] = held
            sections: set[str] = set()
            for m in s.cell.memberships:  # one row per section: a cell declared again there is the same run
                if m.section not in sections:
                    sections.add(m.section)
                    self.entries.append(Entry(m, s, stats, held))
        self.sections = ordered([e.membership.section for e in self.entries])
        self.lines: list[str] = []
        self.drawn: set[Path] = set()
        self.verdicts: list[tuple[str, str, str]] = []  # (method, heterogeneity, reading) against the baseline
        self.rival_verdicts: list[tuple[str, str, str]] = []  # the same, against the strongest other method

    @property
    def window(self) -> str:
        """The base config's late rounds that **accuracy** averages over: "401-500"."""
        rounds = self.study.base.rounds
        return f"{rounds - round(rounds * float(self.o['late_fraction'])) + 1}-{rounds}"

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def figure(self, curves: dict[str, Points], name: str, title: str, alt: str = "",
               bands: dict[str, Band] | None = None) -> None:
        """plots/NAME.png (drawn only with draw) and its link on the page; nothing without curves."""
        if not curves:
            return
        path = self.plots / f"{name}.png"
        if self.draw:
            plots.plot(curves, path, title, bands)
            self.drawn.add(path)
        self.add(f"![{alt or title}]({link(path, self.page_dir)})", "")

    def groups(self, entries: Sequence[Entry]) -> dict[tuple[str, str], list[Entry]]:
        """The entries by (method, heterogeneity)."""
        out: dict[tuple[str, str], list[Entry]] = {}
        for e in entries:
            out.setdefault((e.method, e.het), []).append(e)
        return out
