"""Atomic writes from several processes at once: two `fedmr study run` lanes rewrite the same
study index (cells.json); a shared temporary name let one rename the other's file away."""

import multiprocessing as mp
from pathlib import Path

from fedmr.fileio import atomic_write_text, temporary_name


def _write_many(path: str, tag: str, n: int) -> None:
    for i in range(n):
        atomic_write_text(Path(path), f"{tag} {i}\n" * 200)


def test_concurrent_atomic_writes_of_one_file_never_fail_and_leave_a_whole_file(tmp_path):
    target = tmp_path / "cells.json"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(target), tag, 200)) for tag in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = target.read_text().splitlines()
    assert len(lines) == 200 and len(set(lines)) == 1  # one writer's whole file, not a mix
    assert not list(tmp_path.glob("*.tmp"))


def test_the_temporary_name_sits_beside_the_file_and_names_the_process(tmp_path):
    tmp = temporary_name(tmp_path / "summary.json")
    assert tmp.parent == tmp_path and tmp.name.startswith("summary.json.") and tmp.name.endswith(".tmp")
