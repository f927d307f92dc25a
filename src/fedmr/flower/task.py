"""What the Flower ServerApp and ClientApp share: the run config, the hosting rule and the message codec.

The run config is ``[tool.flwr.app.config]`` (plus ``flwr run --run-config``):
the keys of ``fedmr run`` flat, an algorithm's options as dotted keys
("fedmr.block_fraction"), and a few Flower-only keys under ``flower.``.
Both sides rebuild the same experiment (data, partition, initial model) from
it with ``engine.experiment.prepare``, so the partition a node trains on is the
one the server's config produces.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from ..algorithms.base import TrainResult, TrainTask
from ..config import RunConfig, default_config, merge, validate
from ..engine.experiment import Experiment, prepare
from ..errors import ConfigError

# Flower-only settings (not part of a fedmr config); the defaults suit a small simulation.
FLOWER_DEFAULTS: dict[str, Any] = {
    "out": "",  # results folder; "" = runs/flower-<algorithm>-<dataset>-<time>
    "round_timeout": 600.0,  # seconds the server waits for a round's replies
    "node_wait": 120.0,  # seconds the server waits for the SuperNodes hosting every client to connect
    "log_messages": False,  # write <out>/messages.jsonl: who got which model (digest) each round
    "faults": "",  # test hook: "ROUND:SLOT:KIND,..." with KIND crash | nan | shape (see client_app)
    "resume": False,  # continue the run in flower.out from its last good checkpoint (rounds may grow)
    "data": "partition",  # "partition": every node loads the data set, takes its clients' part; "node": its own data-dir
    "fraction_evaluate": 0.0,  # nodes that evaluate the global model on their local test data (0 = none)
    "server_test_dir": "",  # flower.data = "node": a folder whose test split the server evaluates on ("" = none)
    "poll_interval": 0.1,  # seconds between the ServerApp's looks for replies (Flower's deployed Grid: 3)
}
DATA_MODES = ("partition", "node")


@dataclass(frozen=True)
class FlowerRunConfig:
    cfg: RunConfig
    flower: dict[str, Any]


def split_run_config(run_config: Mapping[str, Any]) -> FlowerRunConfig:
    """Flat Flower run config -> (validated fedmr config, Flower-only settings)."""
    cfg = default_config()
    flower = dict(FLOWER_DEFAULTS)
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        head, dot, rest = _section_split(key)
        if head == "flower":
            if rest not in FLOWER_DEFAULTS:
                raise ConfigError(f"unknown config key '{key}' (Flower keys: {', '.join(FLOWER_DEFAULTS)})")
            flower[rest] = value
        elif dot:
            nested.setdefault(head, {})[rest] = value
        else:
            nested[key] = value
    merge(cfg, nested)
    if flower["data"] not in DATA_MODES:
        raise ConfigError(f"flower.data must be one of {', '.join(DATA_MODES)}, got '{flower['data']}'")
    if not 0.0 <= float(flower["fraction_evaluate"]) <= 1.0:
        raise ConfigError(f"flower.fraction_evaluate must be in [0, 1], got {flower['fraction_evaluate']}")
    return FlowerRunConfig(validate(cfg), flower)


def _section_split(key: str) -> tuple[str, str, str]:
    """"fedmr.block_fraction" -> ("fedmr", ".", "block_fraction"); a plug-in algorithm's section keeps
    its dots: "pkg.mod:Algo.beta" -> ("pkg.mod:Algo", ".", "beta")."""
    if ":" not in key:
        return key.partition(".")
    from ..imports import split_key

    head, *rest = split_key(key)
    return head, "." if rest else "", ".".join(rest)


def config_key(run_config: Mapping[str, Any]) -> str:
    """A hashable identity of a run config (for the per-process experiment cache)."""
    return json.dumps(dict(run_config), sort_keys=True)


@functools.lru_cache(maxsize=2)
def cached_experiment(key: str) -> tuple[FlowerRunConfig, Experiment]:
    """One prepared experiment per process and config: a Ray actor or SuperNode reuses it."""
    run = split_run_config(json.loads(key))
    return run, prepare(run.cfg)


def hosts(partition_id: int, num_partitions: int, client_id: int) -> bool:
    """Node ``partition_id`` of ``num_partitions`` holds the clients c with c % num_partitions == partition_id.

    With as many SuperNodes as clients each node is exactly one client.
    """
    return client_id % num_partitions == partition_id


# ---- messages ---------------------------------------------------------------------------
# A train message holds "model" (the task's state), "task" (client id, slot, round) and the
# payload: tensors in "payload.tensors", each state dict in "payload.state.<name>",
# numbers and strings in "payload.scalars".  A reply holds "model", "result" and the payload.

_SCALARS = (bool, int, float, str)


def message_array_bytes(content: RecordDict) -> int:
    """Bytes of the arrays a message carries (elements times item size, without Flower's
    serialisation headers): the simulator's count of the same tensors (engine/traffic.py)."""
    total = 0
    for record in content.values():
        if isinstance(record, ArrayRecord):
            for array in record.values():
                total += int(np.prod(array.shape, dtype=np.int64)) * np.dtype(array.dtype).itemsize
    return total


