"""FedMR and FedIndep as drop-in Flower strategies for any Flower app.

``FedMR`` takes Flower's ``FedAvg`` constructor arguments (same names, defaults and meaning) plus
``first_stage_rounds`` and ``block_fraction``, and ``start()`` is Flower's: an app built from
Flower's PyTorch quickstart changes one import and one class name.  The messages follow FedAvg's
conventions (the model under ``arrayrecord_key``, the train config under ``configrecord_key`` with
``"server-round"``, the weight under ``weighted_by_key``); the only difference a ClientApp sees is
that the nodes of a round receive different models.

The server side is fedmr's own ``FedMR``/``FedIndep`` algorithm object: slot *i* of its pool goes
to the *i*-th sampled node, the replies are folded in by ``Algorithm.aggregate_train`` (recombine,
or the first-stage reset) and the model the strategy returns each round, which ``Result.arrays``
ends with and federated evaluation sends out, is ``Algorithm.global_state()``: the pool mean.
Sampling, federated evaluation and metric aggregation are FedAvg's (an evaluation reply without the
weight is logged and left out rather than failing the round).

K is the number of nodes sampled for training in a round (FedAvg's rule: ``fraction_train`` of the
connected nodes, at least ``min_train_nodes``).  When it changes between rounds because nodes joined
or left, the pool is resized first (``maths.resize_pool``): it keeps K of its models, or gains
copies of the pool mean.  A reply that is an error, lacks the one ArrayRecord or the
``weighted_by_key`` weight, or fails ``engine.validation.update_problem`` (keys, shapes, dtypes,
finite values) is logged and counted, and its slot keeps the model it had, as in the simulator.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Result
from flwr.serverapp.strategy.strategy_utils import sample_nodes

from ..algorithms.base import Federation, TrainResult
from ..algorithms.fedindep import FedIndep as FedIndepAlgorithm
from ..algorithms.fedmr import FedMR as FedMRAlgorithm
from ..engine.rounds import RoundFold, RoundPlan, plan_round
from ..engine.traffic import Traffic
from ..maths import State
from .task import message_array_bytes

log = logging.getLogger("fedmr.flower")

MetricsAggregation = Callable[[list[RecordDict], str], MetricRecord]


def reply_problem(reply: Message, weighted_by_key: str) -> tuple[str | None, State | None, float]:
    """Why a train reply cannot be used (or None), its model and its weight."""
    if reply.has_error():
        return f"the ClientApp failed: {reply.error.reason}", None, 0.0
    content = reply.content
    if len(content.array_records) != 1:
        return f"expected one ArrayRecord, got {len(content.array_records)}", None, 0.0
    metrics = list(content.metric_records.values())
    if len(metrics) != 1 or weighted_by_key not in metrics[0]:
        return f"its MetricRecord has no \"{weighted_by_key}\" (the reply must say how many examples it trained on)", None, 0.0
    weight = metrics[0][weighted_by_key]
    if isinstance(weight, list) or not weight >= 0:
        return f"\"{weighted_by_key}\" must be one non-negative number, got {weight!r}", None, 0.0
    try:
        state = next(iter(content.array_records.values())).to_torch_state_dict()
    except Exception as exc:  # an array Flower cannot turn into a tensor
        return f"malformed arrays ({type(exc).__name__}: {exc})", None, 0.0
    return None, state, float(weight)


class FedIndep(FedAvg):
    """FedMR's control as a Flower strategy: K models trained by the sampled nodes, never mixed."""

    algorithm_class: type[FedIndepAlgorithm] = FedIndepAlgorithm

    def __init__(self, fraction_train: float = 1.0, fraction_evaluate: float = 1.0, min_train_nodes: int = 2,
                 min_evaluate_nodes: int = 2, min_available_nodes: int = 2, weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config",
                 train_metrics_aggr_fn: MetricsAggregation | None = None,
                 evaluate_metrics_aggr_fn: MetricsAggregation | None = None) -> None:
        super().__init__(fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
                         weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn,
                         evaluate_metrics_aggr_fn)
        self.options: dict[str, Any] = {}
        self.algorithm: FedIndepAlgorithm | None = None
        self.reference: State = {}
        self.slot_of: dict[int, int] = {}  # node id -> pool slot, this round
        self.last_round: dict[str, float] = {}  # the last round's counts and MB down/up (engine/traffic.py)
        self.traffic = Traffic()
        self.plan: RoundPlan | None = None  # this round's (engine/rounds.py)
        self.rejected = self.dropped = 0  # over the whole run

    # ---- the run ----------------------------------------------------------------------
    def start(self, grid: Grid, initial_arrays: ArrayRecord, num_rounds: int = 3, timeout: float = 3600,
              train_config: ConfigRecord | None = None, evaluate_config: ConfigRecord | None = None,
              evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None) -> Result:
        """Flower's ``Strategy.start``; every slot of the pool starts as ``initial_arrays``."""
        self.reference = initial_arrays.to_torch_state_dict()
        federation = Federation(num_clients=1, clients_per_round=1, client_sizes=(), num_classes=0, seed=0)
        self.algorithm = self.algorithm_class(self.options, federation)
        self.algorithm.setup(self.reference)
        self.rejected = self.dropped = 0
        return super().start(grid, initial_arrays, num_rounds, timeout, train_config, evaluate_config, evaluate_fn)

    def summary(self) -> None:
        log.info("\t├──> %s: %s", type(self).__name__, self.options or "K independent models")
        super().summary()

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        """FedAvg's sampling; slot i of the pool goes to the i-th sampled node."""
        if self.algorithm is None:
            raise RuntimeError(f"{type(self).__name__}.start() sets up the pool; call it rather than configure_train")
        if self.fraction_train == 0.0:
            return []
        sample_size = max(int(len(list(grid.get_node_ids())) * self.fraction_train), self.min_train_nodes)
        node_ids, connected = sample_nodes(grid, self.min_available_nodes, sample_size)
        k = len(node_ids)
        if k != self.algorithm.federation.clients_per_round and server_round > 1:
            log.info("round %d: %d nodes sampled, the pool had %d models: resized", server_round, k,
                     self.algorithm.federation.clients_per_round)
        self.algorithm.resize_pool(k)
        log.info("configure_train: Sampled %s nodes (out of %s)", k, len(connected))
        config["server-round"] = server_round
        # the round protocol (engine/rounds.py): Flower sampled the nodes, so slot i is the i-th node's
        self.plan = plan_round(self.algorithm, server_round - 1, clients=list(range(k)))
        self.slot_of = {node: task.slot for node, task in zip(node_ids, self.plan.tasks)}
        messages = [Message(RecordDict({self.arrayrecord_key: ArrayRecord({k: v.detach().cpu() for k, v in task.state.items()}),
                                        self.configrecord_key: ConfigRecord(dict(config))}),
                            dst_node_id=node, message_type=MessageType.TRAIN)
                    for node, task in zip(node_ids, self.plan.tasks)]
        self.traffic = self.plan.traffic = Traffic(sum(message_array_bytes(m.content) for m in messages))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Sound replies go back into their slots, then the algorithm mixes; returns the pool mean."""
        assert self.algorithm is not None and self.plan is not None
        fold = RoundFold(self.plan, self.reference)  # checked and counted as in the simulator (engine/rounds.py)
        used: list[RecordDict] = []
        for reply in replies:
            node = reply.metadata.src_node_id
            slot = self.slot_of.get(node)
            problem, state, weight = reply_problem(reply, self.weighted_by_key)
            if problem is None and slot is None:
                problem = "this node was not asked this round"
            result = None
            if problem is None:
                assert slot is not None and state is not None  # else a problem above (reply_problem gives a state)
                result = TrainResult(slot, slot, state, int(weight))
            received = 0 if reply.has_error() else message_array_bytes(reply.content)  # sound or not
            if fold.offer(result, received=received, problem=problem, sender=f"the reply of node {node}",
                          note="; its slot keeps its model") is not None:
                used.append(reply.content)
        fold.warn_missing("nodes")
        # the quickstart's replies carry no train loss this strategy reads: the row leaves it out
        self.last_round = {k: v for k, v in fold.stats(len(fold.accepted)).as_row().items() if k != "train_loss"}
        self.rejected += fold.rejected
        self.dropped += fold.dropped
        generator = torch.Generator().manual_seed(random.getrandbits(63))  # seed Python's random to repeat a run
        self.algorithm.aggregate_train(server_round - 1, iter(fold.in_slot_order()), generator)
        metrics = self.train_metrics_aggr_fn(used, self.weighted_by_key) if used else None
        return ArrayRecord({k: v.detach().cpu() for k, v in self.algorithm.global_state().items()}), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """FedAvg's weighted metrics over the usable replies; one without the weight is logged and left out."""
        sound = []
        for reply in replies:
            if reply.has_error():
                log.warning("round %d: node %d failed to evaluate: %s", server_round, reply.metadata.src_node_id,
                            reply.error.reason)
                continue
            metrics = list(reply.content.metric_records.values())
            if len(metrics) != 1 or self.weighted_by_key not in metrics[0]:
                log.warning("round %d: rejected the evaluation reply of node %d: its MetricRecord has no \"%s\"",
                            server_round, reply.metadata.src_node_id, self.weighted_by_key)
                continue
            sound.append(reply.content)
        return self.evaluate_metrics_aggr_fn(sound, self.weighted_by_key) if sound else None


