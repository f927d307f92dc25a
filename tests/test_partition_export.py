"""`fedmr partition --export DIR`: one folder per client holding exactly `fedmr run`'s partition, a
local test part per client that together make the test split, read back by a site node (the Flower
ClientApp's reader) as the same pixels; and the one-line errors of a site that cannot take part."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedmr.cli import main
from fedmr.config import load_config
from fedmr.data import load_dataset
from fedmr.errors import DataError
from fedmr.partition import make_partition

SET = ["num_clients=3", "clients_per_round=3", "seed=5", "alpha=0.5"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "sites"
    assert main(["partition", *sum((["--set", s] for s in SET), []), "--export", str(out)]) == 0
    cfg = load_config(None, SET)
    return out, cfg, load_dataset(cfg)


def files(folder):
    return sorted(int(p.stem) for p in folder.glob("*/*.png"))


def test_each_client_folder_holds_exactly_its_part_and_a_share_of_the_test_split(exported):
    out, cfg, data = exported
    parts = make_partition(cfg, data.train_y.numpy(), data.natural_partition)
    assert sorted(p.name for p in out.iterdir()) == ["client-000", "client-001", "client-002", "partition.json"]
    doc = json.loads((out / "partition.json").read_text())
    assert doc["train_data"] == {str(i): list(map(int, p)) for i, p in enumerate(parts)}
    tests = []
    for i, part in enumerate(parts):
        site = out / f"client-{i:03d}"
        assert files(site / "train") == sorted(map(int, part))
        assert sorted(p.name for p in (site / "train").iterdir()) == [str(c) for c in range(10)]  # empty ones too
        for label_dir in (site / "train").iterdir():  # each image under its own class
            assert all(int(data.train_y[int(p.stem)]) == int(label_dir.name) for p in label_dir.glob("*.png"))
        tests.append(files(site / "test"))
    flat = sorted(sum(tests, []))
    assert flat == list(range(len(data.test_y))), "the local test parts are the whole test split, disjoint"
    # a site's test part follows its own label mix
    train_counts = np.bincount(data.train_y[parts[0]].numpy(), minlength=10)
    test_counts = np.bincount(data.test_y[tests[0]].numpy(), minlength=10)
    assert all(test_counts[c] == 0 for c in range(10) if train_counts[c] == 0)


def test_a_site_reads_back_the_same_samples(exported):
    from fedmr.flower.sites import read_site

    out, cfg, data = exported
    parts = make_partition(cfg, data.train_y.numpy(), data.natural_partition)
    site = read_site({**cfg, "dataset": "imagefolder", "normalization": "cifar10"}, str(out / "client-001"))
    order = sorted(map(int, parts[1]), key=lambda i: (int(data.train_y[i]), i))  # class by class, then file name
    assert torch.equal(site.train_y, data.train_y[order])
    # 8-bit PNG: digits' 1/16 pixel steps are rounded to 1/255 (x2 after the [-1, 1] normalisation)
    assert torch.allclose(site.train_x, data.train_x[order], atol=1.01 / 255)
    assert site.classes == [str(c) for c in range(10)] and site.shape == [1, 32, 32]
    assert site.info()["num-examples"] == len(parts[1])


def test_sites_that_cannot_take_part_get_one_clear_line(exported, tmp_path):
    from fedmr.flower.sites import check_sites, client_error, node_data_dir, read_site

    out, cfg, _ = exported
    cfg = {**cfg, "dataset": "imagefolder"}
    with pytest.raises(DataError, match='no data-dir in its node config .*--node-config "data-dir='):
        node_data_dir({"partition-id": 0})
    with pytest.raises(DataError, match="does not exist"):
        read_site(cfg, str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        read_site(cfg, str(tmp_path / "empty"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is not a readable folder"):
        read_site(cfg, str(tmp_path / "afile"))
    (tmp_path / "noimages" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="holds no training samples"):
        read_site(cfg, str(tmp_path / "noimages"))
    (tmp_path / "broken" / "train" / "a").mkdir(parents=True)
    (tmp_path / "broken" / "train" / "a" / "x.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="does not decode"):
        read_site(cfg, str(tmp_path / "broken"))

    good = read_site(cfg, str(out / "client-000")).info()
    check_sites([(1, good), (2, dict(good))])
    with pytest.raises(DataError, match=r"node 2 \(.*\) has classes \['0', '1'\], but the run's are"):
        check_sites([(1, good), (2, {**good, "classes": ["0", "1"]})])
    with pytest.raises(DataError, match="has images of shape 3x32x32, but the run's are 1x32x32"):
        check_sites([(1, good), (2, {**good, "shape": [3, 32, 32]})])
    assert client_error("<class 'fedmr.errors.DataError'>:<'data-dir /x is empty'>") == "data-dir /x is empty"
    assert client_error("<class 'KeyError'>:<'boom'>") == "KeyError: boom"
    assert client_error(None) == client_error("") == "the ClientApp failed without a reason"  # Flower: an empty reason is None


def test_partition_needs_out_or_export(capsys):
    assert main(["partition", "--set", "num_clients=3", "--set", "clients_per_round=3"]) == 2
    assert "needs --out FILE.json, --export DIR or both" in capsys.readouterr().err
