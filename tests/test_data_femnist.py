"""The FEMNIST loader on a tiny LEAF data set: writers, the natural split, pixel mapping, cache, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmr.config import load_config
from fedmr.data import femnist, load_dataset
from fedmr.errors import DataError, PartitionError
from fedmr.partition import make_partition


def images(n: int, level: float) -> list[list[float]]:
    """n images whose pixel k is level, except pixel 0 (top-left) which is 1.0 (white background)."""
    return [[1.0] + [level] * 783 for _ in range(n)]


def leaf(users: dict[str, tuple[int, float, int]]) -> dict:
    """users: name -> (count, pixel level, label)."""
    return {
        "users": list(users),
        "num_samples": [c for c, _, _ in users.values()],
        "user_data": {u: {"x": images(c, lv), "y": [y] * c} for u, (c, lv, y) in users.items()},
    }


def write_leaf(root: Path, level_scale: float = 255.0) -> Path:
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir()
    # two train files, read in sorted name order: writer f0001 then f0002 then f0003
    (root / "train" / "a_train.json").write_text(json.dumps(leaf({"f0001": (3, 51 / level_scale, 7),
                                                                  "f0002": (2, 102 / level_scale, 61)})))
    (root / "train" / "b_train.json").write_text(json.dumps(leaf({"f0003": (4, 0.0, 10)})))
    (root / "test" / "a_test.json").write_text(json.dumps(leaf({"f0001": (1, 0.0, 7), "f0002": (1, 1.0, 61)})))
    (root / "test" / "b_test.json").write_text(json.dumps(leaf({"f0003": (2, 0.0, 10)})))
    return root


def cfg(root: Path, **extra) -> dict:
    return {"dataset": "femnist", "data_dir": str(root), "normalization": "auto", "cache_dir": "", **extra}


@pytest.fixture(autouse=True)
def no_env_cache(monkeypatch):
    monkeypatch.delenv("FEDMR_CACHE", raising=False)


def test_writers_natural_split_and_pixel_mapping(tmp_path):
    data = load_dataset(cfg(write_leaf(tmp_path / "leaf")))
    assert data.train_x.shape == (9, 1, 28, 28) and data.test_x.shape == (4, 1, 28, 28)
    assert data.train_x.is_contiguous(memory_format=torch.channels_last)
    assert data.num_classes == 62 and data.classes[10] == "A" and data.classes[61] == "z"
    assert data.default_model == "cnn_femnist"
    assert data.natural_partition == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    assert data.train_y.tolist() == [7, 7, 7, 61, 61, 10, 10, 10, 10]
    assert data.test_y.tolist() == [7, 61, 10, 10]  # the union of every writer's test part
    # (0.5 - x) / 0.5: white background -> -1, ink -> towards +1
    assert data.train_x[0, 0, 0, 0].item() == pytest.approx(-1.0)
    assert data.train_x[0, 0, 5, 5].item() == pytest.approx((0.5 - 51 / 255) / 0.5)
    assert data.train_x[3, 0, 27, 27].item() == pytest.approx((0.5 - 102 / 255) / 0.5)
    assert data.train_x[5, 0, 1, 0].item() == pytest.approx(1.0)
    plain = load_dataset(cfg(tmp_path / "leaf", normalization="none"))
    assert plain.train_x[0, 0, 5, 5].item() == pytest.approx(51 / 255)


def test_natural_partition_is_one_client_per_writer(tmp_path):
    root = write_leaf(tmp_path / "leaf")
    data = load_dataset(cfg(root))
    config = load_config(None, ['dataset="femnist"', 'partition="natural"', "num_clients=3", "clients_per_round=1"])
    assert make_partition(config, data.train_y.numpy(), data.natural_partition) == [[0, 1, 2], [3, 4], [5, 6, 7, 8]]
    config = config.replace(num_clients=4)
    with pytest.raises(PartitionError, match="has 3 clients; set num_clients = 3"):
        make_partition(config, data.train_y.numpy(), data.natural_partition)


def test_second_load_does_not_parse_again_and_keeps_exact_values(tmp_path, monkeypatch):
    root = write_leaf(tmp_path / "leaf", level_scale=1000.0)  # not k/255: cached as float32
    first = load_dataset(cfg(root))
    parsed = []
    monkeypatch.setattr(femnist, "read_leaf_file", lambda path: parsed.append(path) or [])
    second = load_dataset(cfg(root))
    assert parsed == []
    assert torch.equal(first.train_x, second.train_x) and first.natural_partition == second.natural_partition
    assert second.train_x[0, 0, 5, 5].item() == pytest.approx((0.5 - 0.051) / 0.5)
    entry = next((root / ".fedmr-cache").iterdir())
    assert np.load(entry / "train_x.npy").dtype == np.float32


def test_leaf_pixels_are_cached_as_uint8(tmp_path):
    root = write_leaf(tmp_path / "leaf")
    load_dataset(cfg(root))
    entry = next((root / ".fedmr-cache").iterdir())
    assert np.load(entry / "train_x.npy").dtype == np.uint8


@pytest.mark.parametrize("damage, message", [
    (lambda d: d["num_samples"].__setitem__(0, 5), r"a_train\.json: writer 'f0001' has num_samples 5 but 3 x and 3 y"),
    (lambda d: d["users"].append("ghost"), r"a_train\.json: 3 users but 2 num_samples"),
    (lambda d: d["user_data"]["f0002"]["x"][0].pop(), r"a_train\.json: writer 'f0002' has an image that is not 784"),
    (lambda d: d["user_data"]["f0002"]["y"].__setitem__(0, 62), r"a_train\.json: writer 'f0002' has a label outside"),
    (lambda d: d["user_data"].pop("f0002"), r"a_train\.json: user_data has no 'x'/'y' for writer 'f0002'"),
])
def test_inconsistent_files_are_named(tmp_path, damage, message):
    root = write_leaf(tmp_path / "leaf")
    path = root / "train" / "a_train.json"
    doc = json.loads(path.read_text())
    damage(doc)
    path.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message):
        load_dataset(cfg(root))
    assert not (root / ".fedmr-cache").exists()


def test_truncated_json_and_missing_folders(tmp_path):
    root = write_leaf(tmp_path / "leaf")
    path = root / "test" / "b_test.json"
    path.write_text(path.read_text()[:300])
    with pytest.raises(DataError, match=r"LEAF file .*b_test\.json is not valid JSON"):
        load_dataset(cfg(root))
    with pytest.raises(DataError, match=r"FEMNIST folder not found"):
        load_dataset(cfg(tmp_path / "nowhere"))
    (tmp_path / "empty" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match=r"has no train/\*\.json files"):
        load_dataset(cfg(tmp_path / "empty"))


def test_a_writer_twice_in_train_is_refused(tmp_path):
    root = write_leaf(tmp_path / "leaf")
    (root / "train" / "c_train.json").write_text(json.dumps(leaf({"f0001": (1, 0.0, 1)})))
    with pytest.raises(DataError, match=r"c_train\.json: writer 'f0001' appears twice"):
        load_dataset(cfg(root))
