"""A run's results folder, claimed before any data are loaded.

``claimed_output`` is what ``fedmr run``, ``fedmr compare`` and ``fedmr.run`` / ``fedmr.compare``
wrap a run in: everything that can be known without the data is checked first (the folder can be
written; it holds no run unless resumed; a resume would be accepted; ``tensorboard = true`` has its
package), then the folder is locked for the run, so two runs never write one folder at once, and a
run that fails before writing anything leaves no empty folder behind.  ``new_run_folder`` claims a
default folder (``runs/<name>-<time>``, ``-2``, ``-3``... when several start in the same second).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..callbacks import check_tensorboard
from ..errors import ConfigError
from ..fileio import LOCK_NAME, claim_new_folder, folder_lock, refuse_files_in_path
from ..results import default_run_dir
from .checkpoint import check_resume


def new_run_folder(*parts: str) -> Path:
    """A new folder ``runs/<part>-<part>-<time>``, created here: a name taken by a run that started
    in the same second gets ``-2``, ``-3``...  (``mkdir`` claims it atomically)."""
    return claim_new_folder(default_run_dir(*parts))


def _holds_a_run(out: Path) -> bool:
    return (out / "metrics.csv").exists()


def _check(cfg: Mapping[str, Any] | None, out: Path, resume: bool) -> None:
    if not resume and _holds_a_run(out):
        raise ConfigError(f"output folder {out} already holds a run; choose another --out or --resume it")
    if resume and cfg is not None:
        check_resume(out, cfg)


@contextlib.contextmanager
def claimed_output(out: str | Path | None, cfg: Mapping[str, Any] | None = None, *, resume: bool = False,
                   fresh: bool = False) -> Iterator[None]:
    """Check and hold the results folder ``out`` for the block (None: no folder, only the config's
    checks).  ``cfg``: the run's config (resume and TensorBoard checks); ``fresh``: ``out`` was just
    created for this run (``new_run_folder``), so it is removed again if the run leaves it empty."""
    if cfg is not None:
        check_tensorboard(bool(cfg.get("tensorboard")), out)
    if out is None:
        yield
        return
    out = Path(out)
    _check(cfg, out, resume)
    refuse_files_in_path(out)
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:
        try:  # making the folder and its lock file is the check that it can be written
            out.mkdir(parents=True, exist_ok=True)
            lock = folder_lock(out)
            held = lock.__enter__()
        except OSError as exc:
            raise ConfigError(f"cannot write the results folder {out}: {exc.strerror or exc}") from None
        with contextlib.ExitStack() as stack:
            stack.push(lock)
            if not held:
                raise ConfigError(f"output folder {out} is being written by another fedmr run right now; "
                                  "choose another --out")
            _check(cfg, out, resume)  # again, now that no other run can write it
            yield
    finally:
        if fresh and out not in created:
            created.insert(0, out)
        for place in created:  # innermost first: only what this run created and left empty
            try:
                if place.is_dir() and not [p for p in place.iterdir() if p.name != LOCK_NAME]:
                    place.rmdir()
            except OSError:
                break
