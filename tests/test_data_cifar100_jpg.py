"""CIFAR-100 from a JPEG copy (cifar100-jpg.tar.gz + cifar100-coarse.json): coarse and fine labels, the
paper's statistics, the decode cache, where data_dir may point, bad copies; and the shared copy."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_data_cifar import official_archive, write_cifar100

from fedmr.cli import main
from fedmr.config import load_config
from fedmr.data import cifar, imagefolder, load_dataset
from fedmr.errors import DataError
from fedmr.partition import make_partition

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_CIFAR100 = SHARED / "cifar100-jpg.tar.gz"

FINE = [f"fine{i:02d}" for i in range(100)]  # sorted order = fine id order, as in the real copy
COARSE = [f"super{i:02d}" for i in range(20)]
FINE_TO_COARSE = [(7 * i) % 20 for i in range(100)]  # 5 fine classes per superclass, not simply i // 5
TRAIN = {f: 2 if f < 3 else 1 for f in range(100)}  # images per fine class
TEST = {f: 1 for f in range(5)}
STATS = (torch.tensor([0.4914, 0.4822, 0.4465]), torch.tensor([0.2023, 0.1994, 0.2010]))  # the paper's CIFAR-100 setting


def colour(fine: int, j: int, split: str) -> tuple[int, int, int]:
    return (2 * fine, 100 + 10 * j, 200 if split == "train" else 50)


def write_copy(folder: Path, table: dict | None = None) -> Path:
    """folder/cifar100-jpg.tar.gz (train/<fine>/NNNN.jpg, test/<fine>/NNNN.jpg) and folder/cifar100-coarse.json."""
    tree = folder / "tree"
    for split, counts in (("train", TRAIN), ("test", TEST)):
        for fine, n in counts.items():
            (tree / split / FINE[fine]).mkdir(parents=True)
            for j in range(n):
                Image.new("RGB", (32, 32), colour(fine, j, split)).save(
                    tree / split / FINE[fine] / f"{j:04d}.jpg", quality=95, subsampling=0)
    archive = folder / "cifar100-jpg.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for split in ("test", "train"):
            tar.add(tree / split, arcname=split)
    doc = {"fine_label_names": FINE, "coarse_label_names": COARSE, "fine_to_coarse_id": FINE_TO_COARSE,
           "fine_to_coarse": {f: COARSE[c] for f, c in zip(FINE, FINE_TO_COARSE)}}
    (folder / "cifar100-coarse.json").write_text(json.dumps(table if table is not None else doc))
    return archive


def decoded(folder: Path, split: str) -> tuple[torch.Tensor, list[int]]:
    """What Pillow decodes, class by class, file by file: the expected pixels in [0, 1] and fine labels."""
    counts = TRAIN if split == "train" else TEST
    images, labels = [], []
    for fine, n in sorted(counts.items()):
        for j in range(n):
            with Image.open(folder / "tree" / split / FINE[fine] / f"{j:04d}.jpg") as img:
                images.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1))
            labels.append(fine)
    return torch.stack(images).double() / 255, labels


def cfg(name: str, data_dir: Path, tmp_path: Path, **extra) -> dict:
    return {"dataset": name, "data_dir": str(data_dir), "normalization": "auto", "cache_dir": str(tmp_path / "cache"),
            **extra}


@pytest.fixture(autouse=True)
def no_env_cache(monkeypatch):
    monkeypatch.delenv("FEDMR_CACHE", raising=False)


def test_coarse_labels_by_default_with_the_paper_statistics(tmp_path):
    archive = write_copy(tmp_path)
    data = load_dataset(cfg("cifar100", archive, tmp_path))
    assert data.name == "cifar100" and data.num_classes == 20 and data.classes == COARSE
    pixels, fine = decoded(tmp_path, "train")
    assert data.train_y.tolist() == [FINE_TO_COARSE[f] for f in fine]
    test_pixels, test_fine = decoded(tmp_path, "test")
    assert data.test_y.tolist() == [FINE_TO_COARSE[f] for f in test_fine]
    mean, std = (v.double().view(1, 3, 1, 1) for v in STATS)
    # float32 arithmetic of one multiply-add against float64: a few ulps of values up to about 2.7
    assert torch.allclose(data.train_x.double(), (pixels - mean) / std, atol=1e-5)
    assert torch.allclose(data.test_x.double(), (test_pixels - mean) / std, atol=1e-5)
    assert data.train_x.is_contiguous(memory_format=torch.channels_last) and data.default_model == "cnn"
    assert any("NOT the official train/test split" in note for note in data.notes)


def test_cifar100_fine_gives_the_100_fine_labels(tmp_path):
    archive = write_copy(tmp_path)
    data = load_dataset(cfg("cifar100-fine", archive, tmp_path))
    assert data.num_classes == 100 and data.classes == FINE
    assert data.train_y.tolist() == decoded(tmp_path, "train")[1]
    coarse = load_dataset(cfg("cifar100", archive, tmp_path))
    assert torch.equal(data.train_x, coarse.train_x)


def test_decoded_once_then_read_from_the_cache(tmp_path, monkeypatch):
    archive = write_copy(tmp_path)
    first = load_dataset(cfg("cifar100", archive, tmp_path))
    assert list((tmp_path / "cache").rglob("train_x.npy"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("the second load decoded images instead of reading the cache")

    monkeypatch.setattr(imagefolder, "decode_all", no_decoding)
    again = load_dataset(cfg("cifar100", archive, tmp_path))
    assert torch.equal(first.train_x, again.train_x) and torch.equal(first.test_y, again.test_y)
    # the same entry serves dataset = "imagefolder" on the same archive (fine labels, sorted class folders)
    plain = load_dataset(cfg("imagefolder", archive, tmp_path, normalization="cifar10-stats"))
    assert torch.equal(plain.train_x, first.train_x) and plain.classes == FINE


def test_data_dir_may_be_the_folder_holding_the_archive_and_the_pickles_win(tmp_path):
    archive = write_copy(tmp_path)
    via_folder = load_dataset(cfg("cifar100", tmp_path, tmp_path))
    assert torch.equal(via_folder.train_x, load_dataset(cfg("cifar100", archive, tmp_path)).train_x)
    write_cifar100(tmp_path)  # the official layout beside it: read instead of the JPEG copy
    official = load_dataset(cfg("cifar100", tmp_path, tmp_path))
    assert len(official.train_y) == 25 and official.classes[3] == "super3"
    assert not any("NOT the official" in note for note in official.notes)


def test_an_unpacked_copy_reads_as_the_archive(tmp_path):
    archive = write_copy(tmp_path)
    unpacked = tmp_path / "tree"
    (unpacked / "cifar100-coarse.json").write_text((tmp_path / "cifar100-coarse.json").read_text())
    a, b = load_dataset(cfg("cifar100", unpacked, tmp_path)), load_dataset(cfg("cifar100", archive, tmp_path))
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


@pytest.mark.parametrize("damage, message", [
    ("truncated", r"cifar100-jpg\.tar\.gz is corrupt or truncated"),
    ("no_table", r"CIFAR-100 coarse table not found: .*cifar100-coarse\.json"),
    ("bad_json", r"coarse table .* is not valid JSON"),
    ("coarse_id", r"a fine_to_coarse_id is outside 0\.\.19"),
    ("short_table", r"expected 100 fine names, 20 coarse names and 100 coarse ids, got 99"),
    ("names", r"do not match the 100 fine classes of cifar100-coarse\.json: no folder for zebra"),
])
def test_a_bad_copy_is_one_error_line(tmp_path, capsys, damage, message):
    archive = write_copy(tmp_path)
    table = tmp_path / "cifar100-coarse.json"
    doc = json.loads(table.read_text())
    if damage == "truncated":
        archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    elif damage == "no_table":
        table.unlink()
    elif damage == "bad_json":
        table.write_text(table.read_text()[:100])
    elif damage == "coarse_id":
        doc["fine_to_coarse_id"][5] = 20
    elif damage == "short_table":
        doc["fine_label_names"].pop()
    elif damage == "names":
        doc["fine_label_names"][99] = "zebra"
    if damage in ("coarse_id", "short_table", "names"):
        table.write_text(json.dumps(doc))
    with pytest.raises(DataError, match=message):
        load_dataset(cfg("cifar100", archive, tmp_path))
    assert main(["data", "info", "cifar100", "--data-dir", str(archive), "--set", f'cache_dir="{tmp_path / "c"}"']) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmr: error: ") and err.count("\n") == 1


def test_an_archive_cut_anywhere_is_named_truncated(tmp_path):
    """tarfile's stream mode reads a cut between two members as the end of the archive (the class
    folders seen so far would pass for the whole copy): the gzip stream's own end is checked too."""
    archive = write_copy(tmp_path)
    whole = archive.read_bytes()
    for fraction in (0.05, 0.3, 0.5, 0.7, 0.9, 0.99):
        archive.write_bytes(whole[: int(len(whole) * fraction)])
        with pytest.raises(DataError, match=r"cifar100-jpg\.tar\.gz is corrupt or truncated"):
            load_dataset(cfg("cifar100", archive, tmp_path))
    archive.write_bytes(whole[:-4])  # only gzip's trailer (the length) is missing
    with pytest.raises(DataError, match=r"corrupt or truncated"):
        load_dataset(cfg("imagefolder", archive, tmp_path))
    assert not (tmp_path / "cache").exists()  # nothing partial is cached


