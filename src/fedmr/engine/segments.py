"""Where and how each stretch of a run's rounds was computed: ``segments.csv``, a row per start or
resume of the run (a long study cell spans sittings, machines and settings such as ``compile``).

The rows travel inside every checkpoint (so a resumed run, and a cell parked for another machine,
carries the history of the rounds its checkpoint holds, and forgets rounds it trains again), and
the run folder's ``segments.csv`` is rewritten from them at each checkpoint.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..config import RunConfig
from ..machine import cpu_count, describe

COLUMNS = ("first_round", "last_round", "seconds", "s_per_round", "started_utc", "device", "processor", "cores",
           "torch", "precision", "compile", "workers")
FILE = "segments.csv"


def begin(cfg: RunConfig, device: torch.device, first_round: int) -> dict[str, Any]:
    """The segment that starts now with round ``first_round`` (1-based); ``close`` completes it."""
    return {"first_round": first_round, "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "device": device.type, "processor": describe(device), "cores": cpu_count(),
            "torch": torch.__version__, "precision": cfg.precision, "compile": cfg.compile,
            "workers": cfg.workers}


def close(segment: Mapping[str, Any], last_round: int, seconds: float) -> dict[str, Any]:
    """``segment`` as it stands after round ``last_round``, ``seconds`` after it began."""
    rounds = last_round - int(segment["first_round"]) + 1
    return {**segment, "last_round": last_round, "seconds": round(seconds, 1),
            "s_per_round": round(seconds / rounds, 2) if rounds > 0 else None}


def checked(value: Any) -> list[dict[str, Any]] | None:
    """A checkpoint's ``segments`` as rows, or None where they are malformed."""
    if not isinstance(value, list) or not all(isinstance(r, dict) and "first_round" in r for r in value):
        return None
    return [dict(r) for r in value]


def to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("true" if v is True else "false" if v is False else v) for k, v in row.items()})
    return out.getvalue()
