"""Client partitions: IID, the authors' Dirichlet variant, saved files, and writers' natural splits.

A partition is a list of index lists, one per client, into the training set.
Files use the authors' JSON format, so their saved partitions load here and
ours load in their code.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, cast

import numpy as np

from .errors import PartitionError

log = logging.getLogger("fedmr")

Partition = list[list[int]]

MIN_CLIENT_SIZE = 10
MAX_DIRICHLET_TRIES = 1000


@dataclass(frozen=True)
class PartitionSpec:
    """The config keys a partition is drawn from (the fields bear their names)."""

    partition: str
    num_clients: int
    alpha: float
    seed: int
    partition_file: str = ""
    dataset: str = ""
    partition_file_check: bool = True

    @classmethod
    def of(cls, cfg: PartitionSpec | Mapping[str, Any]) -> PartitionSpec:
        """From a run config (or any mapping of its keys)."""
        # cast: mypy does not narrow on isinstance(cfg, cls); not a PartitionSpec there, so a mapping
        if isinstance(cfg, cls):
            return cfg
        mapping = cast(Mapping[str, Any], cfg)
        return cls(**{f.name: mapping[f.name] for f in fields(cls) if f.name in mapping or f.default is MISSING})


def _fewer_clients(count: int, clients_per_round: int | None) -> str:
    """``--set num_clients=N``, and the clients_per_round that then fits (a run selects at most N)."""
    fits = f" --set clients_per_round={count}" if clients_per_round is not None and clients_per_round > count else ""
    return f"--set num_clients={count}{fits}"


def iid_partition(num_samples: int, num_clients: int, rng: np.random.Generator,
                  clients_per_round: int | None = None) -> Partition:
    """Shuffle and deal out equal shares (sizes differ by at most one)."""
    if num_samples < num_clients:
        raise PartitionError(f"data set too small: {num_samples} training samples for {num_clients} clients "
                             f"(it supports at most {num_samples}: {_fewer_clients(num_samples, clients_per_round)})")
    order = rng.permutation(num_samples)
    return [part.tolist() for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator, min_size: int = MIN_CLIENT_SIZE,
    tries: int = MAX_DIRICHLET_TRIES,
) -> Partition:
    """The authors' Dirichlet label skew.

    Repeat until the smallest client holds ``min_size`` samples: for each class,
    shuffle its indices, draw proportions ~ Dir(alpha) over the clients, zero the
    share of every client already holding at least N / num_clients samples,
    renormalise and split the class at the cumulative proportions.  Finally each
    client's list is shuffled.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if alpha <= 0:
        raise PartitionError(f"alpha must be positive, got {alpha}")
    if n < min_size * num_clients:
        raise PartitionError(
            f"data set too small: {n} training samples cannot give {num_clients} clients {min_size} each"
        )
    classes = np.unique(labels)
    by_class = [np.flatnonzero(labels == c) for c in classes]
    cap = n / num_clients
    for _ in range(tries):
        parts: list[list[int]] = [[] for _ in range(num_clients)]
        for members in by_class:
            members = members.copy()
            rng.shuffle(members)
            props = rng.dirichlet(np.full(num_clients, alpha))
            props = np.array([p * (len(part) < cap) for p, part in zip(props, parts)])
            total = props.sum()
            props = props / total if total > 0 else np.full(num_clients, 1.0 / num_clients)
            cuts = (np.cumsum(props) * len(members)).astype(int)[:-1]
            for part, chunk in zip(parts, np.split(members, cuts)):
                part.extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            for part in parts:
                rng.shuffle(part)
            return [[int(i) for i in part] for part in parts]
    raise PartitionError(
        f"data set too small for a Dirichlet(alpha={alpha}) split: no draw in {MAX_DIRICHLET_TRIES} gave all "
        f"{num_clients} clients {min_size} of the {n} samples; use fewer clients (e.g. --set num_clients="
        f"{max(1, n // (4 * min_size))}) or a larger alpha"
    )


