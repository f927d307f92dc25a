"""The claims page (`fedmr study report CLAIMS.toml`): each claim per data set and model, quoting the readings of
the studies' own pages, never computing one of its own; and a bad claims file is one error line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import stats
from test_new_user import one_error_line
from test_study_report import FIXTURE, MAIN, REPO, RESNET, _late, _mean, _section, extended  # noqa: F401

from fedmr.cli import main
from fedmr.study.contrasts import verdict

CLAIMS = """
[claims]
title = "Claims of the fixture"
report = "results/claims.md"

[[study]]
file = "study.toml"
data = "Fixture digits"
"""


def _rows(text: str, start: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(start)]


@pytest.fixture
def claims(extended) -> tuple[str, str]:  # noqa: F811  (the fixture imported above)
    (extended / "claims.toml").write_text(CLAIMS)
    assert main(["study", "report", "study.toml"]) == 0
    assert main(["study", "report", "claims.toml"]) == 0
    return (extended / "results" / "claims.md").read_text(), (extended / "results" / "README.md").read_text()


def test_claim_1_quotes_the_difference_and_interval_the_metrics_give(claims):
    page, study = claims
    study_dir = FIXTURE / "results" / "study"
    fedavg = [_late(study_dir / f"alpha0.5-seed{s}-fedavg") if s > 1 else _late(FIXTURE / "results" / "earlier" / "fedavg")
              for s in (1, 2, 3)]
    fedmr = [_late(study_dir / f"alpha0.5-seed{s}-fedmr") for s in (1, 2, 3)]
    diffs = np.array(fedmr) - np.array(fedavg)
    lo, hi = stats.t.interval(0.95, 2, loc=diffs.mean(), scale=stats.sem(diffs))
    claim = _section(page, "1. FedMR is more accurate than FedAvg")
    assert (f"| Fixture digits | auto | alpha 0.5 | fedmr | 3 | {100 * diffs.mean():+.2f} | {100 * lo:+.2f} to "
            f"{100 * hi:+.2f} | {verdict(list(diffs), 1.0)} |") in claim
    # and the study page's own row says the same
    row = _rows(study, "| fedmr - fedavg | alpha 0.5 |")[0]
    assert row.endswith(f"| {verdict(list(diffs), 1.0)} |")
    # the deeper model: finished pairs give the late mean, a parked one the interim block, never a verdict
    resnet = _mean(RESNET["fedmr"], 241, 300) - _mean(RESNET["fedavg"], 241, 300)
    assert f"| Fixture digits | resnet20 | alpha 0.1 | fedmr | 1 | {100 * resnet:+.2f} |  | {verdict([resnet], 1.0)} |" in claim
    two = "fedmr@first_stage_rounds=4"
    block = _mean(RESNET[two], 101, 200) - _mean(RESNET["fedavg"], 101, 200)
    assert (f"| Fixture digits | resnet20 | alpha 0.1 | {two} | 0 |  |  | not yet ({two} partial: 250 of 300 rounds; "
            f"fedavg finished); rounds 101-200: {100 * block:+.2f} points, one seed, interim |") in claim


def test_claim_2_names_the_strongest_other_and_how_many_finished(claims):
    page, study = claims
    claim = _section(page, "2. FedMR is more accurate than every baseline")
    resnet = _mean(RESNET["fedmr"], 241, 300) - _mean(RESNET["fedavg"], 241, 300)
    assert (f"| Fixture digits | resnet20 | alpha 0.1 | fedmr | fedavg (2 of 3 finished) | 1 | {100 * resnet:+.2f} |  | "
            f"{verdict([resnet], 1.0)} |") in claim
    assert "| Fixture digits | resnet20 | alpha 0.1 | fedmr@first_stage_rounds=4 |  | 0 |  |  | not yet" in claim
    # the main table's rows are the study page's "against the strongest other method" readings
    for line in _rows(_section(study, "Against the strongest other method"), "| fedmr"):
        cells = [c.strip() for c in line.strip("|").split("|")]
        method, het, rival, _, mean, reading, finished = cells
        if rival == "no pair finished yet":  # no reading there either (no row where the method has no cell)
            rows = _rows(claim, f"| Fixture digits | auto | {het} | {method} |")
            assert all(r.endswith("| no pair finished yet |") for r in rows), rows
            continue
        row = _rows(claim, f"| Fixture digits | auto | {het} | {method} | {rival} ({finished} finished) |")
        assert len(row) == 1 and f"| {mean} |" in row[0] and row[0].endswith(f"| {reading} |"), (line, row)


def test_claims_3_to_5_quote_the_pattern_the_traffic_and_the_studies_state(claims):
    page, study = claims
    pattern = [line for line in _section(study, "Verdict").split("The paper's pattern")[1].splitlines()
               if line.startswith("- **")]
    deeper = _section(page, "3. The gain is larger on the deeper models")
    assert pattern and [f"- Fixture digits: {line[2:]}" for line in pattern] == _rows(deeper, "- Fixture digits: ")
    assert f"{100 * (MAIN['fedmr'][2] - MAIN['fedavg'][2]):+.2f} on the auto" in deeper
    # the fixture's probes: fedmr sends what fedavg sends (1 MB down and 1 up per round)
    assert ("| Fixture digits | auto | alpha 0.5 | fedmr | 1.00 | 1.00 | 1.00 | probe runs, seed 1 |"
            in _section(page, "4. No extra communication"))
    assert "- No study has measured its models yet." in _section(page, "5. Recombination finds flatter minima")
    done = study.split("Cells finished: ", 1)[1].split(".", 1)[0]
    assert f"| Fixture digits | [README.md](README.md) | `study.toml` | {done} |" in page
    assert "Of the paper's models, cnn, vgg16 have no cell in any of these studies" in page


def test_without_probe_runs_claim_4_reads_the_main_cells_that_record_the_traffic(tmp_path, monkeypatch):
    """A study with no communication section (as the CIFAR-100 and FEMNIST ones): each contrasted method's last
    row over the baseline's of the same heterogeneity and seed, from the lowest seed where both record it."""
    import shutil

    from fedmr.results import METRIC_COLUMNS, RunWriter, read_metrics
    from fedmr.study.sections import TRAFFIC

    root = tmp_path / "study"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    (root / "claims.toml").write_text(CLAIMS)
    study = root / "results" / "study"
    traffic = {"alpha0.5-seed2-fedavg": (1.0, 1.0), "alpha0.5-seed2-fedmr": (1.0, 1.0),
               "alpha0.5-seed3-fedavg": (1.0, 1.0), "alpha0.5-seed3-fedmr": (3.0, 3.0),  # seed 2 is the one shown
               "iid-seed2-fedmr": (9.0, 9.0),  # no fedavg of seed 2 recorded: not paired
               "iid-seed3-fedavg": (1.0, 1.0), "iid-seed3-fedmr": (1.0, 2.0)}
    for name, (down, up) in traffic.items():
        rows = read_metrics(study / name / "metrics.csv")
        for row in rows:
            row.update({"down_mb": down, "up_mb": up, "down_client_state_mb": 0.0,
                        "down_total_mb": down * row["round"], "up_total_mb": up * row["round"]})
        RunWriter(study / name, resume=True).write_metrics(rows, [*METRIC_COLUMNS, *TRAFFIC])
    assert main(["study", "report", "claims.toml"]) == 0
    claim = _section((root / "results" / "claims.md").read_text(), "4. No extra communication")
    assert _rows(claim, "| Fixture digits") == [
        "| Fixture digits | auto | alpha 0.5 | fedmr | 1.00 | 1.00 | 1.00 | main cells, seed 2 |",
        "| Fixture digits | auto | IID | fedmr | 1.00 | 2.00 | 1.50 | main cells, seed 3 |"]


