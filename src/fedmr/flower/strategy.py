"""A Flower strategy that delegates every decision to a fedmr ``Algorithm``.

The algorithm picks the clients, builds one task per client (FedMR: a
different model from its pool per slot) and folds the replies back in; the
strategy only routes tasks to the SuperNodes that host those clients and
turns replies into ``TrainResult``s.  It uses the simulator's random streams
(select/round, server/round), so a seed gives the same run on either engine.

On the rounds the run's ``Recorder`` evaluates (``evaluation_due``: every ``eval_every`` rounds
and after the last; without one, every round) it can also send the global model to a
``fraction_evaluate`` sample of the nodes, which evaluate it on their own test data; the
sample-weighted accuracy and loss become ``last_eval`` (fed_accuracy, fed_loss, fed_examples),
which the ServerApp hands to the recorder as its extra columns.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from ..algorithms.base import Algorithm, TrainResult, TrainTask
from ..engine.rounds import RoundFold, RoundPlan, plan_round
from ..engine.traffic import Traffic, held_bytes
from ..errors import ConfigError, DataError
from ..maths import State
from ..seeding import numpy_rng, torch_generator
from .sites import check_sites, client_error
from .task import decode_result, encode_task, message_array_bytes

log = logging.getLogger("fedmr.flower")


def state_digest(state: Mapping[str, Any]) -> str:
    """SHA-256 of a state's tensors in key order: equal digests, equal models."""
    h = hashlib.sha256()
    for key, value in state.items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def ask_nodes(grid: Grid, asked: set[int], timeout: float) -> list[Message]:
    """The query's replies of the connected nodes not asked yet (``asked`` grows)."""
    queries = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY)
               for n in grid.get_node_ids() if n not in asked]
    replies = list(grid.send_and_receive(queries, timeout=timeout)) if queries else []
    asked.update(r.metadata.src_node_id for r in replies)
    return replies


SiteInfo = TypeVar("SiteInfo", bound=Mapping[str, Any])


def site_order(sites: Mapping[int, SiteInfo]) -> list[tuple[int, SiteInfo]]:
    """Sites by what they hold (data-dir, sample count, label counts), the node id only breaking ties:
    a SuperNode that restarts gets a new random node id, and a resumed run must still give each
    client id (and its per-client state) the same site."""
    return sorted(sites.items(), key=lambda item: (str(item[1]["data-dir"]), int(item[1]["num-examples"]),
                                                   [int(c) for c in item[1]["label-counts"]], item[0]))


