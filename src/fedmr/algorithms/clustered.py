"""Clustered sampling based on model similarity (Fraboni et al. 2021, their Algorithm 2).

Each round the server builds m = clients_per_round sampling distributions r_1..r_m over the
clients, with sum_i r_k,i = 1 and sum_k r_k,i = m * p_i (p_i = the client's share of the
data), and draws one client from each: every client keeps its expected weight of plain
multinomial sampling, but clients whose updates are alike land in the same distribution and are
not drawn together, so the round's sample is more representative and the aggregate less noisy.

As Algorithm 2 and the authors' code (github.com/Accenture/Labs-Federated-Learning, branch
clustered_sampling):
  * a client's representative gradient is its latest update, local model - the global model it
    started from (every floating-point entry of the state), zero until it is first sampled;
  * distances between clients: arccos of the cosine similarity (0 when a norm is zero), or the
    squared L2 / L1 distance (``clustered.distance``);
  * Ward hierarchical clustering (scipy) of the rows of that distance matrix, as the authors'
    code calls it; the tree's heights are then replaced by the clusters' data shares and the
    tree is cut where a cluster would exceed 1/m;
  * the m heaviest clusters each get a distribution of their own (r_k,i = m * p_i); the clients
    of the other clusters, cluster by cluster from the lightest, shuffled within a cluster,
    fill the distributions' remaining mass in order (a client may be split between two);
  * aggregation: the drawn clients' models with weight 1/m each (``weighting = "uniform"``),
    the paper's estimator, unbiased because the draws are already proportional to data size;
    ``weighting = "size"`` weights them by sample count as FedAvg instead (this double counts
    data size in expectation).
A client may be drawn by two distributions in one round (one it was split between); it then
trains twice from the same seed, and its model counts twice, as in the authors' code.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..maths import State
from .base import Options, TrainResult, option, register_algorithm
from .client_state import ClientStore
from .fedavg import FedAvg

DISTANCES = ("arccos", "l2", "l1")
WEIGHTINGS = ("uniform", "size")
_TOL = 1e-12


def update_distances(updates: Sequence[Mapping[str, torch.Tensor] | None], distance: str,
                     chunk_numel: int = 1 << 18) -> np.ndarray:
    """Pairwise distance matrix of the clients' updates (None = a zero update), accumulated key by key."""
    n = len(updates)
    template = next((u for u in updates if u is not None), None)
    if template is None:
        return np.zeros((n, n))
    acc = torch.zeros(n, n, dtype=torch.float64)
    for key, ref in template.items():
        flat = [u[key].reshape(-1) if u is not None else None for u in updates]
        for start in range(0, ref.numel(), chunk_numel):  # n x chunk doubles at a time, never n whole models
            stop = min(start + chunk_numel, ref.numel())
            part = torch.stack([f[start:stop].double() if f is not None else torch.zeros(stop - start, dtype=torch.float64)
                                for f in flat])
            acc += torch.cdist(part, part, p=1) if distance == "l1" else part @ part.T
    if distance == "l1":
        return acc.numpy()
    gram = acc.numpy()
    sq = np.diag(gram)
    if distance == "l2":
        return np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)
    norms = np.sqrt(sq)
    denom = norms[:, None] * norms[None, :]
    cos = np.divide(gram, denom, out=np.ones_like(gram), where=denom > 0)
    angles = np.arccos(np.clip(cos, -1.0, 1.0))
    angles[denom <= 0] = 0.0
    return angles


def weight_clusters(distances: np.ndarray, weights: np.ndarray, m: int) -> np.ndarray:
    """Cluster label per client: Ward tree on the distance rows, cut where a cluster's weight exceeds 1/m."""
    # scipy here, not at import: every Flower ClientApp process imports the algorithms (0.5 s for scipy)
    from scipy.cluster.hierarchy import ClusterWarning, fcluster, linkage

    n = len(weights)
    if n == 1:
        return np.ones(1, dtype=int)
    with warnings.catch_warnings():  # the rows of a distance matrix, on purpose, as the authors' code
        warnings.simplefilter("ignore", ClusterWarning)
        tree = linkage(distances, "ward")
    merged = list(weights)
    for row in tree:  # heights become the merged clusters' weights (non-decreasing up the tree)
        merged.append(merged[int(row[0])] + merged[int(row[1])])
        row[2] = merged[-1]
    return fcluster(tree, 1.0 / m + _TOL, criterion="distance")