def check_partition(parts: Sequence[Sequence[int]], num_samples: int, source: str = "partition") -> Partition:
    """Indices must be integers in range, each used at most once, and no client empty."""
    seen = np.zeros(num_samples, dtype=bool)
    clean: Partition = []
    for client, part in enumerate(parts):
        if not isinstance(part, (list, tuple)) or not part:
            raise PartitionError(f"{source}: client {client} has no samples")
        if not all(isinstance(i, int) and not isinstance(i, bool) for i in part):
            raise PartitionError(f"{source}: client {client} has an index that is not an integer")
        bad = next((i for i in part if not 0 <= i < num_samples), None)  # before numpy: 2**70 would overflow
        if bad is not None:
            shown = bad if abs(bad) < 10**40 else "with more than 40 digits"
            raise PartitionError(
                f"{source}: client {client} has index {shown} out of range for {num_samples} training samples"
            )
        arr = np.asarray(part, dtype=np.int64)
        if np.unique(arr).size != arr.size or seen[arr].any():
            dup = next(int(i) for i in arr if seen[i] or (arr == i).sum() > 1)
            raise PartitionError(f"{source}: index {dup} appears more than once (client {client})")
        seen[arr] = True
        clean.append(arr.tolist())
    return clean


def to_json(parts: Partition, *, dataset: str, kind: str, alpha: float | None) -> dict[str, Any]:
    """The authors' partition file format."""
    return {
        "dataset": dataset,
        "num_users": len(parts),
        "iid": kind == "iid",
        "noniid_case": 0 if kind == "iid" else {"dirichlet": 5, "natural": 0}.get(kind, 0),
        "data_beta": alpha if kind == "dirichlet" else None,
        "partition": kind,
        "train_data": {str(i): list(p) for i, p in enumerate(parts)},
    }


def config_json(parts: Partition, cfg: PartitionSpec | Mapping[str, Any]) -> dict[str, Any]:
    """The partition file of a run, described by its config."""
    spec = PartitionSpec.of(cfg)
    return to_json(parts, dataset=spec.dataset, kind=spec.partition,
                   alpha=spec.alpha if spec.partition == "dirichlet" else None)


def save_partition(path: str | Path, parts: Partition, *, dataset: str, kind: str, alpha: float | None) -> None:
    Path(path).write_text(json.dumps(to_json(parts, dataset=dataset, kind=kind, alpha=alpha)))


def load_partition(path: str | Path, num_samples: int, num_clients: int | None = None, *,
                   dataset: str | None = None, strict: bool = True) -> Partition:
    """Read and check a partition file (ours or the authors'); never evaluated, only parsed.  With
    ``dataset`` (the run's) the file must also cover all ``num_samples`` training samples and, where
    it records one, name that data set: a file written for another data set would otherwise train on
    part of this one without a word.  ``strict`` False (``partition_file_check = false``) makes
    that a warning."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise PartitionError(f"partition file not found: {path}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError, so is a 5000-digit integer
        raise PartitionError(f"partition file {path} is not valid JSON: {exc}") from None
    except RecursionError:
        raise PartitionError(f"partition file {path} is not valid JSON: nested too deeply") from None
    except OSError as exc:
        raise PartitionError(f"cannot read partition file {path}: {exc.strerror}") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("train_data"), Mapping):
        raise PartitionError(f"partition file {path} has no 'train_data' mapping of client -> indices")
    data = doc["train_data"]
    odd = next((k for k in data if not (k.isascii() and k.isdigit() and str(int(k)) == k)), None)
    if odd is not None:  # " 1", "01", "1_0" and "٣" all pass int() but name no client
        raise PartitionError(f"partition file {path}: client ids must be integers 0..N-1 written plainly, got {odd[:20]!r}")
    ids = sorted(int(k) for k in data)
    if ids != list(range(len(ids))):
        raise PartitionError(f"partition file {path}: client ids must be 0..{len(ids) - 1}")
    declared = doc.get("num_users", len(ids))
    if declared != len(ids):
        raise PartitionError(f"partition file {path}: num_users is {declared} but train_data has {len(ids)} clients")
    if num_clients is not None and len(ids) != num_clients:
        raise PartitionError(f"partition file {path} has {len(ids)} clients but num_clients is {num_clients}")
    parts = check_partition([data[str(i)] for i in ids], num_samples, f"partition file {path}")
    problem = _foreign(doc.get("dataset"), sum(len(p) for p in parts), dataset, num_samples) if dataset else None
    if problem and strict:
        raise PartitionError(f"partition file {path} {problem}; if it is meant for this data set, set "
                             "partition_file_check = false")
    if problem:
        log.warning("partition file %s %s; used all the same (partition_file_check = false)", path, problem)
    return parts


def _foreign(recorded: Any, covered: int, dataset: str, num_samples: int) -> str | None:
    """Why a partition file looks written for another data set than this run's, or None."""
    if isinstance(recorded, str) and recorded and recorded != dataset:
        return f"was written for data set '{recorded}', this run's is '{dataset}'"
    if covered != num_samples:
        return (f"gives its clients {covered} samples, but the training set holds {num_samples} (a partition "
                f"of another data set, or one that leaves samples out)")
    return None


