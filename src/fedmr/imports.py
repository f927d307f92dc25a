"""Import strings: user code named ``"pkg.mod:attribute"`` (as uvicorn and celery name it) in a
config, resolved with errors that name the config key.  The registries above this module check
their own contracts: algorithms (:func:`fedmr.algorithms.algorithm_class`), data loaders
(:mod:`fedmr.data.user`) and models (:func:`fedmr.models.model_builder`); see docs/api.md.

Resolving an import string imports that module, i.e. runs its code: a config naming plug-ins is
code, to be trusted like code.
"""

from __future__ import annotations

import importlib
import re
import sys
import sysconfig
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import PluginError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_SPEC = re.compile(rf"^({_NAME}(?:\.{_NAME})*):({_NAME}(?:\.{_NAME})*)$")

def is_import_string(value: Any) -> bool:
    """True for a string with a ':' (no built-in name has one): it names user code."""
    return isinstance(value, str) and ":" in value


def split_key(key: str) -> list[str]:
    """A dotted config key cut into its parts, keeping an import-string section whole:
    ``"fedmr.block_fraction"`` -> 2 parts, ``"pkg.mod:Algo.beta"`` -> ``["pkg.mod:Algo", "beta"]``."""
    colon = key.find(":")
    if colon < 0:
        return key.split(".")
    dot = key.find(".", colon)
    if dot < 0:
        return [key]
    return [key[:dot], *key[dot + 1:].split(".")]


def where(key: str) -> str:
    """How a message names the place: "config key 'model'", "config section 'pkg.mod:Algo'" for
    "[pkg.mod:Algo]", or an API argument as itself ("data=")."""
    if key.endswith("="):
        return key
    return f"config section '{key[1:-1]}'" if key.startswith("[") else f"config key '{key}'"


def a_noun(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def resolve(key: str, spec: str) -> Any:
    """The object ``spec`` ("pkg.mod:attr") names; ``key`` is the config key, for the message."""
    match = _SPEC.match(spec)
    if match is None:
        raise PluginError(f"{where(key)}: '{spec}' is not an import string of the form 'package.module:name'")
    module_name, attr_path = match.groups()
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        detail = "" if missing == module_name else f" (it imports '{missing}', which is missing)"
        raise PluginError(f"{where(key)}: cannot import module '{module_name}'{detail}; is it on PYTHONPATH?") from None
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - the user's module failed while importing
        raise PluginError(f"{where(key)}: importing module '{module_name}' failed: {first_line(exc)}") from None
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            raise PluginError(f"{where(key)}: module '{module_name}' has no attribute '{attr_path}'")
        obj = getattr(obj, part)
    return obj


def resolve_callable(key: str, spec: str) -> Callable[..., Any]:
    obj = resolve(key, spec)
    if not callable(obj):
        raise PluginError(f"{where(key)}: '{spec}' is {a_noun(type(obj).__name__)}, not a function or class")
    return obj


def describe(obj: Any) -> str:
    """The import string of a function or class when it has one ("module:qualname"), for config.toml."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None) or type(obj).__name__
    if module and _SPEC.match(f"{module}:{qualname}"):
        return f"{module}:{qualname}"
    return f"{module or 'python'}:{re.sub(r'[^A-Za-z0-9_.]', '_', qualname)}"


def import_roots(cfg: Mapping[str, Any]) -> list[str]:
    """The folders (absolute) a fresh shell must put on PYTHONPATH to import the plug-ins ``cfg``
    names: the root of each plug-in's top-level package, unless it lies in the interpreter's own
    library or site-packages folders.  What a printed resume command prefixes."""
    names = {v for k, v in cfg.items() if k in ("algorithm", "model", "dataset") and is_import_string(v)}
    names |= {k for k, v in cfg.items() if is_plugin_section(k, v)}
    system = {Path(p).resolve() for p in sysconfig.get_paths().values()} | {Path(sys.prefix).resolve(),
                                                                            Path(sys.base_prefix).resolve()}
    roots: list[str] = []
    for name in sorted(names):
        top = name.partition(":")[0].split(".")[0]
        module = sys.modules.get(top)
        origin = getattr(module, "__file__", None)
        if origin is None:
            continue
        path = Path(origin).resolve()
        root = path.parent.parent if path.name == "__init__.py" else path.parent
        if any(root == s or s in root.parents for s in system):
            continue
        if str(root) not in roots:
            roots.append(str(root))
    return roots


def is_plugin_section(key: str, value: Any) -> bool:
    return is_import_string(key) and isinstance(value, Mapping)
