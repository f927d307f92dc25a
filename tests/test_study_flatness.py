"""The results page's "Flatness (the paper's argument)" section (study/flatness.py), on a copy of the
fixture study of tests/test_study_report.py: nothing without landscape files (the committed page stays
byte for byte, which test_study_report checks), and with them a table, plots and a reading that
follow the numbers and the rules the page states."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fedmr.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "study"


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "study"
    shutil.copytree(FIXTURE, root)
    return root


def _doc(folder: str, eigen: float, trace: float, accuracy: float, loss: float = 0.5, curve_scale: float = 1.0,
         member=None, input_=None) -> dict:
    alphas = [-1.0, -0.5, 0.0, 0.5, 1.0]
    rows = [[loss + curve_scale * a * a * k for a in alphas] for k in (1.0, 1.2)]
    return {"format": 1, "models": [{"input": input_ or folder, "run": folder, "kind": "final", "round": None,
                                     "member": member, "pool_size": None}],
            "data": {"samples": 1000}, "train": {"loss": loss, "accuracy": 0.9},
            "test": {"loss": 1.0, "accuracy": accuracy},
            "eigen": {"top_eigenvalue": eigen}, "trace": {"trace": trace, "standard_error": 10.0},
            "curve_1d": {"alphas": alphas, "loss": rows, "loss_mean": [sum(c) / 2 for c in zip(*rows)],
                         "loss_std": [abs(c[0] - c[1]) / 2 ** 0.5 for c in zip(*rows)]}}


def _path_doc(a: str, b: str, losses: list[float], input_a=None, input_b=None) -> dict:
    ts = [i / (len(losses) - 1) for i in range(len(losses))]
    ends = (losses[0] + losses[-1]) / 2
    top = max(range(len(losses)), key=lambda i: losses[i])
    return {"models": [{"input": input_a or a, "run": a}, {"input": input_b or b, "run": b}],
            "path": {"t": ts, "loss": losses, "accuracy": [0.5] * len(losses), "barrier": max(losses) - ends,
                     "barrier_linear": max(v - ((1 - t) * losses[0] + t * losses[-1]) for t, v in zip(ts, losses)),
                     "barrier_at": ts[top], "ends_mean_loss": ends}}


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _report(root: Path, monkeypatch) -> str:
    monkeypatch.chdir(root)
    assert main(["study", "report", "study.toml"]) == 0
    return (root / "results" / "README.md").read_text()


def test_flatness_section_reads_the_landscape_files(tmp_path, monkeypatch):
    root = _copy(tmp_path)
    study = root / "results" / "study"
    fedavg = root / "results" / "earlier" / "fedavg"  # the seed-1 FedAvg cell, reused from an earlier run
    two_stage = study / "alpha0.5-seed1-fedmr_first_stage_rounds-4"
    _write(fedavg / "landscape.json", _doc("results/earlier/fedavg", 40.0, 300.0, 0.60, curve_scale=2.0))
    _write(study / "alpha0.5-seed1-fedmr" / "landscape.json", _doc("x/alpha0.5-seed1-fedmr", 10.0, 100.0, 0.70))
    _write(two_stage / "landscape.json", _doc("x/two", 50.0, 400.0, 0.55))
    _write(study / "alpha0.5-seed1-fedprox" / "landscape.json", _doc("x/prox", 30.0, 310.0, 0.65))
    _write(fedavg / "landscape-path-alpha0.5-seed1-fedmr.json",
           _path_doc("results/earlier/fedavg", "results/study/alpha0.5-seed1-fedmr", [0.5, 0.9, 1.3, 0.8, 0.4]))
    for r, (a, b) in {2: (5.0, 6.0), 4: (8.0, 7.0), 6: (9.0, 4.0), 8: (9.5, 3.0)}.items():
        _write(fedavg / "models" / f"round-{r:06d}-landscape.json", {**_doc("f", a, 1.0, 0.5), "models": [{}]})
        _write(two_stage / "models" / f"round-{r:06d}-landscape.json", {**_doc("t", b, 1.0, 0.5), "models": [{}]})
        pool = f"t/models/round-{r:06d}-pool.safetensors"
        barrier = {2: [1.0, 1.8, 1.0], 4: [1.0, 1.3, 1.0], 6: [1.0, 1.001, 1.0], 8: [1.2, 1.0, 0.8]}[r]
        _write(two_stage / "models" / f"round-{r:06d}-pool-m0-landscape-path-m1.json",
               _path_doc("t", "t", barrier, f"{pool}@0", f"{pool}@1"))
    page = _report(root, monkeypatch)
    section = page[page.index("## Flatness (the paper's argument)"):page.index("## Verdict")]
    assert "| fedavg | alpha 0.5 | 1 | 40 | 300 ± 10 | 0.5000 | 60.00 | 1000 |" in section
    assert "| fedmr | alpha 0.5 | 1 | 10 | 100 ± 10 | 0.5000 | 70.00 | 1000 |" in section
    assert ("- alpha 0.5, seed 1: fedmr's global model is **flatter** than fedavg's: top eigenvalue 10 against 40 "
            "(0.25 times fedavg's), trace 100 ± 10 against 300 ± 10.") in section
    assert "fedmr@first_stage_rounds=4's global model is **not flatter** than fedavg's, it is sharper" in section
    # fedprox's trace (310 ± 10) is within two combined standard errors of fedavg's: fedprox is no contrast, unread
    # four models in a perfect order: an ordering that arises by chance 2 times in 24, so not established
    assert ("Spearman's rank correlation of the top eigenvalue with test accuracy is -1.00 (two-sided p = 0.083, exact "
            "over the 24 orderings): the flatter models are the more accurate ones, **not established** with 4 "
            "models.") in section
    assert "- IID: too few methods measured" not in section  # no IID cell was measured
    assert "| alpha 0.5 | 1 | fedavg -> fedmr | 0.5000 | 0.4000 | 1.3000 (t = 0.5) | 0.8500 | 0.8500 |" in section
    assert ("- fedmr@first_stage_rounds=4 (alpha 0.5, seed 1): its top eigenvalue is below fedavg's from round 4 on "
            "(at round 8: 3 against 9.5).") in section
    assert ("- fedmr@first_stage_rounds=4 (alpha 0.5, seed 1): the barrier between two pool members (highest loss "
            "above the ends' mean) goes from 0.8000 (round 2) to 0.2000 (round 8); the loss on the line stays within 1% "
            "of the chord between the ends (one basin) from round 6 on.") in section
    plots = sorted(p.name for p in (study / "plots").glob("flatness-*.png"))
    assert plots == ["flatness-1d-alpha0.5.png", "flatness-path-alpha0.5.png", "flatness-pool-barrier.png",
                     "flatness-rounds.png"]
    assert all(f"plots/{name}" in section for name in plots)
    assert _report(root, monkeypatch) == page  # byte-stable


def _short_section(root: Path) -> dict[str, Path]:
    """A section of cells trained with one local epoch (as a ResNet-20 section differs by its model) at the
    main cells' heterogeneity, alpha 0.5: its FedAvg and FedMR run folders (config only)."""
    from fedmr.config import to_toml
    from fedmr.results import RunWriter
    from fedmr.study.spec import load_study

    with (root / "study.toml").open("a") as fh:
        fh.write('\n[[grid]]\npriority = 3\nsection = "short"\ntitle = "One local epoch"\n'
                 'algorithm = ["fedavg", "fedmr"]\nalpha = [0.5]\nseed = [1]\nlocal_epochs = [1]\n')
    folders = {}
    for c in load_study(root / "study.toml").cells:
        if c.cfg.local_epochs == 1:
            folder = folders[c.cfg.algorithm] = root / "results" / "study" / c.name
            RunWriter(folder, resume=True).write_config(c.cfg)
            assert (folder / "config.toml").read_text() == to_toml(c.cfg)
    return folders