def test_the_claims_page_is_byte_stable(claims, extended):  # noqa: F811
    first, _ = claims
    assert main(["study", "report", "claims.toml"]) == 0
    assert (extended / "results" / "claims.md").read_text() == first


@pytest.mark.parametrize("text, message", [
    (CLAIMS + "\n[other]\n", "unknown table 'other'"),
    (CLAIMS.replace('title = "Claims of the fixture"', 'titel = "x"'), "unknown key 'claims.titel'"),
    (CLAIMS.replace('data = "Fixture digits"\n', ""), "[[study]] number 1 must give file and data"),
    (CLAIMS.replace('"study.toml"', '"no-such-study.toml"'), "no-such-study.toml"),
    ("[claims]\n", "name the studies as [[study]] tables"),
])
def test_a_bad_claims_file_is_one_error_line(tmp_path, monkeypatch, capsys, text, message):
    import shutil

    root = tmp_path / "study"
    shutil.copytree(FIXTURE, root)
    monkeypatch.chdir(root)
    (root / "claims.toml").write_text(text)
    assert main(["study", "report", "claims.toml"]) == 2
    assert message in one_error_line(capsys)


def test_docs_claims_page_is_current():
    """The committed claims page is what `fedmr study report studies/claims.toml` gives today."""
    import os

    from fedmr.config import read_toml
    from fedmr.study.claims import render_claims

    here = os.getcwd()
    os.chdir(REPO)
    try:
        _, text, _ = render_claims("studies/claims.toml", read_toml("studies/claims.toml"))
    finally:
        os.chdir(here)
    assert text == (REPO / "docs" / "results" / "claims.md").read_text(), "regenerate it: fedmr study report studies/claims.toml"


def test_the_repositorys_claims_file_names_every_study_with_a_page():
    from fedmr.config import read_toml

    named = {t["file"] for t in read_toml(REPO / "studies" / "claims.toml")["study"]}
    pages = {f"studies/{p.name}" for p in (REPO / "studies").glob("*.toml")
             if p.name != "claims.toml" and "flatness" not in p.name and Path(p).read_text().count("[[grid]]")}
    assert pages <= named, f"studies missing from studies/claims.toml: {sorted(pages - named)}"
