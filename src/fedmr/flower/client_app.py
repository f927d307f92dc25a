"""The Flower ClientApp: answers the server's partition query and trains one task with the
algorithm's own ``local_update`` (through ``engine.client.train_client``, the simulator's path)."""

from __future__ import annotations

import math

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from ..algorithms import build_algorithm
from ..engine.client import ClientData, train_client
from ..errors import PartitionError
from ..training import LocalSettings
from .task import cached_experiment, config_key, decode_task, encode_result, hosts

app = ClientApp()


def node_partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise PartitionError(f"SuperNode has no {exc.args[0]} in its node config "
                             "(start it with --node-config \"partition-id=0 num-partitions=N\")") from None


@app.query()
def query(msg: Message, context: Context) -> Message:
    pid, parts = node_partition(context)
    return Message(RecordDict({"partition": ConfigRecord({"partition-id": pid, "num-partitions": parts})}),
                   reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    run, exp = cached_experiment(config_key(context.run_config))
    pid, parts = node_partition(context)
    task, round_idx = decode_task(msg.content)
    if not hosts(pid, parts, task.client_id):
        raise PartitionError(f"node with partition-id {pid} of {parts} does not hold client {task.client_id}")
    fault = injected_fault(run.flower["faults"], round_idx, task.slot)
    if fault == "crash":
        raise RuntimeError(f"injected crash (round {round_idx + 1}, slot {task.slot})")
    algorithm = build_algorithm(run.cfg, exp.federation)
    data = ClientData(exp.data.train_x, exp.data.train_y, exp.partition)
    result = train_client(algorithm, exp.new_model(), task, data, LocalSettings.from_config(run.cfg),
                          run.cfg["seed"], round_idx)
    if fault == "nan":
        result.state = {k: v.fill_(math.nan) if v.is_floating_point() else v for k, v in result.state.items()}
    elif fault == "shape":
        first = next(iter(result.state))
        result.state[first] = torch.zeros(1)
    return Message(encode_result(result), reply_to=msg)


def injected_fault(spec: str, round_idx: int, slot: int) -> str | None:
    """Test hook: "2:0:crash,2:1:nan" makes slot 0 of round 2 crash and slot 1 return NaNs."""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        r, s, kind = item.split(":")
        if int(r) == round_idx + 1 and int(s) == slot:
            return kind
    return None