def _finish(folder: Path) -> None:
    from fedmr.results import RunWriter

    writer = RunWriter(folder, resume=True)
    writer.write_metrics([{"round": r, "accuracy": 0.5} for r in range(2, 11, 2)])
    writer.write_summary({"rounds": 10, "wall_seconds": 10.0})


def test_cells_of_another_setting_are_compared_among_themselves(tmp_path, monkeypatch):
    """The short section's FedMR is read against its own FedAvg, never the main one."""
    root = _copy(tmp_path)
    study = root / "results" / "study"
    for algorithm, folder in _short_section(root).items():
        _finish(folder)
        flat = algorithm == "fedavg"  # here FedAvg is the flatter: 5 against FedMR's 20
        _write(folder / "landscape.json", _doc(folder.name, 5.0 if flat else 20.0, 50.0 if flat else 200.0, 0.5))
    _write(study / "alpha0.5-seed1-fedmr" / "landscape.json", _doc("x/fedmr", 10.0, 100.0, 0.70))
    _write(root / "results" / "earlier" / "fedavg" / "landscape.json", _doc("x/fedavg", 40.0, 300.0, 0.60))
    section = _report(root, monkeypatch).split("## Flatness (the paper's argument)")[1].split("## Verdict")[0]
    assert "| method | setting | seed |" in section
    assert "| fedmr | alpha 0.5, local_epochs=1 | 1 | 20 | 200 ± 10 |" in section
    assert "- alpha 0.5, seed 1: fedmr's global model is **flatter** than fedavg's: top eigenvalue 10 against 40" in section
    assert ("- alpha 0.5, local_epochs=1, seed 1: fedmr's global model is **not flatter** than fedavg's, it is sharper: "
            "top eigenvalue 20 against 5") in section
    assert "plots/flatness-1d-alpha0.5-local_epochs-1.png" in section


