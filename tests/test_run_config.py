"""The typed run config: built once by ``validate``, read by attribute, declared once."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from fedmr.config import SETTINGS, RunConfig, default_config, load_config, to_toml, validate
from fedmr.data import DataSource
from fedmr.errors import ConfigError
from fedmr.partition import PartitionSpec

SRC = Path(__file__).resolve().parents[1] / "src" / "fedmr"


def test_validate_builds_a_frozen_typed_config():
    cfg = load_config(None, ["rounds=7", "lr=1", "fedmr.block_fraction=0.5"])
    assert isinstance(cfg, RunConfig)
    assert cfg.rounds == 7 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.section() == {"first_stage_rounds": 0, "block_fraction": 0.5}
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rounds = 3  # type: ignore[misc]
    section = cfg.section("fedmr")
    section["block_fraction"] = 0.9  # a copy: the config itself cannot be changed through it
    assert cfg.section("fedmr")["block_fraction"] == 0.5 and cfg["fedmr"]["block_fraction"] == 0.5


def test_replace_checks_again():
    cfg = load_config(None, [])
    assert cfg.replace(rounds=3).rounds == 3 and cfg.rounds == 500
    with pytest.raises(ConfigError, match="'rounds' must be at least 1"):
        cfg.replace(rounds=0)
    with pytest.raises(ConfigError, match="must be a number"):
        cfg.replace(lr="fast")


def test_the_mapping_view_is_the_toml_document():
    cfg = load_config(None, ["seed=4"])
    doc = cfg.to_dict()
    assert dict(cfg) == doc and list(cfg) == list(doc) and len(cfg) == len(doc)
    assert cfg["seed"] == 4 and cfg.get("no such key") is None
    assert validate(doc) == cfg  # the document round-trips
    assert to_toml(cfg) == to_toml(doc)


def test_each_default_is_declared_once_as_a_field():
    declared = {f.name: f.default for f in dataclasses.fields(RunConfig) if "help" in f.metadata}
    assert declared == {s.name: s.default for s in SETTINGS}
    assert {k: v for k, v in default_config().items() if not isinstance(v, dict)} == declared
    assert validate(default_config()) == RunConfig(sections=validate(default_config()).sections)


def test_unknown_top_level_keys_are_refused():
    with pytest.raises(ConfigError, match="unknown config key 'round'.*rounds"):
        validate({**default_config(), "round": 3})


def test_the_rooms_below_read_typed_slices():
    cfg = load_config(None, ["partition=\"iid\"", "num_clients=20", "clients_per_round=5", "data_dir=\"elsewhere\""])
    assert PartitionSpec.of(cfg) == PartitionSpec("iid", 20, 0.1, 1, "", "digits")
    assert PartitionSpec.of(dict(cfg)) == PartitionSpec.of(cfg)
    assert DataSource.of(cfg) == DataSource("digits", "elsewhere", "auto", "", {})
    assert cfg.local_settings.epochs == 5 and cfg.local_settings.lr == 0.01


def test_code_reads_run_config_keys_by_attribute():
    """At most 25 string-keyed reads of run-config keys (``cfg["rounds"]``, ``cfg.get("lr")``) in the
    package (issue 21): a config key belongs to ``RunConfig``, not to whoever indexes a dict."""
    names = "|".join(s.name for s in SETTINGS)
    pattern = re.compile(rf"""\w*cfg\w*(\[["']({names})["']\]|\.get\(["']({names})["'])""")
    reads = [f"{p.relative_to(SRC)}:{i}" for p in SRC.rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert len(reads) <= 25, reads