def test_a_cifar_data_dir_naming_a_file(tmp_path, monkeypatch, capsys):
    """Another file is one error line (it was a traceback: the download's temporary file under a file);
    the official archive itself is unpacked beside it."""
    archive = write_copy(tmp_path)
    assert main(["data", "info", "cifar10", "--data-dir", str(archive)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedmr: error: CIFAR-10: data_dir ") and "is a file" in err and err.count("\n") == 1
    blob = official_archive(tmp_path)
    monkeypatch.setitem(cifar.RELEASES, "cifar10", dataclasses.replace(cifar.RELEASES["cifar10"],
                                                                        md5=hashlib.md5(blob).hexdigest()))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "cifar-10-python.tar.gz").write_bytes(blob)
    data = load_dataset(cfg("cifar10", tmp_path / "data" / "cifar-10-python.tar.gz", tmp_path))
    assert len(data.train_y) == 15 and (tmp_path / "data" / "cifar-10-batches-py").is_dir()


def test_data_info_says_the_split_is_not_the_official_one(tmp_path, capsys):
    archive = write_copy(tmp_path)
    assert main(["data", "info", "cifar100", "--data-dir", str(archive), "--set", f'cache_dir="{tmp_path / "c"}"']) == 0
    out = capsys.readouterr().out
    assert "train: 103 images, test: 5 images, 3x32x32" in out
    assert "classes: 20 (super00, super01" in out
    assert "normalization: auto (mean 0.4914/0.4822/0.4465, std 0.2023/0.1994/0.201)" in out
    assert "108 CIFAR-100 images as JPEG (cifar100-jpg.tar.gz)" in out and "100 fine classes of 1-2 train / 0-1 test" in out
    assert "is NOT the official train/test split" in out and "20 coarse superclasses" in out


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CIFAR100.is_file(), reason=f"the shared CIFAR-100 copy is absent ({SHARED_CIFAR100})")
def test_shared_cifar100_copy_loads_then_reads_its_cache_and_partitions(tmp_path, monkeypatch):
    """The real copy: 500/100 images per fine class, 2,500/500 per superclass; decoded once (about 12 s
    on a quiet core), then read from the cache."""
    config = load_config(None, ['dataset="cifar100"', f'data_dir="{SHARED_CIFAR100}"', f'cache_dir="{tmp_path}"'])
    data = load_dataset(config)
    assert len(data.train_y) == 50_000 and len(data.test_y) == 10_000 and data.num_classes == 20
    assert data.classes[0] == "aquatic_mammals" and data.classes[-1] == "vehicles_2"
    assert np.bincount(data.train_y.numpy()).tolist() == [2500] * 20
    assert np.bincount(data.test_y.numpy()).tolist() == [500] * 20
    monkeypatch.setattr(imagefolder, "decode_all", pytest.fail)
    fine = load_dataset(config.replace(dataset="cifar100-fine"))
    assert fine.classes[:3] == ["apple", "aquarium_fish", "baby"] and fine.classes[-1] == "worm"
    assert np.bincount(fine.train_y.numpy()).tolist() == [500] * 100
    table = json.loads((SHARED / "cifar100-coarse.json").read_text())["fine_to_coarse_id"]
    assert torch.equal(data.train_y, torch.tensor(table)[fine.train_y])
    parts = make_partition(config, data.train_y.numpy())  # 100 clients, Dirichlet(0.1)
    assert len(parts) == 100 and sum(map(len, parts)) == 50_000
