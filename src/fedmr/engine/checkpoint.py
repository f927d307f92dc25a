"""Checkpoints: a run's complete state after a round, written so that a crash at any instant leaves a usable one.

Layout of ``<run>/checkpoints/``::

    round-000010.safetensors   the algorithm's server_state() and the global generators' states
    round-000010.json          the manifest, written last: the round, the tensor file's sha256, the
                               metrics rows so far, the elapsed time and the run's fingerprint

A checkpoint exists only once its manifest is in place; both files are written to a temporary
name, fsynced and renamed, so a reader sees either the whole file or none.  The newest two are
kept: a truncated or corrupt newest one (bad JSON, checksum mismatch) is skipped with a warning
and the previous one used.  Tensors are read with safetensors and metadata with json, so
loading a checkpoint can never execute code (no pickle anywhere).

Every random draw of a round derives from (seed, stream, round, client) (see
:mod:`fedmr.seeding`), so the round number, the config and the server state determine the rest
of the run; the global generators are saved too, for code that draws from them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..config import DEFAULTS
from ..errors import CheckpointError
from ..fileio import atomic_write, file_digest, fsync_dir
from .segments import checked as checked_segments

log = logging.getLogger("fedmr")

CHECKPOINT_DIR = "checkpoints"
KEEP = 2
FORMAT = 1
# Test hook: seconds to sleep between writing a temporary file and renaming it into place.
TEST_DELAY_ENV = "FEDMR_TEST_CHECKPOINT_DELAY"
# Config keys that may change between a run and its resumption without changing its numbers: how
# long, where and how it computes, which cache and logging it uses.  A key added in a later release
# belongs here when it cannot change results, or older checkpoints (which lack it) refuse to resume.
RESUMABLE_CHANGES = frozenset({"rounds", "device", "workers", "vectorize", "vectorize_memory_gb", "data_dir",
                               "checkpoint_every", "client_timeout", "cache_dir", "tensorboard",
                               "max_rounds_without_update", "partition_file_check", "save_model_every", "save_pool",
                               "compile"})

_NAME = re.compile(r"^round-(\d{6,})\.json$")
_STATE_PREFIX = "state."
_RNG_TORCH = "rng.torch"
_RNG_NUMPY = "rng.numpy"


@dataclass
class Checkpoint:
    rounds_done: int  # rounds completed; the run continues with round index rounds_done
    server_state: dict[str, torch.Tensor]
    rows: list[dict[str, Any]]
    elapsed_s: float
    path: Path
    fingerprint: dict[str, Any]
    generators: dict[str, Any]
    counters: dict[str, float] = field(default_factory=dict)  # running totals (e.g. MB exchanged); {} before they existed
    segments: list[dict[str, Any]] = field(default_factory=list)  # where its rounds ran (segments.py); [] before they existed

    def restore_generators(self) -> None:
        """Put torch's, numpy's and Python's global generators back where the saved run had them."""
        gens = self.generators
        torch.set_rng_state(gens["torch"])
        keys, pos, has_gauss, gauss = gens["numpy"]
        np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
        version, internal, gauss_next = gens["python"]
        random.setstate((version, tuple(internal), gauss_next))


# ---- atomic files ------------------------------------------------------------------------
def _pause_for_tests() -> None:
    delay = os.environ.get(TEST_DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def _json_sha256(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


# ---- safe tensor files -------------------------------------------------------------------
def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor]) -> str:
    """Write ``tensors`` as safetensors atomically; returns the file's sha256."""
    path = Path(path)
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp)), _pause_for_tests)
    return file_digest(path)


def load_tensors(path: str | Path, device: str | torch.device = "cpu", sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors file (never a pickle); ``sha256`` is checked first when given."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"tensor file not found: {path}")
    if sha256 is not None and file_digest(path) != sha256:
        raise CheckpointError(f"{path} does not match its recorded sha256 (truncated or corrupt)")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({exc}); only safetensors are loaded, never pickles") from None


# ---- the run's identity ------------------------------------------------------------------
def _tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().to("cpu").contiguous().numpy().tobytes())
    return digest.hexdigest()