def sampling_distributions(clusters: np.ndarray, weights: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """(m, n) distributions, one per draw: the heaviest m clusters keep a row each, the rest fill the gaps."""
    n = len(weights)
    mass = m * np.asarray(weights, dtype=np.float64)
    labels = np.unique(clusters)
    cluster_mass = np.array([mass[clusters == c].sum() for c in labels])
    order = labels[np.argsort(cluster_mass, kind="stable")]  # lightest first
    kept, rest = order[::-1][:m], order[: max(len(order) - m, 0)]
    rows = np.zeros((m, n))
    leftovers: list[tuple[int, float]] = []
    i: int | np.integer  # a numpy index from flatnonzero first, an int from leftovers below
    for k, c in enumerate(kept):
        for i in np.flatnonzero(clusters == c):
            take = min(mass[i], 1.0 - rows[k].sum())  # only a client heavier than 1/m overflows its row
            rows[k, i] = take
            if mass[i] - take > _TOL:
                leftovers.append((int(i), mass[i] - take))
    for c in rest:
        members = np.flatnonzero(clusters == c)
        leftovers += [(int(i), mass[i]) for i in rng.permutation(members)]
    k = 0
    for i, left in leftovers:
        while left > _TOL and k < m:
            room = 1.0 - rows[k].sum()
            if room <= _TOL:
                k += 1
                continue
            take = min(room, left)
            rows[k, i] += take
            left -= take
    return rows / rows.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class ClusteredOptions(Options):
    distance: str = option("arccos", "distance between two clients' updates: arccos of their cosine, l2 "
                                     "(squared) or l1", choices=DISTANCES)
    weighting: str = option("uniform", "aggregation weights of the drawn clients: uniform (the paper's "
                                       "estimator) or size (FedAvg's sample counts)", choices=WEIGHTINGS)


@register_algorithm("clustered")
class ClusteredSampling(FedAvg):
    description = "FedAvg whose clients are drawn one per cluster of clients with similar updates"
    reference = ("Fraboni et al., Clustered Sampling: Low-Variance and Improved Representativity for Clients "
                 "Selection in Federated Learning, ICML 2021 (Algorithm 2)")
    Options = ClusteredOptions

    def setup(self, initial_state: State) -> None:
        super().setup(initial_state)
        self.updates = ClientStore()
        sizes = np.asarray(self.federation.client_sizes, dtype=np.float64)
        self.weights = sizes / sizes.sum()
        self.distributions: np.ndarray | None = None  # the latest round's, for inspection
        self._clusters: np.ndarray | None = None  # recomputed only when an update changed

    def select_clients(self, round_idx: int, rng: np.random.Generator) -> list[int]:
        n, m = self.federation.num_clients, self.federation.clients_per_round
        if self._clusters is None:
            distances = update_distances([self.updates.get(i) for i in range(n)], self.options.distance)
            self._clusters = weight_clusters(distances, self.weights, m)
        self.distributions = sampling_distributions(self._clusters, self.weights, m, rng)
        return [int(rng.choice(n, p=row)) for row in self.distributions]

    def aggregate_train(self, round_idx: int, results: Iterable[TrainResult], rng: torch.Generator) -> int:
        start = self.global_model
        uniform = self.options.weighting == "uniform"
        self._clusters = None

        def record(stream: Iterable[TrainResult]) -> Iterator[TrainResult]:
            for result in stream:
                self.updates.put(result.client_id, {k: v - start[k].to(v.device) for k, v in result.state.items()
                                                    if v.is_floating_point()})
                if uniform:  # every draw counts 1/m: the draws are already proportional to data size
                    result = TrainResult(result.client_id, result.slot, result.state, 1, result.train_loss, result.payload)
                yield result

        return super().aggregate_train(round_idx, record(results), rng)

    def round_metrics(self) -> dict[str, float]:
        return {"client_state_mb": self.updates.megabytes()}

    def server_state(self) -> dict[str, torch.Tensor]:
        return {**super().server_state(), **self.updates.to_tensors("update.")}

    def load_server_state(self, tensors: Mapping[str, torch.Tensor]) -> None:
        super().load_server_state(tensors)
        self.updates = ClientStore.from_tensors("update.", tensors)
        self._clusters = None
