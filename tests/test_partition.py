import json

import numpy as np
import pytest

from fedmr.errors import PartitionError
from fedmr.partition import (
    check_partition,
    dirichlet_partition,
    iid_partition,
    load_partition,
    save_partition,
    summarize,
)


def labels(n=2000, classes=10, seed=0):
    return np.random.default_rng(seed).integers(0, classes, n)


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_dirichlet_uses_every_index_once_and_respects_the_minimum(alpha):
    y = labels(5000)
    parts = dirichlet_partition(y, 50, alpha, np.random.default_rng(1))
    flat = np.concatenate(parts)
    assert len(parts) == 50
    assert sorted(flat.tolist()) == list(range(len(y)))
    assert min(len(p) for p in parts) >= 10


def test_dirichlet_is_reproducible_by_seed_and_skewed_for_small_alpha():
    y = labels()
    a = dirichlet_partition(y, 20, 0.1, np.random.default_rng(7))
    b = dirichlet_partition(y, 20, 0.1, np.random.default_rng(7))
    c = dirichlet_partition(y, 20, 0.1, np.random.default_rng(8))
    assert a == b and a != c
    skewed = summarize(a, y, 10)["classes_per_client_mean"]
    mild = summarize(dirichlet_partition(y, 20, 100.0, np.random.default_rng(7)), y, 10)["classes_per_client_mean"]
    assert skewed < mild


def test_dirichlet_caps_clients_at_the_average_size():
    # The cap stops a client from receiving more of a class once it holds N / clients samples,
    # so no client can exceed the average by more than one class's share.
    y = labels(4000)
    parts = dirichlet_partition(y, 40, 0.1, np.random.default_rng(3))
    per_class = np.bincount(y).max()
    assert max(len(p) for p in parts) < 4000 / 40 + per_class


def test_dirichlet_too_small_data_is_a_clear_error():
    with pytest.raises(PartitionError, match="too small"):
        dirichlet_partition(labels(50), 10, 0.1, np.random.default_rng(0))


def test_iid_partition_is_balanced():
    parts = iid_partition(1001, 10, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(1001))
    assert {len(p) for p in parts} <= {100, 101}


def test_partition_file_round_trip_in_the_authors_format(tmp_path):
    parts = iid_partition(100, 4, np.random.default_rng(0))
    path = tmp_path / "p.json"
    save_partition(path, parts, dataset="digits", kind="iid", alpha=None)
    doc = json.loads(path.read_text())
    assert {"dataset", "num_users", "iid", "noniid_case", "data_beta", "train_data"} <= set(doc)
    assert load_partition(path, 100, 4) == parts


@pytest.mark.parametrize("train_data, message", [
    ({"0": [0, 1], "1": [2, 200]}, "out of range"),
    ({"0": [0, 1], "1": [1, 2]}, "more than once"),
    ({"0": [0, 0, 1], "1": [2]}, "more than once"),
    ({"0": [0, -1], "1": [2]}, "out of range"),
    ({"0": [0, 1.5], "1": [2]}, "not an integer"),
    ({"0": [], "1": [2]}, "no samples"),
    ({"0": [0], "2": [2]}, "client ids"),
])
def test_bad_partition_files_are_rejected(tmp_path, train_data, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"num_users": len(train_data), "train_data": train_data}))
    with pytest.raises(PartitionError, match=message):
        load_partition(path, 100)


def test_partition_file_errors_name_the_file(tmp_path):
    with pytest.raises(PartitionError, match="not found"):
        load_partition(tmp_path / "missing.json", 10)
    bad = tmp_path / "broken.json"
    bad.write_text("{not json")
    with pytest.raises(PartitionError, match="broken.json"):
        load_partition(bad, 10)
    wrong = tmp_path / "wrong.json"
    save_partition(wrong, [[0], [1]], dataset="d", kind="iid", alpha=None)
    with pytest.raises(PartitionError, match="num_clients is 3"):
        load_partition(wrong, 10, 3)


def test_check_partition_accepts_a_valid_split():
    assert check_partition([[0, 2], [1]], 3) == [[0, 2], [1]]
