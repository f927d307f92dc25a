"""Crash-safe file writing and file digests, shared by results, checkpoints and data loaders."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """``<path>.<pid>.tmp``: the process id keeps two processes that write the same file at once
    (two ``fedmr study run`` lanes rewriting a study's cells.json) from renaming each other's file."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def atomic_write(path: Path, write: Callable[[Path], object], before_rename: Callable[[], None] | None = None) -> None:
    """``write`` fills ``temporary_name(path)``, which is fsynced and renamed onto ``path``: a crash
    leaves either the old file or the new one, never half of one."""
    tmp = temporary_name(path)
    write(tmp)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
    if before_rename is not None:
        before_rename()
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(Path(path), lambda tmp: tmp.write_text(text))


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digest(path: Path, algorithm: str = "sha256") -> str:
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_writable_folder(folder: Path | str) -> None:
    """Refuse, before any work, a results folder that cannot be written: a file in its path, a
    read-only place, no permission.  It makes the missing folders and a probe file, then removes
    them all again, so a run that fails later (bad data) leaves nothing behind."""
    from .errors import ConfigError

    folder = Path(folder)
    lineage = [folder, *folder.parents]
    for place in lineage:
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                what = "the output path" if place == folder else f"{place}, in the output path,"
                raise ConfigError(f"cannot write the results folder {folder}: {what} is a file, not a folder")
            break
    created: list[Path] = []
    try:
        for place in reversed([p for p in lineage if not p.exists()]):
            place.mkdir()
            created.append(place)
        probe = folder / f".fedmr-write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"cannot write the results folder {folder}: {exc.strerror or exc}") from None
    finally:
        for place in reversed(created):
            try:
                place.rmdir()
            except OSError:
                pass
