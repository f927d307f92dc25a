"""Dropouts: a seeded share of the selected clients fails each round; the run goes on and says so.

FedMR with fewer than K models back: the missing slots keep their previous models and still
take part in recombination."""

from __future__ import annotations

import pytest
import torch

from fedmr.config import load_config
from fedmr.engine import Simulation, prepare
from fedmr.engine.simulator import dropped_clients
from fedmr.errors import ConfigError
from fedmr.results import read_metrics
from fedmr.seeding import numpy_rng

TINY = ["num_clients=8", "clients_per_round=4", "local_epochs=1", "partition=\"iid\"", "seed=4", "dropout_rate=0.5",
        "workers=1"]


@pytest.fixture(scope="module")
def experiment():
    return prepare(load_config(None, TINY))


def test_dropped_clients_are_a_seeded_share_of_the_selection():
    clients = [7, 3, 9, 1, 4]
    for rate, count in ((0.0, 0), (0.1, 1), (0.3, 2), (0.5, 3), (0.99, 5)):  # round(rate * K), halves up
        lost = dropped_clients(1, 0, clients, rate)
        assert len(lost) == count and lost <= set(clients)
    assert dropped_clients(1, 3, clients, 0.4) == dropped_clients(1, 3, clients, 0.4)
    draws = {frozenset(dropped_clients(1, r, clients, 0.4)) for r in range(20)}
    assert len(draws) > 5  # a fresh draw each round, not the same clients every time


def test_dropout_draws_do_not_shift_the_client_selection(experiment):
    """Its own stream: turning dropouts on leaves which clients are selected unchanged."""
    sim = Simulation(experiment, progress="none")
    for r in range(5):
        selected = sim.algorithm.select_clients(r, numpy_rng(experiment.cfg["seed"], "select", r))
        lost = dropped_clients(experiment.cfg["seed"], r, selected, 0.5)
        assert selected == sim.algorithm.select_clients(r, numpy_rng(experiment.cfg["seed"], "select", r))
        assert len(lost) == 2


class RecordingRunner:
    def __init__(self, inner):
        self.inner, self.trained = inner, {}

    def run(self, round_idx, tasks):
        self.trained[round_idx] = [t.client_id for t in tasks]
        yield from self.inner.run(round_idx, tasks)

    def close(self):
        self.inner.close()


def test_run_with_half_the_clients_dropping_completes_and_records_counts(experiment, tmp_path):
    experiment.cfg, saved = load_config(None, TINY + ["rounds=3", "eval_every=1", "algorithm=\"fedavg\""]), experiment.cfg
    try:
        sim = Simulation(experiment, out_dir=tmp_path / "run", progress="none")
    finally:
        experiment.cfg = saved
    sim.runner = recorder = RecordingRunner(sim.runner)
    outcome = sim.run()
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert [(r["round"], r["clients"], r["dropped"], r["rejected"]) for r in rows] == [(n, 2, 2, 0) for n in (1, 2, 3)]
    assert outcome.summary["final_accuracy"] == pytest.approx(rows[-1]["accuracy"], abs=1e-6)
    seed = experiment.cfg["seed"]
    for r, trained in recorder.trained.items():  # the dropped clients did not train at all
        selected = sim.algorithm.select_clients(r, numpy_rng(seed, "select", r))
        assert set(trained) == set(selected) - dropped_clients(seed, r, selected, 0.5)


def test_fedmr_missing_slots_keep_their_models_and_still_recombine(experiment):
    sim = Simulation(experiment, progress="none")
    algorithm = sim.algorithm
    algorithm.setup(experiment.initial_state)
    sim.run_round(0)
    before = {k: v.clone() for k, v in algorithm.pool.items()}
    before_mix = {}
    recombine = algorithm.mix

    def spy(round_idx, rng):
        before_mix.update({k: v.clone() for k, v in algorithm.pool.items()})
        recombine(round_idx, rng)

    algorithm.mix = spy
    selected = algorithm.select_clients(1, numpy_rng(experiment.cfg["seed"], "select", 1))
    lost = dropped_clients(experiment.cfg["seed"], 1, selected, 0.5)
    missing = [slot for slot, client in enumerate(selected) if client in lost]
    stats = sim.run_round(1)
    assert (stats["clients"], stats["dropped"]) == (2, 2) and len(missing) == 2
    moved = 0
    for key, after in algorithm.pool.items():
        for slot in missing:
            assert torch.equal(before_mix[key][slot], before[key][slot])  # kept its previous model
            # ... and that model's entry is still in the pool, in whichever slot recombination put it
            homes = [j for j in range(after.shape[0]) if torch.equal(after[j], before_mix[key][slot])]
            assert homes
            moved += homes[0] != slot
        # recombination permutes the K entries of each key: nothing is averaged or lost
        assert sorted(row.numpy().tobytes() for row in after) == sorted(row.numpy().tobytes() for row in before_mix[key])
    assert moved > 0


def test_dropout_rate_must_be_below_one():
    with pytest.raises(ConfigError, match=r"'dropout_rate' must be in \[0, 1\), got 1.0"):
        load_config(None, ["dropout_rate=1"])


pytestmark = pytest.mark.usefixtures("one_torch_thread")
