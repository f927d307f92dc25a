"""What a new user hits (issue 19): bad output folders and unusable data end in one error line
before any work; label slips warn; typos get suggestions; every command checks only the keys it
uses; loaders take data_dir and options; the printed resume command works as printed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import fedmr
from fedmr.cli import main
from fedmr.config import load_config, read_toml
from fedmr.errors import ConfigError, DataError, PluginError

SMALL = ["--set", "rounds=2", "--set", "num_clients=4", "--set", "clients_per_round=2", "--set", "partition=\"iid\"",
         "--set", "local_epochs=1", "--set", "workers=1"]
API_SMALL = {"rounds": 2, "num_clients": 4, "clients_per_round": 2, "partition": "iid", "local_epochs": 1, "workers": 1}


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("fedmr: error:")]
    assert len(lines) == 1, err
    return lines[0]


# ---- output folders ----------------------------------------------------------------------------------
def bad_outputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    return {
        "under a file": (a_file / "run", "is a file, not a folder"),
        "a file": (a_file, "the output path is a file"),
        "in /proc": (Path("/proc/fedmr-test/run"), "cannot write the results folder"),
    }


@pytest.mark.parametrize("case", ["under a file", "a file", "in /proc"])
@pytest.mark.parametrize("command", ["run", "compare"])
def test_an_output_folder_that_cannot_be_written_is_one_line_before_any_data(case, command, tmp_path, capsys,
                                                                            no_data_loading):
    out, message = bad_outputs(tmp_path)[case]
    before = sorted(p.name for p in tmp_path.iterdir())
    argv = [command, "--quiet", "--out", str(out), *SMALL] + (["--algorithms", "fedavg,fedmr"] if command == "compare" else [])
    assert main(argv) == 2
    line = one_error_line(capsys)
    assert message in line and str(out) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert (tmp_path / "a-file").read_text() == "not a folder"  # nothing lost


def test_the_api_raises_a_fedmr_error_for_an_unwritable_folder(tmp_path, no_data_loading):
    out, _ = bad_outputs(tmp_path)["under a file"]
    with pytest.raises(ConfigError, match="cannot write the results folder"):
        fedmr.run(API_SMALL, out=out)
    with pytest.raises(ConfigError, match="cannot write the results folder"):
        fedmr.compare(API_SMALL, ["fedavg"], out=out)


def test_a_folder_holding_a_run_is_refused_before_any_data(tmp_path, capsys, no_data_loading):
    (tmp_path / "metrics.csv").write_text("round,accuracy\n1,0.5\n")
    assert main(["run", "--quiet", "--out", str(tmp_path), *SMALL]) == 2
    assert "already holds a run" in one_error_line(capsys)
    assert (tmp_path / "metrics.csv").read_text() == "round,accuracy\n1,0.5\n"


def test_a_writable_new_folder_is_probed_without_leaving_anything(tmp_path):
    from fedmr.fileio import check_writable_folder

    check_writable_folder(tmp_path / "new" / "deeper")
    assert list(tmp_path.iterdir()) == []


# ---- names: checked before the data, with suggestions ----------------------------------------------------
@pytest.mark.parametrize("setting, message, suggestion", [
    ("rouns=5", "unknown config key 'rouns'", "did you mean 'rounds'?"),
    ("fedmr.block_fractoin=1", "unknown config key 'fedmr.block_fractoin'", "did you mean 'fedmr.block_fraction'?"),
    ("algorithm=\"fedmx\"", "unknown algorithm 'fedmx'", "did you mean 'fedmr'?"),
    ("model=\"resnet18\"", "unknown model 'resnet18'", "did you mean 'resnet20'?"),
    ("dataset=\"cifar\"", "unknown dataset 'cifar'", "did you mean 'cifar10'?"),
    ("partition=\"iiid\"", "unknown partition 'iiid'", "did you mean 'iid'?"),
])
def test_a_typo_gets_a_suggestion_before_any_data(setting, message, suggestion, tmp_path, capsys, no_data_loading):
    assert main(["run", "--quiet", "--out", str(tmp_path / "r"), "--set", setting]) == 2
    line = one_error_line(capsys)
    assert message in line and suggestion in line
    assert not (tmp_path / "r").exists()


def test_a_name_far_from_any_gets_no_suggestion():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model=\"transformer\""])
    assert "did you mean" not in str(info.value)


def test_the_model_is_checked_before_a_data_set_that_would_fail_to_load(tmp_path, capsys):
    argv = ["run", "--quiet", "--out", str(tmp_path / "r"), "--set", "model=\"resnet18\"",
            "--set", "dataset=\"imagefolder\"", "--set", f"data_dir=\"{tmp_path / 'absent'}\""]
    assert main(argv) == 2
    assert "unknown model 'resnet18'" in one_error_line(capsys)


def test_partition_checks_only_the_keys_it_uses(tmp_path, capsys):
    out = tmp_path / "p.json"
    assert main(["partition", "--set", "num_clients=6", "--out", str(out)]) == 0  # clients_per_round is 10
    assert json.loads(out.read_text())["num_users"] == 6
    capsys.readouterr()
    assert main(["partition", "--set", "num_clients=0", "--out", str(out)]) == 2  # a key it uses still is checked
    assert "num_clients" in one_error_line(capsys)
    with pytest.raises(ConfigError, match="clients_per_round"):  # and a run still refuses the pair
        load_config(None, ["num_clients=6"])


def test_run_help_lists_the_general_keys_with_their_defaults(capsys):
    from fedmr.config import SETTINGS

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for key in ("rounds = 500", "num_clients = 100", "model = \"auto\"", "dataset = \"digits\"", "lr = 0.01"):
        assert key in out
    assert all(f"  {s.name} = " in out for s in SETTINGS)


# ---- data that cannot make a run, and label slips ----------------------------------------------------------
def arrays(n=40, classes=3, features=6, seed=0, labels_from=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(labels_from, labels_from + classes, n)
    x = (rng.normal(size=(n, features)) + y[:, None]).astype("float32")
    return x, y


@pytest.mark.parametrize("case, message", [
    ("empty test", "the test set holds no samples"),
    ("empty train", "holds no samples"),
    ("shapes differ", "differ in shape"),
    ("one class", "only 1 class"),
])
def test_unusable_data_is_refused_at_load_time(case, message):
    x, y = arrays()
    data = {
        "empty test": (x, y, x[:0], y[:0]),
        "empty train": (x[:0], y[:0], x, y),
        "shapes differ": (x, y, x[:, :4], y),
        "one class": (x, np.zeros_like(y), x, y),
    }[case]
    with pytest.raises((DataError, PluginError), match=message):
        fedmr.run(API_SMALL, data=data)


def test_one_based_labels_and_a_test_only_class_warn_naming_the_classes(caplog):
    x, y = arrays(labels_from=1)  # labels 1..3: class 0 is empty
    tx, ty = x[:10], np.r_[y[:9], 4]  # class 4 only in the test set
    with caplog.at_level("WARNING", logger="fedmr"):
        result = fedmr.run(API_SMALL, data=(x, y, tx, ty))
    assert result.summary["rounds"] == 2
    text = caplog.text
    assert "class 0 has no samples at all" in text and "one-based" in text
    assert "class 4 has samples in the test set only (1 test sample)" in text


def test_clean_labels_give_no_warning(caplog):
    x, y = arrays()
    with caplog.at_level("WARNING", logger="fedmr"):
        fedmr.run(API_SMALL, data=(x, y, x[:10], y[:10]))
    assert "samples" not in caplog.text


# ---- loaders with data_dir and options; the printed resume command ------------------------------------
LOADERS = textwrap.dedent("""
    import numpy as np

    CALLS = []

    def with_dir(data_dir, n=60, shift=1.0, name="blobs", noisy=False):
        CALLS.append((data_dir, n, shift, name, noisy))
        rng = np.random.default_rng(0)
        y = rng.integers(0, 3, n)
        x = (rng.normal(size=(n, 6)) + shift * y[:, None]).astype("float32")
        return x, y, x[:20], y[:20]

    def needs_count(count):
        raise AssertionError("never called")

    def empty_test():
        x, y = np.zeros((20, 4), "float32"), np.arange(20) % 2
        return x, y, x[:0], y[:0]

    def one_based():
        rng = np.random.default_rng(0)
        y = rng.integers(1, 4, 60)
        x = (rng.normal(size=(60, 6)) + y[:, None]).astype("float32")
        return x, y, x[:20], y[:20]
