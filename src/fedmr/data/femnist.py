"""``dataset = "femnist"``: LEAF's JSON files or the shared ``femnist.npz`` (``femnist_npz.py``), one client per writer.

``data_dir`` holds ``train/*.json`` and ``test/*.json`` (or names ``femnist.npz``, or a folder
holding it); each file has
``users``, ``num_samples`` and ``user_data`` (``x``: 784 floats in [0, 1] per
image, ``y``: labels 0..61).  Training samples are indexed writer by writer
(files in sorted name order, writers in file order), so the natural partition
is one contiguous block per writer; the test set is the union of all writers'
test parts.  The paper maps pixels to (0.5 - x) / 0.5.  The parsed arrays are
cached, since parsing the JSON is the slow part.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import DataError
from . import cache, femnist_npz, normalization
from .base import DataSet, DataSource, register, size_summary

SIDE = 28
NUM_CLASSES = 62
CLASSES = list(string.digits + string.ascii_uppercase + string.ascii_lowercase)  # LEAF's label order
DEFAULT_NORMALIZATION = "femnist"


def json_files(root: Path, split: str) -> list[Path]:
    files = sorted((root / split).glob("*.json"))
    if not files:
        raise DataError(f"FEMNIST folder {root} has no {split}/*.json files (LEAF's layout: train/*.json, test/*.json)")
    return files


def read_leaf_file(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(writer, float32 (n, 784) pixels, int64 (n,) labels) per writer, checking every count."""
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"LEAF file {path} is not valid JSON (truncated?): {exc}") from None
    except OSError as exc:
        raise DataError(f"cannot read LEAF file {path}: {exc.strerror}") from None
    if not isinstance(doc, dict) or not all(k in doc for k in ("users", "num_samples", "user_data")):
        raise DataError(f"LEAF file {path} lacks 'users', 'num_samples' or 'user_data'")
    users, counts, data = doc["users"], doc["num_samples"], doc["user_data"]
    if not isinstance(users, list) or not isinstance(counts, list) or len(users) != len(counts):
        raise DataError(f"LEAF file {path}: {len(users)} users but {len(counts)} num_samples")
    writers = []
    for user, count in zip(users, counts):
        part = data.get(user) if isinstance(data, dict) else None
        if not isinstance(part, dict) or "x" not in part or "y" not in part:
            raise DataError(f"LEAF file {path}: user_data has no 'x'/'y' for writer {user!r}")
        try:
            x = np.asarray(part["x"], dtype=np.float32)
            y = np.asarray(part["y"], dtype=np.int64)
        except (ValueError, TypeError):
            raise DataError(f"LEAF file {path}: writer {user!r} has an image that is not {SIDE * SIDE} numbers") from None
        if len(part["x"]) != count or len(part["y"]) != count:
            raise DataError(f"LEAF file {path}: writer {user!r} has num_samples {count} but "
                            f"{len(part['x'])} x and {len(part['y'])} y")
        if count and (x.ndim != 2 or x.shape[1] != SIDE * SIDE):
            raise DataError(f"LEAF file {path}: writer {user!r} has an image that is not {SIDE * SIDE} numbers")
        if y.size and (y.min() < 0 or y.max() >= NUM_CLASSES):
            raise DataError(f"LEAF file {path}: writer {user!r} has a label outside 0..{NUM_CLASSES - 1}")
        writers.append((str(user), x.reshape(count, SIDE * SIDE), y))
    return writers


def read_split(root: Path, split: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    writers, seen = [], set()
    for path in json_files(root, split):
        for writer in read_leaf_file(path):
            if writer[0] in seen:
                raise DataError(f"LEAF file {path}: writer {writer[0]!r} appears twice in {split}/")
            seen.add(writer[0])
            writers.append(writer)
    return writers


def compact(x: np.ndarray) -> np.ndarray:
    """uint8 when every pixel is k/255 (LEAF's own output), else float32: the cache holds the exact values."""
    q = np.rint(x * 255.0)
    if x.size and np.abs(q / 255.0 - x).max() <= 1e-6:
        return q.astype(np.uint8)
    return x.astype(np.float32)


def parse(root: Path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    train, test = read_split(root, "train"), read_split(root, "test")
    arrays: dict[str, np.ndarray] = {}
    for split, writers in (("train", train), ("test", test)):
        x = np.concatenate([w[1] for w in writers]) if writers else np.zeros((0, SIDE * SIDE), np.float32)
        arrays[f"{split}_x"] = x.reshape(-1, SIDE, SIDE, 1)
        arrays[f"{split}_y"] = np.concatenate([w[2] for w in writers]) if writers else np.zeros(0, np.int64)
    both = compact(np.concatenate([arrays["train_x"], arrays["test_x"]]))  # one dtype for both splits
    arrays["train_x"], arrays["test_x"] = both[:len(arrays["train_y"])], both[len(arrays["train_y"]):]
    arrays["writer_sizes"] = np.array([len(w[2]) for w in train], dtype=np.int64)
    if not arrays["train_y"].size:
        raise DataError(f"FEMNIST folder {root} holds no training samples")
    return arrays, {"writers": [w[0] for w in train], "source": str(root), "test_sizes": [len(w[2]) for w in test]}


@register("femnist")
def load_femnist(source: DataSource) -> DataSet:
    root = Path(source.data_dir).expanduser()
    npz = femnist_npz.find(root)
    if npz is not None:
        arrays, meta = femnist_npz.read_npz(npz, SIDE, NUM_CLASSES)
        notes = [f"copy: {npz.name}, real LEAF FEMNIST from {len(meta['runs'])} LEAF runs: {'; '.join(meta['runs'])}",
                 femnist_npz.SUBSET_NOTE]
    else:
        if not root.is_dir():
            raise DataError(f"FEMNIST folder not found: {root} (set data_dir to LEAF's data folder with train/*.json "
                            f"and test/*.json, or to {femnist_npz.NPZ})")
        files = json_files(root, "train") + json_files(root, "test")
        arrays, meta = cache.cached("femnist", root, source.cache_dir, lambda: parse(root), files)
        notes = [f"copy: LEAF JSON files ({len(files)} in {root}/train and test)"]
    labels = np.concatenate([arrays["train_y"], arrays["test_y"]])
    shares = [100 * float(np.mean((labels >= lo) & (labels < hi))) for lo, hi in ((0, 10), (10, 36), (36, 62))]
    notes.append("samples: digits {:.1f}%, uppercase {:.1f}%, lowercase {:.1f}%".format(*shares))
    if meta.get("test_sizes"):
        notes.append(f"test: each writer's own test part (LEAF's split), pooled; per writer {size_summary(meta['test_sizes'])}")
    affine = normalization.resolve(source.normalization, DEFAULT_NORMALIZATION, 1)
    scale = 1 / 255 if arrays["train_x"].dtype == np.uint8 else 1.0
    ends = np.cumsum(arrays["writer_sizes"])
    natural = [list(range(int(end - size), int(end))) for size, end in zip(arrays["writer_sizes"], ends)]
    return DataSet(
        name="femnist",
        train_x=normalization.to_tensor(arrays["train_x"], affine, scale),
        train_y=torch.from_numpy(arrays["train_y"].astype(np.int64)),
        test_x=normalization.to_tensor(arrays["test_x"], affine, scale),
        test_y=torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=NUM_CLASSES, classes=CLASSES, natural_partition=natural, default_model="cnn_femnist",
        normalization=affine, notes=tuple(notes),
    )

