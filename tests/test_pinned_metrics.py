"""Small runs whose metrics were written before the redesign of issue 21 (the shared round protocol,
typed options, the modules moved out of circles): the same config must give the same rows.

The expected rows come from commit 5364955, on an AMD EPYC without AVX-512.  Counts and megabytes
are exact; losses and accuracies get a tolerance for another CPU's float rounding (a few ulps per
step, far below what a change of selection, validation or aggregation moves them: those change
which clients and samples are used, and the losses by percent).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import fedmr

PINNED = json.loads((Path(__file__).parent / "fixtures" / "pinned_metrics.json").read_text())
CASES = {
    "fedavg": {"algorithm": "fedavg"},
    "fedmr-two-stage-partial": {"algorithm": "fedmr", "fedmr": {"first_stage_rounds": 2, "block_fraction": 0.5}},
    "scaffold-dropout": {"algorithm": "scaffold", "dropout_rate": 0.2},
    "fedgen-norm-limit": {"algorithm": "fedgen", "max_update_norm": 8.0},
}
BASE = {"rounds": 4, "eval_every": 1, "num_clients": 20, "clients_per_round": 5, "alpha": 0.5, "seed": 3, "lr": 0.05,
        "workers": 1}


def close(got: float, want: float, rel: float, abs_: float = 0.0) -> bool:
    if math.isnan(want):
        return math.isnan(got)
    return got == pytest.approx(want, rel=rel, abs=abs_)


@pytest.mark.parametrize("case", list(CASES))
def test_a_small_run_gives_the_rows_it_gave_before_the_redesign(case):
    rows = fedmr.run({**BASE, **CASES[case]}, progress="none").rows
    want = PINNED[case]
    assert [r["round"] for r in rows] == [w["round"] for w in want]
    for got, expected in zip(rows, want):
        for key in ("clients", "rejected", "dropped"):
            assert got[key] == expected[key], (case, got["round"], key)
        for key in ("down_mb", "up_mb"):
            assert got[key] == pytest.approx(expected[key], rel=1e-12), (case, got["round"], key)
        # one of the 359 test samples either way
        assert close(got["accuracy"], expected["accuracy"], 0.0, 1 / 359 + 1e-9), (case, got["round"], "accuracy")
        for key in ("loss", "train_loss"):
            assert close(got[key], expected[key], 1e-3), (case, got["round"], key, got[key], expected[key])


def test_the_pinned_runs_exercise_rejection_dropout_and_both_fedmr_stages():
    assert any(r["rejected"] for r in PINNED["fedgen-norm-limit"])
    assert any(math.isnan(r["train_loss"]) for r in PINNED["fedgen-norm-limit"])  # a round with nothing accepted
    assert all(r["dropped"] == 1 for r in PINNED["scaffold-dropout"])
    assert BASE["rounds"] > CASES["fedmr-two-stage-partial"]["fedmr"]["first_stage_rounds"]
