"""Which run folder holds each cell: its own folder under the study's output, or an equal finished run
found elsewhere (reused, not copied).  The answer is recorded in ``<output>/cells.json``.

A cell is *done* when a folder holds ``summary.json`` with the cell's rounds, ``metrics.csv``, and a
``config.toml`` equal to the cell's on every key that changes results (see :data:`spec.NOT_RESULTS`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import RunConfig, read_toml, to_toml
from ..errors import ConfigError, FedMRError
from ..fileio import atomic_write_text
from .spec import Cell, Study, difference, result_config

INDEX = "cells.json"
BASE = "base.toml"  # the study's base config, to refuse a folder that holds another study's runs
_MANIFEST = re.compile(r"^round-(\d{6,})\.json$")


@dataclass
class Status:
    cell: Cell
    state: str  # "done" (own folder), "reused" (a finished run elsewhere), "partial" (resumes), "missing"
    folder: Path  # where its results are, or will be
    rounds_done: int = 0

    @property
    def finished(self) -> bool:
        return self.state in ("done", "reused")


def finished_rounds(folder: Path) -> int | None:
    """The rounds in a folder's summary.json when it holds a finished run, else None."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        rounds = summary.get("rounds")
        return rounds if isinstance(rounds, int) and (folder / "metrics.csv").is_file() else None
    except (OSError, ValueError, AttributeError):
        return None


def _config(folder: Path) -> dict[str, Any] | None:
    try:
        return read_toml(folder / "config.toml")
    except FedMRError:
        return None


def checkpoint_round(folder: Path) -> int:
    """The newest checkpoint's round, local or parked (0 if none): what a resumed cell starts from."""
    rounds = [int(m.group(1)) for name in ("checkpoints", "parked") if (folder / name).is_dir()
              for p in (folder / name).iterdir() if (m := _MANIFEST.match(p.name))]
    return max(rounds, default=0)


class RunFinder:
    """Finished runs under the reuse folders, indexed by their result config and rounds."""

    def __init__(self, roots: list[Path]):
        self.runs: dict[str, list[Path]] = {}
        seen: set[Path] = set()
        for root in roots:
            for config in sorted(root.rglob("config.toml")) if root.is_dir() else []:
                folder = config.parent
                if folder in seen or "checkpoints" in folder.parts:
                    continue
                seen.add(folder)
                rounds = finished_rounds(folder)
                cfg = _config(folder) if rounds is not None else None
                if cfg is not None:
                    self.runs.setdefault(self.key(cfg, rounds), []).append(folder)

    @staticmethod
    def key(cfg: Mapping[str, Any], rounds: int | None) -> str:
        return json.dumps(result_config(cfg), sort_keys=True) + f"|rounds={rounds}"

    def find(self, cfg: RunConfig) -> Path | None:
        found = self.runs.get(self.key(cfg, cfg.rounds))
        return found[0] if found else None


def _recorded(study: Study) -> dict[str, Path]:
    try:
        doc = json.loads((study.output / INDEX).read_text())
        return {c["name"]: study.output / c["folder"] for c in doc["cells"] if c.get("state") in ("done", "reused")}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def check_folder(study: Study) -> None:
    """Refuse an output folder that holds runs of another base config, or a cell folder of another config."""
    out = study.output
    if (out / BASE).is_file():
        why = difference(read_toml(out / BASE), study.base)
        if why is not None:
            raise ConfigError(f"study folder {out} holds runs of a different base config ({why}); "
                              f"choose another [study] output or restore the base")
    for cell in study.cells:
        cfg = _config(out / cell.name) if (out / cell.name / "config.toml").is_file() else None
        if cfg is not None and (why := difference(cfg, cell.cfg)) is not None:
            raise ConfigError(f"study folder {out / cell.name} holds a run of a different config ({why}); "
                              f"move it away or choose another [study] output")


def resolve(study: Study) -> list[Status]:
    """Each cell's state, in the study's order.  A finished own folder wins, then the folder cells.json
    recorded (if it still holds the cell), then the first equal finished run under the reuse folders."""
    recorded = _recorded(study)
    finder: RunFinder | None = None
    statuses = []
    for cell in study.cells:
        own = study.output / cell.name
        rounds = cell.cfg.rounds

        def holds(folder: Path, rounds: int = rounds, cell_cfg: RunConfig = cell.cfg) -> bool:
            cfg = _config(folder)
            return finished_rounds(folder) == rounds and cfg is not None and difference(cfg, cell_cfg) is None

        if holds(own):
            statuses.append(Status(cell, "done", own, rounds))
            continue
        folder = recorded.get(cell.name)
        if folder is None or not holds(folder):
            if finder is None:
                finder = RunFinder(study.reuse)
            folder = finder.find(cell.cfg)
        if folder is not None:
            statuses.append(Status(cell, "reused", folder, rounds))
        elif (own / "config.toml").is_file():
            statuses.append(Status(cell, "partial", own, checkpoint_round(own)))
        else:
            statuses.append(Status(cell, "missing", own, 0))
    return statuses


def write_index(study: Study, statuses: list[Status]) -> None:
    """cells.json: each cell's name, priority, state and run folder (relative to the study folder)."""
    out = study.output
    out.mkdir(parents=True, exist_ok=True)
    if not (out / BASE).is_file():
        atomic_write_text(out / BASE, to_toml(study.base))
    cells = [{"name": s.cell.name, "priority": s.cell.priority, "state": s.state,
              "folder": os.path.relpath(s.folder, out), "rounds_done": s.rounds_done,
              "sections": sorted({m.section for m in s.cell.memberships})} for s in statuses]
    body = ",\n".join("  " + json.dumps(c) for c in cells)  # one line per cell: small, readable diffs
    text = f'{{"study": {json.dumps(str(study.path))},\n "cells": [\n{body}\n]}}\n'
    if not (out / INDEX).is_file() or (out / INDEX).read_text() != text:
        atomic_write_text(out / INDEX, text)
