"""Each site with only its own data (``flower.data = "node"``).

A SuperNode started with ``--node-config "data-dir=/srv/site7"`` is one client: its ClientApp reads
that folder (an image folder ``train/<class>/*`` with an optional ``test/<class>/*``, as
``fedmr partition --export`` writes, or any data set fedmr reads, with ``data_dir`` = that folder)
and never sees another site's data.  The ServerApp holds no training data: it asks every node what
it holds (sample and label counts, classes, image shape), checks that the sites agree with each
other and with its own test set if it has one, and builds the federation and the model from that.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..algorithms.base import Federation
from ..config import RunConfig
from ..data import DataSet, DataSource, load_dataset, normalization
from ..data.imagefolder import DEFAULT_NORMALIZATION, decode_all
from ..errors import DataError
from ..seeding import derive_seed
from ..training import clone_state

NODE_KEY = "data-dir"


@dataclass
class SiteData:
    """One site's samples, resident as tensors like a ``DataSet``'s."""

    path: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: list[str]
    default_model: str = "cnn"

    @property
    def shape(self) -> list[int]:
        return [int(s) for s in self.train_x.shape[1:]]

    def client(self, client_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``engine.client.ClientData``'s interface: whichever client id the server gave this node,
        its data are this site's."""
        return self.train_x, self.train_y

    def info(self) -> dict[str, Any]:
        """What the node tells the server (counts and the data's form, never samples)."""
        counts = np.bincount(self.train_y.numpy(), minlength=len(self.classes))
        return {"data-dir": self.path, "num-examples": int(self.train_y.numel()), "test-examples": int(self.test_y.numel()),
                "label-counts": [int(c) for c in counts], "classes": list(self.classes), "shape": self.shape,
                "default-model": self.default_model}


def node_data_dir(node_config: Mapping[str, Any]) -> str:
    if NODE_KEY not in node_config:
        raise DataError("this run reads each site's own data (flower.data = \"node\"), but the SuperNode has no "
                        "data-dir in its node config (start it with --node-config \"data-dir=/path/to/this/site\")")
    return str(node_config[NODE_KEY])


@functools.lru_cache(maxsize=2)
def cached_site(config_key: str, path: str) -> SiteData:
    """One load per ClientApp process, run config and folder (a long-lived ClientApp reuses it)."""
    from ..engine.experiment import resolve_device

    cfg = RunConfig.of(json.loads(config_key))
    site = read_site(cfg, path)
    device = resolve_device(cfg.device)
    for name in ("train_x", "train_y", "test_x", "test_y"):
        setattr(site, name, getattr(site, name).to(device))
    return site


def read_site(cfg: Mapping[str, Any], path: str, need_train: bool = True) -> SiteData:
    source = DataSource.of(cfg)
    root = Path(path).expanduser()
    if not root.exists():
        raise DataError(f"data-dir {root} does not exist")
    if not root.is_dir() or not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"data-dir {root} is not a readable folder")
    if source.dataset == "imagefolder":
        if not any(root.iterdir()):  # (an empty folder; one without train/ is the loader's error)
            raise DataError(f"data-dir {root} is empty (expected train/<class>/* images, as fedmr partition --export writes)")
        arrays, meta = decode_all(root, site=True)
        affine = normalization.resolve(source.normalization, DEFAULT_NORMALIZATION, arrays["train_x"].shape[3])
        site = SiteData(str(root), normalization.to_tensor(arrays["train_x"], affine), torch.from_numpy(arrays["train_y"]),
                        normalization.to_tensor(arrays["test_x"], affine), torch.from_numpy(arrays["test_y"]),
                        list(meta["classes"]))
    else:
        data: DataSet = load_dataset(dataclasses.replace(source, data_dir=str(root)))
        site = SiteData(str(root), data.train_x, data.train_y, data.test_x, data.test_y,
                        list(data.classes) or [str(c) for c in range(data.num_classes)], data.default_model)
    if need_train and site.train_y.numel() == 0:
        raise DataError(f"data-dir {root} holds no training samples (expected train/<class>/* images)")
    return site


# ---- server side ------------------------------------------------------------------------

def client_error(reason: str | None) -> str:
    """A ClientApp's exception as Flower reports it, "<class 'fedmr.errors.DataError'>:<'...'>", as one line
    (Flower gives None for an empty reason)."""
    if not reason:
        return "the ClientApp failed without a reason"
    match = re.fullmatch(r"<class '([\w.]+)'>:<'(.*)'>", reason, flags=re.S)
    if not match:
        return reason
    kind, message = match.groups()
    return message if kind.startswith("fedmr.errors.") else f"{kind.rsplit('.', 1)[-1]}: {message}"


def check_sites(sites: Sequence[tuple[int, Mapping[str, Any]]],
                reference: tuple[list[str], list[int], str] | None = None) -> None:
    """Every site must have the run's classes and image shape: the server's test set's if it has
    one, else the first node's."""
    classes, shape, source = reference or (list(sites[0][1]["classes"]), list(sites[0][1]["shape"]),
                                           f"node {sites[0][0]} ({sites[0][1]['data-dir']})")
    for node, info in sites:
        where = f"node {node} ({info['data-dir']})"
        if list(info["classes"]) != classes:
            raise DataError(f"{where} has classes {list(info['classes'])}, but the run's are {classes} (from {source}); "
                            "every site needs the same class folders (empty ones too)")
        if list(info["shape"]) != shape:
            raise DataError(f"{where} has images of shape {'x'.join(map(str, info['shape']))}, but the run's are "
                            f"{'x'.join(map(str, shape))} (from {source})")


def site_federation(cfg: RunConfig, sites: Sequence[tuple[int, Mapping[str, Any]]]) -> Federation:
    """Client i is the i-th site (in ``strategy.site_order``)."""
    return Federation(num_clients=len(sites), clients_per_round=cfg.clients_per_round,
                      client_sizes=tuple(int(info["num-examples"]) for _, info in sites),
                      num_classes=len(sites[0][1]["classes"]), seed=cfg.seed,
                      label_counts=tuple(tuple(int(c) for c in info["label-counts"]) for _, info in sites))


def site_model(cfg: RunConfig, num_classes: int, shape: Sequence[int],
               default_model: str) -> tuple[str, Callable[[], torch.nn.Module]]:
    """(the model's name, a builder) for the sites' samples: the config's model (a built-in, "auto" or a
    plug-in) resolved as ``engine.experiment.prepare`` resolves it, from the shape the sites report."""
    from types import SimpleNamespace

    from ..models import model_builder

    probe = SimpleNamespace(train_x=torch.zeros(0, *shape), num_classes=num_classes, default_model=default_model)
    name, build, _ = model_builder(cfg.model, probe)
    return name, build


def initial_state(cfg: RunConfig, build: Callable[[], torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The initial model drawn from the config's seed, as ``engine.experiment.prepare`` draws it."""
    torch.manual_seed(derive_seed(cfg.seed, "init"))
    return clone_state(build())
