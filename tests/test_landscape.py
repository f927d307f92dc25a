"""``fedmr landscape`` (issue 32): the curvature maths against Hessians known exactly, the curves and
paths against the model's own loss, determinism, and bad inputs as one ``fedmr: error:`` line.

Tolerances: the maths tests use float64 throughout and compare with an exact eigendecomposition, so
they hold to 1e-6 relative (the power iteration's own stopping rule is 1e-10); Hutchinson's estimate
is random by design and is checked against its own standard error (a miss by more than 4 SE has
probability below 1e-4 for a mean of 400 terms).  Runs here are not trained: the tool needs only a
run folder's config.toml and a model, so the folders are written directly (seconds, not minutes).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from fedmr.cli import main
from fedmr.config import load_config, to_toml
from fedmr.data import load_dataset
from fedmr.engine.checkpoint import save_checkpoint, save_tensors
from fedmr.landscape.hessian import hutchinson_trace, power_iteration, top_eigenvalue
from fedmr.landscape.objective import Objective
from fedmr.maths import stack_states
from fedmr.models import model_builder


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _symmetric(eigenvalues: list[float], seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=_generator(seed), dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ q.T


def _quadratic_hvp(matrix: torch.Tensor):
    """f(w) = w'Aw / 2 on a vector split in two tensors (a model's parameters): Hv = Av exactly."""
    def hvp(v):
        flat = torch.cat([v[0].reshape(-1), v[1].reshape(-1)])
        out = matrix @ flat
        return out[:6].reshape(2, 3), out[6:]
    return hvp


LIKE = (torch.zeros(2, 3, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))


def test_power_iteration_and_hutchinson_recover_a_known_quadratic():
    spectrum = [10.0, 5.0, 3.0, 2.0, 1.0, 0.5, 0.2, 0.1, -0.5, -1.0]
    matrix = _symmetric(spectrum)
    eig = top_eigenvalue(_quadratic_hvp(matrix), LIKE, _generator(1), max_iter=500, tol=1e-12)
    assert eig.converged and eig.value == pytest.approx(10.0, rel=1e-6)
    trace = hutchinson_trace(_quadratic_hvp(matrix), LIKE, _generator(2), vectors=400)
    exact = float(torch.trace(matrix))
    assert abs(trace.value - exact) < 4 * trace.standard_error
    # Var(v'Av) = 2 (|A|_F^2 - sum A_ii^2) for Rademacher v: the reported error estimates it
    expected_se = math.sqrt(2 * (float((matrix ** 2).sum()) - float((torch.diagonal(matrix) ** 2).sum())) / 400)
    assert trace.standard_error == pytest.approx(expected_se, rel=0.25)
    diagonal = torch.diag(torch.tensor(spectrum, dtype=torch.float64))  # v'Dv = tr D for every sign vector
    assert hutchinson_trace(_quadratic_hvp(diagonal), LIKE, _generator(3), vectors=3).value == pytest.approx(sum(spectrum))


def test_a_dominant_negative_eigenvalue_is_shifted_away():
    spectrum = [4.0, 1.0, 0.5, 0.0, 0.0, 0.0, -0.3, -1.0, -2.0, -9.0]
    hvp = _quadratic_hvp(_symmetric(spectrum, seed=4))
    assert power_iteration(hvp, LIKE, _generator(1), 500, 1e-12).value == pytest.approx(-9.0, rel=1e-6)
    eig = top_eigenvalue(hvp, LIKE, _generator(1), 500, 1e-12)
    assert eig.shifted_by == pytest.approx(-9.0, rel=1e-6) and eig.value == pytest.approx(4.0, rel=1e-6)


class Linear(nn.Module):
    """Softmax regression on 4x4-pooled digits (170 parameters): its exact Hessian is small enough to build."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.avg_pool2d(x, 8), 1))


def test_objective_matches_the_exact_hessian_of_a_linear_model_in_float64():
    data = load_dataset(load_config(None, [], uses="data"))
    x, y = data.train_x[:300].double(), data.train_y[:300]
    torch.manual_seed(0)
    model = Linear().double()
    objective = Objective(model, x, y, batch_size=128)  # three batches: the sum over batches is checked too
    weight, bias = objective.params

    def loss(flat):
        w, b = flat[:160].reshape(10, 16), flat[160:]
        return nn.functional.cross_entropy(nn.functional.linear(torch.flatten(nn.functional.avg_pool2d(x, 8), 1), w, b), y)

    flat = torch.cat([weight.reshape(-1), bias])
    hessian = torch.autograd.functional.hessian(loss, flat)
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert float(eigenvalues[-1] - eigenvalues[-2]) > 0.05 * float(eigenvalues[-1])  # a gap: power iteration converges
    eig = top_eigenvalue(objective.hvp, objective.params, _generator(5), max_iter=1000, tol=1e-10)
    assert eig.value == pytest.approx(float(eigenvalues[-1]), rel=1e-6)
    trace = hutchinson_trace(objective.hvp, objective.params, _generator(6), vectors=400)
    assert abs(trace.value - float(torch.trace(hessian))) < 4 * trace.standard_error
    v = tuple(torch.randn(p.shape, generator=_generator(7), dtype=torch.float64) for p in objective.params)
    hv = objective.hvp(v)
    exact = hessian @ torch.cat([v[0].reshape(-1), v[1]])
    assert torch.allclose(torch.cat([hv[0].reshape(-1), hv[1]]), exact, rtol=1e-9, atol=1e-12)
    assert objective.evaluate()[0] == pytest.approx(float(loss(flat)), rel=1e-12)


