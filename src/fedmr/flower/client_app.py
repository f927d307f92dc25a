"""The Flower ClientApp: answers the server's query (its partition, or with ``flower.data = "node"``
what its own data-dir holds), trains one task with the algorithm's own ``local_update`` (through
``engine.client.train_client``, the simulator's path) and evaluates the global model on its local
test data.  The loaded data stay cached in the ClientApp process, so a long-lived ClientApp
(``flower-supernode --isolation process`` + ``flwr-clientapp``) loads them once per run."""

from __future__ import annotations

import json
import math

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from ..algorithms import Federation, build_algorithm
from ..engine.client import ClientData, ClientSamples, train_client
from ..errors import PartitionError
from ..training import evaluate
from .sites import SiteData, cached_site, node_data_dir, site_model
from .task import FlowerRunConfig, cached_experiment, config_key, decode_task, encode_result, hosts, split_run_config

app = ClientApp()


def node_partition(context: Context) -> tuple[int, int]:
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except KeyError as exc:
        raise PartitionError(f"SuperNode has no {exc.args[0]} in its node config "
                             "(start it with --node-config \"partition-id=0 num-partitions=N\")") from None


def node_mode(context: Context) -> tuple[FlowerRunConfig, SiteData | None]:
    """The run's settings, and this node's own data when the run reads each site's data."""
    run = split_run_config(context.run_config)
    if run.flower["data"] != "node":
        return run, None
    return run, cached_site(config_key(run.cfg), node_data_dir(context.node_config))


@app.query()
def query(msg: Message, context: Context) -> Message:
    _, site = node_mode(context)
    if site is not None:
        content = RecordDict({"site": ConfigRecord({"info": json.dumps(site.info())})})
    else:
        pid, parts = node_partition(context)
        content = RecordDict({"partition": ConfigRecord({"partition-id": pid, "num-partitions": parts})})
    return Message(content, reply_to=msg)


def new_site_model(run: FlowerRunConfig, site: SiteData) -> torch.nn.Module:
    """The run's model for this site's samples, resolved as the ServerApp resolves it."""
    _, build = site_model(run.cfg, len(site.classes), site.shape, site.default_model)
    # torch's stubs lack Module.to's memory_format overload (documented and accepted at runtime)
    return build().to(site.train_x.device, memory_format=torch.channels_last)  # type: ignore[call-overload]


@app.train()
def train(msg: Message, context: Context) -> Message:
    run, site = node_mode(context)
    task, round_idx = decode_task(msg.content)
    data: ClientSamples
    if site is None:
        run, exp = cached_experiment(config_key(context.run_config))
        pid, parts = node_partition(context)
        if not hosts(pid, parts, task.client_id):
            raise PartitionError(f"node with partition-id {pid} of {parts} does not hold client {task.client_id}")
        algorithm = build_algorithm(run.cfg, exp.federation)
        model, data = exp.new_model(), ClientData(exp.data.train_x, exp.data.train_y, exp.partition)
    else:  # this site is the client the server made it; its data are the only data here
        federation = Federation(run.cfg.num_clients, run.cfg.clients_per_round, (site.info()["num-examples"],),
                                len(site.classes), run.cfg.seed)
        algorithm, model, data = build_algorithm(run.cfg, federation), new_site_model(run, site), site
    fault = injected_fault(run.flower["faults"], round_idx, task.slot)
    if fault == "crash":
        raise RuntimeError(f"injected crash (round {round_idx + 1}, slot {task.slot})")
    result = train_client(algorithm, model, task, data, run.cfg.local_settings, run.cfg.seed, round_idx)
    if fault == "nan":
        result.state = {k: v.fill_(math.nan) if v.is_floating_point() else v for k, v in result.state.items()}
    elif fault == "shape":
        first = next(iter(result.state))
        result.state[first] = torch.zeros(1)
    return Message(encode_result(result), reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """The global model on this node's test data: its own test split (the whole test set when
    every node loads the whole data set)."""
    run, site = node_mode(context)
    if site is None:
        run, exp = cached_experiment(config_key(context.run_config))
        model, x, y = exp.new_model(), exp.data.test_x, exp.data.test_y
    else:
        model, x, y = new_site_model(run, site), site.test_x, site.test_y
    model.load_state_dict(msg.content.array_records["model"].to_torch_state_dict())
    acc, loss = evaluate(model, x, y, run.cfg.test_batch_size) if y.numel() else (0.0, 0.0)
    return Message(RecordDict({"metrics": MetricRecord({"accuracy": acc, "loss": loss, "num-examples": int(y.numel())})}),
                   reply_to=msg)


def injected_fault(spec: str, round_idx: int, slot: int) -> str | None:
    """Test hook: "2:0:crash,2:1:nan" makes slot 0 of round 2 crash and slot 1 return NaNs."""
    for item in filter(None, (s.strip() for s in spec.split(","))):
        r, s, kind = item.split(":")
        if int(r) == round_idx + 1 and int(s) == slot:
            return kind
    return None
