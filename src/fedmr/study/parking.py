"""Cells that outlast a sitting (a ResNet-20 cell is hours): their newest checkpoint "parked" in the
cell's folder, where it can be committed, so the next sitting, on any machine, resumes it.

``checkpoints/`` is local (git ignores it, and it keeps two checkpoints); ``parked/`` holds exactly
one: the newest manifest and its tensors, plus ``metrics.csv`` with the rows up to it (what the
results page shows of a partial cell), ``train_loss.csv`` with the rounds up to it and
``segments.csv``, where and how those rounds ran (from the checkpoint, which carries them).
``fedmr study park FILE`` refreshes it for every unfinished cell and removes it from finished
ones; ``run_cell`` copies it back into ``checkpoints/`` when the folder has none, and the
checkpoint's own checks (checksums, fingerprint) decide as for any resume.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..engine import segments
from ..engine.checkpoint import CHECKPOINT_DIR, latest_checkpoint
from ..fileio import atomic_write_text
from ..results import METRIC_COLUMNS, RunWriter

PARKED = "parked"
TRAIN_LOG = "train_loss.csv"


def park(folder: Path, finished: bool) -> str:
    """Refresh (or, for a finished cell, remove) ``folder/parked``; what was done, in words."""
    parked = folder / PARKED
    if finished:
        if parked.is_dir():
            shutil.rmtree(parked)
            return "finished: parked checkpoint removed"
        return ""
    ckpt = latest_checkpoint(folder)
    if ckpt is None:
        return ""
    if parked.is_dir() and (parked / ckpt.path.name).is_file():
        return f"parked at round {ckpt.rounds_done} (unchanged)"
    fresh = folder / f"{PARKED}.tmp"
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir()
    tensors = Path(json.loads(ckpt.path.read_text())["tensors"]).name
    shutil.copy2(ckpt.path.parent / tensors, fresh / tensors)
    shutil.copy2(ckpt.path, fresh / ckpt.path.name)  # the manifest last: it names the tensors
    columns = [*METRIC_COLUMNS, *[k for row in ckpt.rows for k in row if k not in METRIC_COLUMNS]]
    writer = RunWriter(fresh)
    if (folder / TRAIN_LOG).is_file():  # every round's training loss, cut back to the checkpoint's round
        shutil.copy2(folder / TRAIN_LOG, fresh / TRAIN_LOG)
        writer.start_train_log(ckpt.rounds_done)
    writer.write_metrics(ckpt.rows, list(dict.fromkeys(columns)))  # the rows up to the checkpoint
    if ckpt.segments:
        atomic_write_text(fresh / segments.FILE, segments.to_csv(ckpt.segments))
    atomic_write_text(fresh / "README.md", f"The newest checkpoint of this unfinished cell (round {ckpt.rounds_done}), "
                      "kept so that another machine resumes it: `fedmr study run` copies it into checkpoints/.\n")
    shutil.rmtree(parked, ignore_errors=True)
    fresh.rename(parked)
    return f"parked at round {ckpt.rounds_done}"


def unpark(folder: Path) -> int:
    """Put the parked checkpoint into ``checkpoints/`` when the folder has none there; its round, or 0."""
    parked, local = folder / PARKED, folder / CHECKPOINT_DIR
    manifests = sorted(parked.glob("round-*.json")) if parked.is_dir() else []
    if not manifests or (local.is_dir() and any(local.glob("round-*.json"))):
        return 0
    local.mkdir(parents=True, exist_ok=True)
    for path in parked.glob("round-*.safetensors"):
        shutil.copy2(path, local / path.name)
    shutil.copy2(manifests[-1], local / manifests[-1].name)
    if (parked / TRAIN_LOG).is_file():  # the rounds before it (the resume drops any later ones)
        shutil.copy2(parked / TRAIN_LOG, folder / TRAIN_LOG)
    return int(manifests[-1].stem.split("-")[1])
