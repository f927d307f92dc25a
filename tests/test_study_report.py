"""`fedmr study report`: the page is rebuilt byte for byte from a committed fixture study's run folders,
its numbers are the ones the metrics give, and its verdicts follow the rules the page states."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from fedmr.cli import main
from fedmr.results import read_metrics
from fedmr.study.contrasts import verdict
from fedmr.study.report import GENERATED

FIXTURE = Path(__file__).parent / "fixtures" / "study"
REPO = Path(__file__).resolve().parents[1]


def _copy(tmp_path: Path, index: bool = True) -> Path:
    root = tmp_path / "study"
    shutil.copytree(FIXTURE, root)
    (root / "results" / "README.md").unlink()
    if not index:
        (root / "results" / "study" / "cells.json").unlink()
    return root


@pytest.mark.parametrize("index", [True, False], ids=["with-cells.json", "folders-only"])
def test_report_rebuilds_the_committed_page_byte_for_byte(tmp_path, monkeypatch, index):
    root = _copy(tmp_path, index)
    monkeypatch.chdir(root)
    assert main(["study", "report", "study.toml"]) == 0
    assert (root / "results" / "README.md").read_bytes() == (FIXTURE / "results" / "README.md").read_bytes()
    assert "On the " not in (FIXTURE / "results" / "README.md").read_text()  # one model: its verdict unlabelled
    assert (root / "results" / "study" / "cells.json").read_bytes() == (FIXTURE / "results" / "study" / "cells.json").read_bytes()
    plots = sorted(p.name for p in (root / "results" / "study" / "plots").iterdir())
    assert plots == ["ablation-block.png", "main-IID.png", "main-alpha0.5.png"]
    first = (root / "results" / "study" / "plots" / "main-IID.png").read_bytes()
    assert main(["study", "report", "study.toml"]) == 0
    assert (root / "results" / "study" / "plots" / "main-IID.png").read_bytes() == first  # stable on one machine


def test_a_cell_declared_again_with_settings_that_change_no_result_is_one_row(tmp_path, monkeypatch):
    """FedProx at alpha 0.5 declared a second time in the main section, keeping its models
    (save_model_every, as the flatness study does): the same run, so the page is the committed one, with
    no second row named "fedprox (save_model_every=5)" and no method compared with itself."""
    root = _copy(tmp_path)
    with (root / "study.toml").open("a") as fh:
        fh.write('\n[[grid]]\nalgorithm = ["fedprox"]\nalpha = [0.5]\nseed = [1]\nsave_model_every = [5]\n')
    monkeypatch.chdir(root)
    assert main(["study", "report", "study.toml"]) == 0
    page = (root / "results" / "README.md").read_text()
    assert "save_model_every" not in page
    assert page == (FIXTURE / "results" / "README.md").read_text()


def _late(folder: Path) -> float:
    rows = read_metrics(folder / "metrics.csv")
    return float(np.mean([r["accuracy"] for r in rows if r["round"] > 8]))  # rounds 9-10 of 10: the last 20%


def test_the_page_holds_the_numbers_the_metrics_give():
    page = (FIXTURE / "results" / "README.md").read_text()
    study = FIXTURE / "results" / "study"
    fedavg = [_late(study / f"alpha0.5-seed{s}-fedavg") if s > 1 else _late(FIXTURE / "results" / "earlier" / "fedavg")
              for s in (1, 2, 3)]
    fedmr = [_late(study / f"alpha0.5-seed{s}-fedmr") for s in (1, 2, 3)]
    cell = f"{100 * np.mean(fedavg):.2f} ± {100 * np.std(fedavg, ddof=1):.2f}"
    assert f"| fedavg | {cell} (best " in page
    diffs = np.array(fedmr) - np.array(fedavg)
    lo, hi = stats.t.interval(0.95, len(diffs) - 1, loc=diffs.mean(), scale=stats.sem(diffs))
    row = next(line for line in page.splitlines() if line.startswith("| fedmr - fedavg | alpha 0.5 |"))
    assert f"| {100 * diffs.mean():+.2f} | {100 * lo:+.2f} to {100 * hi:+.2f} |" in row
    # the reused run is read in place (earlier/fedavg, made by `fedmr run`, is the alpha 0.5 seed 1 FedAvg cell)
    index = json.loads((study / "cells.json").read_text())
    assert {c["name"]: c["folder"] for c in index["cells"]}["alpha0.5-seed1-fedavg"] == "../earlier/fedavg"
    assert "| 2 | alpha0.5-seed1-fedmr_block_fraction-1.0 | `fedmr study run study.toml --only " \
           "name=alpha0.5-seed1-fedmr_block_fraction-1.0` |" in page


@pytest.mark.parametrize("diffs, reading", [
    ([0.05, 0.04, 0.06], "**ahead** by 5.00 points; the 95% interval (+2.52 to +7.48) excludes 0"),
    ([-0.05, -0.04, -0.06], "**behind** by 5.00 points; the 95% interval (-7.48 to -2.52) excludes 0"),
    ([0.002, -0.001, 0.002], "**level** (+0.10 points; the 95% interval (-0.33 to +0.53) lies within 1 point)"),
    ([-0.03, 0.065, -0.026], "level on average (+0.30 points), **not established**: the 95% interval (-13.05 to "
                             "+13.65) reaches past 1 point"),
    ([0.05, -0.01, 0.08], "ahead by 4.00 points on average, **not established**: the 95% interval (-7.38 to "
                          "+15.38) includes 0"),
    ([0.03], "ahead by 3.00 points in the one seed (one seed, no interval)"),
    ([-0.02, -0.03], "behind by 2.50 points in both seeds (2 seeds, too few for an interval)"),
    ([0.005, -0.004], "level: within 1 point in both seeds (2 seeds, too few for an interval)"),
    ([0.03, -0.02], "mixed: ahead in 1 of 2 seeds, mean +0.50 points (2 seeds, too few for an interval)"),
])
def test_verdict_rules(diffs, reading):
    assert verdict(diffs, 1.0) == reading


def test_the_interval_is_students_t():
    diffs = [0.05, 0.04, 0.06]
    lo, hi = stats.t.interval(0.95, 2, loc=np.mean(diffs), scale=stats.sem(diffs))
    assert math.isclose(lo, 0.0252, abs_tol=5e-5) and math.isclose(hi, 0.0748, abs_tol=5e-5)


@pytest.mark.parametrize("file,report", [("studies/cifar10-cnn.toml", "docs/results/README.md"),
                                         ("studies/cifar10-cnn-flatness.toml", "docs/results/cifar10-cnn-flatness/README.md"),
                                         ("studies/cifar100-cnn.toml", "docs/results/cifar100.md"),
                                         ("studies/femnist-cnn.toml", "docs/results/femnist.md")])
def test_docs_results_page_is_current(file, report):
    """The committed results pages, when their studies generated them, are what `fedmr study report` gives today."""
    page = REPO / report
    if not page.is_file() or not page.read_text().startswith(GENERATED.split("`")[0]):
        pytest.skip(f"{report} is not generated by fedmr study report")
    import os

    from fedmr.study.index import resolve
    from fedmr.study.report import Page
    from fedmr.study.spec import load_study

    here = os.getcwd()
    os.chdir(REPO)
    try:
        study = load_study(file)
        text = Page(study, resolve(study), file, draw=False).render()
    finally:
        os.chdir(here)
    assert text == page.read_text(), f"regenerate it: fedmr study report {file}"


def test_the_strongest_other_is_ranked_on_the_seeds_every_other_shares():
    """SCAFFOLD with three seeds, clustered with one: ranked on seed 1, which both have, SCAFFOLD is the
    stronger (its hard seed 2 must not make clustered look stronger), and its differences on all three
    seeds come with it; without a seed all share, each is ranked on its own seeds."""
    from types import SimpleNamespace

    from fedmr.study.contrasts import strongest

    def runs(**late: float) -> list:
        return [SimpleNamespace(seed=int(k[1:]), stats=SimpleNamespace(late=v)) for k, v in late.items()]

    page = SimpleNamespace(o={"baseline": "fedavg"})
    groups = {("fedmr", "a"): runs(s1=0.40, s2=0.38, s3=0.50), ("scaffold", "a"): runs(s1=0.43, s2=0.36, s3=0.49),
              ("clustered", "a"): runs(s1=0.42), ("fedavg", "a"): runs(s1=0.38, s2=0.34, s3=0.46)}
    rival, pairs, label = strongest(page, groups, "fedmr", "a", ["fedavg", "scaffold", "clustered", "moon"])
    assert (rival, label) == ("scaffold", "3 of 4")
    assert [s for s, _ in pairs] == [1, 2, 3] and pairs[0][1] == pytest.approx(-0.03)
    # clustered on seed 2 only, scaffold on seeds 1 and 3: no seed in common, each on its own
    groups[("clustered", "a")] = runs(s2=0.395)
    groups[("fedavg", "a")] = runs(s3=0.40)
    groups[("scaffold", "a")] = runs(s1=0.43, s3=0.49)
    rival, pairs, _ = strongest(page, groups, "fedmr", "a", ["fedavg", "scaffold", "clustered"])
    assert (rival, pairs) == ("clustered", [(2, pytest.approx(-0.015))])  # scaffold: -0.03 and +0.01, mean -0.01


def test_the_page_compares_each_contrast_with_the_strongest_other_method():
    page = (FIXTURE / "results" / "README.md").read_text()
    study = FIXTURE / "results" / "study"
    seed1 = {"fedavg": _late(FIXTURE / "results" / "earlier" / "fedavg"), "fedprox": _late(study / "alpha0.5-seed1-fedprox")}
    strongest = max(seed1, key=seed1.get)
    diff = _late(study / "alpha0.5-seed1-fedmr") - seed1[strongest]
    row = next(line for line in page.splitlines() if line.startswith("| fedmr | alpha 0.5 | "))
    assert row.startswith(f"| fedmr | alpha 0.5 | {strongest} | seed 1: {100 * diff:+.2f} | {100 * diff:+.2f} | ")
    assert row.endswith("| 2 of 2 |")
    # at IID only fedavg is finished: it is the strongest by default, and the count says so
    assert next(line for line in page.splitlines() if line.startswith("| fedmr | IID | ")).startswith("| fedmr | IID | fedavg |")
    assert "fedmr** against the strongest other method: alpha 0.5: " + strongest in page


# ---- probe runs of the traffic, and long cells parked between sittings ----------------------------------
EXTRA = """
[[grid]]
priority = 3
section = "communication"
title = "Communication per round (probe runs)"
algorithm = ["fedavg", "fedmr", "scaffold", "fedprox", "fedmr@first_stage_rounds=4", "moon"]
alpha = [0.5]
seed = [1]
local_epochs = [1]
rounds = [4]

