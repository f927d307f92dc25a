"""Config sections: each algorithm's options (declared by its ``Options``), and plug-ins' tables:
``["pkg.mod:Class"]`` holds a user algorithm's options, ``["pkg.mod:loader"]`` a data loader's."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import tomli_w

from ..errors import ConfigError
from ..imports import is_import_string
from .values import check_type


def algorithm_sections() -> dict[str, dict[str, Any]]:
    """Default options of every registered algorithm, keyed by algorithm name: each class's
    ``Options`` declaration (its field defaults), in registration order."""
    from ..algorithms import ALGORITHMS

    return {name: copy.deepcopy(cls.Options.defaults()) for name, cls in ALGORITHMS.items()}


def algorithm_help() -> str:
    """Every registered algorithm, its options and their defaults, from the ``Options`` declarations
    (the epilog of ``fedmr run --help``)."""
    from ..algorithms import ALGORITHMS

    lines = ["algorithms (--set algorithm=NAME) and their options (--set NAME.KEY=VALUE, or a [NAME] table "
             "in the config file; defaults are the papers'):"]
    for name, cls in ALGORITHMS.items():
        lines.append(f"  {name}: {cls.description}")
        for key, default, text in cls.Options.describe():
            lines.append(f"      {key} = {tomli_w.dumps({'v': default})[4:].strip()}  {text}")
    return "\n".join(lines)


def is_loader_section(spec: str) -> bool:
    """Whether ``[spec]`` holds a data loader's options (it names a callable that is not an Algorithm)."""
    from ..algorithms.base import Algorithm
    from ..imports import resolve

    obj = resolve(f"[{spec}]", spec)
    return callable(obj) and not (isinstance(obj, type) and issubclass(obj, Algorithm))


def section_defaults(spec: str, key: str) -> dict[str, Any]:
    """The reference of a plug-in's config section ``[spec]``: an algorithm's options, or a data
    loader's keyword options (from its signature)."""
    from ..algorithms import algorithm_defaults
    from ..data.user import loader_defaults

    if is_loader_section(spec):
        return loader_defaults(spec, key)
    return algorithm_defaults(spec, key)


def check_loader_options(spec: str, options: Mapping[str, Any]) -> None:
    """The options of ``[spec]`` have the types of the loader's defaults (unknown keys are refused by the config)."""
    from ..data.user import loader_defaults

    for name, default in loader_defaults(spec, f"[{spec}]").items():
        if name in options:
            check_type(f"{spec}.{name}", options[name], default)


def plugin_sections(given: Mapping[str, Mapping[str, Any]], dataset: str, algorithm: str, model: str,
                    training: bool = True) -> dict[str, dict[str, Any]]:
    """Check the names of the ``algorithm``, ``model`` and ``dataset`` (built-in, or user code that must at
    least import and be callable: its contract is checked when it runs) and every plug-in's section,
    all before any data is loaded; returns the ``given`` sections with each plug-in's defaults filled in.
    Without ``training``, only the data set."""
    from ..algorithms import algorithm_class, algorithm_defaults
    from ..data import check_dataset_name
    from ..data.user import loader_defaults
    from ..imports import resolve_callable
    from ..models import check_model_name

    sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in given.items()}
    check_dataset_name(dataset)
    if is_import_string(dataset):
        resolve_callable("dataset", dataset)
        options = loader_defaults(dataset)
        if options and dataset not in sections:  # recorded in config.toml, as an algorithm's options are
            sections[dataset] = options
    for name in [k for k in sections if is_import_string(k) and is_loader_section(k)]:
        if name != dataset:
            raise ConfigError(f"config section '{name}' names a function, not an Algorithm class, and is not "
                              f"the data set's loader (dataset = {dataset!r})")
        check_loader_options(name, sections[name])
    if not training:
        return sections
    algorithm_class(algorithm)
    if is_import_string(algorithm) and algorithm not in sections:
        sections[algorithm] = algorithm_defaults(algorithm, "algorithm")
    check_model_name(model)
    if is_import_string(model):
        resolve_callable("model", model)
    for name in [k for k in sections if is_import_string(k) and not is_loader_section(k)]:
        cls = algorithm_class(name, f"[{name}]")
        options = sections[name]
        sections[name] = {**options, **{sub: check_type(f"{name}.{sub}", options.get(sub, sub_default), sub_default)
                                      for sub, sub_default in algorithm_defaults(name, f"[{name}]").items()}}
        cls.Options(**sections[name]).check(name)  # declared ranges first, named by the section as written
        cls.check_options(sections[name])
    return sections
