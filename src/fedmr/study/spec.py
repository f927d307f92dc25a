"""A study file: a base config, grids of settings and extra cells -> the list of cells, each a full config.

    [study]                      where things go (paths relative to the directory you run from)
    output = "docs/results/cifar10-cnn-study"   the cells' run folders, cells.json, plots
    reuse = ["docs/results"]     folders searched for finished runs equal to a cell (default)
    landscape = ["docs/results/x"]  folders with reruns of cells whose fedmr landscape files the page reads
    report = "docs/results/README.md"
    [base]                       a fedmr config (any key of `fedmr run --config`)
    [[grid]]                     one block of cells: the product of its lists, in file order
    priority = 1                 (optional, default 1) run order, and how the report groups what is missing
    keep_model = true            (optional; also in [study] for every cell) keep the final global model as
                                 final-model.safetensors, which git does not ignore (for fedmr landscape)
    section = "main"             (optional) "main" is the methods x heterogeneity table; others get a table each
    algorithm = ["fedavg", "fedmr@first_stage_rounds=50"]     `compare`'s NAME@KEY=VALUE variants
    seed = [1, 2]                any config key ("fedmr.block_fraction" for an algorithm option)
    heterogeneity = [{alpha = 0.1}, {partition = "iid"}]     a list of tables sets several keys together
    [[cell]]                     one extra cell: settings as single values

Cells are identified by their resolved config: one declared twice (e.g. plain FedMR in the main
grid and as ``first_stage_rounds = 0`` in an ablation) runs once and appears in both sections.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import RunConfig, default_config, merge, read_toml, validate
from ..engine.checkpoint import RESUMABLE_CHANGES
from ..errors import ConfigError

STUDY_KEYS = {"title", "output", "reuse", "report", "baseline", "contrasts", "late_fraction", "thresholds",
              "tie_margin", "description", "keep_model", "landscape"}
BLOCK_KEYS = {"priority", "section", "title", "keep_model"}
# Keys that say how or where a run computes, never what it computes: ignored when a cell is matched to
# a finished run.  The resumable changes minus rounds (a run's length is checked on its summary) and
# client_timeout (which can drop clients).
NOT_RESULTS = RESUMABLE_CHANGES - {"rounds", "client_timeout"}


@dataclass
class Membership:
    """Where a cell was declared: its priority, report section and settings as written."""

    priority: int
    section: str
    title: str
    settings: dict[str, Any]  # dotted key -> value; "algorithm" keeps the variant string
    keep_model: bool = False  # keep the final model as final-model.safetensors (committed; model.safetensors is not)

    @property
    def method(self) -> str:
        return str(self.settings.get("algorithm", ""))


@dataclass
class Cell:
    name: str
    cfg: RunConfig
    memberships: list[Membership] = field(default_factory=list)

    @property
    def priority(self) -> int:
        return min(m.priority for m in self.memberships)

    @property
    def keep_model(self) -> bool:
        return any(m.keep_model for m in self.memberships)


@dataclass
class Study:
    path: Path
    options: dict[str, Any]
    base: RunConfig
    cells: list[Cell]

    @property
    def output(self) -> Path:
        return Path(self.options["output"])

    @property
    def reuse(self) -> list[Path]:
        return [Path(p) for p in self.options["reuse"]]

    @property
    def report(self) -> Path:
        return Path(self.options["report"])


def result_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config that determines a run's numbers, completed with today's defaults (so a run
    written before a key existed still matches), without rounds and without other algorithms' options."""
    full = default_config()
    _update(full, cfg)
    algorithm: Any = full.get("algorithm")  # any value: used only as a key
    out = {k: v for k, v in full.items() if k not in NOT_RESULTS and k != "rounds" and not isinstance(v, dict)}
    out["options"] = full.get(algorithm, {}) if isinstance(full.get(algorithm), dict) else {}
    return json.loads(json.dumps(out, sort_keys=True))


def difference(saved: Mapping[str, Any], wanted: Mapping[str, Any]) -> str | None:
    """The first result-changing key in which two configs differ, as a phrase; None when they agree."""
    old, new = result_config(saved), result_config(wanted)
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if key == "options":
            assert a is not None and b is not None  # result_config always gives "options" (a dict)
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub):
                    return f"'{new['algorithm']}.{sub}' was {a.get(sub)!r}, now {b.get(sub)!r}"
        elif a != b:
            return f"'{key}' was {a!r}, now {b!r}"
    return None


