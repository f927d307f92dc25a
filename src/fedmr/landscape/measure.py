"""The measurements of ``fedmr landscape``, as one JSON document per model (or pair of models).

At one model: the training loss and accuracy on a fixed, seeded subset of the run's training data
(always), the test loss and accuracy on the whole test set (``test``), the top Hessian eigenvalue
(``eigen``), the Hessian trace with its standard error (``trace``), filter-normalised 1-D curves
(``1d``) and a 2-D surface (``2d``).  Between two models: the straight line and its barrier
(``path``).  Every random draw derives from ``seed`` and a named stream (``fedmr.seeding``), so the
same seed gives the same numbers; the defaults are declared once, in ``Settings``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from typing import Any

import torch

from ..seeding import torch_generator
from .directions import INTERPOLATION, curve_1d, evenly, filter_normalised, straight_path, surface_2d
from .hessian import hutchinson_trace, top_eigenvalue
from .objective import BATCHNORM, Objective
from .settings import Settings
from .source import Loaded, Run, check_data_fits, fitted_model, samples

log = logging.getLogger("fedmr")

FORMAT = 1


class Timer:
    def __init__(self, say: Callable[[str], None]):
        self.say = say
        self.seconds: dict[str, float] = {}

    def run(self, name: str, work: Callable[[], Any], done: Callable[[Any], str]) -> Any:
        start = time.perf_counter()
        result = work()
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.say(f"{name}: {done(result)} ({self.seconds[name]:.1f} s)")
        return result


def _objective(run: Run, loaded: Loaded, settings: Settings) -> Objective:
    model = fitted_model(run, loaded, settings.dtype)
    x, y = samples(run, settings.samples, torch_generator(settings.seed, "landscape-subset"), settings.dtype)
    check_data_fits(model, run, x)
    return Objective(model, x, y, settings.batch_size)


def _header(run: Run, objective: Objective, settings: Settings, models: Iterable[Loaded]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "models": [m.describe() for m in models],
        "model": run.model_name,
        "parameters": sum(p.numel() for p in objective.params),
        "data": {"dataset": run.data.name, "split": "train", "samples": objective.samples,
                 "of": int(run.data.train_y.shape[0]), "subset_seed_stream": "landscape-subset"},
        "loss": "mean cross-entropy over the samples",
        "batchnorm": BATCHNORM if objective.has_batchnorm else "the model has no BatchNorm layer; " + BATCHNORM,
        "dtype": str(settings.dtype).replace("torch.", ""),
        "device": str(run.device),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
    }


def measure_one(run: Run, loaded: Loaded, settings: Settings, say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """The measurements ``settings.compute`` asks for at one model, as the JSON document."""
    objective = _objective(run, loaded, settings)
    timer = Timer(say)
    doc = _header(run, objective, settings, [loaded])
    loss, acc = timer.run("train", objective.evaluate, lambda r: f"loss {r[0]:.4f}, accuracy {r[1]:.4f} on "
                                                             f"{objective.samples} training samples")
    doc["train"] = {"loss": loss, "accuracy": acc}
    if "test" in settings.compute:
        test = Objective(objective.model, _on(run.data.test_x, run, settings), run.data.test_y.to(run.device),
                         settings.batch_size)
        t_loss, t_acc = timer.run("test", test.evaluate, lambda r: f"loss {r[0]:.4f}, accuracy {r[1]:.4f} on "
                                                                  f"{test.samples} test samples")
        doc["test"] = {"loss": t_loss, "accuracy": t_acc, "samples": test.samples}
    if "eigen" in settings.compute:
        eig = timer.run("eigen", lambda: top_eigenvalue(
            objective.hvp, objective.params, torch_generator(settings.seed, "landscape-power"),
            settings.power_iters, settings.tolerance),
            lambda e: f"top eigenvalue {e.value:.4g} after {e.iterations} Hessian-vector products"
                      + ("" if e.converged else " (not converged)"))
        doc["eigen"] = {"top_eigenvalue": eig.value, "iterations": eig.iterations, "converged": eig.converged,
                        "tolerance": eig.tolerance, "shifted_by": eig.shifted_by, "history": eig.history,
                        "method": "power iteration on Hessian-vector products (the largest eigenvalue; where the "
                                  "largest in magnitude is negative, a second iteration on H minus it)"}
    if "trace" in settings.compute:
        tr = timer.run("trace", lambda: hutchinson_trace(
            objective.hvp, objective.params, torch_generator(settings.seed, "landscape-trace"), settings.trace_vectors),
            lambda t: f"trace {t.value:.4g} ± {t.standard_error:.2g} ({t.vectors} Rademacher vectors)")
        doc["trace"] = {"trace": tr.value, "standard_error": tr.standard_error, "vectors": tr.vectors,
                        "samples": tr.samples, "method": "Hutchinson: the mean of v'Hv over Rademacher vectors v; "
                                                         "standard error = sample standard deviation / sqrt(vectors)"}
    if "1d" in settings.compute:
        alphas = evenly(-settings.radius, settings.radius, settings.points)
        dirs = [filter_normalised(objective.params, torch_generator(settings.seed, "landscape-direction", i))
                for i in range(settings.directions)]
        curve = timer.run("1d", lambda: curve_1d(objective, dirs, alphas),
                          lambda c: f"{len(c.loss)} filter-normalised directions x {len(alphas)} steps")
        doc["curve_1d"] = _curve_doc(curve.alphas, curve.loss, curve.accuracy)
    if "2d" in settings.compute:
        alphas = evenly(-settings.radius, settings.radius, settings.grid)
        first, second = (filter_normalised(objective.params, torch_generator(settings.seed, "landscape-plane", i))
                         for i in (0, 1))
        surface = timer.run("2d", lambda: surface_2d(objective, first, second, alphas),
                            lambda s: f"{len(alphas)} x {len(alphas)} grid")
        doc["surface_2d"] = {"alphas": surface.alphas, "loss": surface.loss, "accuracy": surface.accuracy,
                             "normalisation": "filter (Li et al. 2018), zero on biases and BatchNorm parameters"}
    doc["seconds"] = timer.seconds
    return doc


def _on(x: torch.Tensor, run: Run, settings: Settings) -> torch.Tensor:
    x = x.to(run.device)
    if x.is_floating_point() and x.dtype != settings.dtype:
        x = x.to(settings.dtype)
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def _curve_doc(alphas: list[float], loss: list[list[float]], acc: list[list[float]]) -> dict[str, Any]:
    def spread(rows: list[list[float]]) -> tuple[list[float], list[float]]:
        means, stds = [], []
        for column in zip(*rows):
            m = sum(column) / len(column)
            means.append(m)
            stds.append((sum((v - m) ** 2 for v in column) / (len(column) - 1)) ** 0.5 if len(column) > 1 else 0.0)
        return means, stds

    loss_mean, loss_std = spread(loss)
    acc_mean, acc_std = spread(acc)
    return {"alphas": alphas, "loss_mean": loss_mean, "loss_std": loss_std, "accuracy_mean": acc_mean,
            "accuracy_std": acc_std, "loss": loss, "accuracy": acc,
            "normalisation": "filter (Li et al. 2018), zero on biases and BatchNorm parameters",
            "spread": "standard deviation over the directions (n - 1)"}


def measure_path(run: Run, a: Loaded, b: Loaded, settings: Settings,
                 say: Callable[[str], None] = log.info) -> dict[str, Any]:
    """The straight line from ``a`` to ``b`` on ``run``'s training subset; both must fit its model."""
    objective = _objective(run, a, settings)
    second = fitted_model(run, b, settings.dtype)  # the same architecture, or a one-line error
    timer = Timer(say)
    doc = _header(run, objective, settings, [a, b])
    ts = evenly(0.0, 1.0, settings.path_points)
    start = {k: v.detach() for k, v in objective.model.state_dict().items()}
    end = {k: v.detach() for k, v in second.state_dict().items()}
    path = timer.run("path", lambda: straight_path(objective, start, end, ts),
                     lambda p: f"loss {p.loss[0]:.4f} -> {p.loss[-1]:.4f}, highest {max(p.loss):.4f} at t = "
                               f"{p.barrier_at:g}, barrier {p.barrier:.4f} (above the chord: {p.barrier_linear:.4f})")
    doc["path"] = {"t": path.ts, "loss": path.loss, "accuracy": path.accuracy, "barrier": path.barrier,
                   "barrier_at": path.barrier_at, "ends_mean_loss": path.ends_mean,
                   "barrier_rule": "the highest loss on the line minus the mean of the two ends' losses",
                   "barrier_linear": path.barrier_linear,
                   "barrier_linear_rule": "the highest loss above the straight chord between the ends' losses, "
                                          "max over t of L(t) - ((1 - t) L(0) + t L(1)) (Frankle et al. 2020)",
                   "interpolation": INTERPOLATION}
    doc["seconds"] = timer.seconds
    return doc
