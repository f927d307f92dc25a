"""FEMNIST from femnist.npz: the same tensors as LEAF's JSON for the same samples, the natural split,
the paper's pixel mapping and K = 10% of the writers, bad files; and the shared copy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmr.cli import main
from fedmr.config import load_config
from fedmr.data import load_dataset
from fedmr.errors import DataError
from fedmr.partition import make_partition

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_FEMNIST = SHARED / "femnist.npz"


def make_arrays(writers: int = 3, seed: int = 0) -> dict[str, np.ndarray]:
    """Writers f0000.. (sorted) with 2 + w % 3 training and 1 + w % 2 test samples, the samples interleaved
    across writers and splits (as in the shared file, whose rows follow the LEAF runs, not the writers)."""
    rng = np.random.default_rng(seed)
    rows = [(w, s) for w in range(writers) for s, n in ((0, 2 + w % 3), (1, 1 + w % 2)) for _ in range(n)]
    order = rng.permutation(len(rows))
    writer = np.array([rows[i][0] for i in order], dtype=np.int32)
    split = np.array([rows[i][1] for i in order], dtype=np.uint8)
    x = np.full((len(rows), 28, 28), 255, np.uint8)  # LEAF's white background
    x[:, 4:24, 10:18] = rng.integers(0, 256, size=(len(rows), 20, 8), dtype=np.uint8)  # ink, every value
    y = rng.integers(0, 62, size=len(rows)).astype(np.int16)
    return {"x": x, "y": y, "writer": writer, "split": split, "run": np.zeros(len(rows), np.uint8),
            "writer_ids": np.array([f"f{w:04d}_00" for w in range(writers)]),
            "writer_run": np.zeros(writers, np.uint8), "run_repositories": np.array(["someone/leaf-run"])}


def write_npz(folder: Path, arrays: dict[str, np.ndarray] | None = None, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    doc = {**(arrays if arrays is not None else make_arrays()), **changes}
    path = folder / "femnist.npz"
    np.savez_compressed(path, **{k: v for k, v in doc.items() if v is not None})
    return path


def write_leaf_json(npz: Path, root: Path, writers: list[int] | None = None) -> Path:
    """LEAF's JSON structure rebuilt from the npz as ../shared/data/README.md does (values x / 255.0)."""
    d = np.load(npz)
    x, y, w, s = d["x"], d["y"], d["writer"], d["split"]
    chosen = range(len(d["writer_ids"])) if writers is None else writers
    for split, name in ((0, "train"), (1, "test")):
        users = [str(d["writer_ids"][i]) for i in chosen]
        out: dict = {"users": users, "num_samples": [], "user_data": {}}
        for i, u in zip(chosen, users):
            m = (w == i) & (s == split)
            out["num_samples"].append(int(m.sum()))
            out["user_data"][u] = {"x": (x[m].reshape(-1, 784) / 255.0).tolist(), "y": y[m].astype(int).tolist()}
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / f"all_data_{name}.json").write_text(json.dumps(out))
    return root


def cfg(data_dir: Path, tmp_path: Path, **extra) -> dict:
    return {"dataset": "femnist", "data_dir": str(data_dir), "normalization": "auto",
            "cache_dir": str(tmp_path / "cache"), **extra}