# ---- the command on run folders ----------------------------------------------------------------------
TINY = ["num_clients=4", "clients_per_round=2", "rounds=1", "eval_every=1"]


def make_run(folder, model="mlp", seed=1, algorithm="fedavg"):
    """A run folder as `fedmr run` leaves one (config.toml and model.safetensors), with an untrained model."""
    cfg = load_config(None, [*TINY, f'model="{model}"', f"seed={seed}", f'algorithm="{algorithm}"'])
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(to_toml(cfg))
    _, build, _ = model_builder(cfg.model, load_dataset(cfg))
    torch.manual_seed(seed)
    net = build()
    save_tensors(folder / "model.safetensors", net.state_dict())
    return net


def landscape(args, capsys):
    code = main(["landscape", "--quiet", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


FAST = ["--samples", "64", "--power-iters", "3", "--trace-vectors", "2", "--directions", "2", "--points", "5",
        "--grid", "3"]


def test_one_model_curves_start_at_its_loss_and_the_same_seed_gives_the_same_numbers(tmp_path, capsys, one_torch_thread):
    make_run(tmp_path / "run")
    code, out, _ = landscape([tmp_path / "run", *FAST], capsys)
    assert code == 0, out
    doc = json.loads((tmp_path / "run" / "landscape.json").read_text())
    assert {(tmp_path / "run" / f"landscape-{k}.png").is_file() for k in ("1d", "2d")} == {True}
    assert doc["data"]["samples"] == 64 and doc["models"][0]["kind"] == "final"
    assert "running statistics" in doc["batchnorm"]
    curve = doc["curve_1d"]
    middle = curve["alphas"].index(0.0)
    for row in curve["loss"]:  # every direction passes through the model itself
        assert row[middle] == pytest.approx(doc["train"]["loss"], rel=1e-6)
    assert doc["surface_2d"]["loss"][1][1] == pytest.approx(doc["train"]["loss"], rel=1e-6)
    assert doc["trace"]["vectors"] == 2 and doc["eigen"]["iterations"] >= 1
    code, _, _ = landscape([tmp_path / "run", *FAST, "--out", tmp_path / "again"], capsys)
    again = json.loads((tmp_path / "again" / "landscape.json").read_text())
    doc.pop("seconds"), again.pop("seconds")
    assert again == doc
    code, _, _ = landscape([tmp_path / "run", *FAST, "--seed", "2", "--out", tmp_path / "other"], capsys)
    other = json.loads((tmp_path / "other" / "landscape.json").read_text())
    assert other["curve_1d"]["loss"] != doc["curve_1d"]["loss"]


def test_only_the_eigenvalue_when_asked(tmp_path, capsys, one_torch_thread):
    make_run(tmp_path / "run")
    code, out, _ = landscape([tmp_path / "run", "--compute", "eigen", "--samples", "32", "--power-iters", "2"], capsys)
    assert code == 0
    doc = json.loads((tmp_path / "run" / "landscape.json").read_text())
    assert {"eigen", "train"} <= set(doc) and not {"trace", "test", "curve_1d", "surface_2d"} & set(doc)
    assert out.strip() == f"wrote {tmp_path / 'run' / 'landscape.json'}"
    landscape([tmp_path / "run", "--compute", "trace", "--samples", "32", "--trace-vectors", "1"], capsys)
    text = (tmp_path / "run" / "landscape.json").read_text()
    assert "NaN" not in text and json.loads(text)["trace"]["standard_error"] is None  # one vector: no error, strict JSON


def test_straight_path_ends_are_the_two_models_losses(tmp_path, capsys, one_torch_thread):
    """Between two runs' final models (ResNet-20: BatchNorm buffers are interpolated too)."""
    make_run(tmp_path / "a", model="resnet20", seed=1)
    make_run(tmp_path / "b", model="resnet20", seed=2)
    small = ["--samples", "16", "--compute", "eigen", "--power-iters", "1"]
    ends = []
    for name in ("a", "b"):
        assert landscape([tmp_path / name, *small], capsys)[0] == 0
        ends.append(json.loads((tmp_path / name / "landscape.json").read_text())["train"]["loss"])
    code, out, _ = landscape([tmp_path / "a", tmp_path / "b", "--samples", "16", "--path-points", "3"], capsys)
    assert code == 0, out
    doc = json.loads((tmp_path / "a" / "landscape-path-b.json").read_text())
    path = doc["path"]
    assert path["t"] == [0.0, 0.5, 1.0]
    assert path["loss"][0] == pytest.approx(ends[0], rel=1e-6) and path["loss"][-1] == pytest.approx(ends[1], rel=1e-6)
    assert path["barrier"] == pytest.approx(max(path["loss"]) - (ends[0] + ends[1]) / 2, rel=1e-6)
    chord = max(path["loss"][1] - (ends[0] + ends[1]) / 2, 0.0)  # the chord's ends are on it: 0 there
    assert path["barrier_linear"] == pytest.approx(chord, rel=1e-6, abs=1e-9)
    assert (tmp_path / "a" / "landscape-path-b.png").is_file()


def test_pool_members_and_their_mean_from_a_checkpoint(tmp_path, capsys, one_torch_thread):
    nets = [make_run(tmp_path / f"m{i}", seed=i) for i in range(3)]
    run = tmp_path / "pool"
    make_run(run, algorithm="fedmr")
    pool = stack_states([n.state_dict() for n in nets])
    manifest = save_checkpoint(run, 7, {f"pool.{k}": v for k, v in pool.items()}, [], 0.0, {})
    code, out, _ = landscape([f"{manifest}@0", f"{manifest}@2", "--samples", "32", "--path-points", "2"], capsys)
    assert code == 0, out
    doc = json.loads((run / "checkpoints" / "round-000007-m0-landscape-path-m2.json").read_text())
    assert doc["models"][0]["pool_size"] == 3 and doc["models"][1]["member"] == 2 and doc["models"][0]["round"] == 7
    single = ["--samples", "32", "--compute", "eigen", "--power-iters", "1"]
    assert landscape([tmp_path / "m0", *single], capsys)[0] == 0
    assert doc["path"]["loss"][0] == pytest.approx(json.loads((tmp_path / "m0" / "landscape.json").read_text())
                                                   ["train"]["loss"], rel=1e-6)
    assert landscape([manifest, *single], capsys)[0] == 0  # the pool's mean, FedMR's global model
    mean = json.loads((run / "checkpoints" / "round-000007-landscape.json").read_text())
    assert mean["models"][0]["member"] is None and mean["models"][0]["pool_size"] == 3


def _image_folder(root):
    from PIL import Image

    for split in ("train", "test"):
        for label in ("a", "b", "c"):
            (root / split / label).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (8, 8), (40 * i, 80, 120)).save(root / split / label / f"{i}.png")
    return root


@pytest.mark.parametrize("case, message", [
    ("not a run", "is not a fedmr run folder (no config.toml)"),
    ("unfinished run", "holds no final model (model.safetensors): the run has not finished"),
    ("another model", "does not fit run"),
    ("another model's checkpoint", "does not fit run"),
    ("data that do not fit", "does not fit run"),
    ("a member of no pool", "holds one global model, not a pool of models"),
    ("three models", "takes one model or two"),
    ("unknown computation", "unknown computation 'eigne' (choose from test, eigen, trace, 1d, 2d, path) (did you mean 'eigen'?)"),
    ("path with one model", "--compute path needs two models"),
    ("missing file", "no such file or folder"),
])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, case, message):
    run = tmp_path / "run"
    make_run(run)
    args = {
        "not a run": [tmp_path],
        "unfinished run": [run],
        "another model": [tmp_path / "cnn" / "model.safetensors", "--run", run],
        "another model's checkpoint": [tmp_path / "cnn" / "checkpoints" / "round-000003.json", "--run", run],
        "data that do not fit": [run, "--set", 'dataset="imagefolder"', "--set",
                                 f'data_dir="{_image_folder(tmp_path / "images")}"'],
        "a member of no pool": [f"{run}@1"],
        "three models": [run, run, run],
        "unknown computation": [run, "--compute", "eigne"],
        "path with one model": [run, "--compute", "path"],
        "missing file": [tmp_path / "nope.safetensors"],
    }[case]
    if case == "unfinished run":
        (run / "model.safetensors").unlink()
    if case.startswith("another model"):
        net = make_run(tmp_path / "cnn", model="cnn")
        save_checkpoint(tmp_path / "cnn", 3, {f"global.{k}": v for k, v in net.state_dict().items()}, [], 0.0, {})
    code, out, err = landscape(args, capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("fedmr: error: ") and message in err, err


def test_the_over_rounds_plot_is_logarithmic_only_for_a_wide_positive_range(tmp_path, monkeypatch):
    """A CNN's eigenvalues (tens) beside a ResNet-20's (thousands) on one plot: a log axis; a narrow range or
    a barrier that is 0 somewhere: linear."""
    from fedmr.landscape import plots

    scales: list[str] = []
    save = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: (scales.append(fig.axes[0].get_yscale()), save(fig, path)))
    plots.draw_over_rounds({"cnn": [(50, 30.0), (100, 40.0)]}, tmp_path / "a.png", "t", "y")
    plots.draw_over_rounds({"cnn": [(50, 30.0)], "resnet20": [(100, 3000.0)]}, tmp_path / "b.png", "t", "y")
    plots.draw_over_rounds({"pool": [(50, 0.0), (100, 3000.0)]}, tmp_path / "c.png", "t", "y")
    assert scales == ["linear", "log", "linear"]
    assert all((tmp_path / f"{n}.png").is_file() for n in "abc")
