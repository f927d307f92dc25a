"""``fedmr landscape MODEL [MODEL_B]``: the command's arguments, and where its files go.

One model: ``<stem>.json`` (``landscape.json`` for a run folder's final model) and the plots
``<stem>-1d.png``, ``<stem>-2d.png``; two models: ``<stem of A>-path-<B>.json`` and ``.png``.  They
are written beside the input (the run folder itself, or the folder of the checkpoint or file), or
in ``--out DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError

log = logging.getLogger("fedmr")

HELP = """\
MODEL is a run folder (its final model.safetensors), a checkpoint (RUN/checkpoints/round-NNNNNN.json,
or parked/), or a .safetensors model (RUN/models/round-NNNNNN.safetensors from save_model_every); add
@N for member N of a pool (FedMR, FedIndep: RUN/checkpoints/round-NNNNNN.json@3, or
RUN/models/round-NNNNNN-pool.safetensors@3) or @mean for the pool's mean (the global model, the
default for a pool).  Two models: the straight line between them and its barrier.

computations (--compute, comma-separated): test (test loss and accuracy), eigen (top Hessian
eigenvalue, power iteration), trace (Hutchinson, with its standard error), 1d (filter-normalised
loss curves), 2d (a loss surface), path (two models).  The training loss and accuracy on the
subset are always measured.  Default: test,eigen,trace,1d,2d for one model, path for two.

The model is in evaluation mode: BatchNorm uses the model's running statistics.  See docs/landscape.md."""


def add_parser(subparsers: Any) -> None:
    from .settings import DEFAULTS

    p = subparsers.add_parser("landscape", help="sharpness and loss landscape of a run's model (Hessian, curves, paths)",
                              description="Sharpness and loss landscape of a trained model, on a seeded subset of "
                                          "its run's training data.", epilog=HELP,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help="one model, or two for the path between them")
    p.add_argument("--run", metavar="DIR", help="the run whose config gives the data and model "
                                                "(default: the run folder holding MODEL)")
    p.add_argument("--out", metavar="DIR", help="folder for the JSON and plots (default: beside the first MODEL)")
    p.add_argument("--compute", metavar="LIST", help="which computations (default: test,eigen,trace,1d,2d; two "
                                                     "models: path)")
    p.add_argument("--samples", type=int, default=DEFAULTS["samples"], metavar="N",
                   help="training samples to measure on: a fixed subset drawn with --seed (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], metavar="N",
                   help="samples per forward pass (memory only; default %(default)s)")
    p.add_argument("--seed", type=int, default=DEFAULTS["seed"], metavar="N",
                   help="seed of the subset and of every random vector (default %(default)s)")
    p.add_argument("--power-iters", type=int, default=DEFAULTS["power_iters"], metavar="N",
                   help="most Hessian-vector products of the power iteration, per stage (default %(default)s)")
    p.add_argument("--tolerance", type=float, default=DEFAULTS["tolerance"], metavar="X",
                   help="stop the power iteration when the eigenvalue changes by less than X, relative "
                        "(default %(default)s)")
    p.add_argument("--trace-vectors", type=int, default=DEFAULTS["trace_vectors"], metavar="N",
                   help="Rademacher vectors of Hutchinson's trace estimate (default %(default)s)")
    p.add_argument("--directions", type=int, default=DEFAULTS["directions"], metavar="N",
                   help="random directions of the 1-D curve, one seed each (default %(default)s)")
    p.add_argument("--points", type=int, default=DEFAULTS["points"], metavar="N",
                   help="steps of each 1-D curve, -radius to radius (default %(default)s)")
    p.add_argument("--radius", type=float, default=DEFAULTS["radius"], metavar="R",
                   help="how far the curves and the surface go along a direction (default %(default)s)")
    p.add_argument("--grid", type=int, default=DEFAULTS["grid"], metavar="N",
                   help="points per side of the 2-D surface (default %(default)s)")
    p.add_argument("--path-points", type=int, default=DEFAULTS["path_points"], metavar="N",
                   help="points on the straight line, ends included (default %(default)s)")
    p.add_argument("--double", action="store_true", help="compute in float64 (slower; the model trained in float32)")
    p.add_argument("--set", dest="assignments", metavar="KEY=VALUE", action="append", default=[],
                   help="change a key of the run's config, e.g. --set data_dir=\"/data/cifar10\" (where the data lie "
                        "now) or --set device=\"cpu\"")
    p.add_argument("--quiet", action="store_true", help="print only the files written")


