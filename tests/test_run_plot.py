"""What a single run leaves for people to look at (issue 19): `fedmr run` writes `accuracy.png` as
`fedmr compare` does (one plotting function for both: whole-round ticks, markers on short runs, a
title naming the model and data), a plot failure never loses the run, and `client_state_mb` is 0,
not empty, for the algorithms that keep nothing per client (FedAvg, FedMR), on both front ends."""

from __future__ import annotations

import csv
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from fedmr.cli import main
from fedmr.config import default_config
from fedmr.results import MARKER_POINTS, accuracy_figure, setting_title

TINY = ["num_clients=6", "clients_per_round=3", "rounds=3", "local_epochs=1", "eval_every=1", "workers=1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _sets(*assignments: str) -> list[str]:
    return [a for s in assignments for a in ("--set", s)]


def _rows(folder: Path) -> list[dict[str, str]]:
    with (folder / "metrics.csv").open() as fh:
        return list(csv.DictReader(fh))


def _read_png(path: Path):
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    return matplotlib.image.imread(path)


@pytest.fixture(scope="module")
def fedavg_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "fedavg"
    assert main(["run", "--quiet", "--out", str(out), *_sets(*TINY, "algorithm=fedavg")]) == 0
    return out


def test_a_single_run_writes_a_readable_accuracy_plot(fedavg_run):
    image = _read_png(fedavg_run / "accuracy.png")
    assert image.shape[0] > 300 and image.shape[1] > 500  # 7 x 4.5 inches at 120 dpi
    assert not list(fedavg_run.glob("accuracy.png*.tmp"))
    summary = json.loads((fedavg_run / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["last_n"] == 3  # three evaluations, not five


@pytest.mark.parametrize("algorithm", ["fedavg", "fedmr"])
def test_client_state_mb_is_zero_for_algorithms_without_per_client_state(algorithm, fedavg_run, tmp_path):
    if algorithm == "fedavg":
        folder = fedavg_run
    else:
        folder = tmp_path / algorithm
        assert main(["run", "--quiet", "--out", str(folder), *_sets(*TINY, f"algorithm={algorithm}")]) == 0
    rows = _rows(folder)
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    assert all(r["client_state_mb"] == "0" for r in rows)
    # pool_cosine stays empty where there is no pool
    assert all((r["pool_cosine"] == "") == (algorithm == "fedavg") for r in rows)


def test_the_flower_server_writes_zero_client_state_and_the_plot_too(tmp_path):
    """The ServerApp's evaluate_fn hands rounds to the same Recorder (as in test_flower_helpers)."""
    pytest.importorskip("flwr")
    from fedmr.config import load_config
    from fedmr.engine import Simulation, prepare
    from fedmr.engine.recorder import Recorder
    from fedmr.flower.server_app import CentralEvaluation
    from fedmr.results import RunWriter

    cfg = load_config(None, [*TINY, "algorithm=fedavg", "rounds=2"])
    exp = prepare(cfg)
    trainer = Simulation(exp, progress="none")
    recorder = Recorder(cfg, exp, trainer.algorithm, RunWriter(tmp_path / "flower"))
    strategy = SimpleNamespace(rounds_before=recorder.start(), last_round={}, last_eval={})
    evaluate = CentralEvaluation(recorder, strategy)
    for r in range(cfg["rounds"]):
        strategy.last_round = trainer.run_round(r)
        evaluate(r + 1, None)
    recorder.finish({"engine": "flower"})
    assert [r["client_state_mb"] for r in _rows(tmp_path / "flower")] == ["0", "0"]
    _read_png(tmp_path / "flower" / "accuracy.png")
    # per-client evaluation and every round's training loss, as `fedmr run` writes them (issue 28.5)
    assert all(0 <= float(r["client_acc_worst10"]) <= float(r["client_acc_mean"]) <= 1 for r in _rows(tmp_path / "flower"))
    assert (tmp_path / "flower" / "train_loss.csv").read_text().count("\n") == 3  # the header, rounds 1 and 2
    assert (tmp_path / "flower" / "client_accuracy.csv").is_file()
    _read_png(tmp_path / "flower" / "loss.png")


def test_the_plot_has_whole_round_ticks_markers_on_short_runs_and_names_model_and_data():
    rows = [{"round": r, "accuracy": 0.1 * r} for r in (1, 2, 3)]
    fig = accuracy_figure({"fedavg": rows}, "fedavg — cnn on digits", legend=False)
    ax = fig.axes[0]
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks)  # not 1.25, 1.5, ...
    assert ax.lines[0].get_marker() == "o" and ax.get_legend() is None
    assert ax.get_title() == "fedavg — cnn on digits"
    long = [{"round": r, "accuracy": 0.5} for r in range(1, MARKER_POINTS + 2)]
    nan = {"round": MARKER_POINTS + 5, "accuracy": float("nan")}
    fig = accuracy_figure({"a": long + [nan], "b": rows}, "t")
    lines = fig.axes[0].lines
    assert lines[0].get_marker() in (None, "None", "") and lines[1].get_marker() == "o"
    assert len(lines[0].get_xdata()) == MARKER_POINTS + 1  # the row without a value is left out
    assert fig.axes[0].get_legend() is not None


def test_titles_name_model_data_and_split():
    cfg = {**default_config(), "num_clients": 100, "partition": "dirichlet", "alpha": 0.1}
    assert setting_title(cfg, "cnn", "cifar10") == "cnn on cifar10 (dirichlet alpha 0.1, 100 clients)"
    assert setting_title({**cfg, "partition": "iid"}, "mlp", "digits", 20) == "mlp on digits (iid, 20 clients)"
    assert setting_title(cfg, "cnn", "sites", 3, clients_hold_data=True) == \
        "cnn on sites (the sites' own data, 3 clients)"


def test_a_plot_failure_is_a_warning_and_the_run_keeps_its_results(tmp_path, monkeypatch, caplog):
    import fedmr.results

    def broken(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(fedmr.results, "plot_curves", broken)
    out = tmp_path / "r"
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        assert main(["run", "--quiet", "--out", str(out), *_sets(*TINY, "algorithm=fedavg", "rounds=1")]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
    assert len(_rows(out)) == 1 and (out / "model.safetensors").exists()
    assert not (out / "accuracy.png").exists()
    assert any("could not draw" in r.getMessage() and "no fonts" in r.getMessage() for r in caplog.records)


def test_the_compare_plot_and_table_use_the_same_drawing(tmp_path):
    out = tmp_path / "cmp"
    assert main(["compare", "--quiet", "--algorithms", "fedavg,fedmr", "--out", str(out),
                 *_sets(*TINY, "rounds=2")]) == 0
    _read_png(out / "accuracy.png")
    for variant in ("fedavg", "fedmr"):
        _read_png(out / variant / "accuracy.png")  # each variant is a run with its own plot
        assert all(r["client_state_mb"] == "0" for r in _rows(out / variant))
    table = (out / "comparison.md").read_text()
    assert table.startswith("# cnn on digits (dirichlet alpha 0.1, 6 clients), seed 1")
    assert "| mean of last 2 |" in table and "mean of last 5" not in table


def test_plotting_prints_no_matplotlib_log_lines(tmp_path):
    """A fresh matplotlib config folder makes matplotlib build its font cache, which it announces
    at INFO ("INFO matplotlib.font_manager: generated new fontManager"); the CLI logs at INFO."""
    code = ("import sys; from fedmr.cli import main; "
            f"sys.exit(main(['run', '--quiet', '--out', {str(tmp_path / 'r')!r}, *{_sets(*TINY, 'rounds=1')!r}]))")
    env = {**os.environ, "MPLCONFIGDIR": str(tmp_path / "mpl"), "MPLBACKEND": "TkAgg"}  # no display: Agg regardless
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "matplotlib" not in proc.stderr and "matplotlib" not in proc.stdout
    _read_png(tmp_path / "r" / "accuracy.png")


# ---- issue 28.4: one unit, an axis from 0, a legend off the curves, a band for seeds ----------------------
def test_a_flat_run_is_drawn_in_percent_from_zero_not_as_a_collapse():
    rows = [{"round": r, "accuracy": a} for r, a in ((2, 0.1114), (4, 0.1085), (6, 0.1114))]
    fig = accuracy_figure({"fedmr": rows}, "t", legend=False)
    ax = fig.axes[0]
    assert list(ax.lines[0].get_ydata()) == pytest.approx([11.14, 10.85, 11.14])  # percent, as the study's plots
    low, high = ax.get_ylim()
    assert low == 0 and 11.14 < high < 12  # the highest point is inside the axes, not on its edge
    assert "(%)" in ax.get_ylabel()


SEEDS = " (mean of 3 seeds, band: lowest to highest seed)"  # the study's multi-seed curves


@pytest.mark.parametrize("labels", [
    ["fedavg", "fedprox", "scaffold", "moon", "fedgen", "clustered", "fedindep", "fedmr",
     "fedmr@first_stage_rounds=50", "fedmr@block_fraction=0.5@first_stage_rounds=20"],
    ["fedavg" + SEEDS, "fedprox", "scaffold", "moon", "fedgen", "clustered", "fedindep", "fedmr" + SEEDS,
     "fedmr@first_stage_rounds=50" + SEEDS],
    ["fedavg", "fedmr"],
], ids=["compare-10", "study-long-labels", "two"])
def test_the_legend_sits_under_the_axes_covers_no_curve_and_fits_the_image(labels):
    curves = {label: [{"round": r, "accuracy": 0.1 + 0.05 * i + 0.01 * r} for r in (1, 2, 3)]
              for i, label in enumerate(labels)}
    fig = accuracy_figure(curves, "compare")
    fig.canvas.draw()
    ax, legend = fig.axes[0], fig.axes[0].get_legend()
    assert [t.get_text() for t in legend.get_texts()] == labels
    box, axes = legend.get_window_extent(), ax.get_window_extent()
    assert box.y1 <= axes.y0  # wholly under the plotting area
    assert box.x0 >= 0 and box.x1 <= fig.bbox.x1 and box.y0 >= 0  # and inside the image
    assert axes.width > 0.75 * fig.bbox.width and axes.height > 0.5 * fig.bbox.height  # not squeezed by it


def test_a_band_is_shaded_in_its_curves_colour_and_loss_is_not_in_percent():
    rows = [{"round": r, "accuracy": 0.5} for r in (1, 2)]
    fig = accuracy_figure({"a": rows}, "t", bands={"a": [(1, 0.4, 0.6), (2, 0.45, 0.55)]})
    ax = fig.axes[0]
    (band,) = ax.collections
    assert band.get_facecolor()[0][:3] == pytest.approx(matplotlib_rgb(ax.lines[0].get_color()))
    assert band.get_paths()[0].vertices[:, 1].max() == pytest.approx(60.0)  # percent too
    fig = accuracy_figure({"loss": [{"round": 1, "loss": 2.3}]}, "t", key="loss")
    assert fig.axes[0].lines[0].get_ydata()[0] == 2.3 and fig.axes[0].get_ylabel() == "cross-entropy loss"


def matplotlib_rgb(color: str) -> tuple[float, float, float]:
    from matplotlib.colors import to_rgb

    return to_rgb(color)


def test_a_run_draws_its_loss_beside_its_accuracy(fedavg_run):
    image = _read_png(fedavg_run / "loss.png")
    assert image.shape[0] > 300 and image.shape[1] > 500
    assert [r.split(",")[0] for r in (fedavg_run / "train_loss.csv").read_text().splitlines()] == \
        ["round", "1", "2", "3"]


def test_the_study_plots_draw_with_the_same_function_and_a_band_over_seeds(tmp_path):
    from fedmr.study.plots import BAND, plot, seed_curve, seed_label

    seeds = [[{"round": 2, "accuracy": 0.2}, {"round": 4, "accuracy": 0.4}, {"round": 5, "accuracy": 0.5}],
             [{"round": 2, "accuracy": 0.3}, {"round": 4, "accuracy": 0.2}]]  # the second stopped at round 4
    points, band = seed_curve(seeds)
    assert points == [(2, 0.25), (4, pytest.approx(0.3))] and band == [(2, 0.2, 0.3), (4, 0.2, 0.4)]
    assert seed_label("fedmr", 2) == f"fedmr (mean of 2 seeds, {BAND})" and seed_label("fedmr", 1) == "fedmr"
    plot({seed_label("fedmr", 2): points}, tmp_path / "p.png", "t", {seed_label("fedmr", 2): band})
    _read_png(tmp_path / "p.png")
