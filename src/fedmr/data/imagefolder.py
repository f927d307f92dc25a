"""``dataset = "imagefolder"``: ``train/<class>/*`` and ``test/<class>/*`` image files, in a folder or a .tar.gz.

Labels follow the sorted class names of ``train/``; samples are indexed class
by class in that order and, within a class, by sorted file name, so a saved
partition stays valid on every machine.  Pillow decodes each image once; the
uint8 arrays are cached (see ``cache.py``), so later loads take seconds.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any, cast

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from . import cache, normalization
from .base import DataSet, DataSource, register

SPLITS = ("train", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff"}
GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}
DEFAULT_NORMALIZATION = "cifar10"  # mean 0.5, std 0.5: the paper's CIFAR-10 setting


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES


def decode_image(data: bytes, where: str) -> np.ndarray:
    """(H, W, C) uint8, C = 1 for grayscale files and 3 otherwise; a file that does not decode is an error."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            converted = img.convert("L" if img.mode in GRAY_MODES else "RGB")
            pixels = np.asarray(converted, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise DataError(f"image {where} does not decode: {exc}") from None
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


Record = tuple[str, str, str, bytes]  # split, class, file name, encoded bytes


def folder_files(root: Path) -> list[Path]:
    """Every image file under ``root/train`` and ``root/test`` (what the cache key covers)."""
    if not (root / "train").is_dir():
        raise DataError(f"image folder {root} has no train/ folder (expected train/<class>/* and test/<class>/*)")
    files = []
    for split in SPLITS:
        for class_dir in sorted(p for p in (root / split).glob("*") if p.is_dir() and not p.name.startswith(".")):
            files.extend(sorted(p for p in class_dir.iterdir() if p.is_file() and is_image_name(p.name)))
    return files


def folder_classes(root: Path, split: str) -> list[str]:
    base = root / split
    return sorted(p.name for p in base.glob("*") if p.is_dir() and not p.name.startswith(".")) if base.is_dir() else []


def read_folder(root: Path) -> tuple[Iterator[Record], dict[str, set[str]]]:
    classes = {split: set(folder_classes(root, split)) for split in SPLITS}

    def records() -> Iterator[Record]:
        for path in folder_files(root):
            rel = path.relative_to(root)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise DataError(f"cannot read image {path}: {exc.strerror}") from None
            yield rel.parts[0], rel.parts[1], rel.parts[2], data

    return records(), classes


def read_tar(path: Path, classes: dict[str, set[str]]) -> Iterator[Record]:
    """Stream the archive once; members are ``[prefix/]split/class/file``.

    A gzip archive is decompressed here and read to its end: tarfile's stream mode takes a cut that
    falls between two members for the end of the archive, gzip's end-of-stream check does not."""
    try:
        with path.open("rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
            fh.seek(0)
            stream = cast(IO[bytes], gzip.GzipFile(fileobj=fh) if gz else fh)
            with tarfile.open(fileobj=stream, mode="r|" if gz else "r|*") as tar:
                yield from _members(tar, classes)
            while gz and stream.read(1 << 20):  # the rest (tar padding) up to gzip's end-of-stream marker and CRC
                pass
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise DataError(f"archive {path} is corrupt or truncated: {exc}") from None


def _members(tar: tarfile.TarFile, classes: dict[str, set[str]]) -> Iterator[Record]:
    for member in tar:
        parts = [p for p in member.name.split("/") if p not in ("", ".")]
        if member.isdir() and len(parts) >= 2 and parts[-2] in SPLITS and not parts[-1].startswith("."):
            classes[parts[-2]].add(parts[-1])
        if not member.isfile() or len(parts) < 3 or parts[-3] not in SPLITS or not is_image_name(parts[-1]):
            continue
        split, label = parts[-3], parts[-2]
        classes[split].add(label)
        handle = tar.extractfile(member)
        yield split, label, parts[-1], handle.read() if handle else b""


def decode_all(source: Path, site: bool = False) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Decode every image of the source into uint8 (N, H, W, C) arrays in the canonical order.

    ``site``: one client's folder of a federation (``fedmr partition --export``), where a class
    folder may be empty because this site holds none of that class; the caller checks the rest."""
    if source.is_dir():
        records, classes = read_folder(source)
    else:
        classes = {split: set() for split in SPLITS}
        records = read_tar(source, classes)
    decoded: dict[str, list[tuple[str, str, np.ndarray]]] = {split: [] for split in SPLITS}
    for split, label, name, data in records:
        decoded[split].append((label, name, decode_image(data, f"{source}:{split}/{label}/{name}")))

    names = sorted(classes["train"])
    if not decoded["train"] and not site:
        raise DataError(f"image folder {source} has no training images (expected train/<class>/*.jpg|png)")
    extra = sorted(classes["test"] - classes["train"])
    if extra:
        raise DataError(f"image folder {source}: test/ has classes not in train/: {', '.join(extra)}")
    have = {label for label, _, _ in decoded["train"]}
    empty = [c for c in names if c not in have]
    if empty and not site:
        raise DataError(f"image folder {source}: train/{empty[0]} holds no images")
    index = {c: i for i, c in enumerate(names)}

    first = (decoded["train"] or decoded["test"] or [("", "", np.zeros((0, 0, 1), np.uint8))])[0]
    shape = first[2].shape[:2]
    colour = any(px.shape[2] == 3 for split in SPLITS for _, _, px in decoded[split])
    arrays: dict[str, np.ndarray] = {}
    for split in SPLITS:
        items = sorted(decoded[split], key=lambda item: (index[item[0]], item[1]))
        for label, name, px in items:
            if px.shape[:2] != shape:
                raise DataError(f"image {source}:{split}/{label}/{name} is {px.shape[1]}x{px.shape[0]}, the others "
                                f"{shape[1]}x{shape[0]}: all images must have one size")
        pixels = [np.repeat(px, 3, axis=2) if colour and px.shape[2] == 1 else px for _, _, px in items]
        arrays[f"{split}_x"] = (np.stack(pixels) if pixels else np.zeros((0, *shape, 3 if colour else 1), np.uint8))
        arrays[f"{split}_y"] = np.array([index[label] for label, _, _ in items], dtype=np.int64)
    return arrays, {"classes": names, "source": str(source)}


@register("imagefolder")
def load_imagefolder(config: DataSource) -> DataSet:
    source = Path(config.data_dir).expanduser()
    if not source.exists():
        raise DataError(f"image folder not found: {source} (set data_dir to a folder with train/<class>/* and "
                        f"test/<class>/*, or to a .tar.gz of one)")
    arrays, meta = decoded(source, config.cache_dir)
    channels = arrays["train_x"].shape[3]
    affine = normalization.resolve(config.normalization, DEFAULT_NORMALIZATION, channels)
    return DataSet(
        name=source_name(source),
        train_x=normalization.to_tensor(arrays["train_x"], affine), train_y=_labels(arrays["train_y"]),
        test_x=normalization.to_tensor(arrays["test_x"], affine), test_y=_labels(arrays["test_y"]),
        num_classes=len(meta["classes"]), classes=list(meta["classes"]), default_model="cnn",
        normalization=affine,
    )


def decoded(source: Path, cache_dir: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The uint8 arrays of a folder or archive (``decode_all``), decoded once and then read from the cache."""
    files = folder_files(source) if source.is_dir() else []
    return cache.cached("imagefolder", source, cache_dir, lambda: decode_all(source), files)


def source_name(source: Path) -> str:
    """What plots and logs call the data: the folder or archive name (cifar10-jpg.tar.gz -> cifar10-jpg)."""
    name = source.resolve().name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.asarray(y, dtype=np.int64))
