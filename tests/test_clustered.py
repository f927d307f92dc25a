import numpy as np
import pytest
import torch

from fedmr.algorithms import Federation, TrainResult
from fedmr.algorithms.clustered import ClusteredSampling, sampling_distributions, update_distances, weight_clusters
from fedmr.config import load_config
from fedmr.errors import ConfigError

START = {"w": torch.zeros(6), "b": torch.zeros(2), "steps": torch.zeros((), dtype=torch.long)}


def build(sizes, m, **options):
    fed = Federation(num_clients=len(sizes), clients_per_round=m, client_sizes=tuple(sizes), num_classes=2, seed=1)
    algo = ClusteredSampling({**ClusteredSampling.defaults, **options}, fed)
    algo.setup(START)
    return algo


def report(algo, updates):
    """Every client returns start + its update once, so the server knows all representative updates."""
    results = [TrainResult(c, c, {"w": u[:6], "b": u[6:], "steps": torch.ones((), dtype=torch.long)}, 10)
               for c, u in enumerate(updates)]
    algo.aggregate_train(0, iter(results), torch.Generator())
    algo.global_model = {k: v.clone() for k, v in START.items()}


def test_never_two_clients_of_one_group_in_a_round():
    # 20 clients in 5 groups of alike updates, equal data: each group is one cluster of weight 1/5
    groups = np.repeat(np.arange(5), 4)
    directions = torch.eye(8)[:5] * 3
    noise = torch.Generator().manual_seed(0)
    updates = [directions[g] + 0.05 * torch.randn(8, generator=noise) for g in groups]
    algo = build([30] * 20, 5)
    report(algo, updates)
    seen = np.zeros(20)
    for r in range(200):
        picked = algo.select_clients(r, np.random.default_rng(r))
        assert len(picked) == 5
        assert sorted(groups[picked]) == [0, 1, 2, 3, 4]
        seen[picked] += 1
    assert (seen > 0).all()  # every client gets its turn within its group


def test_inclusion_probabilities_match_the_cluster_weights():
    sizes = np.array([5, 40, 10, 25, 60, 15, 30, 20, 35, 10])
    m = 4
    algo = build(list(sizes), m)
    report(algo, list(torch.randn(10, 8, generator=torch.Generator().manual_seed(1))))
    p = sizes / sizes.sum()
    draws = 3000
    counts = np.zeros(10)
    for r in range(draws):
        picked = algo.select_clients(r, np.random.default_rng(1000 + r))
        rows = algo.distributions
        np.testing.assert_allclose(rows.sum(axis=1), 1.0)  # one distribution per draw
        np.testing.assert_allclose(rows.sum(axis=0), m * p, atol=1e-9)  # each client keeps m * p_i
        for k, c in enumerate(picked):
            assert rows[k, c] > 0
        counts[picked] += 1
    # the expected number of times client i is drawn per round is m * p_i
    sd = np.sqrt(draws * m * p)
    assert (np.abs(counts - draws * m * p) < 4 * sd + 1).all(), (counts / draws, m * p)


def test_tree_cut_keeps_clusters_under_one_mth_and_heavy_clients_split():
    distances = update_distances([{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 0.1])},
                                  {"w": torch.tensor([0.0, 1.0])}, None], "arccos")
    assert distances[0, 1] < 0.2 and distances[0, 2] == pytest.approx(np.pi / 2) and distances[3, 0] == 0
    weights = np.array([0.6, 0.1, 0.1, 0.1, 0.1])
    clusters = weight_clusters(np.random.default_rng(0).random((5, 5)), weights, 2)
    for c in np.unique(clusters):  # a cluster above 1/m is a single heavy client
        assert weights[clusters == c].sum() <= 0.5 + 1e-12 or (clusters == c).sum() == 1
    rows = sampling_distributions(clusters, weights, 2, np.random.default_rng(0))
    np.testing.assert_allclose(rows.sum(axis=1), 1.0)
    np.testing.assert_allclose(rows.sum(axis=0), 2 * weights, atol=1e-9)


def test_aggregation_weights_each_draw_equally_or_by_size():
    uniform, size = build([10, 30], 2), build([10, 30], 2, weighting="size")
    for algo in (uniform, size):
        results = [TrainResult(0, 0, {"w": torch.ones(6), "b": torch.zeros(2), "steps": torch.zeros((), dtype=torch.long)}, 10),
                   TrainResult(1, 1, {"w": torch.zeros(6), "b": torch.zeros(2), "steps": torch.zeros((), dtype=torch.long)}, 30)]
        algo.aggregate_train(0, iter(results), torch.Generator())
    torch.testing.assert_close(uniform.global_state()["w"], torch.full((6,), 0.5))
    torch.testing.assert_close(size.global_state()["w"], torch.full((6,), 0.25))
    assert uniform.round_metrics()["client_state_mb"] > 0
    fresh = build([10, 30], 2)
    fresh.load_server_state(uniform.server_state())
    assert torch.equal(fresh.updates.get(0)["w"], torch.ones(6))


def test_unknown_distance_is_a_config_error():
    with pytest.raises(ConfigError, match="clustered.distance"):
        load_config(None, ["clustered.distance=\"cosine\""])
