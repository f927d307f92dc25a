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


USER_LOADERS = '''
import numpy as np


def _images():
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    x = rng.integers(0, 256, (60, 1, 8, 8)).astype("float32") / 255  # pixels in [0, 1]
    return x, y, x[:15], y[:15]


def declared():
    return _images()


declared.normalization = "none"  # the samples are the pixels in [0, 1] themselves


def declared_stats():
    x, y, vx, vy = _images()
    return (x - 0.25) / 0.5, y, (vx - 0.25) / 0.5, vy


declared_stats.normalization = ((0.25,), (0.5,))  # x = (pixel - mean) / std


def undeclared():
    return _images()


def tabular():
    x = np.random.default_rng(0).normal(size=(60, 5)).astype("float32")
    y = np.arange(60) % 3
    return x, y, x[:15], y[:15]
'''


@pytest.fixture
def user_loaders(tmp_path, monkeypatch):
    import os

    name = f"fedmr_export_loaders_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(USER_LOADERS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize("loader, normalization", [("declared", "none"), ("declared_stats", None)])
def test_a_user_loader_declares_its_pixel_normalization_and_exports(user_loaders, loader, normalization, tmp_path,
                                                                    capsys):
    """``loader.normalization``: a name ("none") or (mean, std); the PNGs hold the same 8-bit pixels."""
    out = tmp_path / "sites"
    argv = ["partition", "--set", f"dataset=\"{user_loaders}:{loader}\"", "--set", "num_clients=2", "--set",
            "partition=\"iid\"", "--export", str(out)]
    assert main(argv) == 0
    doc = json.loads((out / "partition.json").read_text())
    assert doc["normalization"] == normalization
    import importlib

    from PIL import Image

    x, y, _, _ = importlib.import_module(user_loaders)._images()
    first = sorted((out / "client-000" / "train").glob("*/*.png"))[0]
    index = int(first.stem)
    assert np.array_equal(np.asarray(Image.open(first)), np.round(x[index, 0] * 255).astype(np.uint8))
    assert "wrote 2 client folders" in capsys.readouterr().out


@pytest.mark.parametrize("loader, message", [
    ("undeclared", "does not say how its pixels were normalised, so its images cannot be written back as PNGs; a "
                   "loader declares it as an attribute, e.g. loader.normalization = \"none\""),
    ("tabular", "has samples of shape (5,), not images (C, H, W): --export writes each client's samples as PNG "
                "images; for other data use --out partition.json"),
])
def test_an_undeclared_or_tabular_user_data_set_gets_a_message_that_says_what_to_do(user_loaders, loader, message,
                                                                                    tmp_path, capsys):
    argv = ["partition", "--set", f"dataset=\"{user_loaders}:{loader}\"", "--set", "num_clients=2", "--set",
            "partition=\"iid\"", "--export", str(tmp_path / "sites")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("fedmr: error:") == 1, err


def test_a_bad_normalization_declaration_is_refused(user_loaders):
    import importlib

    from fedmr.errors import PluginError

    mod = importlib.import_module(user_loaders)
    mod.undeclared.normalization = "sepia"
    try:
        with pytest.raises(PluginError, match="normalization = 'sepia' is none of"):
            load_dataset(load_config(None, [f"dataset=\"{user_loaders}:undeclared\""], uses="data"))
        mod.undeclared.normalization = ((0.5, 0.5), (0.5, 0.5))
        with pytest.raises(PluginError, match="needs 1 values each"):
            load_dataset(load_config(None, [f"dataset=\"{user_loaders}:undeclared\""], uses="data"))
    finally:
        del mod.undeclared.normalization
