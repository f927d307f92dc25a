"""The CIFAR-10 / CIFAR-100 (coarse) loaders on tiny files in the official pickle layout; no network."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmr.data import cifar, load_dataset
from fedmr.errors import DataError

PER_BATCH = 3


def batch(first_label: int, n: int, num_classes: int, label_key: bytes) -> dict:
    """Image i has channel c filled with 10 * c + label, and its label; pixel (0, 1) of the red plane is 200."""
    labels = [(first_label + i) % num_classes for i in range(n)]
    planes = np.stack([np.stack([np.full((32, 32), 10 * c + y, np.uint8) for c in range(3)]) for y in labels])
    planes[:, 0, 0, 1] = 200
    return {b"data": planes.reshape(n, 3072), label_key: labels, b"batch_label": b"x"}


def dump(path: Path, doc) -> None:
    path.write_bytes(pickle.dumps(doc, protocol=2))


def write_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", batch(i, PER_BATCH, 10, b"labels"))
    dump(folder / "test_batch", batch(0, 2, 10, b"labels"))
    dump(folder / "batches.meta", {b"label_names": [n.encode() for n in "abcdefghij"]})
    return folder


def write_cifar100(root: Path) -> Path:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    train = batch(0, 25, 20, b"coarse_labels")
    train[b"fine_labels"] = list(range(25))
    dump(folder / "train", train)
    dump(folder / "test", batch(5, 4, 20, b"coarse_labels"))
    dump(folder / "meta", {b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
                           b"fine_label_names": [f"fine{i}".encode() for i in range(100)]})
    return folder


def cfg(name: str, data_dir: Path, normalization: str = "auto") -> dict:
    return {"dataset": name, "data_dir": str(data_dir), "normalization": normalization}


def test_cifar10_shapes_labels_layout_and_paper_normalisation(tmp_path):
    write_cifar10(tmp_path)
    data = load_dataset(cfg("cifar10", tmp_path))
    assert data.train_x.shape == (5 * PER_BATCH, 3, 32, 32) and data.test_x.shape == (2, 3, 32, 32)
    assert data.train_x.is_contiguous(memory_format=torch.channels_last)
    assert data.classes == list("abcdefghij") and data.num_classes == 10
    assert data.train_y.tolist() == [(b + i) % 10 for b in range(1, 6) for i in range(PER_BATCH)]
    assert data.test_y.tolist() == [0, 1]
    y = data.train_y[:, None].float()
    raw = torch.tensor([0.0, 10.0, 20.0])[None, :] + y  # channel c holds 10 c + label
    assert torch.allclose(data.train_x[:, :, 5, 5], (raw / 255 - 0.5) / 0.5)  # mean 0.5, std 0.5
    assert torch.allclose(data.train_x[:, 0, 0, 1], torch.full((15,), (200 / 255 - 0.5) / 0.5))  # row-major planes
    # data_dir may also name the release folder itself
    same = load_dataset(cfg("cifar10", tmp_path / "cifar-10-batches-py"))
    assert torch.equal(same.train_x, data.train_x)


def test_cifar100_uses_the_20_coarse_labels_and_cifar10_statistics(tmp_path):
    write_cifar100(tmp_path)
    data = load_dataset(cfg("cifar100", tmp_path))
    assert data.num_classes == 20 and data.classes[3] == "super3"
    assert data.train_y.tolist() == [i % 20 for i in range(25)] and len(data.test_y) == 4
    mean, std = torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010])
    assert torch.allclose(data.train_x[0, :, 9, 9], (torch.tensor([0.0, 10.0, 20.0]) / 255 - mean) / std, atol=1e-6)
    raw = load_dataset(cfg("cifar100", tmp_path, "none"))
    assert torch.allclose(raw.train_x[1, :, 9, 9], torch.tensor([1.0, 11.0, 21.0]) / 255)


def test_a_truncated_pickle_is_named(tmp_path):
    folder = write_cifar10(tmp_path)
    bad = folder / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[:500])
    with pytest.raises(DataError, match=r"data_batch_3 is corrupt or truncated"):
        load_dataset(cfg("cifar10", tmp_path))


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = write_cifar10(tmp_path)
    dump(folder / "test_batch", {b"data": os.system})  # a global other than numpy's array builders
    with pytest.raises(DataError, match=r"test_batch is corrupt .*refusing to load"):
        load_dataset(cfg("cifar10", tmp_path))


def test_mismatched_counts_and_missing_files_are_named(tmp_path):
    folder = write_cifar10(tmp_path)
    doc = batch(0, 3, 10, b"labels")
    doc[b"labels"] = [1, 2]
    dump(folder / "data_batch_2", doc)
    with pytest.raises(DataError, match=r"data_batch_2: 3 images but 2 'labels'"):
        load_dataset(cfg("cifar10", tmp_path))
    (folder / "data_batch_2").unlink()
    with pytest.raises(DataError, match=r"CIFAR file missing: .*data_batch_2"):
        load_dataset(cfg("cifar10", tmp_path))


def test_no_network_says_where_to_put_the_files(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    target = tmp_path / "data"
    with pytest.raises(DataError) as err:
        load_dataset(cfg("cifar10", target))
    message = str(err.value)
    assert "cifar-10-python.tar.gz" in message and str(target / "cifar-10-batches-py") in message
    assert "no route to host" in message and "\n" not in message
    assert not target.exists()  # nothing half-written


def official_archive(tmp_path: Path) -> bytes:
    write_cifar10(tmp_path / "src")
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    return buffer.getvalue()


def test_download_is_checked_and_unpacked(tmp_path, monkeypatch):
    blob = official_archive(tmp_path)
    release = dataclasses.replace(cifar.RELEASES["cifar10"], md5=hashlib.md5(blob).hexdigest())
    monkeypatch.setitem(cifar.RELEASES, "cifar10", release)
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(blob))
    data = load_dataset(cfg("cifar10", tmp_path / "data"))
    assert len(data.train_y) == 5 * PER_BATCH
    assert (tmp_path / "data" / "cifar-10-python.tar.gz").is_file()


def test_an_archive_with_the_wrong_checksum_is_refused(tmp_path, monkeypatch):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(official_archive(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", pytest.fail)  # present: never downloaded again
    with pytest.raises(DataError, match=r"cifar-10-python\.tar\.gz fails its checksum"):
        load_dataset(cfg("cifar10", tmp_path / "data"))