def _array_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: v.detach().cpu() for k, v in state.items()})


def encode_payload(payload: Mapping[str, Any], into: RecordDict) -> None:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for name, value in payload.items():
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, Mapping) and all(isinstance(v, torch.Tensor) for v in value.values()):
            into[f"payload.state.{name}"] = _array_record(value)
        elif isinstance(value, _SCALARS) or (isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value)):
            scalars[name] = value
        else:
            raise TypeError(f"payload entry '{name}' of type {type(value).__name__} cannot travel in a Flower message")
    if tensors:
        into["payload.tensors"] = _array_record(tensors)
    if scalars:
        into["payload.scalars"] = ConfigRecord(scalars)


def decode_payload(content: RecordDict) -> dict[str, Any]:
    payload: dict[str, Any] = {}
    for name, record in content.items():
        # the record types encode_payload gives these names
        if name == "payload.tensors":
            payload.update(cast(ArrayRecord, record).to_torch_state_dict())
        elif name.startswith("payload.state."):
            payload[name[len("payload.state."):]] = cast(ArrayRecord, record).to_torch_state_dict()
        elif name == "payload.scalars":
            payload.update(dict(record))
    return payload


def encode_task(task: TrainTask, round_idx: int) -> RecordDict:
    content = RecordDict({
        "model": _array_record(task.state),
        "task": ConfigRecord({"client_id": task.client_id, "slot": task.slot, "round": round_idx}),
    })
    encode_payload(task.payload, content)
    return content


def decode_task(content: RecordDict) -> tuple[TrainTask, int]:
    meta = content.config_records["task"]  # ints, as encode_task writes them
    task = TrainTask(int(cast(int, meta["client_id"])), int(cast(int, meta["slot"])),
                     content.array_records["model"].to_torch_state_dict(), decode_payload(content))
    return task, int(cast(int, meta["round"]))


def encode_result(result: TrainResult) -> RecordDict:
    content = RecordDict({
        "model": _array_record(result.state),
        "result": MetricRecord({"client_id": result.client_id, "slot": result.slot,
                                "num-examples": result.num_samples, "train_loss": float(result.train_loss)}),
    })
    encode_payload(result.payload, content)
    return content


def decode_result(content: RecordDict) -> TrainResult:
    """The reply as a TrainResult; raises KeyError/TypeError/ValueError when it is malformed."""
    meta = content.metric_records["result"]  # numbers, as encode_result writes them (a list fails int/float)
    state = content.array_records["model"].to_torch_state_dict()
    return TrainResult(int(cast(int, meta["client_id"])), int(cast(int, meta["slot"])), state,
                       int(cast(int, meta["num-examples"])), float(cast(float, meta["train_loss"])), decode_payload(content))
