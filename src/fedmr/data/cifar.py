"""``dataset = "cifar10"`` / ``"cifar100"`` (20 coarse labels) / ``"cifar100-fine"`` (100 fine labels)
from the official pickled releases, or CIFAR-100 from a JPEG copy (``cifar100_jpg.py``).

``data_dir`` holds ``cifar-10-batches-py/`` or ``cifar-100-python/`` (or is that
folder).  When it is absent the official archive is used from ``data_dir`` or
downloaded, its MD5 checked, and unpacked there.  The pickles are read with an
unpickler that builds only numpy arrays and plain containers, so a doctored
file cannot run code.  For CIFAR-100, ``data_dir`` may instead name
``cifar100-jpg.tar.gz`` (or a folder holding it) with ``cifar100-coarse.json``
beside it; the official pickles win where a folder holds both.
"""

from __future__ import annotations

import codecs
import dataclasses
import pickle
import shutil
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from ..fileio import file_digest
from . import cifar100_jpg, normalization
from .base import DataSet, DataSource, register

DOWNLOAD_TIMEOUT_S = 30


@dataclass(frozen=True)
class Release:
    title: str
    folder: str
    archive: str
    url: str
    md5: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str
    names_key: str
    default_normalization: str


RELEASES = {
    "cifar10": Release(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
        tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "batches.meta",
        "labels", "label_names", "cifar10"),
    "cifar100": Release(
        "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
        ("train",), ("test",), "meta", "coarse_labels", "coarse_label_names", "cifar10-stats"),
}
RELEASES["cifar100-fine"] = dataclasses.replace(RELEASES["cifar100"], label_key="fine_labels",
                                                names_key="fine_label_names")
LABELS_NOTE = {
    "cifar100": "labels: the paper's 20 coarse superclasses, 5 fine classes each (dataset = \"cifar100-fine\" for the 100 "
                "fine labels)",
    "cifar100-fine": "labels: the 100 fine classes (dataset = \"cifar100\" for the paper's 20 coarse superclasses)",
}

def _safe_globals() -> dict[tuple[str, str], Any]:
    """The only callables a CIFAR pickle needs: numpy's array and dtype reconstruction."""
    multiarray: ModuleType  # from numpy._core (2.x) or numpy.core (1.x)
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray
    found = {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar}
    table: dict[tuple[str, str], Any] = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                                         ("_codecs", "encode"): codecs.encode}  # bytes in protocol-2 pickles
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table.update({(module, name): fn for name, fn in found.items()})
    return table