def discover_sites(grid: Grid, num_clients: int, node_wait: float,
                   reference: tuple[list[str], list[int], str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """``flower.data = "node"``: wait for ``num_clients`` nodes, each one site with its own data-dir;
    their (node id, site info) in :func:`site_order`, so client i is the i-th.  A node that cannot
    read its data stops the run with its one-line reason."""
    deadline = time.monotonic() + node_wait
    asked: set[int] = set()
    sites: dict[int, dict[str, Any]] = {}
    while len(sites) < num_clients:
        for reply in ask_nodes(grid, asked, node_wait):
            node = reply.metadata.src_node_id
            if reply.has_error():
                raise DataError(f"node {node}: {client_error(reply.error.reason)}")
            sites[node] = json.loads(str(reply.content.config_records["site"]["info"]))
        if len(sites) >= num_clients:
            break
        if time.monotonic() > deadline:
            raise ConfigError(f"{len(sites)} of num_clients = {num_clients} SuperNodes with a data-dir connected "
                              f"in {node_wait:.0f}s (each site is one client)")
        time.sleep(0.5)
    chosen = site_order(sites)[:num_clients]
    check_sites(chosen, reference)
    for node, info in chosen:
        log.info("node %d: %d training and %d test samples in %s", node, info["num-examples"], info["test-examples"],
                 info["data-dir"])
    return chosen


class AlgorithmStrategy(Strategy):
    """Flower round n (1-based) is the algorithm's round ``rounds_before + n - 1``: a resumed run's
    Flower rounds start again at 1, its algorithm rounds go on where the checkpoint left them."""

    def __init__(self, algorithm: Algorithm, *, seed: int, reference: State, max_update_norm: float = 0.0,
                 node_wait: float = 120.0, message_log: Path | None = None, rounds_before: int = 0,
                 fraction_evaluate: float = 0.0, evaluation_due: Callable[[int], bool] = lambda done: True):
        self.algorithm = algorithm
        self.seed = seed
        self.rounds_before = rounds_before
        self.reference = reference  # keys, shapes and dtypes every reply must match
        self.max_update_norm = max_update_norm
        self.node_wait = node_wait
        self.message_log = message_log  # one JSON line per train message: round, node, client, slot, digest
        self.node_of: dict[int, int] = {}  # client id -> node id
        self.plan = RoundPlan(-1, [], [], Traffic())  # the last round's tasks and traffic (engine/rounds.py)
        self.sent: list[Message] = []  # the last round's train messages (tests inspect them)
        self.last_round: dict[str, Any] = {}
        self.fraction_evaluate = fraction_evaluate
        self.evaluation_due = evaluation_due  # rounds done (whole run) -> evaluate now? (the Recorder's)
        self.last_eval: dict[str, Any] = {}  # the latest federated evaluation, for the metrics row

    @property
    def tasks(self) -> list[TrainTask]:
        return self.plan.tasks

    @property
    def traffic(self) -> Traffic:
        """The last round's bytes: down as the messages carry them, up once the replies are folded."""
        return self.plan.traffic

    # ---- routing ------------------------------------------------------------------------
    def discover(self, grid: Grid) -> None:
        """Ask every connected node for its partition until each client has a host."""
        num_clients = self.algorithm.federation.num_clients
        deadline = time.monotonic() + self.node_wait
        asked: set[int] = set()
        while True:
            for reply in ask_nodes(grid, asked, self.node_wait):
                if reply.has_error():
                    log.warning("node %d did not answer the partition query: %s", reply.metadata.src_node_id,
                                client_error(reply.error.reason))
                    continue
                info = reply.content.config_records["partition"]
                pid, parts = int(cast(int, info["partition-id"])), int(cast(int, info["num-partitions"]))
                for client in range(pid, num_clients, parts):
                    self.node_of.setdefault(client, reply.metadata.src_node_id)
            missing = [c for c in range(num_clients) if c not in self.node_of]
            if not missing:
                log.info("%d nodes host the %d clients", len(set(self.node_of.values())), num_clients)
                return
            if time.monotonic() > deadline:
                raise ConfigError(f"no SuperNode hosts client {missing[0]} after {self.node_wait:.0f}s "
                                  f"({len(missing)} of {num_clients} clients unhosted; check partition-id/num-partitions)")
            time.sleep(0.5)

    # ---- training -----------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if not self.node_of:
            self.discover(grid)
        round_idx = self.rounds_before + server_round - 1
        plan = plan_round(self.algorithm, round_idx, self.seed)  # the round protocol (engine/rounds.py)
        self.sent = [Message(encode_task(task, round_idx), dst_node_id=self.node_of[task.client_id],
                             message_type=MessageType.TRAIN) for task in plan.tasks]
        held = self.algorithm.client_held  # the client's own state in the payload (engine/traffic.py)
        self.plan = dataclasses.replace(plan, traffic=Traffic(sum(message_array_bytes(m.content) for m in self.sent), 0,
                                                              sum(held_bytes(t, held) for t in plan.tasks)))
        if self.message_log is not None:
            with self.message_log.open("a") as fh:
                for task, msg in zip(self.tasks, self.sent):
                    fh.write(json.dumps({"round": round_idx + 1, "node": msg.metadata.dst_node_id, "client": task.client_id,
                                         "slot": task.slot, "sha256": state_digest(task.state)}) + "\n")
        return self.sent

    def fold(self, replies: Iterable[Message]) -> RoundFold:
        """The replies to the last round's tasks through the shared fold (engine/rounds.py): decoded
        here, checked and counted there."""
        fold = RoundFold(self.plan, self.reference, self.max_update_norm)
        for reply in replies:
            sender = f"a reply from node {reply.metadata.src_node_id}"
            received = 0 if reply.has_error() else message_array_bytes(reply.content)  # sound or not
            problem, result = self._decode(reply)
            fold.offer(result, received=received, problem=problem, sender=sender)
        fold.warn_missing()
        return fold

    def accepted(self, replies: Iterable[Message]) -> tuple[list[TrainResult], int, int]:
        """The sound results of a round in slot order (as the simulator folds them), how many
        replies were refused (failed, malformed or rejected by ``update_problem``) and how many never came."""
        fold = self.fold(replies)
        return fold.in_slot_order(), fold.rejected, fold.dropped

    @staticmethod
    def _decode(reply: Message) -> tuple[str | None, TrainResult | None]:
        if reply.has_error():
            return f"the client failed: {reply.error.reason}", None
        try:
            return None, decode_result(reply.content)
        except KeyError as exc:
            return f"malformed reply: no \"{exc.args[0]}\"", None
        except (TypeError, ValueError) as exc:
            return f"malformed reply ({type(exc).__name__}: {exc})", None

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        round_idx = self.rounds_before + server_round - 1
        fold = self.fold(replies)
        results = fold.in_slot_order()
        used = self.algorithm.aggregate_train(round_idx, iter(results), torch_generator(self.seed, "server", round_idx))
        self.last_round = fold.stats(used).as_row()
        metrics = MetricRecord({"clients": used, "rejected": fold.rejected})
        if results:
            metrics["train_loss"] = self.last_round["train_loss"]
        return ArrayRecord({k: v.detach().cpu() for k, v in self.algorithm.global_state().items()}), metrics

    # ---- federated evaluation: the global model on the nodes' own test data -------------
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        done = self.rounds_before + server_round
        self.last_eval = {}
        if self.fraction_evaluate <= 0 or not self.evaluation_due(done):
            return []
        nodes = sorted(set(self.node_of.values()))
        count = min(len(nodes), max(1, math.ceil(self.fraction_evaluate * len(nodes))))
        picks = sorted(nodes[int(i)] for i in numpy_rng(self.seed, "evaluate", done - 1).choice(len(nodes), count, replace=False))
        return [Message(RecordDict({"model": arrays, "config": ConfigRecord({"round": done - 1})}), dst_node_id=n,
                        message_type=MessageType.EVALUATE) for n in picks]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Accuracy and loss weighted by each node's "num-examples"; unusable replies are logged and left out."""
        done = self.rounds_before + server_round
        sound: list[RecordDict] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                log.warning("round %d: node %d failed to evaluate: %s", done, node,
                            client_error(reply.error.reason))
                continue
            metrics = reply.content.metric_records.get("metrics")
            missing = [k for k in ("num-examples", "accuracy", "loss") if metrics is None or k not in metrics]
            if missing:
                log.warning("round %d: rejected the evaluation reply of node %d: no \"%s\"", done, node, missing[0])
                continue
            assert metrics is not None  # else all three keys are missing
            if int(cast(float, metrics["num-examples"])) > 0:
                sound.append(reply.content)
        if not sound:
            return None
        weighted = aggregate_metricrecords(sound, "num-examples")
        # numbers (as the ClientApp's evaluate sends them), and their weighted means
        examples = sum(int(cast(float, c.metric_records["metrics"]["num-examples"])) for c in sound)
        self.last_eval = {"fed_accuracy": float(cast(float, weighted["accuracy"])),
                          "fed_loss": float(cast(float, weighted["loss"])), "fed_examples": examples}
        log.info("round %d: federated evaluation on %d nodes, %d examples: accuracy %.4f loss %.4f", done, len(sound),
                 examples, self.last_eval["fed_accuracy"], self.last_eval["fed_loss"])
        return MetricRecord(self.last_eval)

    def summary(self) -> None:
        fed = self.algorithm.federation
        log.info("fedmr algorithm '%s': %d clients, %d per round, seed %d", self.algorithm.name, fed.num_clients,
                 fed.clients_per_round, self.seed)
