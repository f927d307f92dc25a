"""A cache of decoded arrays (plain uint8/float .npy files), so a data set is decoded once per source.

An entry is a folder of ``<name>.npy`` files plus ``meta.json``, keyed by the
source's resolved path and by its size and modification time (for a folder:
those of every file in it), so editing or replacing the source invalidates the
entry.  Entries are written into a temporary folder and renamed into place:
a crash or a second process never leaves half an entry.

Where: the ``cache_dir`` config key, else ``$FEDMR_CACHE``, else
``.fedmr-cache`` beside the data when that folder is writable, else
``~/.cache/fedmr``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("fedmr")

CACHE_FOLDER = ".fedmr-cache"
META = "meta.json"
FORMAT = 1  # bump when the arrays an entry holds change meaning

Arrays = dict[str, np.ndarray]


def cache_root(source: Path, cache_dir: str = "") -> Path:
    """The configured folder (``cache_dir``, else $FEDMR_CACHE), else beside the data, else ~/.cache."""
    configured = cache_dir or os.environ.get("FEDMR_CACHE")
    if configured:
        return Path(configured).expanduser()
    beside = source if source.is_dir() else source.parent
    if writable(beside):
        return beside / CACHE_FOLDER
    return Path.home() / ".cache" / "fedmr"


def writable(folder: Path) -> bool:
    """Writable by us and not marked read-only (root may write anywhere, but a r-x folder means 'keep out')."""
    try:
        marked = folder.stat().st_mode & 0o222
    except OSError:
        return False
    return bool(marked) and os.access(folder, os.W_OK | os.X_OK)


def fingerprint(source: Path, files: Iterable[Path] = ()) -> str:
    """Size and mtime of a file source, or of each of ``files`` of a folder source.

    Not the folder's own mtime: writing the cache inside the folder changes it.
    """
    digest = hashlib.sha1(f"format {FORMAT}".encode())
    if not source.is_dir():
        st = source.stat()
        digest.update(f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    for path in files:
        st = path.stat()
        rel = path.relative_to(source).as_posix()
        digest.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def entry_dir(root: Path, kind: str, source: Path, stamp: str) -> Path:
    where = hashlib.sha1(str(source.resolve()).encode()).hexdigest()[:12]
    return root / f"{kind}-{where}-{stamp}"


def read_entry(entry: Path) -> tuple[Arrays, dict[str, Any]] | None:
    """The arrays and metadata of a complete entry, or None (absent or unreadable: rebuild)."""
    try:
        meta = json.loads((entry / META).read_text())
        # memory-mapped: the pages are read once, straight into the float conversion
        arrays = {name: np.load(entry / f"{name}.npy", mmap_mode="r", allow_pickle=False) for name in meta["arrays"]}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the unreadable cache entry %s (%s); decoding again", entry, exc)
        return None
    return arrays, meta


def write_entry(entry: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Write atomically; drop older entries of the same source.  A cache that cannot be written is only a warning."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would hide a shared cache from other users
    except OSError as exc:
        log.warning("cannot write the data cache in %s (%s); the next run decodes again", entry.parent, exc)
        return
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
        (tmp / META).write_text(json.dumps({**meta, "arrays": list(arrays)}))
        stale = [p for p in entry.parent.glob(entry.name.rsplit("-", 1)[0] + "-*") if p.is_dir() and p != entry]
        try:
            os.rename(tmp, entry)
        except OSError:  # another process wrote it first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
        for old in stale:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        log.warning("cannot write the data cache %s (%s); the next run decodes again", entry, exc)


def cached(kind: str, source: Path, cache_dir: str, build: Callable[[], tuple[Arrays, dict[str, Any]]],
           files: Iterable[Path] = ()) -> tuple[Arrays, dict[str, Any]]:
    """The cached arrays of ``source``, calling ``build`` (the slow decode) only when no valid entry exists."""
    entry = entry_dir(cache_root(source, cache_dir), kind, source, fingerprint(source, files))
    hit = read_entry(entry)
    if hit is not None:
        return hit
    arrays, meta = build()
    write_entry(entry, arrays, meta)
    return arrays, meta
