"""The Python API: ``fedmr.run`` and ``fedmr.compare``, the same engine as ``fedmr run`` / ``fedmr compare``
with your own model factory and data passed as Python objects (see docs/api.md)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .callbacks import Callback, check_callbacks
from .config import RunConfig, default_config, load_config, merge, validate, warn_unused_sections
from .data import IN_MEMORY, Arrays
from .errors import ConfigError
from .imports import describe

Config = Mapping[str, Any] | str | Path | None
ModelArg = Callable[..., torch.nn.Module] | str | None
DataArg = Arrays | Callable[[], Arrays] | str | None

log = logging.getLogger("fedmr")


@dataclass
class RunResult:
    """One finished run.

    Attributes:
        rows: the metrics.csv rows as dicts, one per evaluation (``round``, ``accuracy``, ``loss``,
            ``train_loss``, ...).
        summary: the summary.json dict (``final_accuracy``, ``best_accuracy``, ``best_round``, ...).
        final_state: the final global model's state_dict (FedMR: the mean of the pool).
        config: the validated config the run used (as written to config.toml).
        out_dir: the results folder, or None when the run wrote none.
        train_rows: the train_loss.csv rows as dicts, one per round (``round``, ``train_loss``,
            ``clients``, ``rejected``, ``dropped``): the clients' mean training loss of every round,
            evaluated or not.
    """

    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    final_state: dict[str, torch.Tensor] = field(repr=False)
    config: dict[str, Any] = field(repr=False)
    out_dir: Path | None = None
    train_rows: list[dict[str, Any]] = field(default_factory=list, repr=False)

    @property
    def final_accuracy(self) -> float:
        return float(self.summary["final_accuracy"])


def _config(config: Config) -> RunConfig:
    """A config dict (the TOML file's keys, nested sections), a path to a TOML file, or None (defaults)."""
    if config is None:
        return load_config()
    if isinstance(config, (str, Path)):
        return load_config(config)
    if not isinstance(config, Mapping):
        raise ConfigError(f"config must be a dict of config keys or a path to a TOML file, got a {type(config).__name__}")
    given = dict(config)
    if isinstance(given.get("algorithm"), type):  # an Algorithm subclass itself: named by its import string
        given["algorithm"] = describe(given["algorithm"])
    return validate(merge(default_config(), copy.deepcopy(given)))


def _overrides(cfg: RunConfig, model: ModelArg, data: DataArg) -> tuple[RunConfig, Any, Callable[[], Any]]:
    """(config, model factory or None, a function giving the DataSet or None) for prepare(); a string
    sets the config key instead.  config.toml records a factory or loader by its import string
    ("module:function").  The data are loaded only when that function is called: after the checks
    that need no data (the results folder, a resume)."""
    from .data import DataSet, dataset_from_arrays

    if isinstance(model, str):
        cfg = cfg.replace(model=model)
    if isinstance(data, str):
        cfg = cfg.replace(dataset=data)
    factory = None if isinstance(model, str) else model
    names: dict[str, Any] = {}  # what config.toml records for objects given here (not checked again: they are given)
    if factory is not None:
        names["model"] = describe(factory)
        _warn_unnamed("model", factory)
    load: Callable[[], Any] = lambda: None  # noqa: E731 - the config's own data set
    if isinstance(data, DataSet):  # already checked (e.g. fedmr.data.load_dataset's result)
        names["dataset"] = data.name if ":" not in data.name else IN_MEMORY
        load = lambda: data  # noqa: E731
    elif callable(data):
        names["dataset"] = describe(data)
        _warn_unnamed("data", data)
        loader = data
        load = lambda: dataset_from_arrays(  # noqa: E731
            "data=", _call_loader(loader), getattr(loader, "__name__", "data"), loader=loader,
            given=f"the loader {describe(loader)} returned")
    elif data is not None and not isinstance(data, str):
        names["dataset"] = IN_MEMORY  # config.toml records that the data came from Python
        arrays = data
        load = lambda: dataset_from_arrays("data=", arrays, "data", given="got")  # noqa: E731
    return dataclasses.replace(cfg, **names), factory, load


def _warn_unnamed(argument: str, obj: Any) -> None:
    """A lambda or a function defined inside another has no import string: the run works, but its
    config.toml cannot name the object, so no ``fedmr run --resume`` (a new process) can rebuild it."""
    name = getattr(obj, "__qualname__", "")
    if "<" in name or not getattr(obj, "__module__", None):
        log.warning("%s=%s is %s, which has no import string: config.toml records it as %r, which names nothing, "
                    "so the run cannot be resumed or repeated from its folder by fedmr run --resume (only by "
                    "fedmr.run(..., resume=True) with the same object); define it at the top level of a module",
                    argument, name or type(obj).__name__, "a lambda" if "<lambda>" in name else "a nested function",
                    describe(obj))


def _call_loader(loader: Callable[[], Any]) -> Any:
    from .errors import PluginError

    try:
        return loader()
    except Exception as exc:  # noqa: BLE001 - the user's loader failed
        raise PluginError(f"data=: the loader {describe(loader)} raised {type(exc).__name__}: {exc}") from None


def run(config: Config = None, *, model: ModelArg = None, data: DataArg = None, out: str | Path | None = None,
        callbacks: Sequence[Callback] = (), progress: bool | None = None, resume: bool = False) -> RunResult:
    """Run one experiment, exactly as ``fedmr run`` does.

    Args:
        config: a dict of the same keys as the TOML config file (sections as nested dicts, e.g.
            ``{"rounds": 50, "fedmr": {"first_stage_rounds": 10}}``; ``"algorithm"`` may be an
            Algorithm subclass itself), a path to a TOML file, or None for the defaults.  Missing
            keys take their defaults.
        model: a factory ``factory(num_classes, input_shape) -> torch.nn.Module`` (a class with that
            constructor works too), overriding the config's ``model``; or a model name / import string.
        data: ``(train_x, train_y, test_x, test_y)`` as tensors or numpy arrays (labels integer classes
            ``0..C-1``), or a function returning that tuple, overriding the config's ``dataset``; or
            a data set name / import string.
        out: a results folder to write exactly as ``fedmr run --out`` (config.toml, metrics.csv,
            summary.json, checkpoints, model.safetensors); None writes nothing.
        callbacks: functions called with each evaluation row (a dict) as the run goes.
        progress: show the CLI's progress bar on stderr (rounds, latest accuracy, seconds per
            round); None (the default) shows it in a terminal or a notebook and not in a script
            whose stderr goes to a file or pipe.
        resume: continue the run in ``out`` from its newest checkpoint, as ``fedmr run --resume``
            (the same config, model and data; only the resumable keys such as ``rounds`` may
            change, and arrays must be the ones it started with: their checksum is checked).

    Returns:
        A :class:`RunResult` with ``.rows``, ``.summary`` and ``.final_state``.

    Raises:
        fedmr.FedMRError: a bad config, plug-in or data set (the CLI's one-line errors).
    """
    from .engine.experiment import prepare
    from .engine.output import claimed_output
    from .engine.simulator import Simulation

    if resume and out is None:
        raise ConfigError("resume=True continues the run in a results folder: give out=")
    cfg = _config(config)
    cfg, factory, load = _overrides(cfg, model, data)
    warn_unused_sections(cfg, [cfg.algorithm])
    checked = _checked(callbacks)
    with claimed_output(out, cfg, resume=resume):
        exp = prepare(cfg, data=load(), model=factory)
        outcome = Simulation(exp, out_dir=out, progress=_progress(progress), on_row=checked, resume=resume).run()
    return RunResult(outcome.rows, outcome.summary, outcome.final_state, dict(exp.cfg), outcome.out_dir,
                     outcome.train_rows)


def _progress(progress: bool | None) -> str:
    """The Simulation's progress mode: a bar when asked, or by default where someone watches (a
    terminal, a Jupyter kernel); "none" prints nothing at all (no partition summary either)."""
    if progress is None:
        progress = sys.stderr.isatty() or "ipykernel" in sys.modules
    return "bar" if progress else "none"


def _checked(callbacks: Sequence[Callback]) -> list[Callback]:
    """Checked before any data is loaded; each gets a copy of the row (the recorder keeps its rows)."""
    copying: list[Callable[..., None]] = [lambda row, cb=cb: cb(dict(row)) for cb in check_callbacks(callbacks)]
    return copying


def compare(config: Config = None, algorithms: Sequence[str | type] = ("fedavg", "fedmr"), *, model: ModelArg = None,
            data: DataArg = None, out: str | Path | None = None, callbacks: Sequence[Callback] = (),
            progress: bool | None = None, resume: bool = False) -> dict[str, RunResult]:
    """Run several algorithms on the same data, partition, seed and initial model, as ``fedmr compare``.

    Args:
        config, model, data, callbacks, progress: as for :func:`run`; each callback row also carries
            ``"variant"`` (the algorithm spec it belongs to).
        algorithms: built-in names, plug-in classes (the class itself, or "pkg.mod:Class") and
            variants with options ("fedmr@first_stage_rounds=50", "pkg.mod:Class@beta=0.5").
        out: the comparison folder (one subfolder per variant, comparison.md, accuracy.png); None
            runs in a temporary folder that is removed afterwards.
        resume: keep the finished variants in ``out`` and continue the interrupted one, as
            ``fedmr compare --resume`` (the same config, algorithms, model and data).

    Returns:
        ``{spec: RunResult}`` in the order given.
    """

    from safetensors.torch import load_file

    from .config import read_toml
    from .engine.compare import parse_variant, run_comparison, variant_folder
    from .results import read_metrics

    if resume and out is None:
        raise ConfigError("resume=True continues the comparison in its folder: give out=")
    cfg = _config(config)
    cfg, factory, load = _overrides(cfg, model, data)
    specs = [describe(a) if isinstance(a, type) else str(a).strip() for a in algorithms]
    specs = [s for s in specs if s]
    if not specs:
        raise ConfigError("compare needs at least one algorithm")
    checked = _checked(callbacks)
    warn_unused_sections(cfg, [parse_variant(spec)[0] for spec in specs])

    def on_row(spec: str, row: dict[str, Any]) -> None:
        for cb in checked:
            cb({**row, "variant": spec})

    with tempfile.TemporaryDirectory(prefix="fedmr-compare-") as scratch:
        folder = Path(out) if out is not None else Path(scratch)  # a folder even so: the final states are read back
        outcome = run_comparison(cfg, specs, folder, _progress(progress), resume=resume, data=load,
                                 model=factory, on_row=on_row)
        results = {}
        for spec in specs:
            path = variant_folder(folder, spec)
            results[spec] = RunResult(outcome.rows[spec], outcome.summaries[spec], load_file(path / "model.safetensors"),
                                      read_toml(path / "config.toml"), path if out is not None else None,
                                      read_metrics(path / "train_loss.csv") if (path / "train_loss.csv").is_file() else [])
        return results