FEDMR_DEFAULTS = FedMRAlgorithm.Options.defaults()  # the declared defaults, as `fedmr run` has them


class FedMR(FedIndep):
    """FedMR (Hu et al.) as a Flower strategy: each sampled node trains a different model of the pool,
    the returned models are recombined layer by layer; ``first_stage_rounds`` rounds of equal-weight
    averaging first, ``block_fraction`` > 0 moves blocks of layers (fedmr's ``fedmr`` options)."""

    algorithm_class = FedMRAlgorithm

    def __init__(self, fraction_train: float = 1.0, fraction_evaluate: float = 1.0, min_train_nodes: int = 2,
                 min_evaluate_nodes: int = 2, min_available_nodes: int = 2, weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", configrecord_key: str = "config",
                 train_metrics_aggr_fn: MetricsAggregation | None = None,
                 evaluate_metrics_aggr_fn: MetricsAggregation | None = None,
                 first_stage_rounds: int = FEDMR_DEFAULTS["first_stage_rounds"],
                 block_fraction: float = FEDMR_DEFAULTS["block_fraction"]) -> None:
        super().__init__(fraction_train, fraction_evaluate, min_train_nodes, min_evaluate_nodes, min_available_nodes,
                         weighted_by_key, arrayrecord_key, configrecord_key, train_metrics_aggr_fn,
                         evaluate_metrics_aggr_fn)
        self.options = {"first_stage_rounds": int(first_stage_rounds), "block_fraction": float(block_fraction)}
        FedMRAlgorithm.check_options(self.options)
