"""Experiment set-up: the config's data, partition, model and initial state, drawn from its seed
before the first round.  The simulator, comparisons, the API and the Flower apps all start here."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import torch

from ..algorithms import Federation
from ..config import RunConfig
from ..data import DataSet, check_trainable, load_dataset
from ..errors import ConfigError
from ..maths import State
from ..models import check_model_output, model_builder
from ..partition import Partition, config_json, make_partition, summarize
from ..results import RunWriter
from ..seeding import derive_seed
from ..training import bf16_is_native, clone_state
from .client_eval import ClientTests

log = logging.getLogger("fedmr")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device = \"cuda\" but no CUDA GPU is available (use \"cpu\" or \"auto\")")
    return torch.device(name)


@dataclass
class Experiment:
    """Everything a run needs before its first round; shared by the runs of ``compare``."""

    cfg: RunConfig
    data: DataSet
    partition: Partition
    partition_summary: dict[str, Any]
    model_name: str
    initial_state: State
    device: torch.device
    build: Callable[[], torch.nn.Module] | None = field(default=None, repr=False)  # a fresh model (any kind)

    @property
    def federation(self) -> Federation:
        labels = self.data.train_y.cpu().numpy()
        counts = tuple(tuple(int(c) for c in np.bincount(labels[p], minlength=self.data.num_classes)) for p in self.partition)
        return Federation(
            num_clients=self.cfg.num_clients,
            clients_per_round=self.cfg.clients_per_round,
            client_sizes=tuple(len(p) for p in self.partition),
            num_classes=self.data.num_classes,
            seed=self.cfg.seed,
            label_counts=counts,
        )

    @cached_property
    def client_tests(self) -> ClientTests | None:
        """Each client's local test part (``engine/client_eval.py``), dealt once per experiment; None
        where its clients hold their data themselves or there is no test set."""
        return ClientTests.deal(self.data, self.partition, self.cfg.seed)

    def write_clients(self, writer: RunWriter, cfg: RunConfig) -> None:
        """The results folder's record of who holds which data: partition.json (each client's sample
        indices, the authors' format) and its summary.  An experiment whose clients hold their data
        themselves (a Flower federation of sites) writes what it knows instead."""
        writer.write_partition(config_json(self.partition, cfg), self.partition_summary)

    def new_model(self) -> torch.nn.Module:
        assert self.build is not None, "an Experiment is made by prepare()"
        model = self.build()
        model.load_state_dict(self.initial_state)
        # channels_last touches 4-D (convolution) weights only, so other models stay as they are
        # torch's stubs lack Module.to's memory_format overload (documented and accepted at runtime)
        return model.to(self.device, memory_format=torch.channels_last)  # type: ignore[call-overload]


def check_cpp_compiler() -> None:
    """``compile = true`` on a CPU builds C++ kernels: refuse to start where no compiler is found."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as e:  # inductor raises its own InvalidCxxCompiler (and OSError on odd paths)
        raise ConfigError(f"compile = true needs a C++ compiler on a CPU (g++, or the one $CXX names): {e}".strip()
                          ) from None


def prepare(cfg: Mapping[str, Any], data: DataSet | None = None, model: Any = None) -> Experiment:
    """Load data, draw the partition and the initial model, all from the config's seed.  ``data`` and
    ``model`` (a factory(num_classes, input_shape)) override the config's ``dataset`` and ``model``.
    A config given as a plain mapping is checked first."""
    cfg = RunConfig.of(cfg)
    device = resolve_device(cfg.device)
    if cfg.precision == "bf16" and not bf16_is_native(device):
        log.warning("precision = \"bf16\": this %s has no native bf16 units, so bf16 is emulated here and slower "
                    "than fp32", "CPU" if device.type == "cpu" else "GPU")
    if cfg.compile and device.type == "cpu":
        check_cpp_compiler()
    if cfg.compile:
        log.info("compile = true: each training process compiles the model once, in its first round "
                 "(tens of seconds on one core; inductor caches it on disk for later processes)")
    data = data if data is not None else load_dataset(cfg)
    for warning in check_trainable(data):
        log.warning("%s", warning)
    labels = data.train_y.cpu().numpy()
    partition = make_partition(cfg, labels, data.natural_partition, clients_per_round=cfg.clients_per_round)
    summary = summarize(partition, labels, data.num_classes)
    model_name, build, user_code = model_builder(model if model is not None else cfg.model, data)
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    net = build()
    if user_code:  # once, before round 1: a user model must map a batch to (batch, num_classes) logits
        check_model_output("model", net, data.train_x[:2], data.num_classes, model_name)
    initial = {k: v.to(device) for k, v in clone_state(net).items()}  # so the server's pool lives on the device too
    return Experiment(cfg, data.to(device), partition, summary, model_name, initial, device, build)
