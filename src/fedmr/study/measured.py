"""What the flatness section reads: each cell's ``fedmr landscape`` files (docs/landscape.md), in its own
run folder or in a rerun of it, as :class:`Measured` records; :mod:`flatness` renders them.

* ``landscape.json`` (its final model): top Hessian eigenvalue, trace ± standard error, training loss
  on the measured subset, test accuracy, the 1-D curves;
* ``landscape-path-<other cell>.json``: the straight line from this cell's final model to another's;
* ``models/round-NNNNNN-landscape.json`` (``save_model_every``, or a checkpoint measured with ``--out
  RUN/models``): the top eigenvalue over the rounds;
* ``models/round-NNNNNN-pool*-path-*.json`` (two members of one saved pool): the barrier over rounds.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .cells import Entry

BASIN = 0.01  # a line whose loss stays within 1% (of the ends' mean loss) of the chord reads as one basin
_ROUND = re.compile(r"^round-(\d+)")
_GLOBAL_ROUND = re.compile(r"^round-(\d+)-landscape\.json$")  # the global model saved after a round


def _read(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


@dataclass
class Measured:
    """One finished cell's landscape files."""

    entry: Entry
    folder: Path  # where the files are: the cell's run folder or a rerun of it
    final: dict[str, Any]
    paths: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (other run folder's name, document)
    eigen_rounds: list[tuple[int, float]] = field(default_factory=list)
    # (round, barrier, barrier above the chord (the barrier where a file predates it), the ends' mean loss)
    pool_barriers: list[tuple[int, float, float, float]] = field(default_factory=list)

    @property
    def method(self) -> str:
        """The variant alone: methods are compared within one :attr:`setting`."""
        return self.entry.variant

    @property
    def setting(self) -> str:
        """What the model was trained in: the heterogeneity and the cell's other settings (a ResNet-20 cell
        in bf16 is not compared with a CNN cell)."""
        return ", ".join([self.entry.het, *self.entry.others])

    @property
    def eigen(self) -> float | None:
        return self.final.get("eigen", {}).get("top_eigenvalue")

    @property
    def trace(self) -> tuple[float, float] | None:
        t = self.final.get("trace")
        if not t:
            return None
        error = t.get("standard_error")
        return float(t["trace"]), math.nan if error is None else float(error)  # null: one vector, no error

    @property
    def accuracy(self) -> float | None:
        """The test accuracy of the measured model; the run's last evaluation where the file has none."""
        if "test" in self.final:
            return float(self.final["test"]["accuracy"])
        rows = self.entry.rows
        return rows[-1]["accuracy"] if rows else None


def _measured_folder(folders: Sequence[Path]) -> tuple[Path, dict[str, Any] | None, list[Path]] | None:
    """The first of ``folders`` that holds landscape files: (it, its landscape.json, its over-rounds files)."""
    for folder in folders:
        final = _read(folder / "landscape.json")
        models = folder / "models"
        rounds = sorted(p for p in models.glob("round-*-landscape.json") if _GLOBAL_ROUND.match(p.name)) \
            if models.is_dir() else []
        if final is not None or rounds:
            return folder, final, rounds
    return None


def collect(entries: Sequence[Entry], reruns: Sequence[Path] = ()) -> list[Measured]:
    """Each finished cell's landscape files: in its own run folder, or else in a rerun of it (an equal
    finished run, as the study's reuse matches them) under the ``reruns`` folders ([study] landscape).
    A cell still running (parked between sittings) gives only its models measured over the rounds
    (``models/round-NNNNNN-landscape.json``, e.g. from its checkpoints with ``--out RUN/models``)."""
    from .index import RunFinder

    finder = RunFinder(list(reruns)) if reruns else None
    found: dict[str, Measured] = {}
    for e in entries:
        if e.status.cell.name in found:
            continue
        again = finder.runs.get(finder.key(e.status.cell.cfg, e.status.cell.cfg.rounds), []) \
            if finder and e.stats else []
        held = _measured_folder([e.status.folder, *again])
        if held is None or (e.stats is None and not held[2]):
            continue
        folder, final, rounds = held
        models = folder / "models"
        m = Measured(e, folder, (final or {}) if e.stats else {})
        for path in sorted(folder.glob("landscape-path-*.json")) if e.stats else []:
            doc = _read(path)
            if doc and "path" in doc and len(doc.get("models", [])) == 2:
                m.paths.append((Path(str(doc["models"][1]["run"])).name, doc))
        for path in rounds:
            doc, match = _read(path), _GLOBAL_ROUND.match(path.name)
            if doc and match and "eigen" in doc:
                m.eigen_rounds.append((int(match.group(1)), float(doc["eigen"]["top_eigenvalue"])))
        for path in sorted(models.glob("round-*-path-*.json")) if models.is_dir() else []:
            doc, match = _read(path), _ROUND.match(path.name)
            if doc and match and "path" in doc and doc["models"][0]["input"].split("@")[0] == \
                    doc["models"][1]["input"].split("@")[0]:  # two members of one pool
                path_ = doc["path"]
                m.pool_barriers.append((int(match.group(1)), float(path_["barrier"]),
                                        float(path_.get("barrier_linear", path_["barrier"])), float(path_["ends_mean_loss"])))
        found[e.status.cell.name] = m
    return list(found.values())


def pair_means(values: Sequence[tuple[int, float, float, float]]) -> list[tuple[int, float, float, float]]:
    """Per round, the mean over the pairs of pool members measured at it (one pair: its own numbers)."""
    by_round: dict[int, list[tuple[int, float, float, float]]] = {}
    for v in values:
        by_round.setdefault(v[0], []).append(v)
    out = []
    for r, vs in sorted(by_round.items()):
        n = len(vs)
        out.append((r, sum(v[1] for v in vs) / n, sum(v[2] for v in vs) / n, sum(v[3] for v in vs) / n))
    return out