[[grid]]
priority = 4
section = "resnet20"
title = "ResNet-20 (alpha 0.1, seed 1)"
algorithm = ["fedavg", "fedmr@first_stage_rounds=4", "fedmr", "scaffold", "moon"]
model = ["resnet20"]
alpha = [0.1]
seed = [1]
rounds = [300]
eval_every = [50]

[[grid]]  # the main model at the ResNet-20 cells' setting and rounds: the paper's pattern compares the two
priority = 4
algorithm = ["fedavg", "fedmr@first_stage_rounds=4", "fedmr"]
alpha = [0.1]
seed = [1]
rounds = [300]
eval_every = [10]
"""
LONG = "resnet20-alpha0.1-seed1-eval_every-50-rounds-300"  # the ResNet-20 cells' names, less the variant
# the ResNet-20 cells' rows (round, accuracy), evaluated every 50 of 300 rounds: fedavg, scaffold and fedmr
# finished, two-stage FedMR parked at round 250, moon not started
RESNET = {"fedavg": [(50, 0.2), (100, 0.3), (150, 0.35), (200, 0.4), (250, 0.42), (300, 0.44)],
          "scaffold": [(50, 0.1), (100, 0.2), (150, 0.3), (200, 0.3), (250, 0.35), (300, 0.38)],
          "fedmr": [(50, 0.25), (100, 0.33), (150, 0.38), (200, 0.42), (250, 0.46), (300, 0.47)],
          "fedmr@first_stage_rounds=4": [(50, 0.2), (100, 0.32), (150, 0.41), (200, 0.43), (250, 0.45)]}
# the main model's cells at the same setting (alpha 0.1, seed 1, 300 rounds), every 10 rounds: the accuracy
# in rounds 1-100, 101-200 and 201-300
MAIN = {"fedavg": (0.30, 0.35, 0.40), "fedmr": (0.31, 0.37, 0.42), "fedmr@first_stage_rounds=4": (0.32, 0.43, 0.45)}


def _traffic(rounds_mb: list[tuple[int, float, float, float]]) -> list[dict[str, float]]:
    """Rows (round, down MB, up MB, client-state MB of down) with the cumulative totals of every round
    (each round's traffic taken as the next evaluated one's)."""
    rows, down, up, last = [], 0.0, 0.0, 0
    for r, d, u, c in rounds_mb:
        down, up, last = down + d * (r - last), up + u * (r - last), r
        rows.append({"round": r, "accuracy": 0.1, "down_mb": d, "up_mb": u, "down_client_state_mb": c,
                     "down_total_mb": down, "up_total_mb": up})
    return rows


def _accuracy(rows: list[tuple[int, float]]) -> list[dict[str, float]]:
    return [{"round": r, "accuracy": a} for r, a in rows]


def _cell(folder: Path, cfg: dict, rows: list[dict[str, float]] | None, columns: list[str] | None = None) -> None:
    """A finished run folder (rows), or, with rows None, a started one without results."""
    from fedmr.config import to_toml
    from fedmr.results import METRIC_COLUMNS, RunWriter

    writer = RunWriter(folder, resume=True)
    writer.write_config(cfg)
    if rows is not None:
        writer.write_metrics(rows, columns or METRIC_COLUMNS)
        writer.write_summary({"rounds": cfg["rounds"], "wall_seconds": 1.0 * cfg["rounds"]})
    assert (folder / "config.toml").read_text() == to_toml(cfg)


def _park(folder: Path, done: int, rows: list[dict[str, float]]) -> None:
    """What `fedmr study park` leaves: the newest checkpoint and the rows up to it."""
    from fedmr.results import RunWriter

    (folder / "parked").mkdir()
    (folder / "parked" / f"round-{done:06d}.json").write_text("{}")
    RunWriter(folder / "parked").write_metrics(rows)


def _segments(path: Path, stretches: list[tuple[int, int, str, str, bool, float]]) -> None:
    """A segments.csv of (first round, last round, processor, precision, compile, s/round) rows."""
    from fedmr.engine import segments

    rows = [{"first_round": a, "last_round": b, "seconds": s * (b - a + 1), "s_per_round": s,
             "started_utc": "2026-12-01T00:00:00Z", "device": "cuda" if "NVIDIA" in p else "cpu", "processor": p,
             "cores": 1, "torch": "2.13.0", "precision": precision, "compile": c, "workers": 1}
            for a, b, p, precision, c, s in stretches]
    path.write_text(segments.to_csv(rows))


def _steps(levels: tuple[float, float, float]) -> list[dict[str, float]]:
    """Rows every 10 rounds over 300: accuracy levels[0] in rounds 1-100, [1] in 101-200, [2] in 201-300."""
    return _accuracy([(r, levels[(r - 1) // 100]) for r in range(10, 301, 10)])


@pytest.fixture
def extended(tmp_path, monkeypatch) -> Path:
    """The fixture study with a communication section of probe runs and a ResNet-20 section whose cells are
    finished, partial (parked) or not started."""
    from fedmr.results import METRIC_COLUMNS
    from fedmr.study.sections import TRAFFIC
    from fedmr.study.spec import load_study

    root = _copy(tmp_path)
    with (root / "study.toml").open("a") as fh:
        fh.write(EXTRA)
    monkeypatch.chdir(root)
    study = load_study("study.toml")
    cells = {(m.section, m.method): c for c in study.cells for m in c.memberships}
    out = root / "results" / "study"

    def cell(section: str, method: str, rows, columns=None) -> Path:
        c = cells[(section, method)]
        _cell(out / c.name, c.cfg, rows, columns)
        return out / c.name

    same = _traffic([(2, 1.0, 1.0, 0.0), (4, 1.0, 1.0, 0.0)])
    cell("communication", "fedavg", same)
    cell("communication", "fedmr", same)
    cell("communication", "scaffold", _traffic([(2, 1.5, 2.0, 0.25), (4, 2.0, 2.0, 0.5)]))
    old = [c for c in METRIC_COLUMNS if c not in TRAFFIC]
    cell("communication", "fedprox", same, old)  # written before the traffic columns: absent
    cell("communication", "fedmr@first_stage_rounds=4", _accuracy([(2, 0.1), (4, 0.2)]))  # ... or empty
    fedavg = cell("resnet20", "fedavg", _accuracy(RESNET["fedavg"]))
    _segments(fedavg / "segments.csv", [(101, 200, "AMD EPYC 9B14 (avx512_bf16)", "fp32", False, 60.0),
                                        (201, 300, "NVIDIA H100 80GB HBM3", "fp32", True, 2.5)])
    cell("resnet20", "scaffold", _accuracy(RESNET["scaffold"]))
    cell("resnet20", "fedmr", _accuracy(RESNET["fedmr"]))
    partial = cell("resnet20", "fedmr@first_stage_rounds=4", None)
    _park(partial, 250, _accuracy(RESNET["fedmr@first_stage_rounds=4"]))
    _segments(partial / "parked" / "segments.csv", [(1, 250, "Intel Xeon (amx_bf16)", "bf16", False, 40.0)])
    # this machine ran it further: its local metrics, checkpoints and segments are not on the page
    (partial / "metrics.csv").write_text("round,accuracy\n" + "".join(f"{r},0.9\n" for r in range(50, 301, 50)))
    (partial / "checkpoints").mkdir()
    (partial / "checkpoints" / "round-000290.json").write_text("{}")
    _segments(partial / "segments.csv", [(1, 290, "this machine", "bf16", False, 40.0)])
    # the main model (the fixture's) at the same setting and rounds, rows every 10 rounds
    for method, levels in MAIN.items():
        cell("main", method, _steps(levels))
    return root


def _section(page: str, title: str) -> str:
    return page.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def test_the_communication_section_gives_each_methods_traffic_and_the_megabytes_to_an_accuracy(extended):
    assert main(["study", "report", "study.toml"]) == 0
    page = (extended / "results" / "README.md").read_text()
    text = _section(page, "Communication per round (probe runs)")
    # fixture, alpha 0.5 seed 1: fedavg first reaches 30% at round 4 and 50% at round 6 (past the probe's
    # last round, 4: extrapolated at round 4's 1 + 1 MB); fedmr reaches 30% at round 4 and never 50%
    assert "| fedavg | 1.00 | 1.00 | 1.00 | 1.00 | 0.00 | 1.00 | 8.0 (round 4) | ≈12.0 (round 6) |" in text
    assert "| fedmr | 1.00 | 1.00 | 1.00 | 1.00 | 0.00 | 1.00 | 8.0 (round 4) | never |" in text
    assert "| scaffold | 2.00 | 2.00 | 1.75 | 2.00 | 0.50 | 2.00 | main cell missing | main cell missing |" in text
    assert "| fedprox | not recorded (a run from before the traffic columns) |" in text
    assert "| fedmr@first_stage_rounds=4 | not recorded (a run from before the traffic columns) |" in text
    assert "| moon | missing |" in text
    assert "≈: the main cell reached the accuracy after the probe's last round" in text
    assert "FedMR's traffic equals fedavg's" in text and "round 4" in text
    # the generic table is not drawn for it, and the missing probe is listed as missing
    assert "| setting | accuracy |" not in text
    assert "--only name=alpha0.5-seed1-local_epochs-1-rounds-4-moon`" in _section(page, "Missing cells")


def test_a_partial_cell_is_shown_from_its_parked_rows_never_as_finished(extended):
    assert main(["study", "report", "study.toml"]) == 0
    page = (extended / "results" / "README.md").read_text()
    text = _section(page, "ResNet-20 (alpha 0.1, seed 1)")
    assert "| method | state | mean 1-100 | mean 101-200 | mean 201-300 | round to 30% | round to 40% |" in text
    assert "| fedavg | finished | 25.00 | 37.50 | 43.00 | 100 | 200 |" in text
    # parked at 250: block 201-300 is not covered to its end; the local rows (0.9 up to 300) are not read
    assert "| fedmr@first_stage_rounds=4 | partial: 250 of 300 rounds | 26.00 | 42.00 |  | 100 | 150 |" in text
    assert "| fedmr | finished | 29.00 | 40.00 | 46.50 | 100 | 200 |" in text
    assert "| scaffold | finished | 15.00 | 30.00 | 36.50 | 150 | never |" in text
    assert "| moon | not started |  |  |  |  |  |" in text
    assert "| fedmr@first_stage_rounds=4 - fedavg | +1.00 | +4.50 |  |" in text
    assert "| fedmr - fedavg | +4.00 | +2.50 | +3.50 |" in text
    assert "![ResNet-20 (alpha 0.1, seed 1)](study/plots/resnet20.png)" in text
    assert (extended / "results" / "study" / "plots" / "resnet20.png").is_file()
    assert not (extended / "results" / "study" / "plots" / "communication.png").exists()
    missing = _section(page, "Missing cells")
    assert f"| 4 | {LONG}-fedmr_first_stage_rounds-4, partial (250 of 300 rounds parked) |" in missing
    assert f"| 4 | {LONG}-moon | `" in missing
    assert f"{LONG}-fedmr_first" not in _section(page, "Run folders of the finished cells")


def test_the_extended_page_is_the_same_from_any_checkout(extended):
    """Only committed files count: without this machine's local metrics and checkpoints the page is the same."""
    from fedmr.study.index import resolve
    from fedmr.study.report import Page
    from fedmr.study.spec import load_study

    def render() -> str:
        study = load_study("study.toml")
        return Page(study, resolve(study), "study.toml", draw=False).render()

    first = render()
    assert render() == first
    partial = extended / "results" / "study" / f"{LONG}-fedmr_first_stage_rounds-4"
    (partial / "metrics.csv").unlink()
    (partial / "segments.csv").unlink()
    shutil.rmtree(partial / "checkpoints")
    assert render() == first