def _update(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _update(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def parse_variant(spec: str) -> tuple[str, dict[str, Any]]:
    """compare's NAME@KEY=VALUE syntax: one parser for both."""
    from ..engine.compare import parse_variant as parse

    return parse(spec)


def _flatten(table: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """{"fedmr": {"block_fraction": [..]}} (TOML's dotted keys) -> {"fedmr.block_fraction": [..]}."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        name = f"{where}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def apply(base: Mapping[str, Any], settings: Mapping[str, Any]) -> RunConfig:
    """The base config with one cell's settings; checked."""
    cfg = copy.deepcopy(dict(base))
    for key, value in settings.items():
        if key == "algorithm":
            if not isinstance(value, str):
                raise ConfigError(f"'algorithm' must be a string such as \"fedmr@first_stage_rounds=50\", got {value!r}")
            name, options = parse_variant(value)
            cfg["algorithm"] = name
            if options:
                if name not in cfg:
                    raise ConfigError(f"unknown algorithm '{name}'")
                merge(cfg, {name: options})
            continue
        nested: Any = value
        for part in reversed(key.split(".")):
            nested = {part: nested}
        merge(cfg, nested)
    config = validate(cfg)
    from ..models import MODELS

    if config.model != "auto" and ":" not in config.model and config.model not in MODELS:  # ':' a plug-in's import string
        raise ConfigError(f"unknown model '{config.model}' (choose from auto, {', '.join(MODELS)})")
    return config


def _token(key: str, value: Any) -> str:
    if key == "algorithm":
        return str(value).replace("@", "_").replace("=", "-")  # compare's variant folder names
    if key == "partition":
        return str(value)
    if key in ("alpha", "seed"):
        return f"{key}{value}"
    if key == "model":
        return str(value)
    return f"{key.split('.')[-1]}-{value}"


_ORDER = {"model": 0, "partition": 1, "alpha": 2, "seed": 3}


def cell_name(settings: Mapping[str, Any]) -> str:
    """Folder name from the settings: model, heterogeneity, seed, other keys, then the algorithm variant."""
    keys = sorted(settings, key=lambda k: (_ORDER.get(k, 5 if k == "algorithm" else 4), k))
    name = "-".join(_token(k, settings[k]) for k in keys) or "base"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)


def _block_cells(block: Mapping[str, Any], where: str) -> tuple[Membership, list[dict[str, Any]]]:
    priority = block.get("priority", 1)
    if isinstance(priority, bool) or not isinstance(priority, int) or priority < 1:
        raise ConfigError(f"{where}: 'priority' must be a positive integer, got {priority!r}")
    section = block.get("section", "main")
    title = block.get("title", section)
    if not isinstance(section, str) or not isinstance(title, str):
        raise ConfigError(f"{where}: 'section' and 'title' must be strings")
    keep = block.get("keep_model", False)
    if not isinstance(keep, bool):
        raise ConfigError(f"{where}: 'keep_model' must be true or false, got {keep!r}")
    axes: list[list[dict[str, Any]]] = []
    for key, values in block.items():
        if key in BLOCK_KEYS:
            continue
        if isinstance(values, Mapping) and not any(isinstance(v, list) for v in _flatten(values).values()):
            raise ConfigError(f"{where}: '{key}' must be a list of values")
        flat = _flatten({key: values}) if isinstance(values, Mapping) else {key: values}
        for name, vals in flat.items():
            if not isinstance(vals, list) or not vals:
                raise ConfigError(f"{where}: '{name}' must be a non-empty list of values, got {vals!r}")
            if all(isinstance(v, Mapping) for v in vals):  # a compound axis: each value sets several keys
                axes.append([_flatten(v) for v in vals])
            elif any(isinstance(v, Mapping) for v in vals):
                raise ConfigError(f"{where}: '{name}' mixes tables and single values")
            else:
                axes.append([{name: v} for v in vals])
    combos = [dict(kv for part in combo for kv in part.items()) for combo in itertools.product(*axes)]
    return Membership(priority, section, title, {}, keep), combos


def _single_cell(table: Mapping[str, Any], where: str) -> tuple[Membership, list[dict[str, Any]]]:
    block = {k: v for k, v in table.items() if k in BLOCK_KEYS}
    settings = _flatten({k: v for k, v in table.items() if k not in BLOCK_KEYS})
    for key, value in settings.items():
        if isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' is a list; a [[cell]] takes single values (use a [[grid]])")
    membership, _ = _block_cells(block, where)
    return membership, [settings]


def load_study(path: str | Path) -> Study:
    """Read and check a study file: every cell's config is resolved and validated here, before anything runs."""
    path = Path(path)
    try:
        doc = read_toml(path)
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("config file", "study file", 1)) from None
    unknown = sorted(set(doc) - {"study", "base", "grid", "cell"})
    if unknown:
        raise ConfigError(f"study {path}: unknown table '{unknown[0]}' (expected [study], [base], [[grid]], [[cell]])")
    options = dict(doc.get("study", {}))
    bad = sorted(set(options) - STUDY_KEYS)
    if bad:
        raise ConfigError(f"study {path}: unknown key 'study.{bad[0]}' (known: {', '.join(sorted(STUDY_KEYS))})")
    stem = path.stem
    options.setdefault("title", stem)
    options.setdefault("output", f"docs/results/{stem}-study")
    options.setdefault("reuse", ["docs/results"])
    options.setdefault("report", "docs/results/README.md")
    options.setdefault("baseline", "fedavg")
    options.setdefault("contrasts", [])
    options.setdefault("late_fraction", 0.2)
    options.setdefault("thresholds", [0.4, 0.5])
    options.setdefault("tie_margin", 1.0)
    options.setdefault("description", "")
    options.setdefault("keep_model", False)
    options.setdefault("landscape", [])
    if isinstance(options["landscape"], str) or not isinstance(options["landscape"], list):
        raise ConfigError(f"study {path}: 'study.landscape' must be a list of folders")
    if not isinstance(options["keep_model"], bool):
        raise ConfigError(f"study {path}: 'study.keep_model' must be true or false, got {options['keep_model']!r}")
    if not 0 < options["late_fraction"] <= 1:
        raise ConfigError(f"study {path}: 'study.late_fraction' must be in (0, 1], got {options['late_fraction']!r}")
    if isinstance(options["reuse"], str) or not isinstance(options["reuse"], list):
        raise ConfigError(f"study {path}: 'study.reuse' must be a list of folders")
    try:
        base = validate(merge(default_config(), doc.get("base", {})))
    except ConfigError as exc:
        raise ConfigError(f"study {path}: [base]: {exc}") from None
    declared: list[tuple[Membership, list[dict[str, Any]], str]] = []
    for kind in ("grid", "cell"):
        tables = doc.get(kind, [])
        if not isinstance(tables, list):
            raise ConfigError(f"study {path}: write [[{kind}]] (an array of tables)")
        for i, table in enumerate(tables, 1):
            where = f"study {path}: [[{kind}]] number {i}"
            membership, combos = (_block_cells if kind == "grid" else _single_cell)(table, where)
            declared.append((membership, combos, where))
    if not declared:
        raise ConfigError(f"study {path}: no [[grid]] or [[cell]] declares any cell")
    cells: dict[str, Cell] = {}
    names: dict[str, str] = {}
    for membership, combos, where in sorted(declared, key=lambda d: d[0].priority):  # stable: file order within a priority
        for settings in combos:
            try:
                cfg = apply(base, settings)
            except ConfigError as exc:
                shown = ", ".join(f"{k} = {v!r}" for k, v in settings.items())
                raise ConfigError(f"{where}, cell {shown}: {exc}") from None
            key = json.dumps(result_config(cfg), sort_keys=True) + f"|rounds={cfg.rounds}"
            entry = Membership(membership.priority, membership.section, membership.title, settings,
                               membership.keep_model or options["keep_model"])
            if key not in cells:
                name = cell_name(settings)
                if name in names:
                    raise ConfigError(f"{where}: two different cells would share the folder name '{name}'")
                names[name] = key
                cells[key] = Cell(name, cfg)
            cells[key].memberships.append(entry)
    return Study(path, options, base, list(cells.values()))


def heterogeneity(cfg: RunConfig) -> str:
    if cfg.partition == "dirichlet":
        return f"alpha {cfg.alpha}"
    return "IID" if cfg.partition == "iid" else str(cfg.partition)
