"""Experiment configuration: the paper's defaults, TOML files, ``--set KEY=VALUE`` overrides, validation.

A config file is a nested table: top-level keys are the run's settings, declared once as the
fields of ``RunConfig`` (``run_config.py``); each algorithm has a section of its own options
(``[fedmr]``, ``[fedprox]``...), whose defaults the algorithm class declares (``sections.py``,
which also checks plug-ins' tables).  ``validate`` checks everything, once, and builds the
``RunConfig`` that later code reads (``config.rounds``); ``load_config`` (``loading.py``) reads
the defaults, a file and ``--set`` overrides and validates them.
"""

from .loading import load_config, merge, parse_assignment, parse_value, read_toml, to_toml, warn_unused_sections
from .run_config import (
    AT_LEAST_ONE,
    DEFAULTS,
    NATURAL_SHARE,
    PAPER_CLIENTS_PER_ROUND,
    PARTITIONS,
    SETTING_NAMES,
    SETTINGS,
    USES,
    RunConfig,
    Setting,
    default_config,
    paper_clients_per_round,
    settings_help,
    used_keys,
    validate,
)
from .sections import algorithm_help, algorithm_sections, check_loader_options, is_loader_section, section_defaults

__all__ = [
    "AT_LEAST_ONE", "DEFAULTS", "NATURAL_SHARE", "PAPER_CLIENTS_PER_ROUND", "PARTITIONS", "SETTINGS", "SETTING_NAMES",
    "USES", "RunConfig", "Setting", "algorithm_help", "algorithm_sections", "check_loader_options", "default_config",
    "is_loader_section", "load_config", "merge", "paper_clients_per_round", "parse_assignment", "parse_value",
    "read_toml", "section_defaults", "settings_help", "to_toml", "used_keys", "validate", "warn_unused_sections",
]
