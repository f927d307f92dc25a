"""`fedmr data info` and `fedmr partition` on tiny data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from fedmr.cli import main
from fedmr.config import load_config
from fedmr.engine.experiment import prepare
from fedmr.partition import load_partition


@pytest.fixture
def folder(tmp_path, monkeypatch) -> Path:
    """8 training and 2 test images in two classes; red 51, green 102, blue 153 everywhere."""
    monkeypatch.delenv("FEDMR_CACHE", raising=False)
    root = tmp_path / "imgs"
    for split, per_class in (("train", 4), ("test", 1)):
        for label in ("cat", "dog"):
            (root / split / label).mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (32, 32), (51, 102, 153)).save(root / split / label / f"{i}.png")
    return root


def test_data_info_prints_sizes_classes_and_channel_stats(folder, capsys):
    assert main(["data", "info", "imagefolder", "--data-dir", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "train: 8 images, test: 2 images, 3x32x32" in out
    assert "classes: 2 (cat, dog)" in out
    assert "train pixel mean per channel (0..1): 0.2000 0.4000 0.6000" in out
    assert "train pixel std per channel (0..1):  0.0000 0.0000 0.0000" in out
    assert "normalization: auto (mean 0.5/0.5/0.5, std 0.5/0.5/0.5)" in out
    assert "normalised train mean per channel: -0.6000 -0.2000 0.2000" in out


def test_data_info_takes_config_keys(folder, capsys):
    assert main(["data", "info", "imagefolder", "--data-dir", str(folder), "--set", 'normalization="none"']) == 0
    assert "normalised train mean per channel: 0.2000 0.4000 0.6000" in capsys.readouterr().out


def test_data_info_errors_are_one_line(tmp_path, capsys):
    assert main(["data", "info", "imagefolder", "--data-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmr: error: image folder not found") and err.count("\n") == 1
    assert main(["data", "info", "mnist"]) == 2
    assert "unknown dataset 'mnist'" in capsys.readouterr().err


@pytest.mark.parametrize("settings", [
    ["num_clients=10", "clients_per_round=2"],  # the embedded digits, Dirichlet(0.1)
    ["num_clients=10", "clients_per_round=2", 'partition="iid"', "seed=7"],
])
def test_partition_matches_what_run_would_use(tmp_path, capsys, settings):
    out = tmp_path / "sub" / "partition.json"
    args = ["partition", "--out", str(out)]
    for item in settings:
        args += ["--set", item]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("partition: 10 clients, 1438 samples") and str(out) in printed
    doc = json.loads(out.read_text())
    expected = prepare(load_config(None, settings)).partition
    assert [doc["train_data"][str(i)] for i in range(10)] == expected
    assert doc["summary"]["sizes"] == [len(p) for p in expected]
    assert load_partition(out, 1438, 10) == expected  # usable as partition = "file"


def test_partition_reads_a_config_file(folder, tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text(f'dataset = "imagefolder"\ndata_dir = "{folder}"\nnum_clients = 2\n'
                      f'clients_per_round = 1\npartition = "iid"\n')
    out = tmp_path / "p.json"
    assert main(["partition", "--config", str(config), "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["dataset"] == "imagefolder" and doc["num_users"] == 2
    assert sorted(doc["train_data"]["0"] + doc["train_data"]["1"]) == list(range(8))
    assert main(["partition", "--config", str(config), "--set", "num_clients=100", "--out", str(out)]) == 2
    assert "fedmr: error:" in capsys.readouterr().err
