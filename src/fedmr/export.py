"""``fedmr partition --export DIR``: one image folder per client, to rehearse a real federation.

``DIR/client-007/train/<class>/*.png`` holds exactly the samples that ``fedmr run`` gives client 7
(the same config draws the same partition), and ``DIR/client-007/test/<class>/*.png`` its held-out
local test part: the data set's test split dealt out class by class in proportion to each client's
share of that class in training, so a site is tested on its own label mix and the parts together
are the whole test split (the sample-weighted accuracy over all sites is the test-set accuracy).
Every client folder has every class folder, empty ones too, so all sites agree on the classes.
A SuperNode reads its folder with ``--node-config "data-dir=DIR/client-007"`` and the run config
``flower.data = "node"``, ``dataset = "imagefolder"`` and the ``normalization`` printed here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .data import DataSet, load_dataset
from .data.normalization import NORMALIZATIONS, resolve
from .errors import DataError
from .fileio import atomic_write_text
from .partition import Partition, PartitionSpec, config_json, make_partition, summarize
from .seeding import numpy_rng


def local_test_parts(parts: Partition, train_y: np.ndarray, test_y: np.ndarray, num_classes: int, seed: int) -> Partition:
    """The test split dealt out per class in proportion to each client's training count of that class
    (largest remainders; ties to the lower client id); a class no client trains on stays unassigned."""
    counts = np.stack([np.bincount(train_y[p], minlength=num_classes) for p in parts]).astype(np.float64)
    rng = numpy_rng(seed, "export-test")
    out: list[list[int]] = [[] for _ in parts]
    for c in range(num_classes):
        pool = np.flatnonzero(test_y == c)
        rng.shuffle(pool)
        weights = counts[:, c]
        if weights.sum() == 0 or len(pool) == 0:
            continue
        share = len(pool) * weights / weights.sum()
        take = np.floor(share).astype(int)
        order = sorted(range(len(parts)), key=lambda i: (-(share[i] - take[i]), i))
        for i in order[: len(pool) - int(take.sum())]:
            take[i] += 1
        start = 0
        for i, n in enumerate(take):
            out[i].extend(int(j) for j in pool[start:start + n])
            start += n
    return [sorted(p) for p in out]


def to_pixels(x: torch.Tensor, data: DataSet) -> np.ndarray:
    """Normalised (N, C, H, W) tensors back to (N, H, W, C) uint8 (8-bit: finer steps are rounded)."""
    if x.dim() != 4:
        raise DataError(f"data set '{data.name}' has samples of shape {tuple(x.shape[1:])}, not images (C, H, W): "
                        "--export writes each client's samples as PNG images; for other data use --out "
                        "partition.json (the clients' sample indices)")
    if x.shape[1] not in (1, 3):
        raise DataError(f"data set '{data.name}' has images of {x.shape[1]} channels; PNG needs 1 or 3")
    if data.normalization is None:
        raise DataError(f"data set '{data.name}' does not say how its pixels were normalised, so its images cannot "
                        "be written back as PNGs; a loader declares it as an attribute, e.g. loader.normalization = "
                        "\"none\" (samples are pixels in [0, 1]) or ((mean, ...), (std, ...)) (docs/api.md)")
    mean, std = (torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1) for v in data.normalization)
    pixels = ((x.float().cpu() * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def class_folders(classes: Sequence[str], num_classes: int) -> list[str]:
    """Folder names that sort in label order (the image-folder loader labels by sorted name)."""
    names = [str(c) for c in classes] if len(classes) == num_classes else [str(c) for c in range(num_classes)]
    if sorted(names) == names and len(set(names)) == len(names):
        return names
    width = len(str(num_classes - 1))
    return [f"{i:0{width}d}-{name}" for i, name in enumerate(names)]


def normalization_name(data: DataSet) -> str | None:
    """The config value of ``normalization`` that gives these pixels again from the PNGs."""
    channels = data.in_channels
    for name in NORMALIZATIONS:
        try:
            affine = resolve(name, name, channels)
        except DataError:
            continue
        if data.normalization is not None and all(np.allclose(a, b) for a, b in zip(affine, data.normalization)):
            return name
    return None


def write_images(folder: Path, pixels: np.ndarray, labels: np.ndarray, indices: Sequence[int], names: Sequence[str]) -> None:
    from PIL import Image

    for name in names:
        (folder / name).mkdir(parents=True, exist_ok=True)
    for i in indices:
        px = pixels[i]
        image = Image.fromarray(px[:, :, 0], "L") if px.shape[2] == 1 else Image.fromarray(px, "RGB")
        image.save(folder / names[int(labels[i])] / f"{int(i):06d}.png")


def export_partition(cfg: Mapping[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Write the client folders; returns the partition document (also DIR/partition.json)."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"export folder {out} is not empty; choose a new one")
    data = load_dataset(cfg)
    spec = PartitionSpec.of(cfg)
    train_y, test_y = data.train_y.cpu().numpy(), data.test_y.cpu().numpy()
    parts = make_partition(spec, train_y, data.natural_partition)
    tests = local_test_parts(parts, train_y, test_y, data.num_classes, spec.seed)
    names = class_folders(data.classes, data.num_classes)
    train_px, test_px = to_pixels(data.train_x, data), to_pixels(data.test_x, data)
    width = max(3, len(str(len(parts) - 1)))
    for client, (train, test) in enumerate(zip(parts, tests)):
        site = out / f"client-{client:0{width}d}"
        write_images(site / "train", train_px, train_y, train, names)
        write_images(site / "test", test_px, test_y, test, names)
    doc = config_json(parts, cfg)
    doc.update(seed=spec.seed, summary=summarize(parts, train_y, data.num_classes),
               test_parts=[list(map(int, t)) for t in tests], classes=names, normalization=normalization_name(data))
    atomic_write_text(out / "partition.json", json.dumps(doc))
    return doc
