"""FEMNIST from ``femnist.npz`` (the shared copy of real LEAF FEMNIST; ``femnist-manifest.json`` beside it).

Arrays: ``x`` uint8 (N, 28, 28) = round(255 * LEAF value) (255 is the white background), ``y``
labels, ``writer`` (index into ``writer_ids``), ``split`` (0 = train, 1 = test: LEAF's own
per-writer split); ``run``, ``writer_run`` and ``run_repositories`` say which LEAF run each
sample came from.  Samples are ordered writer by writer in ``writer_ids`` order, each writer's in
the file's order: the order of the LEAF JSON with those writers in one file, so both readers give
the same tensors.  Read with ``allow_pickle=False``: a doctored file cannot run code.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import DataError

NPZ = "femnist.npz"
MANIFEST = "femnist-manifest.json"
REQUIRED = ("x", "y", "writer", "split", "writer_ids")
SUBSET_NOTE = ("subset: the shared femnist.npz is LEAF's own sample (-s niid --sf 0.05 -k 0 -t sample --tf 0.9) "
               "restricted to the shards whose files could be had, the small ones: it is biased towards writers with "
               "fewer samples (about half as many as the writers left out; full LEAF FEMNIST has about 226 per writer) "
               "and towards digits; see ../shared/data/README.md")


def find(data_dir: Path) -> Path | None:
    """The npz ``data_dir`` names: the file itself, or ``femnist.npz`` in a folder without LEAF's ``train/``."""
    if data_dir.is_file():
        return data_dir
    if data_dir.is_dir() and not (data_dir / "train").is_dir() and (data_dir / NPZ).is_file():
        return data_dir / NPZ
    return None


def read_npz(path: Path, side: int, num_classes: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The arrays in the JSON reader's form (``train_x``/``test_x`` uint8 (n, side, side, 1), labels,
    ``writer_sizes`` of the training parts) and meta (writers, each writer's test size, provenance)."""
    try:
        with np.load(path, allow_pickle=False) as doc:
            missing = [name for name in REQUIRED if name not in doc.files]
            if missing:
                raise DataError(f"FEMNIST file {path} lacks the array '{missing[0]}' (it needs {', '.join(REQUIRED)})")
            d = {name: doc[name] for name in doc.files}
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"FEMNIST file not found: {path}") from None
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
        raise DataError(f"FEMNIST file {path} is corrupt or truncated: {exc}") from None
    x, y, writer, split, ids = d["x"], d["y"], d["writer"], d["split"], d["writer_ids"]
    n = len(x)
    if x.dtype != np.uint8 or x.shape[1:] != (side, side):
        raise DataError(f"FEMNIST file {path}: 'x' must be uint8 (N, {side}, {side}), got {x.dtype} {x.shape}")
    for name, a in (("y", y), ("writer", writer), ("split", split)):
        if a.shape != (n,) or not np.issubdtype(a.dtype, np.integer):
            raise DataError(f"FEMNIST file {path}: '{name}' must hold one integer per image ({n}), got {a.dtype} {a.shape}")
    if ids.ndim != 1 or ids.dtype.kind != "U":
        raise DataError(f"FEMNIST file {path}: 'writer_ids' must be a list of strings, got {ids.dtype} {ids.shape}")
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise DataError(f"FEMNIST file {path}: a label is outside 0..{num_classes - 1}")
    if n and (writer.min() < 0 or writer.max() >= len(ids)):
        raise DataError(f"FEMNIST file {path}: a writer index is outside 0..{len(ids) - 1} (writer_ids has {len(ids)})")
    if n and not np.isin(split, (0, 1)).all():
        raise DataError(f"FEMNIST file {path}: 'split' must be 0 (train) or 1 (test)")
    arrays: dict[str, np.ndarray] = {}
    for part, flag in (("train", 0), ("test", 1)):
        rows = np.flatnonzero(split == flag)
        rows = rows[np.argsort(writer[rows], kind="stable")]  # writer by writer, each in the file's order
        arrays[f"{part}_x"] = x[rows].reshape(-1, side, side, 1)
        arrays[f"{part}_y"] = y[rows].astype(np.int64)
        arrays[f"{part}_sizes"] = np.bincount(writer[rows], minlength=len(ids))
    if not arrays["train_y"].size:
        raise DataError(f"FEMNIST file {path} holds no training samples")
    arrays["writer_sizes"] = arrays.pop("train_sizes")
    meta = {"writers": [str(w) for w in ids], "test_sizes": arrays.pop("test_sizes").tolist(),
            "runs": _runs(d, path)}
    return arrays, meta


def _runs(d: dict[str, np.ndarray], path: Path) -> list[str]:
    """'repository: W writers' per LEAF run (from the arrays; the manifest adds the snapshot commits)."""
    if "run_repositories" not in d or "writer_run" not in d:
        return []
    repos = [str(r) for r in d["run_repositories"]]
    counts = np.bincount(d["writer_run"].astype(np.int64), minlength=len(repos))
    commits = {}
    try:
        manifest = json.loads((path.parent / MANIFEST).read_text())
        commits = {int(r["run"]): str(r["commit"])[:8] for r in manifest.get("runs", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # absent or unreadable: provenance only
        pass
    return [f"{repo}" + (f"@{commits[i]}" if i in commits else "") + f" ({int(counts[i])} writers)"
            for i, repo in enumerate(repos)]
