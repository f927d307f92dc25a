"""The image-folder loader: layout, order, labels, normalisation, the decode cache, errors, and the shared CIFAR-10 copy."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmr.config import load_config
from fedmr.data import cache, imagefolder, load_dataset
from fedmr.errors import DataError
from fedmr.partition import make_partition

SHARED_CIFAR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"

# class -> {file name: grey level}; names deliberately not in creation order
LAYOUT = {
    "train": {"dog": {"b.png": 40, "a.png": 30}, "cat": {"c.png": 20, "a.png": 10, "b.png": 15}},
    "test": {"cat": {"z.png": 50}, "dog": {"y.png": 60}},
}


def write_folder(root: Path, layout=LAYOUT, size=(32, 32), mode="RGB") -> Path:
    for split, classes in layout.items():
        for label, files in classes.items():
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for name, level in files.items():
                colour = (level, level + 1, level + 2) if mode == "RGB" else level
                Image.new(mode, size, colour).save(root / split / label / name)
    return root


def config(data_dir: Path, **extra) -> dict:
    return {"dataset": "imagefolder", "data_dir": str(data_dir), "normalization": "auto", "cache_dir": "", **extra}


@pytest.fixture(autouse=True)
def no_env_cache(monkeypatch):
    monkeypatch.delenv("FEDMR_CACHE", raising=False)


@pytest.fixture
def decodes(monkeypatch):
    """Counts Pillow decodes."""
    calls = []
    real_open = Image.open

    def counting_open(*args, **kwargs):
        calls.append(1)
        return real_open(*args, **kwargs)

    monkeypatch.setattr(Image, "open", counting_open)
    return calls


def test_shapes_labels_order_and_normalisation(tmp_path):
    data = load_dataset(config(write_folder(tmp_path / "imgs")))
    assert data.classes == ["cat", "dog"] and data.num_classes == 2
    assert data.train_x.shape == (5, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32)
    assert data.train_x.dtype == torch.float32
    assert data.train_x.is_contiguous(memory_format=torch.channels_last)
    assert data.train_y.tolist() == [0, 0, 0, 1, 1] and data.test_y.tolist() == [0, 1]
    # class by class, files sorted by name: cat a, b, c then dog a, b; default normalisation (x - 0.5) / 0.5
    levels = [10, 15, 20, 30, 40]
    red = data.train_x[:, 0, 5, 7]
    assert torch.allclose(red, (torch.tensor(levels) / 255 - 0.5) / 0.5)
    assert torch.allclose(data.train_x[:, 2, 0, 0], (torch.tensor(levels) + 2) / 255 * 2 - 1)
    assert data.default_model == "cnn"


def test_normalization_choices(tmp_path):
    root = write_folder(tmp_path / "imgs")
    raw = load_dataset(config(root, normalization="none")).train_x
    assert torch.allclose(raw[0, :, 0, 0], torch.tensor([10, 11, 12]) / 255)
    stats = load_dataset(config(root, normalization="cifar10-stats")).train_x
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    assert torch.allclose(stats[0, :, 0, 0], (raw[0, :, 0, 0] - mean) / std, atol=1e-6)


def test_tarball_gives_the_same_data_as_the_folder(tmp_path):
    root = write_folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="imgs")  # a top-level folder in the archive is allowed
    a, b = load_dataset(config(root)), load_dataset(config(archive))
    assert a.classes == b.classes
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


def test_second_load_reads_the_cache_without_decoding(tmp_path, decodes):
    root = write_folder(tmp_path / "imgs")
    first = load_dataset(config(root))
    assert len(decodes) == 7
    entries = list((root / cache.CACHE_FOLDER).iterdir())
    assert len(entries) == 1 and sorted(p.name for p in entries[0].glob("*.npy")) == [
        "test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    assert np.load(entries[0] / "train_x.npy").dtype == np.uint8
    second = load_dataset(config(root))
    assert len(decodes) == 7  # no decode the second time
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.train_y, second.train_y)
    # changing a file invalidates the entry, and the stale one is removed
    Image.new("RGB", (32, 32), (99, 99, 99)).save(root / "train" / "cat" / "a.png")
    os.utime(root / "train" / "cat" / "a.png", ns=(1, 1))
    third = load_dataset(config(root))
    assert len(decodes) == 14
    assert third.train_x[0, 0, 0, 0].item() == pytest.approx(99 / 255 * 2 - 1)
    assert len(list((root / cache.CACHE_FOLDER).iterdir())) == 1


def test_cache_location(tmp_path, monkeypatch, decodes):
    root = write_folder(tmp_path / "imgs")
    elsewhere = tmp_path / "mycache"
    load_dataset(config(root, cache_dir=str(elsewhere)))
    assert len(list(elsewhere.iterdir())) == 1 and not (root / cache.CACHE_FOLDER).exists()
    monkeypatch.setenv("FEDMR_CACHE", str(tmp_path / "envcache"))
    assert cache.cache_root(root, "") == tmp_path / "envcache"
    monkeypatch.delenv("FEDMR_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    readonly = tmp_path / "ro"
    readonly.mkdir()
    (readonly / "data.tar.gz").write_bytes(b"")
    readonly.chmod(0o555)  # read-only (root could still write: the mode decides)
    try:
        assert cache.cache_root(readonly / "data.tar.gz") == tmp_path / "home" / ".cache" / "fedmr"
    finally:
        readonly.chmod(0o755)
    assert cache.cache_root(root / "x.tar.gz") == root / cache.CACHE_FOLDER


def test_grayscale_images_give_one_channel(tmp_path):
    root = write_folder(tmp_path / "imgs", size=(28, 28), mode="L")
    data = load_dataset(config(root))
    assert data.train_x.shape == (5, 1, 28, 28)
    assert data.train_x[1, 0, 3, 3].item() == pytest.approx(15 / 255 * 2 - 1)


def test_a_jpeg_that_does_not_decode_is_named(tmp_path):
    root = write_folder(tmp_path / "imgs")
    good = root / "train" / "cat" / "d.jpg"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(good, "JPEG")
    good.write_bytes(good.read_bytes()[:200])  # truncated
    with pytest.raises(DataError, match=r"train/cat/d\.jpg does not decode"):
        load_dataset(config(root))
    good.write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match=r"train/cat/d\.jpg does not decode"):
        load_dataset(config(root))
    assert not (root / cache.CACHE_FOLDER).exists()  # nothing partial is cached


def test_a_truncated_archive_is_named(tmp_path):
    root = write_folder(tmp_path / "imgs")
    archive = tmp_path / "imgs.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname=".")
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"imgs\.tar\.gz is corrupt or truncated"):
        load_dataset(config(archive))


@pytest.mark.parametrize("problem, message", [
    ("missing", r"image folder not found"),
    ("no_train", r"has no train/ folder"),
    ("sizes", r"train/dog/b\.png is 16x16, the others 32x32"),
    ("test_class", r"test/ has classes not in train/: bird"),
    ("empty_class", r"train/emu holds no images"),
])
def test_layout_errors(tmp_path, problem, message):
    root = write_folder(tmp_path / "imgs")
    if problem == "missing":
        root = tmp_path / "nowhere"
    elif problem == "no_train":
        (root / "train").rename(root / "training")
    elif problem == "sizes":
        Image.new("RGB", (16, 16)).save(root / "train" / "dog" / "b.png")
    elif problem == "test_class":
        write_folder(root, {"test": {"bird": {"q.png": 1}}})
    elif problem == "empty_class":
        (root / "train" / "emu").mkdir()
    with pytest.raises(DataError, match=message):
        load_dataset(config(root))


@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason=f"the shared CIFAR-10 copy is absent ({SHARED_CIFAR})")
def test_shared_cifar10_copy_loads_then_reads_its_cache_and_partitions(tmp_path, monkeypatch):
    """The load times are a benchmark's (benchmarks/data_load.py); this checks what makes them: the
    second load reads the cache and decodes no image."""
    cfg = load_config(None, ['dataset="imagefolder"', f'data_dir="{SHARED_CIFAR}"', 'normalization="cifar10"',
                             f'cache_dir="{tmp_path}"'])
    data = load_dataset(cfg)
    assert len(data.train_y) == 50_000 and len(data.test_y) == 10_000 and data.num_classes == 10
    assert data.classes[0] == "airplane" and data.classes[-1] == "truck"
    assert np.bincount(data.train_y.numpy()).tolist() == [5000] * 10
    assert list(tmp_path.rglob("*.npy")), "the first load wrote no cache entry"

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load decoded images instead of reading the cache")

    monkeypatch.setattr(imagefolder, "decode_all", no_decoding)
    monkeypatch.setattr(imagefolder, "decode_image", no_decoding)
    again = load_dataset(cfg)
    assert torch.equal(again.test_x, data.test_x) and torch.equal(again.train_y, data.train_y)
    parts = make_partition(cfg, data.train_y.numpy())  # 100 clients, Dirichlet(0.1)
    assert len(parts) == 100 and sum(map(len, parts)) == 50_000