def _mean(rows: list[tuple[int, float]], first: int, last: int) -> float:
    """Mean accuracy of the rows evaluated in rounds first-last."""
    return float(np.mean([a for r, a in rows if first <= r <= last]))


def test_the_verdict_reads_each_model_and_the_papers_pattern(extended):
    assert main(["study", "report", "study.toml"]) == 0
    text = _section((extended / "results" / "README.md").read_text(), "Verdict")
    main_part, resnet = text.split("On the resnet20 (section \"ResNet-20 (alpha 0.1, seed 1)\"):\n")
    resnet, pattern = resnet.split("The paper's pattern")
    assert "On the auto (main table):\n\n- **fedmr** against fedavg: alpha 0.5: " in main_part  # the fixture's model
    # fedmr and fedavg are finished on the resnet20: the late mean (rounds 241-300: the rows of 250 and 300)
    fedmr = _mean(RESNET["fedmr"], 241, 300) - _mean(RESNET["fedavg"], 241, 300)
    assert f"{100 * fedmr:.2f}" == "3.50"
    assert f"- **fedmr** against fedavg: alpha 0.1: {verdict([fedmr], 1.0)}." in resnet
    assert verdict([fedmr], 1.0) == "ahead by 3.50 points in the one seed (one seed, no interval)"
    # the strongest other finished method of the section: fedavg (scaffold trails it); moon has not started
    assert _mean(RESNET["scaffold"], 241, 300) < _mean(RESNET["fedavg"], 241, 300)
    assert ("- **fedmr** against the strongest other method: alpha 0.1: fedavg (2 of 3 others finished): "
            f"{verdict([fedmr], 1.0)}.") in resnet
    # two-stage FedMR is parked at 250: not yet, with the lead in the latest block both cover, 101-200
    two = "fedmr@first_stage_rounds=4"
    block = _mean(RESNET[two], 101, 200) - _mean(RESNET["fedavg"], 101, 200)
    assert (f"- **{two}** against fedavg: alpha 0.1: not yet ({two} partial: 250 of 300 rounds; fedavg "
            f"finished); rounds 101-200: {100 * block:+.2f} points, one seed; interim, not a verdict.") in resnet
    assert f"{100 * block:+.2f}" == "+4.50"
    assert f"**{two}** against the strongest" not in resnet
    # the pattern: the same rounds on the main model at the same heterogeneity and seed
    main_late = MAIN["fedmr"][2] - MAIN["fedavg"][2]  # rounds 241-300 lie in the third level
    assert (f"- **fedmr** at alpha 0.1, seed 1, rounds 241-300 (the late mean): {100 * fedmr:+.2f} points over "
            f"fedavg on the resnet20, {100 * main_late:+.2f} on the auto: **larger** on the deeper model (by "
            f"{100 * (fedmr - main_late):.2f} points; one seed each).") in pattern
    assert f"{100 * main_late:+.2f}" == "+2.00"
    main_block = MAIN[two][1] - MAIN["fedavg"][1]
    assert (f"- **{two}** at alpha 0.1, seed 1, rounds 101-200: {100 * block:+.2f} points over fedavg on the "
            f"resnet20, {100 * main_block:+.2f} on the auto: **smaller** on the deeper model (by "
            f"{100 * (main_block - block):.2f} points; one seed each; interim, not a verdict).") in pattern
    assert f"{100 * main_block:+.2f}" == "+8.00"
    assert pattern.rstrip().endswith("the readings above cover only the finished cells.")


