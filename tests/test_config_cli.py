import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmr.cli import main
from fedmr.config import load_config, parse_assignment
from fedmr.engine.compare import parse_variant
from fedmr.errors import ConfigError

TINY = ["num_clients=10", "clients_per_round=3", "rounds=2", "local_epochs=1", "eval_every=1"]


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_defaults_are_the_papers():
    cfg = load_config()
    assert (cfg["num_clients"], cfg["clients_per_round"], cfg["local_epochs"], cfg["batch_size"]) == (100, 10, 5, 50)
    assert (cfg["lr"], cfg["momentum"], cfg["alpha"], cfg["eval_every"], cfg["seed"]) == (0.01, 0.5, 0.1, 10, 1)
    assert cfg["partition"] == "dirichlet"
    assert cfg["fedmr"] == {"first_stage_rounds": 0, "block_fraction": 0.0}


def test_toml_then_set_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('rounds = 7\nalgorithm = "fedavg"\n[fedmr]\nblock_fraction = 0.5\n')
    cfg = load_config(path, ["rounds=9", "fedmr.first_stage_rounds=3", "lr=1"])
    assert cfg["rounds"] == 9 and cfg["algorithm"] == "fedavg"
    assert cfg["fedmr"] == {"first_stage_rounds": 3, "block_fraction": 0.5}
    assert cfg["lr"] == 1.0 and isinstance(cfg["lr"], float)


def test_parse_assignment_and_variants():
    assert parse_assignment("dataset=digits") == (["dataset"], "digits")
    assert parse_assignment("fedmr.block_fraction=0.25") == (["fedmr", "block_fraction"], 0.25)
    assert parse_variant("fedmr@first_stage_rounds=50") == ("fedmr", {"first_stage_rounds": 50})


@pytest.mark.parametrize("setting, message", [
    ("colour=1", "unknown config key 'colour'"),
    ("fedmr.speed=2", "unknown config key 'fedmr.speed'"),
    ("algorithm=fedfoo", "unknown algorithm 'fedfoo'"),
    ("alpha=0", "'alpha' must be positive"),
    ("alpha=-1", "'alpha' must be positive"),
    ("clients_per_round=200", "cannot exceed num_clients"),
    ("rounds=0", "'rounds' must be at least 1"),
    ("rounds=1.5", "'rounds' must be an integer"),
    ("lr=fast", "'lr' must be a number"),
    ("momentum=1", "'momentum' must be in"),
    ("partition=random", "unknown partition"),
    ("partition=file", "needs partition_file"),
    ("fedmr.block_fraction=1.5", "block_fraction"),
    ("dataset=mnist", "unknown dataset"),
    ("model=transformer", "unknown model"),
    ("rounds", "KEY=VALUE"),
])
def test_bad_input_is_one_clear_line_and_exit_2(capsys, tmp_path, setting, message):
    code, out, err = run_cli(["run", "--out", str(tmp_path / "r"), *sum([["--set", s] for s in TINY], []),
                              "--set", setting], capsys)
    assert code == 2
    assert message in err
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("fedmr: error")]) == 1


def test_bad_partition_file_and_too_small_data(capsys, tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text(json.dumps({"num_users": 10, "train_data": {str(i): [i, i + 1] for i in range(10)}}))
    code, _, err = run_cli(["run", "--out", str(tmp_path / "a"), "--set", "partition=file",
                            "--set", f"partition_file='{bad}'", *sum([["--set", s] for s in TINY], [])], capsys)
    assert code == 2 and "appears more than once" in err and str(bad) in err
    code, _, err = run_cli(["run", "--out", str(tmp_path / "b"), "--set", "num_clients=1000",
                            "--set", "clients_per_round=10"], capsys)
    assert code == 2 and "too small" in err


def test_missing_or_broken_config_file(capsys, tmp_path):
    code, _, err = run_cli(["run", "--config", str(tmp_path / "nope.toml")], capsys)
    assert code == 2 and "config file not found" in err
    broken = tmp_path / "broken.toml"
    broken.write_text("rounds = = 3")
    code, _, err = run_cli(["run", "--config", str(broken)], capsys)
    assert code == 2 and "not valid TOML" in err


def test_run_writes_the_results_folder(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run_cli(["run", "--quiet", "--out", str(out), *sum([["--set", s] for s in TINY], [])], capsys)
    assert code == 0 and "final accuracy" in stdout
    assert {p.name for p in out.iterdir()} >= {"config.toml", "partition.json", "partition_summary.json",
                                                "metrics.csv", "summary.json"}
    summary = json.loads((out / "summary.json").read_text())
    assert {"final_accuracy", "best_accuracy", "best_round", "mean_last5_accuracy", "wall_seconds",
            "rounds_per_second"} <= set(summary)
    # the saved config re-runs the same experiment
    again = tmp_path / "again"
    assert main(["run", "--quiet", "--config", str(out / "config.toml"), "--out", str(again)]) == 0
    assert (again / "metrics.csv").read_text().split("\n")[1].split(",")[:3] == \
        (out / "metrics.csv").read_text().split("\n")[1].split(",")[:3]
    # an existing run is never overwritten
    code, _, err = run_cli(["run", "--out", str(out), *sum([["--set", s] for s in TINY], [])], capsys)
    assert code == 2 and "already holds a run" in err


def test_compare_writes_table_and_plot(tmp_path, capsys):
    out = tmp_path / "cmp"
    code, stdout, _ = run_cli(["compare", "--quiet", "--algorithms", "fedavg,fedmr,fedmr@block_fraction=1.0",
                               "--out", str(out), *sum([["--set", s] for s in TINY], [])], capsys)
    assert code == 0
    assert (out / "accuracy.png").stat().st_size > 1000
    table = (out / "comparison.md").read_text()
    for label in ("fedavg", "fedmr", "fedmr@block_fraction=1.0"):
        assert f"| {label} |" in table


def test_console_script_is_installed():
    proc = subprocess.run([sys.executable, "-m", "fedmr.cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "compare" in proc.stdout


def test_run_help_names_every_built_in_model():
    from fedmr.config import RunConfig
    from fedmr.models import MODELS

    help_text = RunConfig.__dataclass_fields__["model"].metadata["help"]
    assert all(name in help_text.split(", ") for name in MODELS), help_text


def test_parsing_the_arguments_does_not_import_torch():
    """The algorithms epilog (which imports torch) is built only for ``run/compare --help``."""
    code = ("import sys, fedmr.cli; fedmr.cli.build_parser().parse_args(['study', 'report', 'x.toml']); "
            "print('torch' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_unknown_section_is_rejected(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[fedfoo]\nmu = 1\n")
    with pytest.raises(ConfigError, match="unknown config section 'fedfoo'"):
        load_config(path)


def test_the_docs_tables_are_unbroken():
    """Every line between a Markdown table's rows (outside code blocks) is a table row:
    pasted command output in a table cuts it in two (docs/errors.md once held progress-bar lines)."""
    import re

    root = Path(__file__).resolve().parents[1]
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for paragraph in re.split(r"\n\s*\n", text):
            lines = paragraph.strip("\n").splitlines()
            rows = [i for i, line in enumerate(lines) if line.startswith("|")]
            if any(re.match(r"\|\s*:?-{3,}", line) for line in lines):
                bad = [line for line in lines[rows[0]:rows[-1] + 1] if not line.startswith("|")]
                assert not bad, f"{page.name}: a table holds {bad[0][:60]!r}"