class _ArraysOnly(pickle.Unpickler):
    SAFE = _safe_globals()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.SAFE:
            return self.SAFE[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def read_pickle(path: Path) -> dict[str, Any]:
    """One batch file as a dict with str keys (the release is a Python 2 pickle with bytes keys)."""
    try:
        with path.open("rb") as fh:
            doc = _ArraysOnly(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise DataError(f"CIFAR file missing: {path} (the folder is incomplete; unpack the official archive again)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, OSError) as exc:
        raise DataError(f"CIFAR file {path} is corrupt or truncated: {exc}") from None
    if not isinstance(doc, dict):
        raise DataError(f"CIFAR file {path} is not a batch (expected a dict, got {type(doc).__name__})")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in doc.items()}


def read_batches(folder: Path, files: tuple[str, ...], label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (N, 32, 32, 3) images and int64 labels of the batch files, in file order."""
    images, labels = [], []
    for name in files:
        path = folder / name
        doc = read_pickle(path)
        data, y = doc.get("data"), doc.get(label_key)
        if not isinstance(data, np.ndarray) or y is None:
            raise DataError(f"CIFAR file {path} lacks 'data' or '{label_key}'")
        y = np.asarray(y)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataError(f"CIFAR file {path}: 'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
        if y.shape != (data.shape[0],) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"CIFAR file {path}: {data.shape[0]} images but {y.size} '{label_key}'")
        if y.size and (y.min() < 0 or y.max() >= num_classes):
            raise DataError(f"CIFAR file {path}: a label is outside 0..{num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(y.astype(np.int64))
    return np.concatenate(images), np.concatenate(labels)


def download(release: Release, target: Path) -> None:
    """Fetch the official archive to ``target`` (via a temporary name)."""
    tmp = target.with_name(target.name + ".part")
    try:
        with urllib.request.urlopen(release.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
            target.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("wb") as fh:
                shutil.copyfileobj(response, fh)
        tmp.replace(target)
    except (urllib.error.URLError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise DataError(
            f"{release.title} not found in {target.parent} and it cannot be downloaded ({reason}): download "
            f"{release.url} elsewhere and put it at {target} or unpack it there as {target.parent / release.folder}/"
        ) from None


def locate(release: Release, data_dir: Path) -> Path:
    """The unpacked release folder, unpacking (and first downloading) the official archive where needed."""
    if data_dir.is_file():
        if data_dir.name != release.archive:
            other = ("" if release.folder == RELEASES["cifar100"].folder else
                     "; a JPEG copy in train/<class>/ folders reads as dataset = \"imagefolder\"")
            raise DataError(f"{release.title}: data_dir {data_dir} is a file, not the official {release.archive}: set "
                            f"it to the folder holding {release.folder}/ or {release.archive}{other}")
        data_dir = data_dir.parent  # the official archive itself: unpacked beside it
    if data_dir.name == release.folder and data_dir.is_dir():
        return data_dir
    folder = data_dir / release.folder
    if folder.is_dir():
        return folder
    archive = data_dir / release.archive
    if not archive.is_file():
        download(release, archive)
    found = file_digest(archive, "md5")
    if found != release.md5:
        raise DataError(f"{release.title} archive {archive} fails its checksum (md5 {found}, expected {release.md5}): "
                        f"delete it and download it again")
    try:
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(data_dir, filter="data")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{release.title} archive {archive} cannot be unpacked: {exc}") from None
    if not folder.is_dir():
        raise DataError(f"{release.title} archive {archive} holds no {release.folder}/ folder")
    return folder


def load_release(source: DataSource, key: str) -> DataSet:
    release = RELEASES[key]
    data_dir = Path(source.data_dir).expanduser()
    jpeg = cifar100_jpg.find(data_dir, release.folder, release.archive) if key in LABELS_NOTE else None
    if jpeg is not None:
        return from_jpeg(source, key, cifar100_jpg.load(jpeg, source.cache_dir))
    folder = locate(release, data_dir)
    names = [n.decode("latin1") if isinstance(n, bytes) else str(n)
             for n in read_pickle(folder / release.meta_file).get(release.names_key, [])]
    if not names:
        raise DataError(f"CIFAR file {folder / release.meta_file} lacks '{release.names_key}'")
    train_x, train_y = read_batches(folder, release.train_files, release.label_key, len(names))
    test_x, test_y = read_batches(folder, release.test_files, release.label_key, len(names))
    notes = (f"copy: the official pickled release ({folder})",) + ((LABELS_NOTE[key],) if key in LABELS_NOTE else ())
    return dataset(source, key, (train_x, train_y, test_x, test_y), names, notes)


def from_jpeg(source: DataSource, key: str, copy: cifar100_jpg.JpegCopy) -> DataSet:
    """The JPEG copy with the coarse labels (``cifar100``) or its fine ones (``cifar100-fine``)."""
    coarse = key == "cifar100"
    labels = (lambda fine: copy.table.fine_to_coarse[fine]) if coarse else (lambda fine: fine)
    names = copy.table.coarse_names if coarse else copy.table.fine_names
    notes = (cifar100_jpg.copy_note(copy), cifar100_jpg.SPLIT_NOTE, LABELS_NOTE[key])
    return dataset(source, key, (copy.train_x, labels(copy.train_fine), copy.test_x, labels(copy.test_fine)), names,
                   notes)


def dataset(source: DataSource, key: str, arrays: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
            names: list[str], notes: tuple[str, ...]) -> DataSet:
    """uint8 (N, 32, 32, 3) images and int labels -> the normalised DataSet (the paper's statistics by default)."""
    train_x, train_y, test_x, test_y = arrays
    affine = normalization.resolve(source.normalization, RELEASES[key].default_normalization, 3)
    return DataSet(
        name=key,
        train_x=normalization.to_tensor(train_x, affine), train_y=torch.from_numpy(np.asarray(train_y, np.int64)),
        test_x=normalization.to_tensor(test_x, affine), test_y=torch.from_numpy(np.asarray(test_y, np.int64)),
        num_classes=len(names), classes=list(names), default_model="cnn", normalization=affine, notes=notes,
    )


@register("cifar10")
def load_cifar10(source: DataSource) -> DataSet:
    return load_release(source, "cifar10")


@register("cifar100")
def load_cifar100(source: DataSource) -> DataSet:
    """CIFAR-100 with its 20 coarse superclass labels, as in the paper."""
    return load_release(source, "cifar100")


@register("cifar100-fine")
def load_cifar100_fine(source: DataSource) -> DataSet:
    """CIFAR-100 with its 100 fine labels (not in the paper)."""
    return load_release(source, "cifar100-fine")