def test_the_pattern_is_level_not_yet_or_without_its_main_cells(extended):
    from fedmr.results import RunWriter
    from fedmr.study.spec import load_study

    cells = {(m.section, m.method): extended / "results" / "study" / c.name  # as the fixture made them
             for c in load_study("study.toml").cells for m in c.memberships}
    two = "fedmr@first_stage_rounds=4"

    def verdict_text() -> str:
        assert main(["study", "report", "study.toml"]) == 0
        return _section((extended / "results" / "README.md").read_text(), "Verdict")

    # the main model's lead within a point of the resnet20's: level
    RunWriter(cells[("main", "fedmr")], resume=True).write_metrics(
        _steps((0.31, 0.37, 0.43)))  # late lead 0.43 - 0.40 = +3.00 against the resnet20's +3.50
    # two-stage FedMR parked at round 50 only: no block both cover, so no interim lead
    partial = cells[("resnet20", two)]
    shutil.rmtree(partial / "parked")
    _park(partial, 50, _accuracy(RESNET[two][:1]))
    text = verdict_text()
    assert ("- **fedmr** at alpha 0.1, seed 1, rounds 241-300 (the late mean): +3.50 points over fedavg on the "
            "resnet20, +3.00 on the auto: **level** on the deeper model (within 1 point; one seed each).") in text
    assert (f"- **{two}** against fedavg: alpha 0.1: not yet ({two} partial: 50 of 300 rounds; fedavg "
            "finished).") in text
    assert (f"- **{two}** at alpha 0.1, seed 1: not yet (no 100-round block that both {two} and fedavg cover "
            "on the resnet20).") in text
    # without the main model's finished cell at that setting, the page says so
    (cells[("main", "fedmr")] / "summary.json").unlink()
    assert ("- **fedmr** at alpha 0.1, seed 1, rounds 241-300 (the late mean): +3.50 points over fedavg on the "
            "resnet20; the main table has no finished fedmr and fedavg cells at alpha 0.1, seed 1.") in verdict_text()