def _settings(args: argparse.Namespace) -> Any:
    from .settings import Settings, parse_compute

    if len(args.models) > 2:
        raise ConfigError(f"fedmr landscape takes one model or two (the path between them), got {len(args.models)}")
    settings = Settings(compute=parse_compute(args.compute, len(args.models)), samples=args.samples,
                        batch_size=args.batch_size, seed=args.seed, power_iters=args.power_iters,
                        tolerance=args.tolerance, trace_vectors=args.trace_vectors, directions=args.directions,
                        points=args.points, radius=args.radius, grid=args.grid, path_points=args.path_points,
                        double=args.double)
    settings.check(len(args.models))
    return settings


def _other(a: Any, b: Any) -> str:
    """B's name in the path's file name: its member when both are in one file, its run (and file) otherwise."""
    member = b.label[len(b.ref.path.stem):] if b.kind != "final" else b.label[len(b.run.name):]
    if b.ref.path.resolve() == a.ref.path.resolve():
        return member.lstrip("-") or "global"
    if b.run.resolve() != a.run.resolve():
        return b.run.name + ("" if b.kind == "final" else f"-{b.ref.path.stem}") + member
    return b.label


def _plain(value: Any) -> Any:
    """NaN (a standard error from one vector) as null: the file stays strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _write_json(path: Path, doc: dict[str, Any]) -> None:
    from ..fileio import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(_plain(doc), indent=1, allow_nan=False) + "\n")


def _plot(draw: Any, *args: Any) -> bool:
    """A plot that fails is a warning: the JSON beside it holds every number."""
    try:
        draw(*args)
        return True
    except Exception as exc:  # noqa: BLE001 - never lose the measurements to a plot
        log.warning("could not draw %s (%s: %s)", args[1], type(exc).__name__, exc)
        return False


def cmd_landscape(args: argparse.Namespace) -> int:
    from ..fileio import check_writable_folder
    from .measure import measure_one, measure_path
    from .plots import draw_curves_1d, draw_paths, draw_surface_2d
    from .source import load_model, open_run, parse_ref

    settings = _settings(args)
    refs = [parse_ref(text) for text in args.models]
    forced = Path(args.run) if args.run else None
    loaded = [load_model(ref, forced) for ref in refs]
    first = loaded[0]
    out = Path(args.out) if args.out else (first.ref.path if first.kind == "final" else first.ref.path.parent)
    check_writable_folder(out)
    run = open_run(first.run, args.assignments)

    def say(line: str) -> None:
        if not args.quiet:
            print(line, file=sys.stderr, flush=True)

    written: list[Path] = []
    if len(loaded) == 1:
        doc = measure_one(run, first, settings, say)
        target = out / f"{first.stem}.json"
        _write_json(target, doc)
        written.append(target)
        title = f"{run.model_name} on {run.data.name}: {first.label}"
        if "curve_1d" in doc and _plot(draw_curves_1d, {first.label: doc["curve_1d"]}, out / f"{first.stem}-1d.png", title):
            written.append(out / f"{first.stem}-1d.png")
        if "surface_2d" in doc and _plot(draw_surface_2d, doc["surface_2d"], out / f"{first.stem}-2d.png", title):
            written.append(out / f"{first.stem}-2d.png")
    else:
        second = loaded[1]
        doc = measure_path(run, first, second, settings, say)
        stem = f"{first.stem}-path-{_other(first, second)}"
        target = out / f"{stem}.json"
        _write_json(target, doc)
        written.append(target)
        if _plot(draw_paths, {f"{first.label} -> {second.label}": doc["path"]}, out / f"{stem}.png",
                 f"{run.model_name} on {run.data.name}: straight line", (first.label, second.label)):
            written.append(out / f"{stem}.png")
    for path in written:
        print(f"wrote {path}")
    return 0
