"""Reading a run config: the defaults, a TOML file, ``--set KEY=VALUE`` overrides, in that order."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import tomli_w

from ..errors import ConfigError, did_you_mean
from ..imports import is_import_string, split_key
from .run_config import RunConfig, default_config, validate
from .sections import algorithm_sections, is_loader_section, section_defaults


def parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (number, bool, quoted string, array) or else a bare string."""
    try:
        doc = tomllib.loads(f"v = {text}")
    except (ValueError, RecursionError):  # TOMLDecodeError, a 5000-digit integer, 10000 nested brackets
        return text
    return doc["v"] if list(doc) == ["v"] else text  # "1\nrounds=2" is one odd string, not two settings


def parse_assignment(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
    key, _, value = item.partition("=")
    key = key.strip()
    parts = split_key(key)  # "fedmr.block_fraction" -> ["fedmr", "block_fraction"]; "pkg.mod:Algo.beta" keeps its dots
    if not key or any(not part for part in parts):
        raise ConfigError(f"--set expects KEY=VALUE, got '{item}'")
    return parts, parse_value(value.strip())


def read_toml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # TOMLDecodeError is a ValueError, so is a 5000-digit integer
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {path} is not valid TOML: nested too deeply") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None


def merge(base: dict[str, Any], overrides: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """Merge ``overrides`` into ``base``, refusing keys that ``base`` does not have."""
    for key, value in overrides.items():
        name = f"{where}{key}"
        if key not in base and not where and isinstance(value, Mapping) and ":" in key:
            base[key] = section_defaults(key, f"[{key}]")  # a plug-in's options: its class or signature declares them
        if key not in base:
            sections = [k for k, v in base.items() if isinstance(v, dict)]
            if not where and isinstance(value, Mapping):
                raise ConfigError(f"unknown config section '{name}' (no such algorithm){did_you_mean(key, sections)}")
            known = [k for k in base if k not in sections] if not where else list(base)
            raise ConfigError(f"unknown config key '{name}'{did_you_mean(key, known, where)}")
        if isinstance(base[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f"config key '{name}' is a section; set its keys as {name}.KEY")
            merge(base[key], value, f"{name}.")
        else:
            if isinstance(value, Mapping):
                raise ConfigError(f"config key '{name}' is not a section")
            base[key] = value
    return base


def load_config(path: str | Path | None = None, assignments: Iterable[str] = (), uses: str = "run") -> RunConfig:
    """Defaults, then the TOML file, then each ``--set`` in order; validated for a command that
    ``uses`` "run" (every key), "partition" or "data" (only the keys those read: see ``Setting.group``)."""
    cfg = default_config()
    if path is not None:
        merge(cfg, read_toml(path))
    for item in assignments:
        keys, value = parse_assignment(item)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        merge(cfg, nested)
    return validate(cfg, uses)


def to_toml(cfg: Mapping[str, Any]) -> str:
    return tomli_w.dumps(dict(cfg))


def warn_unused_sections(cfg: RunConfig, algorithms: Iterable[str]) -> list[str]:
    """Warn once about each algorithm section whose options differ from their defaults although no
    algorithm run uses it (``--set fedprox.mu=0.1`` with ``algorithm = "fedmr"``): the user may
    have meant another algorithm.  Sections at their defaults (config.toml records every one) are
    not mentioned.  Returns the sections warned about."""
    import logging

    from ..algorithms import algorithm_defaults

    run = set(algorithms)
    builtin = algorithm_sections()
    unused = []
    for name, options in cfg.sections.items():
        if name in run or (is_import_string(name) and is_loader_section(name)):
            continue
        defaults = builtin[name] if name in builtin else algorithm_defaults(name, f"[{name}]")
        changed = {k: v for k, v in options.items() if defaults.get(k) != v}
        if changed:
            unused.append(name)
            given = ", ".join(f"{name}.{k} = {tomli_w.dumps({'v': v})[4:].strip()}" for k, v in changed.items())
            running = ", ".join(sorted(run))
            logging.getLogger("fedmr").warning(
                "%s has no effect: it is an option of algorithm %s, which this run does not use (it runs %s)",
                given, name, running)
    return unused
