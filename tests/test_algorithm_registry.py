"""Algorithms register themselves, declare their options once, and a half-written one fails when built."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import FrozenInstanceError, dataclass

import pytest

from fedmr.algorithms import ALGORITHMS, Algorithm, Federation, Options, option, register_algorithm
from fedmr.algorithms.fedavg import FedAvg
from fedmr.cli import main
from fedmr.config import algorithm_help, default_config, load_config
from fedmr.errors import ConfigError

FED = Federation(4, 2, (10,) * 4, 10, 1)


@pytest.fixture
def registry():
    """Registrations made by a test are undone after it."""
    saved = dict(ALGORITHMS)
    yield ALGORITHMS
    ALGORITHMS.clear()
    ALGORITHMS.update(saved)


def test_builtins_register_in_config_order_with_their_declared_defaults():
    assert list(ALGORITHMS) == ["fedavg", "fedprox", "scaffold", "moon", "fedgen", "clustered", "fedindep", "fedmr"]
    cfg = default_config()
    for name, cls in ALGORITHMS.items():
        assert cls.name == name
        assert cfg[name] == cls.defaults == cls.Options.defaults()
    assert ALGORITHMS["fedmr"].Options().block_fraction == 0.0
    with pytest.raises(FrozenInstanceError):
        ALGORITHMS["fedmr"].Options().block_fraction = 0.5  # type: ignore[misc]


@pytest.mark.parametrize("setting, message", [
    ("fedmr.block_fraction=2", r"'fedmr.block_fraction' must be in \[0.0, 1.0\], got 2.0"),
    ("fedmr.first_stage_rounds=-1", r"'fedmr.first_stage_rounds' must be in \[0, inf\], got -1"),
    ("scaffold.server_lr=0", r"'scaffold.server_lr' must be in \(0.0, inf\], got 0.0"),
    ("moon.temperature=0", r"'moon.temperature' must be in \(0.0, inf\]"),
    ("fedgen.decay=1.5", r"'fedgen.decay' must be in \(0.0, 1.0\]"),
    ("fedgen.hidden_dim=0", r"'fedgen.hidden_dim' must be in \[1, inf\]"),
    ("clustered.weighting=\"mean\"", "'clustered.weighting' must be one of uniform, size, got 'mean'"),
    ("fedprox.mu=\"big\"", "'fedprox.mu' must be a number"),
])
def test_declared_ranges_types_and_choices_are_checked(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [setting])


def test_a_new_algorithm_registers_and_gets_a_config_section(registry):
    @dataclass(frozen=True)
    class HalfOptions(Options):
        share: float = option(0.5, "weight of the new model", low=0.0, high=1.0)

    @register_algorithm("halfavg")
    class HalfAvg(FedAvg):
        description = "FedAvg moving half way"
        Options = HalfOptions

    assert registry["halfavg"] is HalfAvg and HalfAvg.name == "halfavg"
    cfg = load_config(None, ["algorithm=halfavg", "halfavg.share=0.25"])
    assert cfg["halfavg"] == {"share": 0.25}
    with pytest.raises(ConfigError, match=r"'halfavg.share' must be in \[0.0, 1.0\]"):
        load_config(None, ["halfavg.share=3"])
    assert "halfavg: FedAvg moving half way" in algorithm_help() and "share = 0.5" in algorithm_help()


def test_a_taken_name_and_a_non_algorithm_are_refused(registry):
    with pytest.raises(ConfigError, match="'fedavg' is taken"):
        @register_algorithm("fedavg")
        class Other(FedAvg):
            pass
    with pytest.raises(TypeError, match="subclass of Algorithm"):
        register_algorithm("thing")(object)


def test_a_half_written_algorithm_fails_when_built_naming_what_is_missing():
    class Half(Algorithm):
        def setup(self, initial_state):
            self.state = initial_state

        def configure_train(self, round_idx, clients):
            return []

    with pytest.raises(ConfigError, match="does not implement aggregate_train, global_state, load_server_state, "
                                          "server_state"):
        Half({}, FED)
    assert FedAvg({}, FED).options == FedAvg.Options()  # complete: builds


def test_an_algorithm_reads_its_options_as_its_own_typed_dataclass():
    fedmr_class, scaffold_class = ALGORITHMS["fedmr"], ALGORITHMS["scaffold"]
    built = fedmr_class({"first_stage_rounds": 50}, FED)
    assert type(built.options) is fedmr_class.Options
    assert (built.options.first_stage_rounds, built.options.block_fraction) == (50, 0.0)  # the rest: the defaults
    assert built.options["first_stage_rounds"] == 50  # the dict form of earlier plug-ins still reads
    with pytest.raises(KeyError):
        built.options["nope"]
    with pytest.raises(FrozenInstanceError):
        built.options.block_fraction = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError, match="unexpected keyword argument 'nope'"):
        scaffold_class({"nope": 1}, FED)


def test_option_declarations_are_checked_when_the_class_is_made():
    @dataclass(frozen=True)
    class Wrong(Options):
        steps: int = option(0.5, "a float default for an int")

    with pytest.raises(TypeError, match="declared int but defaults to 0.5"):
        class Bad(FedAvg):
            Options = Wrong
    with pytest.raises(TypeError, match="sets defaults by hand"):
        class ByHand(FedAvg):
            defaults = {"mu": 1.0}


def test_run_help_lists_every_algorithm_with_its_options_and_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    for name, cls in ALGORITHMS.items():
        assert f"  {name}: {cls.description}" in text
    assert "block_fraction = 0.0" in text and 'distance = "arccos"' in text and "generator_lr = 0.0003" in text


def test_compare_help_lists_the_options_too():
    proc = subprocess.run([sys.executable, "-m", "fedmr.cli", "compare", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "first_stage_rounds = 0" in proc.stdout and "server_lr = 1.0" in proc.stdout