def test_a_cell_still_running_gives_its_models_over_the_rounds(tmp_path, monkeypatch):
    """FedMR parked at round 6 of 10, its checkpoints at rounds 2 and 4 measured into models/ (as the ResNet-20
    cells' are between sittings): on the over-rounds plot and read against FedAvg, with no final row."""
    root = _copy(tmp_path)
    folders = _short_section(root)
    _finish(folders["fedavg"])
    _write(folders["fedavg"] / "landscape.json", _doc("f", 30.0, 300.0, 0.5))
    (folders["fedmr"] / "parked").mkdir()
    (folders["fedmr"] / "parked" / "round-000006.json").write_text("{}")
    for r, (a, b) in {2: (5.0, 4.0), 4: (8.0, 3.0), 6: (9.0, 2.0)}.items():
        _write(folders["fedavg"] / "models" / f"round-{r:06d}-landscape.json", {**_doc("f", a, 1.0, 0.5), "models": [{}]})
        if r < 6:
            _write(folders["fedmr"] / "models" / f"round-{r:06d}-landscape.json", {**_doc("m", b, 1.0, 0.5), "models": [{}]})
    pool = "m/checkpoints/round-000002.json"  # two members of its checkpoint's pool, measured at round 2
    _write(folders["fedmr"] / "models" / "round-000002-m0-landscape-path-m1.json",
           _path_doc("m", "m", [1.0, 1.5, 2.0], f"{pool}@0", f"{pool}@1"))
    section = _report(root, monkeypatch).split("## Flatness (the paper's argument)")[1].split("## Verdict")[0]
    assert ("- fedmr (alpha 0.5, local_epochs=1, seed 1): the barrier between two pool members (highest loss above "
            "the ends' mean) is 0.5000 at round 2, the one round measured; the loss on the line stays within 1% of "
            "the chord between the ends (one basin) at round 2.") in section
    assert "| fedavg | alpha 0.5, local_epochs=1 | 1 | 30 |" in section
    assert "| fedmr | alpha 0.5, local_epochs=1 |" not in section  # no final model yet
    assert ("- fedmr (alpha 0.5, local_epochs=1, seed 1): its top eigenvalue is below fedavg's from round 2 on "
            "(at round 4: 3 against 8).") in section
    assert "plots/flatness-rounds.png" in section


def test_several_pairs_of_pool_members_are_averaged_and_one_basin_needs_every_line(tmp_path, monkeypatch):
    """Pairs 0-1 and 2-3 of the pool measured at rounds 2, 4 and 6: the reading gives the mean barrier per
    round, and one basin only from the round on which every measured line stays near its chord."""
    root = _copy(tmp_path)
    study = root / "results" / "study"
    two_stage = study / "alpha0.5-seed1-fedmr_first_stage_rounds-4"
    _write(two_stage / "landscape.json", _doc("x/two", 50.0, 400.0, 0.55))
    lines = {2: ([1.0, 1.8, 1.0], [1.0, 1.4, 1.0]), 4: ([1.0, 1.001, 1.0], [1.0, 1.3, 1.0]),
             6: ([1.0, 1.001, 1.0], [1.0, 1.005, 1.0])}
    for r, pairs in lines.items():
        pool = f"t/models/round-{r:06d}-pool.safetensors"
        for (a, b), losses in zip([(0, 1), (2, 3)], pairs):
            _write(two_stage / "models" / f"round-{r:06d}-pool-m{a}-landscape-path-m{b}.json",
                   _path_doc("t", "t", losses, f"{pool}@{a}", f"{pool}@{b}"))
    section = _report(root, monkeypatch).split("## Flatness (the paper's argument)")[1].split("## Verdict")[0]
    assert ("- fedmr@first_stage_rounds=4 (alpha 0.5, seed 1): the barrier between two pool members "
            "(highest loss above the ends' mean; the mean over 2 pairs of members) goes from 0.6000 (round 2) to "
            "0.0030 (round 6); the loss on every measured line stays within 1% of the chord between the ends "
            "(one basin) from round 6 on.") in section


