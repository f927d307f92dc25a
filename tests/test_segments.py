"""segments.csv: a row per start or resume of a run, saying which rounds ran where and how; the rows
travel in the checkpoints, so a resume forgets the rounds it trains again."""

from __future__ import annotations

import csv
import json

import pytest
import torch

import fedmr
from fedmr.engine.checkpoint import CHECKPOINT_DIR
from fedmr.machine import describe

SMALL = {"num_clients": 8, "clients_per_round": 4, "eval_every": 1, "local_epochs": 1, "seed": 2, "workers": 1}


def _segments(folder):
    with (folder / "segments.csv").open() as fh:
        return list(csv.DictReader(fh))


def test_each_start_and_resume_adds_a_row_and_the_checkpoint_carries_them(tmp_path):
    out = tmp_path / "run"
    fedmr.run({**SMALL, "rounds": 2}, out=out, progress="none")
    (first,) = _segments(out)
    assert (first["first_round"], first["last_round"]) == ("1", "2")
    assert first["processor"] == describe(torch.device("cpu")) and first["device"] == "cpu"
    assert (first["precision"], first["compile"], first["workers"]) == ("fp32", "false", "1")
    assert first["torch"] == torch.__version__ and int(first["cores"]) >= 1
    assert float(first["s_per_round"]) == pytest.approx(float(first["seconds"]) / 2, abs=0.05)  # seconds: 0.1 s

    fedmr.run({**SMALL, "rounds": 4, "workers": 2}, out=out, resume=True, progress="none")
    rows = _segments(out)
    assert [(r["first_round"], r["last_round"], r["workers"]) for r in rows] == [("1", "2", "1"), ("3", "4", "2")]
    manifest = json.loads((out / CHECKPOINT_DIR / "round-000004.json").read_text())
    assert [s["first_round"] for s in manifest["segments"]] == [1, 3]


def test_a_resume_forgets_the_rounds_its_checkpoint_does_not_hold(tmp_path):
    out = tmp_path / "run"
    fedmr.run({**SMALL, "rounds": 4, "checkpoint_every": 2, "eval_every": 2}, out=out, progress="none")
    assert [(r["first_round"], r["last_round"]) for r in _segments(out)] == [("1", "4")]
    # as if the run had been killed after round 3: only the checkpoint of round 2 is left
    for path in (out / CHECKPOINT_DIR).glob("round-000004.*"):
        path.unlink()
    (out / "summary.json").unlink()
    fedmr.run({**SMALL, "rounds": 4, "checkpoint_every": 2, "eval_every": 2}, out=out, resume=True, progress="none")
    assert [(r["first_round"], r["last_round"]) for r in _segments(out)] == [("1", "2"), ("3", "4")]


def test_a_checkpoint_without_segments_resumes_with_none_before_it(tmp_path):
    """Checkpoints written before segments existed hold none: the resumed run lists its own alone."""
    from fedmr.engine.checkpoint import _json_sha256

    out = tmp_path / "run"
    fedmr.run({**SMALL, "rounds": 2}, out=out, progress="none")
    manifest = out / CHECKPOINT_DIR / "round-000002.json"
    doc = json.loads(manifest.read_text())
    body = {k: v for k, v in doc.items() if k not in ("manifest_sha256", "segments")}
    manifest.write_text(json.dumps({**body, "manifest_sha256": _json_sha256(body)}))
    fedmr.run({**SMALL, "rounds": 3}, out=out, resume=True, progress="none")
    assert [(r["first_round"], r["last_round"]) for r in _segments(out)] == [("3", "3")]
