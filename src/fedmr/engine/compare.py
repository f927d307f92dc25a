"""Several variants on one experiment (``fedmr compare``), and resuming a comparison.

Every variant runs on the same prepared experiment (data, partition, seed, initial model) and
checkpoints in its own folder, so a crashed or stopped comparison resumes: finished variants are
read back, the interrupted one continues from its checkpoint.  The CLI and the Python API call
these functions; nothing here knows about argparse.

    <out>/config.toml      the base config
    <out>/compare.json     {"algorithms": [the variant specs]}
    <out>/<variant>/       one run folder per variant ("fedmr@first_stage_rounds=50" -> fedmr_first_stage_rounds-50)
    <out>/comparison.md, comparison.json, accuracy.png (every variant's curve; each variant's folder
                           also holds its own)
"""

from __future__ import annotations

import copy
import json
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..callbacks import check_tensorboard
from ..config import RunConfig, load_config, merge, parse_value, to_toml, validate
from ..data import DataSet
from ..errors import CheckpointError, ConfigError
from ..fileio import atomic_write_text
from ..partition import format_summary
from ..results import comparison_table, read_metrics, setting_title, write_plot
from .checkpoint import RESUMABLE_CHANGES
from .experiment import prepare
from .output import claimed_output
from .simulator import Simulation, stop_on_signals

COMPARE_FILE = "compare.json"  # the variants of a comparison, beside its base config.toml

VariantRowCallback = Callable[[str, dict[str, Any]], None]


@dataclass
class ComparisonOutcome:
    """What a comparison produced: per variant label (its spec), the summary and the metrics rows."""

    summaries: dict[str, dict[str, Any]]
    rows: dict[str, list[dict[str, Any]]]
    out_dir: Path | None = None
    stop_signal: int = 0  # the signal that stopped it (its finished runs are saved), or 0
    resumed: list[str] = field(default_factory=list)  # variants read back as finished earlier
    late_signal: int = 0  # a signal in the last variant's last round: the comparison was finished, not stopped


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """'fedmr@first_stage_rounds=50@block_fraction=0.5' -> ('fedmr', {...})."""
    name, *settings = spec.strip().split("@")
    options: dict[str, Any] = {}
    for item in settings:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"bad algorithm variant '{spec}': expected NAME@KEY=VALUE")
        options[key.strip()] = parse_value(value.strip())
    return name.strip(), options


def variants(cfg: Mapping[str, Any], specs: Sequence[str]) -> list[tuple[str, RunConfig]]:
    """(spec, checked config of that variant) for each spec."""
    result = []
    for spec in specs:
        name, options = parse_variant(spec)
        variant_cfg = {**copy.deepcopy(dict(cfg)), "algorithm": name}
        if options:
            merge(variant_cfg, {name: options})
        result.append((spec, validate(variant_cfg)))
    labels = [spec for spec, _ in result]
    if len(set(labels)) != len(labels):
        raise ConfigError("--algorithms lists the same variant twice")
    return result


def variant_folder(out: Path, spec: str) -> Path:
    return out / spec.replace("@", "_").replace("=", "-")


def finished(folder: Path, rounds: int) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """A variant's (summary, metrics rows) when its folder holds a run completed to ``rounds``."""
    try:
        summary = json.loads((folder / "summary.json").read_text())
        if summary.get("rounds") != rounds:
            return None
        return summary, read_metrics(folder / "metrics.csv")
    except (OSError, ValueError, AttributeError):
        return None  # not finished, or its files are damaged: the run resumes from its checkpoint


def saved_specs(out: Path) -> list[str]:
    """The variants a comparison in ``out`` was started with."""
    try:
        specs = json.loads((out / COMPARE_FILE).read_text())["algorithms"]
        if not isinstance(specs, list) or not specs or not all(isinstance(s, str) for s in specs):
            raise ValueError("no list of algorithms")
        return specs
    except FileNotFoundError:
        raise CheckpointError(f"no comparison to resume in {out} (no {COMPARE_FILE}); start it with: "
                              f"fedmr compare --algorithms ... --out {shlex.quote(str(out))}") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{out / COMPARE_FILE} is damaged ({exc}); it should read "
                              '{"algorithms": ["fedavg", "fedmr"]}') from None


def refuse_other_changes(saved: Mapping[str, Any], cfg: Mapping[str, Any]) -> None:
    """Finished variants are kept as they are, so a resumed comparison may only change what does not
    change results (the keys a resumed run may change)."""
    for key in sorted(set(saved) | set(cfg)):
        if key not in RESUMABLE_CHANGES and saved.get(key) != cfg.get(key):
            raise ConfigError(f"a resumed comparison keeps its config: '{key}' was {saved.get(key)!r}, now "
                              f"{cfg.get(key)!r} (only {', '.join(sorted(RESUMABLE_CHANGES))} may change)")