def test_not_flatter_is_said_and_a_real_landscape_file_is_read(tmp_path, monkeypatch, one_torch_thread):
    """A cell measured by `fedmr landscape` itself (an untrained model put in the cell's folder)."""
    from fedmr.config import load_config
    from fedmr.data import load_dataset
    from fedmr.engine.checkpoint import save_tensors
    from fedmr.models import model_builder

    root = _copy(tmp_path)
    study = root / "results" / "study"
    cell = study / "iid-seed1-fedmr"
    cfg = load_config(cell / "config.toml")
    _, build, _ = model_builder(cfg.model, load_dataset(cfg))
    torch.manual_seed(0)
    save_tensors(cell / "model.safetensors", build().state_dict())
    assert main(["landscape", "--quiet", str(cell), "--compute", "eigen,trace,1d", "--samples", "32",
                 "--power-iters", "2", "--trace-vectors", "2", "--directions", "2", "--points", "3"]) == 0
    measured = json.loads((cell / "landscape.json").read_text())
    eigen = measured["eigen"]["top_eigenvalue"]
    _write(study / "iid-seed1-fedavg" / "landscape.json",
           _doc("x/iid-seed1-fedavg", eigen / 2, measured["trace"]["trace"] - 1e6, 0.5))
    page = _report(root, monkeypatch)
    assert "- IID, seed 1: fedmr's global model is **not flatter** than fedavg's, it is sharper" in page
    assert "- IID: too few methods measured (2) to say whether flatness goes with accuracy." in page
    flag = "" if measured["eigen"]["converged"] else " (not converged)"  # 2 products: rarely converged
    assert f"| fedmr | IID | 1 | {eigen:.4g}{flag} |" in page
    assert (study / "plots" / "flatness-1d-IID.png").is_file()


def test_no_landscape_files_no_section(tmp_path, monkeypatch):
    root = _copy(tmp_path)
    page = _report(root, monkeypatch)
    assert "Flatness" not in page
    assert page == (FIXTURE / "results" / "README.md").read_text()


@pytest.mark.parametrize("bad", ["not json", "[1, 2]"])
def test_an_unreadable_landscape_file_is_passed_over(tmp_path, monkeypatch, bad):
    root = _copy(tmp_path)
    (root / "results" / "study" / "iid-seed1-fedmr" / "landscape.json").write_text(bad)
    assert "Flatness" not in _report(root, monkeypatch)


def test_a_rerun_of_a_cell_under_study_landscape_is_read_for_it(tmp_path, monkeypatch):
    """[study] landscape = [folders]: a finished cell measured in an equal rerun elsewhere (its models kept there)."""
    root = _copy(tmp_path)
    rerun = root / "reruns" / "alpha0.5-seed1-fedmr-again"
    shutil.copytree(root / "results" / "study" / "alpha0.5-seed1-fedmr", rerun)
    config = rerun / "config.toml"  # keeps models: changes no result, so still a rerun of the cell
    config.write_text("save_model_every = 5\n" + config.read_text())
    _write(rerun / "landscape.json", _doc("reruns/alpha0.5-seed1-fedmr-again", 12.5, 100.0, 0.7))
    assert "Flatness" not in _report(root, monkeypatch)  # not named: not read
    study = root / "study.toml"
    study.write_text(study.read_text().replace('report = "results/README.md"',
                                               'report = "results/README.md"\nlandscape = ["reruns"]'))
    from fedmr.results import RunWriter, read_metrics
    from fedmr.study.execute import late_mean

    rows = read_metrics(rerun / "metrics.csv")  # the rerun drifted: 1 point higher at every evaluation
    RunWriter(rerun, resume=True).write_metrics([{**r, "accuracy": r["accuracy"] + 0.01} for r in rows])
    cell = 100 * late_mean(rows, 10, 0.2)
    page = _report(root, monkeypatch)
    assert "| fedmr | alpha 0.5 | 1 | 12.5 | 100 ± 10 | 0.5000 | 70.00 | 1000 |" in page
    assert (f"| fedmr | alpha 0.5 | 1 | {cell:.2f} | {cell + 1:.2f} | +1.00 | "
            "[alpha0.5-seed1-fedmr-again](../reruns/alpha0.5-seed1-fedmr-again) |") in page
    study.write_text(study.read_text().replace('landscape = ["reruns"]', 'landscape = "reruns"'))
    monkeypatch.chdir(root)
    assert main(["study", "report", "study.toml"]) == 2