""")


@pytest.fixture
def loader_module(tmp_path, monkeypatch):
    name = f"fedmr_test_loaders_{os.getpid()}"
    folder = tmp_path / "user"
    folder.mkdir()
    (folder / f"{name}.py").write_text(LOADERS)
    monkeypatch.syspath_prepend(str(folder))
    return name, folder


def test_a_loader_gets_data_dir_and_its_options_from_the_config(loader_module, tmp_path):
    import importlib

    name, _ = loader_module
    cfg = load_config(None, [f"dataset=\"{name}:with_dir\"", "data_dir=\"/data/site-3\"",
                             f"{name}:with_dir.n=90", f"{name}:with_dir.name=\"other\""])
    assert cfg[f"{name}:with_dir"] == {"n": 90, "shift": 1.0, "name": "other", "noisy": False}
    out = tmp_path / "run"
    fedmr.run({**cfg, **API_SMALL}, out=out)
    module = importlib.import_module(name)
    assert module.CALLS[-1] == ("/data/site-3", 90, 1.0, "other", False)
    assert read_toml(out / "config.toml")[f"{name}:with_dir"]["n"] == 90  # recorded, so a resume loads the same


@pytest.mark.parametrize("setting, message", [
    ("{m}:with_dir.n=\"many\"", "must be an integer"),
    ("{m}:with_dir.size=3", "unknown config key '{m}:with_dir.size'"),
])
def test_a_loader_option_of_the_wrong_type_or_name_is_refused(loader_module, setting, message):
    name, _ = loader_module
    with pytest.raises(ConfigError, match=message.format(m=name)):
        load_config(None, [f"dataset=\"{name}:with_dir\"", setting.format(m=name)])


def test_a_loader_parameter_without_a_default_is_refused_by_name(loader_module):
    name, _ = loader_module
    with pytest.raises(PluginError, match="requires parameter 'count'"):
        load_config(None, [f"dataset=\"{name}:needs_count\""])


def test_the_printed_resume_command_works_in_a_new_shell_for_a_plugin_run(loader_module, tmp_path):
    """Started with PYTHONPATH, stopped by SIGTERM; the printed command, run by a shell whose
    environment has no PYTHONPATH, finishes the run."""
    name, folder = loader_module
    work = tmp_path / "work"
    work.mkdir()
    argv = [sys.executable, "-m", "fedmr.cli", "run", "--quiet", "--out", "r", "--set", f"dataset=\"{name}:with_dir\"",
            "--set", "rounds=400", "--set", "eval_every=1", "--set", "num_clients=4", "--set", "clients_per_round=2",
            "--set", "partition=\"iid\"", "--set", "local_epochs=1", "--set", "workers=1"]
    env = {**os.environ, "PYTHONPATH": str(folder)}
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not list((work / "r" / "checkpoints").glob("*.json")) and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    command = next(line for line in err.splitlines() if line.startswith("resume with: ")).removeprefix("resume with: ")
    assert command.startswith("PYTHONPATH=") and command.endswith("fedmr run --resume r")
    # `fedmr` as the shell finds it: this interpreter's console script, in a clean environment
    clean = {"PATH": f"{Path(sys.executable).parent}{os.pathsep}/usr/bin{os.pathsep}/bin", "HOME": str(tmp_path)}
    fedmr_bin = Path(sys.executable).parent / "fedmr"
    if not fedmr_bin.exists():
        pytest.skip(f"no fedmr console script beside {sys.executable}")
    # a few rounds past where the SIGTERM stopped it (a quiet machine gets further in the polling interval)
    stopped = max(int(p.name[6:12]) for p in (work / "r" / "checkpoints").glob("round-*.json"))
    done = subprocess.run(["bash", "-c", f"{command} --set rounds={stopped + 2} --quiet"], cwd=work, env=clean,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads((work / "r" / "summary.json").read_text())["rounds"] == stopped + 2
    # and without the prefix, the same command fails as the issue reported: the prefix is what makes it work
    bare = subprocess.run(["bash", "-c", f"fedmr run --resume r --set rounds={stopped + 4} --quiet"], cwd=work, env=clean,
                          capture_output=True, text=True, timeout=600)
    assert bare.returncode == 2 and "is it on PYTHONPATH" in bare.stderr


def test_no_prefix_when_the_run_names_no_plugins(tmp_path):
    from fedmr.cli import resume_command

    cfg = load_config(None, [])
    assert resume_command("run", tmp_path / "r", cfg) == f"fedmr run --resume {tmp_path / 'r'}"


def test_the_cli_refuses_an_empty_test_set_and_warns_of_one_based_labels(loader_module, tmp_path, capsys):
    name, _ = loader_module
    out = tmp_path / "r"
    assert main(["run", "--quiet", "--out", str(out), *SMALL, "--set", f"dataset=\"{name}:empty_test\""]) == 2
    assert "the test set holds no samples" in one_error_line(capsys)
    assert not out.exists()
    import logging

    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("fedmr").addHandler(handler)
    try:
        assert main(["run", "--quiet", "--out", str(out), *SMALL, "--set", f"dataset=\"{name}:one_based\""]) == 0
    finally:
        logging.getLogger("fedmr").removeHandler(handler)
    assert any("class 0 has no samples at all" in r and "one-based" in r for r in records), records