def resumed_comparison(out: Path, assignments: Iterable[str] = ()) -> tuple[RunConfig, list[str]]:
    """(config, variant specs) of the comparison in ``out`` with ``assignments`` applied, refusing
    any change but the resumable keys."""
    specs = saved_specs(out)
    if not (out / "config.toml").is_file():
        raise CheckpointError(f"no comparison to resume in {out} (no config.toml)")
    cfg = load_config(out / "config.toml", assignments)
    refuse_other_changes(load_config(out / "config.toml", []), cfg)
    return cfg, specs


def run_comparison(cfg: Mapping[str, Any], specs: Sequence[str], out: Path | None, progress: str = "bar",
                   resume: bool = False, *, data: DataSet | Callable[[], DataSet | None] | None = None,
                   model: Any = None, on_row: VariantRowCallback | None = None, fresh: bool = False) -> ComparisonOutcome:
    """Run each variant in ``specs`` (e.g. "fedavg", "fedmr@first_stage_rounds=50") of ``cfg`` on one
    prepared experiment.  ``out``: the comparison's folder (None: nothing written, no resume);
    ``progress``: "bar", "log" or "none"; ``resume``: keep finished variants, continue the
    interrupted one; ``data`` replaces the config's data set (or a function that loads it, called
    once the folder is checked), ``model`` (a factory) its model; ``on_row(label, row)`` is called
    with each metrics row; ``fresh``: ``out`` was just created for it (removed again if left
    empty).  The first SIGINT/SIGTERM stops it after a checkpoint (``stop_signal``)."""
    out = Path(out) if out is not None else None
    cfg = RunConfig.of(cfg)
    chosen = variants(cfg, specs)
    if resume and out is None:
        raise ConfigError("resuming a comparison needs its folder")
    if out is not None and not resume and (out / COMPARE_FILE).exists():
        raise ConfigError(f"output folder {out} already holds a comparison; choose another --out or "
                          f"resume it with: fedmr compare --resume {shlex.quote(str(out))}")
    if out is not None and not resume and (out / "config.toml").exists():
        raise ConfigError(f"output folder {out} already holds a run; choose another --out")
    for _spec, variant_cfg in chosen:
        check_tensorboard(variant_cfg.tensorboard, out)
    with claimed_output(out, resume=resume, fresh=fresh):
        return _compare(cfg, chosen, specs, out, progress, resume, data() if callable(data) else data, model, on_row)


def _compare(cfg: RunConfig, chosen: list[tuple[str, RunConfig]], specs: Sequence[str], out: Path | None,
             progress: str, resume: bool, data: DataSet | None, model: Any,
             on_row: VariantRowCallback | None) -> ComparisonOutcome:
    exp = prepare(cfg, data, model)
    if progress != "none":
        print(format_summary(exp.partition_summary), file=sys.stderr)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.toml", to_toml(cfg))
        atomic_write_text(out / COMPARE_FILE, json.dumps({"algorithms": list(specs)}, indent=1))
    outcome = ComparisonOutcome({}, {}, out)
    for spec, variant_cfg in chosen:
        folder = variant_folder(out, spec) if out is not None else None
        done = finished(folder, variant_cfg.rounds) if resume and folder is not None else None
        if done is not None:
            if progress != "none":
                print(f"[{spec}] finished earlier: {folder}", file=sys.stderr)
            outcome.summaries[spec], outcome.rows[spec] = done
            outcome.resumed.append(spec)
            continue
        exp.cfg = variant_cfg
        callbacks = [lambda row, spec=spec: on_row(spec, row)] if on_row is not None else []
        simulation = Simulation(exp, out_dir=folder, progress=progress, label=spec, on_row=callbacks,
                                resume=resume and folder is not None and (folder / "config.toml").exists())
        with stop_on_signals(simulation):
            result = simulation.run()
        if result.stopped_after is not None:
            outcome.stop_signal = result.stop_signal
            return outcome
        outcome.summaries[spec], outcome.rows[spec] = result.summary, result.rows
        if result.late_signal and spec != chosen[-1][0]:  # in this variant's last round: it finished, the rest wait
            outcome.stop_signal = result.late_signal
            return outcome
        outcome.late_signal = result.late_signal
    if out is not None:
        title = f"{setting_title(cfg, exp.model_name, exp.data.name)}, seed {cfg.seed}"
        atomic_write_text(out / "comparison.md", f"# {title}\n\n" + comparison_table(outcome.summaries))
        atomic_write_text(out / "comparison.json", json.dumps(outcome.summaries, indent=1))
        write_plot(outcome.rows, out / "accuracy.png", title)  # drawn as each run's own accuracy.png
    return outcome