def test_the_rank_correlation_p_value_is_exact_for_few_models():
    """n models in a perfect order arise by chance in 2 of the n! orderings (either direction): p = 2 / n!."""
    from scipy import stats

    from fedmr.study.flatness import _rank_p

    assert _rank_p([3.0, 2.0, 1.0], [0.1, 0.2, 0.3]) == (pytest.approx(1 / 3), "exact over the 6 orderings")
    assert _rank_p([1.0, 2.0, 3.0, 4.0, 5.0], [1, 2, 3, 4, 5])[0] == pytest.approx(2 / 120)  # established at 5%
    # one neighbouring pair swapped of four: rho = 0.8; |rho| >= 0.8 for the identity, its 3 neighbour swaps
    # and their 4 reversals: 8 of the 24 orderings
    assert _rank_p([1.0, 2.0, 3.0, 4.0], [2, 1, 3, 4])[0] == pytest.approx(8 / 24)
    x, y = list(range(9)), [0, 2, 1, 3, 5, 4, 6, 8, 7]
    assert _rank_p(x, y) == (pytest.approx(float(stats.spearmanr(x, y).pvalue)), "t approximation")


@pytest.mark.parametrize("third", [(15.0, 150.0), (60.0, 500.0), None])
def test_flatness_over_seeds_is_summed_up_with_an_interval_from_three_seeds(tmp_path, monkeypatch, third):
    """FedMR against FedAvg at alpha 0.5 measured in seeds 1, 2 (and 3): in how many seeds it is flatter, the
    geometric mean of each measure's per-seed ratio and, from three seeds, its 95% Student-t interval on the log
    ratios, computed here with numpy and scipy; flatter is established only where both intervals lie below 1."""
    import numpy as np
    from scipy import stats

    root = _copy(tmp_path)
    study = root / "results" / "study"
    measures = {1: ((40.0, 300.0), (10.0, 100.0)), 2: ((50.0, 400.0), (20.0, 100.0))}
    if third is not None:
        measures[3] = ((30.0, 300.0), third)
    for seed, (base, fedmr) in measures.items():
        folder = root / "results" / "earlier" / "fedavg" if seed == 1 else study / f"alpha0.5-seed{seed}-fedavg"
        _write(folder / "landscape.json", _doc(f"x/fedavg{seed}", *base, 0.6))
        _write(study / f"alpha0.5-seed{seed}-fedmr" / "landscape.json", _doc(f"x/fedmr{seed}", *fedmr, 0.7))
    section = _report(root, monkeypatch).split("## Flatness (the paper's argument)")[1].split("## Verdict")[0]
    n = len(measures)
    parts, highs, lows = [], [], []
    for i, name in enumerate(["top eigenvalue", "trace"]):
        logs = np.log([fedmr[i] / base[i] for base, fedmr in measures.values()])
        text = f"{name} {np.exp(logs.mean()):.2f} times fedavg's"
        if n >= 3:
            half = stats.t.ppf(0.975, n - 1) * logs.std(ddof=1) / np.sqrt(n)
            lo, hi = np.exp(logs.mean() - half), np.exp(logs.mean() + half)
            text += f" (95% interval {lo:.2f} to {hi:.2f})"
            highs.append(hi)
            lows.append(lo)
        parts.append(text)
    flatter = 2 if third is None or third[0] > 30.0 else 3
    counts = "" if flatter == n else " (sharper in 1)"
    if n < 3:
        reading = "2 seeds, too few for an interval"
    elif max(highs) < 1:
        reading = "**flatter**, established: every interval lies below 1"
    else:
        reading = "**not established**: an interval includes 1, or the measures disagree"
    assert (f"- alpha 0.5, over {n} seeds: fedmr's global model is flatter than fedavg's in {flatter} of {n}{counts}; "
            f"geometric mean of the per-seed ratios: {', '.join(parts)}: {reading}.") in section
    assert section.count(", over ") == 1  # only fedmr has several seeds measured
    if third == (15.0, 150.0):
        assert max(highs) < 1  # the case meant to be established is
