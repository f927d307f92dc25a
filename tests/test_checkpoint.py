"""Checkpoints: atomic, checksummed, pickle-free; a corrupt newest one falls back to the previous one."""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmr.cli import main
from fedmr.config import load_config
from fedmr.engine import Simulation, prepare
from fedmr.engine.checkpoint import (
    CHECKPOINT_DIR,
    latest_checkpoint,
    load_tensors,
    read_checkpoint,
    save_checkpoint,
    save_tensors,
)
from fedmr.errors import CheckpointError
from fedmr.results import read_metrics

TINY = ["num_clients=8", "clients_per_round=3", "rounds=6", "local_epochs=1", "eval_every=2",
        "partition=\"iid\"", "seed=3", "workers=1"]
FINGERPRINT = {"config": {"seed": 1}, "partition_sha256": "p", "initial_model_sha256": "i"}


def _state(value: float) -> dict[str, torch.Tensor]:
    return {"pool.w": torch.full((3, 4), value), "pool.n": torch.tensor([int(value)] * 3)}


def _write_two(run: Path) -> None:
    save_checkpoint(run, 2, _state(2.0), [{"round": 2, "accuracy": 0.5}], 1.0, FINGERPRINT)
    save_checkpoint(run, 4, _state(4.0), [{"round": 2, "accuracy": 0.5}, {"round": 4, "accuracy": float("nan")}],
                    2.0, FINGERPRINT)


def test_round_trip_keeps_state_rows_and_generators(tmp_path):
    torch.manual_seed(11)
    np.random.seed(12)
    random.seed(13)
    save_checkpoint(tmp_path, 4, _state(4.0), [{"round": 4, "accuracy": 0.25, "pool_cosine": None}], 3.5, FINGERPRINT)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    ckpt = latest_checkpoint(tmp_path, FINGERPRINT)
    assert ckpt is not None and ckpt.rounds_done == 4 and ckpt.elapsed_s == 3.5
    assert ckpt.rows == [{"round": 4, "accuracy": 0.25, "pool_cosine": None}]
    assert torch.equal(ckpt.server_state["pool.w"], _state(4.0)["pool.w"])
    assert ckpt.server_state["pool.n"].dtype == torch.int64
    assert list(ckpt.server_state) == ["pool.w", "pool.n"]  # the saved order, not the file's sorted one
    ckpt.restore_generators()
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_keeps_only_the_last_two_and_no_temporary_files(tmp_path):
    for r in (2, 4, 6, 8):
        save_checkpoint(tmp_path, r, _state(float(r)), [], 0.0, FINGERPRINT)
    names = sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir())
    assert names == ["round-000006.json", "round-000006.safetensors", "round-000008.json", "round-000008.safetensors"]


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _edit_rows(path: Path) -> None:
    doc = json.loads(path.read_text())
    doc["rows"][0]["accuracy"] = 0.99
    path.write_text(json.dumps(doc))


CORRUPTIONS = {
    "truncated tensors": ("safetensors", _truncate, "does not match its recorded sha256"),
    "flipped byte in tensors": ("safetensors", _flip_byte, "does not match its recorded sha256"),
    "missing tensors": ("safetensors", lambda p: p.unlink(), "tensor file not found"),
    "truncated manifest": ("json", _truncate, "not readable JSON"),
    "edited manifest": ("json", _edit_rows, "does not match its recorded checksum"),
}


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corrupt_newest_falls_back_to_previous_with_a_warning(tmp_path, caplog, name):
    suffix, damage, reason = CORRUPTIONS[name]
    _write_two(tmp_path)
    damage(tmp_path / CHECKPOINT_DIR / f"round-000004.{suffix}")
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        ckpt = latest_checkpoint(tmp_path, FINGERPRINT)
    assert ckpt is not None and ckpt.rounds_done == 2
    assert torch.equal(ckpt.server_state["pool.w"], _state(2.0)["pool.w"])
    assert any("round-000004.json" in r.message and reason in r.message for r in caplog.records)


def test_all_corrupt_is_an_error_not_a_silent_restart(tmp_path):
    _write_two(tmp_path)
    for r in (2, 4):
        _truncate(tmp_path / CHECKPOINT_DIR / f"round-00000{r}.safetensors")
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_checkpoint(tmp_path, FINGERPRINT)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    _write_two(tmp_path)
    other = {**FINGERPRINT, "config": {"seed": 2}}
    with pytest.raises(CheckpointError, match="config key 'seed' was 1, now 2"):
        latest_checkpoint(tmp_path, other)


