"""CIFAR-100 from a JPEG copy: ``cifar100-jpg.tar.gz`` (``train/<fine_class>/NNNN.jpg``,
``test/<fine_class>/NNNN.jpg``, or that layout unpacked) with ``cifar100-coarse.json`` beside it.

The fine class folders, in sorted order, are the official fine label ids 0-99; the table gives
``fine_label_names``, ``coarse_label_names`` and ``fine_to_coarse_id`` (the official superclass
of each fine id), and is checked against the folders.  The images are decoded once by the
image-folder reader and cached (the same cache entry as ``dataset = "imagefolder"`` on the same
archive).  The shared copy's train/test split is not the official one (see ``SPLIT_NOTE``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import imagefolder

ARCHIVE = "cifar100-jpg.tar.gz"
COARSE_TABLE = "cifar100-coarse.json"
NUM_FINE, NUM_COARSE = 100, 20
SPLIT_NOTE = ("split: the archive's own. The shared cifar100-jpg.tar.gz is NOT the official train/test split: its "
              "source had merged them, so each fine class was re-split 500 train / 100 test with a fixed seed "
              "(../shared/data/README.md); test accuracies are comparable with, not identical to, the official test set's")


@dataclass(frozen=True)
class CoarseTable:
    fine_names: list[str]
    coarse_names: list[str]
    fine_to_coarse: np.ndarray  # int64 (100,): the coarse id of each fine id


@dataclass(frozen=True)
class JpegCopy:
    train_x: np.ndarray  # uint8 (N, 32, 32, 3)
    train_fine: np.ndarray  # int64 fine ids
    test_x: np.ndarray
    test_fine: np.ndarray
    table: CoarseTable
    source: Path


def find(data_dir: Path, official_folder: str, official_archive: str) -> Path | None:
    """The JPEG copy ``data_dir`` names, or None where it holds (or names) the official release:
    an archive other than the official one, a folder holding ``cifar100-jpg.tar.gz``, or an
    unpacked copy (a folder with ``train/``).  The official pickles win where both are present."""
    if data_dir.is_file():
        return None if data_dir.name == official_archive else data_dir
    if not data_dir.is_dir() or data_dir.name == official_folder or (data_dir / official_folder).is_dir():
        return None
    if (data_dir / ARCHIVE).is_file():
        return data_dir / ARCHIVE
    return data_dir if (data_dir / "train").is_dir() else None


def table_path(source: Path) -> Path:
    """``cifar100-coarse.json`` beside the archive, or in (else beside) an unpacked copy's folder."""
    if source.is_dir() and (source / COARSE_TABLE).is_file():
        return source / COARSE_TABLE
    return source.parent / COARSE_TABLE


def read_table(path: Path) -> CoarseTable:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"CIFAR-100 coarse table not found: {path} (the JPEG copy needs {COARSE_TABLE} beside it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"CIFAR-100 coarse table {path} is not valid JSON (truncated?): {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read the CIFAR-100 coarse table {path}: {exc.strerror}") from None
    fine = doc.get("fine_label_names") if isinstance(doc, dict) else None
    coarse = doc.get("coarse_label_names") if isinstance(doc, dict) else None
    ids = doc.get("fine_to_coarse_id") if isinstance(doc, dict) else None
    if not (isinstance(fine, list) and isinstance(coarse, list) and isinstance(ids, list)):
        raise DataError(f"CIFAR-100 coarse table {path} lacks 'fine_label_names', 'coarse_label_names' or "
                        f"'fine_to_coarse_id'")
    if len(fine) != NUM_FINE or len(coarse) != NUM_COARSE or len(ids) != NUM_FINE:
        raise DataError(f"CIFAR-100 coarse table {path}: expected {NUM_FINE} fine names, {NUM_COARSE} coarse names "
                        f"and {NUM_FINE} coarse ids, got {len(fine)}, {len(coarse)} and {len(ids)}")
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < NUM_COARSE for i in ids):
        raise DataError(f"CIFAR-100 coarse table {path}: a fine_to_coarse_id is outside 0..{NUM_COARSE - 1}")
    return CoarseTable([str(n) for n in fine], [str(n) for n in coarse], np.asarray(ids, dtype=np.int64))


def load(source: Path, cache_dir: str) -> JpegCopy:
    """The decoded (cached) copy, its fine labels checked against the table's names."""
    table = read_table(table_path(source))
    arrays, meta = imagefolder.decoded(source, cache_dir)
    classes = list(meta["classes"])
    if classes != table.fine_names:
        missing = sorted(set(table.fine_names) - set(classes))
        extra = sorted(set(classes) - set(table.fine_names))
        what = (f"no folder for {missing[0]}" if missing else f"a folder {extra[0]} the table does not name" if extra
                else "the folders' sorted order differs from the table's fine_label_names")
        raise DataError(f"CIFAR-100 JPEG copy {source}: its {len(classes)} class folders do not match the "
                        f"{NUM_FINE} fine classes of {COARSE_TABLE}: {what}")
    shape = arrays["train_x"].shape[1:]
    if shape != (32, 32, 3):
        raise DataError(f"CIFAR-100 JPEG copy {source}: images are {'x'.join(map(str, shape))}, expected 32x32 RGB")
    return JpegCopy(arrays["train_x"], np.asarray(arrays["train_y"], np.int64), arrays["test_x"],
                    np.asarray(arrays["test_y"], np.int64), table, source)


def copy_note(copy: JpegCopy) -> str:
    """What the copy holds: its images and the fine classes' sizes (computed, so true of any copy)."""
    train = np.bincount(copy.train_fine, minlength=NUM_FINE)
    test = np.bincount(copy.test_fine, minlength=NUM_FINE)

    def each(counts: np.ndarray) -> str:
        return f"{counts.min()}" if counts.min() == counts.max() else f"{counts.min()}-{counts.max()}"

    return (f"copy: {len(copy.train_fine) + len(copy.test_fine)} CIFAR-100 images as JPEG ({copy.source.name}), fine "
            f"classes by {COARSE_TABLE}: {NUM_FINE} fine classes of {each(train)} train / {each(test)} test images")