def test_npz_and_leaf_json_give_the_same_tensors(tmp_path):
    npz = write_npz(tmp_path / "npz")
    leaf = write_leaf_json(npz, tmp_path / "leaf")
    a, b = load_dataset(cfg(npz, tmp_path)), load_dataset(cfg(leaf, tmp_path))
    for name in ("train_x", "train_y", "test_x", "test_y"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.natural_partition == b.natural_partition == [[0, 1], [2, 3, 4], [5, 6, 7, 8]]
    assert a.num_classes == b.num_classes == 62 and a.default_model == b.default_model == "cnn_femnist"


def test_writers_in_order_their_own_test_parts_pooled_and_the_paper_pixel_mapping(tmp_path):
    arrays = make_arrays()
    data = load_dataset(cfg(write_npz(tmp_path, arrays), tmp_path))
    w, s = arrays["writer"], arrays["split"]
    for split, x, y in ((0, data.train_x, data.train_y), (1, data.test_x, data.test_y)):
        rows = [i for writer in range(3) for i in range(len(w)) if w[i] == writer and s[i] == split]
        assert y.tolist() == arrays["y"][rows].tolist()
        # (0.5 - v) / 0.5 on LEAF's v = pixel / 255: background (255) -> -1, ink towards +1; float32 rounding only
        expected = (0.5 - torch.from_numpy(arrays["x"][rows]).double() / 255) / 0.5
        assert torch.allclose(x[:, 0].double(), expected, atol=1e-6)
    assert data.train_x[0, 0, 0, 0].item() == -1.0
    assert len(data.test_y) == 4 and any("pooled" in note for note in data.notes)


def test_natural_partition_with_k_ten_percent_of_the_writers(tmp_path):
    data = load_dataset(cfg(write_npz(tmp_path, make_arrays(writers=25)), tmp_path))
    config = load_config(None, ['dataset="femnist"', 'partition="natural"', "num_clients=25"])
    assert config.clients_per_round == 2  # 10% of 25 writers, rounded down as the authors' max(int(frac * n), 1)
    assert load_config(None, ['partition="natural"', "num_clients=300"]).clients_per_round == 30
    assert load_config(None, ['partition="natural"', "num_clients=5"]).clients_per_round == 1
    assert load_config(None, ['partition="natural"', "num_clients=25", "clients_per_round=7"]).clients_per_round == 7
    assert load_config(None, []).clients_per_round == 10  # elsewhere the paper's K = 10
    parts = make_partition(config, data.train_y.numpy(), data.natural_partition)
    assert parts == data.natural_partition and len(parts) == 25


def test_a_run_on_the_npz_uses_the_femnist_cnn_and_records_k(tmp_path, one_torch_thread):
    npz = write_npz(tmp_path / "data", make_arrays(writers=20))
    out = tmp_path / "run"
    args = ["run", "--quiet", "--out", str(out)]
    for item in ('dataset="femnist"', f'data_dir="{npz}"', 'partition="natural"', "num_clients=20", "rounds=1",
                 "local_epochs=1", "eval_every=1", 'algorithm="fedavg"', "workers=1"):
        args += ["--set", item]
    assert main(args) == 0
    recorded = (out / "config.toml").read_text()
    assert "clients_per_round = 2\n" in recorded and 'model = "auto"' in recorded
    assert json.loads((out / "partition.json").read_text())["num_users"] == 20
    from fedmr.models import CNNFemnist, build_model

    assert isinstance(build_model("cnn_femnist", 62, input_shape=(1, 28, 28)), CNNFemnist)


@pytest.mark.parametrize("change, message", [
    ({"writer": None}, r"femnist\.npz lacks the array 'writer'"),
    ({"y": np.full(13, 62, np.int16)}, r"a label is outside 0\.\.61"),
    ({"y": np.full(13, -1, np.int16)}, r"a label is outside 0\.\.61"),
    ({"writer": np.full(13, 3, np.int32)}, r"a writer index is outside 0\.\.2"),
    ({"split": np.full(13, 2, np.uint8)}, r"'split' must be 0 \(train\) or 1 \(test\)"),
    ({"x": np.zeros((13, 28, 27), np.uint8)}, r"'x' must be uint8 \(N, 28, 28\)"),
    ({"y": np.zeros(12, np.int16)}, r"'y' must hold one integer per image \(13\)"),
])
def test_a_bad_npz_is_one_error_line(tmp_path, capsys, change, message):
    npz = write_npz(tmp_path, **change)
    with pytest.raises(DataError, match=message):
        load_dataset(cfg(npz, tmp_path))
    assert main(["data", "info", "femnist", "--data-dir", str(npz)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmr: error: FEMNIST file ") and err.count("\n") == 1


def test_a_truncated_npz_is_named(tmp_path, capsys):
    npz = write_npz(tmp_path)
    npz.write_bytes(npz.read_bytes()[: npz.stat().st_size // 2])
    with pytest.raises(DataError, match=r"femnist\.npz is corrupt or truncated"):
        load_dataset(cfg(npz, tmp_path))
    assert main(["data", "info", "femnist", "--data-dir", str(tmp_path)]) == 2  # the folder holding it
    assert capsys.readouterr().err.count("\n") == 1


def test_data_info_describes_writers_and_the_subset(tmp_path, capsys):
    npz = write_npz(tmp_path)
    assert main(["data", "info", "femnist", "--data-dir", str(npz)]) == 0
    out = capsys.readouterr().out
    assert "train: 9 images, test: 4 images, 1x28x28" in out
    assert 'natural split: 3 writers (partition = "natural", num_clients = 3; clients_per_round "auto" = 1)' in out
    assert "training samples per writer: min 2 / median 3 / mean 3.0 / max 4" in out
    assert "per writer min 1 / median 1 / mean 1.3 / max 2" in out
    assert "someone/leaf-run (3 writers)" in out and "biased towards writers with fewer samples" in out


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_FEMNIST.is_file(), reason=f"the shared FEMNIST copy is absent ({SHARED_FEMNIST})")
def test_shared_femnist_copy_matches_its_readme_and_leaf_json(tmp_path):
    """The counts ../shared/data/README.md gives; and five writers' samples read from LEAF JSON rebuilt as
    the README does are the npz reader's tensors for those writers."""
    data = load_dataset(cfg(SHARED_FEMNIST, tmp_path))
    assert len(data.train_y) == 41_224 and len(data.test_y) == 4_733
    assert data.natural_partition is not None and len(data.natural_partition) == 300
    sizes = [len(p) for p in data.natural_partition]
    assert (min(sizes), int(np.median(sizes)), max(sizes)) == (2, 150, 320)
    assert set(data.train_y.tolist()) == set(data.test_y.tolist()) == set(range(62))
    chosen = [0, 7, 150, 298, 299]
    leaf = load_dataset(cfg(write_leaf_json(SHARED_FEMNIST, tmp_path / "leaf", chosen), tmp_path))
    rows = [i for w in chosen for i in data.natural_partition[w]]
    assert torch.equal(leaf.train_x, data.train_x[rows]) and torch.equal(leaf.train_y, data.train_y[rows])
    assert load_config(None, ['partition="natural"', "num_clients=300"]).clients_per_round == 30