class _RunsCode:
    """Unpickling this calls os.system: what a doctored checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_pickle(path: Path, marker: Path) -> None:
    torch.save({"state.pool.w": _RunsCode(marker)}, path)


def test_pickled_tensor_file_fails_safely(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "model.safetensors"
    _plant_pickle(evil, marker)
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        load_tensors(evil)
    assert not marker.exists()


def test_pickled_checkpoint_with_a_matching_manifest_fails_safely(tmp_path):
    """Even a manifest whose checksums match the pickle never gets it unpickled."""
    marker = tmp_path / "pwned"
    save_checkpoint(tmp_path, 2, _state(2.0), [], 0.0, FINGERPRINT)
    folder = tmp_path / CHECKPOINT_DIR
    tensors, manifest = folder / "round-000002.safetensors", folder / "round-000002.json"
    _plant_pickle(tensors, marker)
    doc = json.loads(manifest.read_text())
    doc.pop("manifest_sha256")
    from fedmr.engine.checkpoint import _json_sha256
    from fedmr.fileio import file_digest

    doc["sha256"] = file_digest(tensors)
    manifest.write_text(json.dumps({**doc, "manifest_sha256": _json_sha256(doc)}))
    with pytest.raises(CheckpointError, match="not a valid safetensors file"):
        read_checkpoint(manifest)
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        latest_checkpoint(tmp_path, FINGERPRINT)
    assert not marker.exists()


def test_save_tensors_is_loadable_and_atomic(tmp_path):
    path = tmp_path / "m.safetensors"
    state = {"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.tensor([1, 2])}  # a is not contiguous
    save_tensors(path, state)
    loaded = load_tensors(path)
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]


# ---- a whole run, in this process ---------------------------------------------------------
def _run(out: Path, extra: list[str] = ()) -> int:
    return main(["run", "--quiet", "--out", str(out), *[a for s in [*TINY, *extra] for a in ("--set", s)]])


def _comparable(path: Path) -> list[dict[str, float]]:
    rows = read_metrics(path)
    for row in rows:
        row.pop("elapsed_s")
    return rows


def _same_rows(a, b) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(x[k] == y[k] or (x[k] != x[k] and y[k] != y[k]) for k in x) for x, y in zip(a, b)
    )


def test_resume_after_corrupt_newest_matches_uninterrupted_run(tmp_path, caplog, capsys):
    run = tmp_path / "run"
    assert _run(run) == 0
    reference = _comparable(run / "metrics.csv")
    reference_model = load_tensors(run / "model.safetensors")
    reference_losses = (run / "train_loss.csv").read_bytes()
    _truncate(run / CHECKPOINT_DIR / "round-000006.safetensors")
    (run / "model.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        assert main(["run", "--quiet", "--resume", str(run)]) == 0
    assert any("skipping checkpoint round-000006.json" in r.message for r in caplog.records)
    assert _same_rows(_comparable(run / "metrics.csv"), reference)
    assert (run / "train_loss.csv").read_bytes() == reference_losses  # rounds after round 4's checkpoint: trained again
    model = load_tensors(run / "model.safetensors")
    assert model.keys() == reference_model.keys()
    assert all(torch.equal(model[k], reference_model[k]) for k in model)

    # a different seed cannot continue this run's checkpoint
    capsys.readouterr()
    assert main(["run", "--quiet", "--resume", str(run), "--set", "seed=4"]) == 2
    assert "belongs to a different run: config key 'seed' was 3, now 4" in capsys.readouterr().err
    assert load_config(run / "config.toml")["seed"] == 3  # the refused resume left the run folder alone


def test_resume_with_a_pickle_planted_as_the_only_checkpoint_fails_safely(tmp_path, capsys):
    run, marker = tmp_path / "run", tmp_path / "pwned"
    assert _run(run, ["rounds=2"]) == 0
    for manifest in (run / CHECKPOINT_DIR).glob("*.safetensors"):
        _plant_pickle(manifest, marker)
    capsys.readouterr()
    assert main(["run", "--quiet", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "fedmr: error: no usable checkpoint" in err and "does not match its recorded sha256" in err
    assert not marker.exists()


def test_derived_streams_make_a_round_independent_of_what_ran_before(tmp_path):
    """The claim resumption rests on: round r depends only on (config, round, server state), not on global RNGs."""
    cfg = load_config(None, TINY + ["dropout_rate=0.4"])
    exp = prepare(cfg)
    straight = Simulation(exp, progress="none")
    straight.algorithm.setup(exp.initial_state)
    for r in range(3):
        straight.run_round(r)
    saved = {k: v.clone() for k, v in straight.algorithm.server_state().items()}
    stats = straight.run_round(3)

    torch.manual_seed(12345), np.random.seed(6789), random.seed(1011)  # scramble every global generator
    fresh = Simulation(exp, progress="none")
    fresh.algorithm.setup(exp.initial_state)
    fresh.algorithm.load_server_state(saved)
    assert fresh.run_round(3) == stats  # same counts, dropouts and training loss
    after, expected = fresh.algorithm.server_state(), straight.algorithm.server_state()
    assert all(torch.equal(after[k], expected[k]) for k in expected)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_checkpoint_from_before_the_logging_and_cache_keys_still_resumes(tmp_path):
    """A checkpoint of an older release has `cache_dir` in its fingerprint and no `tensorboard`; neither
    key changes results, so the run must continue, not be refused as a different run."""
    from fedmr.engine.checkpoint import _json_sha256

    run = tmp_path / "run"
    assert _run(run) == 0
    before = _comparable(run / "metrics.csv")
    for manifest in (run / CHECKPOINT_DIR).glob("round-*.json"):
        body = json.loads(manifest.read_text())
        body.pop("manifest_sha256")
        body["fingerprint"]["config"].pop("tensorboard", None)  # today's checkpoints leave both out
        body["fingerprint"]["config"]["cache_dir"] = ""
        manifest.write_text(json.dumps({**body, "manifest_sha256": _json_sha256(body)}))
    assert main(["run", "--quiet", "--resume", str(run), "--set", "rounds=8"]) == 0
    after = _comparable(run / "metrics.csv")
    assert [r["round"] for r in after] == [2, 4, 6, 8]
    assert _same_rows(after[:3], before)
