"""The results page's per-client section (issue 28.5): shown for the main cells whose runs record the
client_acc_* columns, with the numbers their metrics give; absent where no run records them, so pages of
older runs stay byte for byte what they were (tests/test_study_report.py)."""

from __future__ import annotations

import csv
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fedmr.cli import main
from fedmr.results import CLIENT_COLUMNS

FIXTURE = Path(__file__).parent / "fixtures" / "study"


def _add_client_columns(folder: Path, offset: float) -> list[dict[str, str]]:
    """Give a fixture run's metrics.csv the per-client columns (made-up values, distinct per row)."""
    path = folder / "metrics.csv"
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    for i, row in enumerate(rows):
        row.update(client_acc_mean=f"{0.5 + offset + 0.01 * i:g}", client_acc_std=f"{0.2 - offset:g}",
                   client_acc_worst10=f"{0.1 + offset + 0.001 * i:g}")
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0].keys()])
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _late(rows: list[dict[str, str]], key: str) -> float:
    return float(np.mean([float(r[key]) for r in rows if int(r["round"]) > 8]))  # rounds 9-10 of 10


@pytest.fixture
def study(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "study"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    return root


def test_the_page_shows_per_client_accuracy_for_the_main_cells_that_record_it(study):
    out = study / "results" / "study"
    fedmr = [_add_client_columns(out / f"alpha0.5-seed{s}-fedmr", 0.01 * s) for s in (1, 2, 3)]
    fedavg = [_add_client_columns(out / f"alpha0.5-seed{s}-fedavg", 0.02 * s) for s in (2, 3)]  # seed 1: an old run
    assert main(["study", "report", "study.toml"]) == 0
    page = (study / "results" / "README.md").read_text()
    section = page.split("## Per-client accuracy\n", 1)[1].split("\n## ", 1)[0]
    assert "rounds 9-10" in section
    rows = [line for line in section.splitlines() if line.startswith("| fed")]
    assert len(rows) == 2  # only the cells whose runs record it: no IID row, no fedmr@first_stage_rounds=4 row

    def cell(runs: list[list[dict[str, str]]], key: str) -> str:
        values = [_late(r, key) for r in runs]
        return f"{100 * np.mean(values):.2f} ± {100 * np.std(values, ddof=1):.2f}"

    assert rows[0] == "| fedavg | alpha 0.5 | " + " | ".join(cell(fedavg, k) for k in CLIENT_COLUMNS) + " | 2 of 3 |"
    assert rows[1] == "| fedmr | alpha 0.5 | " + " | ".join(cell(fedmr, k) for k in CLIENT_COLUMNS) + " | 3 |"
    # it follows the main table; the committed page (no run records it) has no such section
    assert page.index("## Main table") < page.index("## Per-client accuracy") < page.index("## Differences from")
    assert "Per-client" not in (FIXTURE / "results" / "README.md").read_text()


def test_one_local_epoch_is_singular(study):
    from fedmr.study.index import resolve
    from fedmr.study.report import Page
    from fedmr.study.spec import load_study

    spec = load_study("study.toml")
    statuses = resolve(spec)
    for epochs, words in ((1, "3 per round, 1 local epoch, batch"), (2, "3 per round, 2 local epochs, batch")):
        page = Page(replace(spec, base=spec.base.replace(local_epochs=epochs)), statuses, "study.toml", draw=False).render()
        assert words in page
