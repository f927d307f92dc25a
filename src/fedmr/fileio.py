"""Crash-safe file writing and file digests, shared by results, checkpoints and data loaders."""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: folders are not locked
    fcntl = None  # type: ignore[assignment]


def temporary_name(path: Path) -> Path:
    """``<path>.<pid>-<thread>.tmp``: the process and thread ids keep two writers of the same file
    (two ``fedmr study run`` lanes rewriting a study's cells.json, two API runs in threads) from
    renaming each other's file."""
    return path.with_name(f"{path.name}.{os.getpid()}-{threading.get_native_id()}.tmp")


def _umask() -> int:
    """The process's umask, read without changing it (/proc on Linux; elsewhere set and restored)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # pragma: no cover - not Linux
    os.umask(mask)  # pragma: no cover
    return mask  # pragma: no cover


def atomic_write(path: Path, write: Callable[[Path], object], before_rename: Callable[[], None] | None = None) -> None:
    """``write`` fills ``temporary_name(path)``, which is fsynced and renamed onto ``path``: a crash
    leaves either the old file or the new one, never half of one.  The file gets the permissions
    the umask gives a new file (0644 under the usual 022), whatever the writer chose (safetensors
    writes 0600)."""
    tmp = temporary_name(path)
    write(tmp)
    with tmp.open("rb+") as fh:
        os.fsync(fh.fileno())
        try:
            os.fchmod(fh.fileno(), 0o666 & ~_umask())
        except (OSError, AttributeError):  # pragma: no cover - a file system without modes
            pass
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


def refuse_files_in_path(folder: Path) -> None:
    """A results folder whose path runs through a file (``a-file/run``) is refused by name."""
    from .errors import ConfigError

    for place in [folder, *folder.parents]:
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                what = "the output path" if place == folder else f"{place}, in the output path,"
                raise ConfigError(f"cannot write the results folder {folder}: {what} is a file, not a folder")
            break


def check_writable_folder(folder: Path | str) -> None:
    """Refuse, before any work, a results folder that cannot be written: a file in its path, a
    read-only place, no permission.  It makes the missing folders and a probe file, then removes
    them all again, so a run that fails later (bad data) leaves nothing behind."""
    from .errors import ConfigError

    folder = Path(folder)
    lineage = [folder, *folder.parents]
    refuse_files_in_path(folder)
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


LOCK_NAME = ".fedmr-lock"  # held (flock) while a run writes its folder; removed when it ends


def claim_new_folder(path: Path) -> Path:
    """Create ``path``, or ``path-2``, ``path-3``... when it exists: the first free name, claimed
    atomically (``mkdir`` either creates it or fails), so runs started in the same second get
    folders of their own."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        candidate = path if n == 1 else path.with_name(f"{path.name}-{n}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free folder name", str(path))  # pragma: no cover


_HELD_LOCKS: set[IO[bytes]] = set()


def _drop_inherited_locks() -> None:
    """In a forked child (round workers, study jobs): close its copies of the parent's lock files.  A flock
    belongs to every copy of its descriptor, so without this a SIGKILLed run's folder stays locked until its
    last worker has died too, and a resume started at once is refused."""
    for fh in list(_HELD_LOCKS):
        fh.close()
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextmanager
def folder_lock(folder: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``folder`` (an flock on ``folder/.fedmr-lock``) for the block; yields
    False at once, without waiting, when another run (another process, or another thread of this
    one) holds it.  The lock dies with its process, so a killed run leaves no stale lock; the file
    is removed at the end (a waiting claimant that opened the removed file retries on the new one)."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    lock = folder / LOCK_NAME
    fh: IO[bytes] | None = None
    while True:
        fh = lock.open("ab")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            yield False
            return
        try:  # the holder before us may have removed the file between our open and our lock
            same = os.stat(lock).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()
    _HELD_LOCKS.add(fh)
    try:
        yield True
    finally:
        _HELD_LOCKS.discard(fh)
        lock.unlink(missing_ok=True)
        fh.close()