def test_the_resnet20_section_says_where_its_rounds_ran(extended):
    assert main(["study", "report", "study.toml"]) == 0
    text = _section((extended / "results" / "README.md").read_text(), "ResNet-20 (alpha 0.1, seed 1)")
    rows = [line for line in text.split("| method | rounds | processor | precision | compile | s/round |\n")[1]
            .split("\n\n")[0].splitlines()[1:]]
    assert rows == [
        "| fedavg | 1-100 | not recorded (before segments.csv existed) |  |  |  |",  # resumed after segments.csv
        "| fedavg | 101-200 | AMD EPYC 9B14 (avx512_bf16) | fp32 | false | 60.00 |",
        "| fedavg | 201-300 | NVIDIA H100 80GB HBM3 | fp32 | true | 2.50 |",
        "| fedmr@first_stage_rounds=4 | 1-250 | Intel Xeon (amx_bf16) | bf16 | false | 40.00 |",  # parked/ only
        "| fedmr | 1-300 | not recorded (before segments.csv existed) |  |  |  |",  # no segments.csv at all
        "| scaffold | 1-300 | not recorded (before segments.csv existed) |  |  |  |",
    ]  # moon has not started: no row
    assert text.index("| method | rounds |") < text.index("Lead over fedavg per block")


def test_wall_time_is_compared_only_on_the_same_processor(tmp_path, monkeypatch):
    """Each finished cell's time per round counts under the processor its segments.csv names: one row per method
    and processor, "several" for a cell resumed on another kind, "not recorded" for a cell without the file."""
    root = _copy(tmp_path)
    cells = root / "results" / "study"
    amd, intel = "AMD EPYC (avx2 avx512f avx512_bf16)", "Intel Xeon (amx_bf16)"
    for seed in (2, 3):
        _segments(cells / f"alpha0.5-seed{seed}-fedavg" / "segments.csv", [(1, 10, amd, "fp32", False, 1.0)])
    _segments(cells / "iid-seed2-fedavg" / "segments.csv", [(1, 5, amd, "fp32", False, 1.0), (6, 10, intel, "fp32", False, 1.0)])
    monkeypatch.chdir(root)
    assert main(["study", "report", "study.toml"]) == 0
    rows = [line for line in _section((root / "results" / "README.md").read_text(), "Wall time per round").splitlines()
            if line.startswith("| fedavg |")]
    per = {s: float(json.loads((cells / s / "summary.json").read_text())["wall_seconds"]) / 10
           for s in ("alpha0.5-seed2-fedavg", "alpha0.5-seed3-fedavg", "iid-seed2-fedavg")}
    two = sorted([per["alpha0.5-seed2-fedavg"], per["alpha0.5-seed3-fedavg"]])
    assert [r.split(" | ")[1] for r in rows] == [amd, "not recorded", "several (see the cell's segments.csv)"]
    assert rows[0] == f"| fedavg | {amd} | {sum(two) / 2:.2f} | {two[0]:.2f}-{two[1]:.2f} | 2 |"
    assert rows[1].endswith(" | 3 |") and rows[2] == (f"| fedavg | several (see the cell's segments.csv) | "
                                                      f"{per['iid-seed2-fedavg']:.2f} | {per['iid-seed2-fedavg']:.2f}-"
                                                      f"{per['iid-seed2-fedavg']:.2f} | 1 |")


def test_totals_between_and_past_the_probes_rows_and_blocks_covered_to_their_end():
    from fedmr.study.sections import block_means, total_at

    rows = _traffic([(10, 1.0, 2.0, 0.0), (20, 2.0, 2.0, 0.0)])
    assert total_at(rows, 20) == (70.0, False)  # 10 rounds of 1 + 2 MB, then 10 of 2 + 2
    assert total_at(rows, 15) == (30.0 + 5 * 3.0, True)
    assert total_at(rows, 35) == (70.0 + 15 * 4.0, True)
    assert total_at(rows, 5) == (5 * 3.0, True)
    assert block_means(_accuracy([(50, 0.2), (100, 0.4), (150, 0.5)]), 250) == [pytest.approx(0.3), None, None]
    assert block_means(_accuracy([(100, 0.2), (200, 0.4), (250, 0.5)]), 250) == [0.2, 0.4, 0.5]