def _fixed_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a config a resumed run must keep (all but ``RESUMABLE_CHANGES``), as JSON reads it back."""
    config = {k: v for k, v in cfg.items() if k not in RESUMABLE_CHANGES}
    return dict(json.loads(json.dumps(config)))


def fingerprint(cfg: Mapping[str, Any], partition: Sequence[Sequence[int]], initial_state: Mapping[str, torch.Tensor],
                data: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """What must not change between a run and its resumption: config, partition, initial model, and
    the data itself when only its arrays identify it (``data``: data passed from Python)."""
    parts = hashlib.sha256(json.dumps([list(map(int, p)) for p in partition]).encode()).hexdigest()
    found = {"config": _fixed_config(cfg), "partition_sha256": parts,
             "initial_model_sha256": _tensors_sha256(initial_state)}
    if data is not None:
        found["data_sha256"] = _tensors_sha256(data)
    return found


def _config_mismatch(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    for key in sorted((set(old) | set(new)) - RESUMABLE_CHANGES):  # older checkpoints hold some of them
        # a key added to fedmr after the checkpoint was written (precision): the run had its default
        was = old[key] if key in old else DEFAULTS.get(key)
        if was != new.get(key):
            return f"config key '{key}' was {was!r}, now {new.get(key)!r}"
    return None


def _mismatch(saved: Mapping[str, Any], current: Mapping[str, Any]) -> str | None:
    why = _config_mismatch(saved.get("config", {}), current["config"])
    if why is not None:
        return why
    if saved.get("partition_sha256") != current["partition_sha256"]:
        return "the partition differs"
    if saved.get("initial_model_sha256") != current["initial_model_sha256"]:
        return "the initial model differs (another torch version?)"
    if saved.get("data_sha256") != current.get("data_sha256"):
        return "the data arrays differ (pass the arrays the run started with)"
    return None


# ---- writing -------------------------------------------------------------------------------
def _generator_tensors() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    tensors = {_RNG_TORCH: torch.get_rng_state(), _RNG_NUMPY: torch.from_numpy(np.asarray(keys, dtype=np.int64))}
    meta = {"numpy": [int(pos), int(has_gauss), float(gauss)], "python": [version, list(internal), gauss_next]}
    return tensors, meta


def save_checkpoint(
    run_dir: str | Path, rounds_done: int, server_state: Mapping[str, torch.Tensor], rows: Sequence[Mapping[str, Any]],
    elapsed_s: float, run_fingerprint: Mapping[str, Any], keep: int = KEEP, counters: Mapping[str, float] | None = None,
    segments: Sequence[Mapping[str, Any]] | None = None,
) -> Path:
    """Write the checkpoint after ``rounds_done`` rounds; drop all but the newest ``keep``.
    ``counters``: running totals the run keeps between evaluations (the MB exchanged so far);
    ``segments``: where and how its rounds so far were computed (``segments.py``)."""
    directory = Path(run_dir) / CHECKPOINT_DIR
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"round-{rounds_done:06d}"
    gen_tensors, gen_meta = _generator_tensors()
    tensors = {**{_STATE_PREFIX + k: v for k, v in server_state.items()}, **gen_tensors}
    sha = save_tensors(directory / f"{stem}.safetensors", tensors)
    body = {
        "format": FORMAT, "round": rounds_done, "tensors": f"{stem}.safetensors", "sha256": sha,
        # safetensors files list keys sorted; the order matters (FedMR draws one permutation per key in order)
        "state_keys": list(server_state),
        "rows": [dict(r) for r in rows], "elapsed_s": elapsed_s, "generators": gen_meta,
        "fingerprint": dict(run_fingerprint),
        **({"counters": {k: float(v) for k, v in counters.items()}} if counters else {}),
        **({"segments": [dict(r) for r in segments]} if segments else {}),
    }
    body = json.loads(json.dumps(body, default=_plain))  # numpy scalars -> numbers; hashed as read back
    manifest = directory / f"{stem}.json"
    text = json.dumps({**body, "manifest_sha256": _json_sha256(body)})
    atomic_write(manifest, lambda tmp: tmp.write_text(text), _pause_for_tests)
    fsync_dir(directory)
    prune(directory, keep)
    return manifest


def _plain(value: Any) -> Any:
    if isinstance(value, (np.generic, torch.Tensor)):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a checkpoint manifest")


def prune(directory: Path, keep: int = KEEP) -> None:
    """Remove all but the newest ``keep`` checkpoints, leftover temporary files and orphan tensors."""
    manifests = _manifests(directory)
    for _, old in manifests[keep:]:
        old.unlink(missing_ok=True)  # the manifest first: a crash here leaves an orphan, never a dangling manifest
        old.with_suffix(".safetensors").unlink(missing_ok=True)
    kept = {m.with_suffix(".safetensors").name for _, m in manifests[:keep]}
    newest = manifests[0][0] if manifests else -1
    for path in directory.iterdir():
        if path.name.endswith(".tmp"):
            path.unlink(missing_ok=True)
        elif path.suffix == ".safetensors" and path.name not in kept:
            match = re.match(r"^round-(\d+)\.safetensors$", path.name)
            if match and int(match.group(1)) <= newest:
                path.unlink(missing_ok=True)


# ---- reading -------------------------------------------------------------------------------
def _manifests(directory: Path) -> list[tuple[int, Path]]:
    """(round, manifest path), newest first."""
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found, reverse=True)


def read_checkpoint(manifest: Path, device: str | torch.device = "cpu") -> Checkpoint:
    """One checkpoint, fully checked; CheckpointError says what is wrong with it."""
    try:
        doc = json.loads(manifest.read_text())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CheckpointError(f"{manifest} is not readable JSON ({exc})") from None
    if not isinstance(doc, dict) or "manifest_sha256" not in doc:
        raise CheckpointError(f"{manifest} is not a fedmr checkpoint manifest")
    body = {k: v for k, v in doc.items() if k != "manifest_sha256"}
    if _json_sha256(body) != doc["manifest_sha256"]:
        raise CheckpointError(f"{manifest} does not match its recorded checksum (edited or corrupt)")
    if body.get("format") != FORMAT:
        raise CheckpointError(f"{manifest} has checkpoint format {body.get('format')!r}; this fedmr reads format {FORMAT}")
    try:
        rounds_done = int(body["round"])
        tensor_file = manifest.parent / Path(str(body["tensors"])).name
        rows = [dict(r) for r in body["rows"]]
        elapsed = float(body["elapsed_s"])
        pos, has_gauss, gauss = body["generators"]["numpy"]
        version, internal, gauss_next = body["generators"]["python"]
        sha = str(body["sha256"])
        order = [str(k) for k in body["state_keys"]]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{manifest} lacks a valid field ({exc})") from None
    tensors = load_tensors(tensor_file, "cpu", sha)
    try:
        generators = {"torch": tensors.pop(_RNG_TORCH),
                      "numpy": (tensors.pop(_RNG_NUMPY), int(pos), int(has_gauss), float(gauss)),
                      "python": (int(version), [int(i) for i in internal], gauss_next)}
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{tensor_file} lacks the generator states ({exc})") from None
    if sorted(_STATE_PREFIX + k for k in order) != sorted(tensors):
        raise CheckpointError(f"{tensor_file} does not hold the tensors its manifest lists")
    state = {k: tensors[_STATE_PREFIX + k].to(device) for k in order}
    saved_fingerprint = body.get("fingerprint")
    counters = body.get("counters", {})
    if not isinstance(counters, dict) or not all(isinstance(v, (int, float)) for v in counters.values()):
        raise CheckpointError(f"{manifest} has malformed counters")
    segment_rows = checked_segments(body.get("segments", []))
    if segment_rows is None:
        raise CheckpointError(f"{manifest} has malformed segments")
    return Checkpoint(rounds_done, state, rows, elapsed, manifest,
                      saved_fingerprint if isinstance(saved_fingerprint, dict) else {}, generators,
                      {str(k): float(v) for k, v in counters.items()}, segment_rows)


def latest_checkpoint(run_dir: str | Path, run_fingerprint: Mapping[str, Any] | None = None,
                      device: str | torch.device = "cpu") -> Checkpoint | None:
    """The newest usable checkpoint of a run (None if it has none); corrupt ones are skipped with a warning.

    A checkpoint that is sound but was written by another config or partition is an error,
    not something to skip: resuming it would silently mix two experiments.
    """
    directory = Path(run_dir) / CHECKPOINT_DIR
    manifests = _manifests(directory)
    problems = []
    for _rounds_done, manifest in manifests:
        try:
            ckpt = read_checkpoint(manifest, device)
        except CheckpointError as exc:
            log.warning("skipping checkpoint %s: %s; falling back to the previous one", manifest.name, exc)
            problems.append(str(exc))
            continue
        if run_fingerprint is not None:
            why = _mismatch(ckpt.fingerprint, run_fingerprint)
            if why is not None:
                raise CheckpointError(f"checkpoint {manifest} belongs to a different run: {why}")
        return ckpt
    if problems:
        raise CheckpointError(
            f"no usable checkpoint in {directory} ({len(problems)} corrupt: {problems[0]}); "
            f"delete {directory} to start the run over"
        )
    return None


FINISHED_MARKS = ("summary.json", "model.safetensors")  # what only a finished run leaves in its folder


def refuse_finished_without_checkpoint(run_dir: str | Path) -> None:
    """A folder that holds a finished run but no checkpoint to continue from (its checkpoints/ was
    deleted) is never started over: that would overwrite its results."""
    run_dir = Path(run_dir)
    if _manifests(run_dir / CHECKPOINT_DIR):
        return
    marks = [name for name in FINISHED_MARKS if (run_dir / name).exists()]
    if marks:
        raise CheckpointError(
            f"cannot resume {run_dir}: it holds a finished run ({marks[0]}) but no checkpoint to continue from "
            f"({CHECKPOINT_DIR}/ is empty or gone), and a finished run is never overwritten; start a new run "
            f"with its config: fedmr run --config {run_dir / 'config.toml'} --out NEW_FOLDER")


def check_resume(run_dir: str | Path, cfg: Mapping[str, Any]) -> None:
    """Before any data are loaded: whether the run in ``run_dir`` can be resumed with ``cfg``, as far as
    its newest readable manifest tells (the config it was written with and its round); the
    partition, initial model and tensors are checked when the run resumes.  A finished run without
    checkpoints is refused (``refuse_finished_without_checkpoint``)."""
    run_dir = Path(run_dir)
    refuse_finished_without_checkpoint(run_dir)
    for _rounds_done, manifest in _manifests(run_dir / CHECKPOINT_DIR):
        try:
            doc = json.loads(manifest.read_text())
            saved, rounds_done = doc["fingerprint"]["config"], int(doc["round"])
        except (OSError, UnicodeDecodeError, ValueError, RecursionError, KeyError, TypeError):
            continue  # unreadable: resuming skips it with a warning, as latest_checkpoint does
        if not isinstance(saved, dict):
            continue
        why = _config_mismatch(saved, _fixed_config(cfg))
        if why is not None:
            raise CheckpointError(f"checkpoint {manifest} belongs to a different run: {why}")
        rounds = cfg.get("rounds")
        if isinstance(rounds, int) and rounds_done > rounds:
            raise CheckpointError(f"checkpoint {manifest} is after round {rounds_done} but rounds is "
                                  f"{rounds}; resume with --set rounds={rounds_done} or more")
        return


def resume_from_checkpoint(run_dir: str | Path, algorithm: Any, run_fingerprint: Mapping[str, Any], rounds: int,
                           device: str | torch.device = "cpu") -> Checkpoint | None:
    """Load the newest usable checkpoint of ``run_dir`` into ``algorithm`` (and the global generators)
    and return it (its rounds done, metrics rows, seconds, counters and segments); None for a run
    killed before its first checkpoint.  The simulator and the Flower ServerApp both resume through this."""
    ckpt = latest_checkpoint(run_dir, run_fingerprint, device)
    if ckpt is None:
        refuse_finished_without_checkpoint(run_dir)
        log.warning("no checkpoint in %s yet: starting from round 1", run_dir)
        return None
    if ckpt.rounds_done > rounds:
        raise CheckpointError(f"checkpoint {ckpt.path} is after round {ckpt.rounds_done} but rounds is "
                              f"{rounds}; resume with --set rounds={ckpt.rounds_done} or more")
    algorithm.load_server_state(ckpt.server_state)
    ckpt.restore_generators()
    log.info("resuming %s after round %d from %s", run_dir, ckpt.rounds_done, ckpt.path.name)
    return ckpt