def make_partition(cfg: PartitionSpec | Mapping[str, Any], labels: np.ndarray, natural: Partition | None = None, *,
                   clients_per_round: int | None = None) -> Partition:
    """The partition a config asks for, drawn from the run's seed.  ``clients_per_round`` (a run's):
    a suggestion of fewer clients for a data set too small also brings it down to fit."""
    from .seeding import numpy_rng

    spec = PartitionSpec.of(cfg)
    kind, n = spec.partition, spec.num_clients
    rng = numpy_rng(spec.seed, "partition")
    if kind == "iid":
        return iid_partition(len(labels), n, rng, clients_per_round)
    if kind == "dirichlet":
        try:
            return dirichlet_partition(labels, n, spec.alpha, rng)
        except PartitionError as exc:
            best = _supported_clients(spec, labels)
            if not best:
                raise
            what = str(exc).split("; use fewer")[0]
            raise PartitionError(f"{what}; with this seed it supports {_fewer_clients(best, clients_per_round)} "
                                 f"(or use a larger alpha)") from None
    if kind == "file":
        return load_partition(spec.partition_file, len(labels), n, dataset=spec.dataset,
                              strict=spec.partition_file_check)
    if kind == "natural":
        if natural is None:
            raise PartitionError(f"data set '{spec.dataset}' has no natural (per-writer) split")
        if len(natural) != n:
            raise PartitionError(
                f"the natural split of '{spec.dataset}' has {len(natural)} clients; set num_clients = {len(natural)}")
        return check_partition(natural, len(labels), "natural split")
    raise PartitionError(f"unknown partition '{kind}'")


def _supported_clients(spec: PartitionSpec, labels: np.ndarray) -> int:
    """How many clients this seed's Dirichlet split can serve: the largest count (binary search) whose
    draw succeeds within 100 tries of the very stream a run uses, so the suggestion is sure to work."""
    from .seeding import numpy_rng

    def works(k: int) -> bool:
        try:
            dirichlet_partition(labels, k, spec.alpha, numpy_rng(spec.seed, "partition"), tries=100)
            return True
        except PartitionError:
            return False

    low, high, best = 1, min(spec.num_clients - 1, len(labels) // MIN_CLIENT_SIZE), 0
    while low <= high:
        mid = (low + high) // 2
        if works(mid):
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


def summarize(parts: Partition, labels: np.ndarray, num_classes: int) -> dict[str, Any]:
    """Client sizes, classes per client and label counts: what a reader needs to judge the skew."""
    labels = np.asarray(labels)
    counts = np.stack([np.bincount(labels[p], minlength=num_classes) for p in parts])
    sizes = counts.sum(1)
    classes = (counts > 0).sum(1)
    return {
        "num_clients": len(parts),
        "num_samples": int(sizes.sum()),
        "size_min": int(sizes.min()),
        "size_mean": float(sizes.mean()),
        "size_max": int(sizes.max()),
        "classes_per_client_min": int(classes.min()),
        "classes_per_client_mean": float(classes.mean()),
        "classes_per_client_max": int(classes.max()),
        "sizes": sizes.tolist(),
        "classes_per_client": classes.tolist(),
        "label_counts": counts.tolist(),
    }


def format_summary(summary: Mapping[str, Any]) -> str:
    return (
        f"partition: {summary['num_clients']} clients, {summary['num_samples']} samples; "
        f"size min/mean/max {summary['size_min']}/{summary['size_mean']:.1f}/{summary['size_max']}; "
        f"classes per client min/mean/max {summary['classes_per_client_min']}/"
        f"{summary['classes_per_client_mean']:.1f}/{summary['classes_per_client_max']}"
    )

