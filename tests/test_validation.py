"""A bad client update (NaN, Inf, wrong shape or dtype, missing or extra key, too large) never enters the
pool or the average: FedMR's slot keeps its previous model, FedAvg leaves the client out."""

from __future__ import annotations

import logging

import pytest
import torch

from fedmr.algorithms import TrainResult
from fedmr.config import load_config
from fedmr.engine import Simulation, prepare
from fedmr.engine.validation import update_problem
from fedmr.maths import RunningMean
from fedmr.seeding import numpy_rng

TINY = ["num_clients=6", "clients_per_round=3", "local_epochs=1", "partition=\"iid\"", "seed=2", "workers=1"]
BAD_SLOT = 1


def _first_float_key(state):
    return next(k for k, v in state.items() if v.is_floating_point())


def _nan(state):
    state[_first_float_key(state)].view(-1)[0] = float("nan")


def _inf(state):
    state[_first_float_key(state)].view(-1)[-1] = float("-inf")


def _wrong_shape(state):
    key = _first_float_key(state)
    state[key] = torch.zeros(state[key].shape[0] + 1, *state[key].shape[1:])


def _wrong_dtype(state):
    key = _first_float_key(state)
    state[key] = state[key].double()


def _missing_key(state):
    del state[next(iter(state))]


def _extra_key(state):
    state["backdoor.weight"] = torch.zeros(3)


CORRUPTIONS = {
    "nan": (_nan, "non-finite values"),
    "inf": (_inf, "non-finite values"),
    "wrong shape": (_wrong_shape, "has shape"),
    "wrong dtype": (_wrong_dtype, "has dtype torch.float64"),
    "missing key": (_missing_key, "missing key"),
    "extra key": (_extra_key, "unexpected key 'backdoor.weight'"),
}


class CorruptingRunner:
    """Wraps the real runner: damages the update of one slot and records the sound ones."""

    def __init__(self, inner, damage, slots=(BAD_SLOT,)):
        self.inner, self.damage, self.slots, self.sound = inner, damage, slots, {}

    def run(self, round_idx, tasks):
        for result in self.inner.run(round_idx, tasks):
            if result.slot in self.slots:
                self.damage(result.state)
            else:
                self.sound[result.slot] = result
            yield result

    def close(self):
        self.inner.close()


@pytest.fixture(scope="module")
def experiment():
    return prepare(load_config(None, TINY))


def _simulation(experiment, algorithm, damage, slots=(BAD_SLOT,)):
    sim = Simulation(experiment, algorithm=algorithm, progress="none")
    sim.algorithm.setup(experiment.initial_state)
    sim.runner = CorruptingRunner(sim.runner, damage, slots)
    return sim


def _copy(state):
    return {k: v.clone() for k, v in state.items()}


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_fedmr_rejects_the_update_and_the_slot_keeps_its_previous_model(experiment, kind, caplog):
    damage, reason = CORRUPTIONS[kind]
    sim = _simulation(experiment, "fedmr", damage)
    algorithm = sim.algorithm
    before = _copy(algorithm.pool)
    before_mix = {}
    recombine = algorithm.mix

    def spy(round_idx, rng):  # the pool after the updates went in, before recombination
        before_mix.update(_copy(algorithm.pool))
        recombine(round_idx, rng)

    algorithm.mix = spy
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        stats = sim.run_round(0)
    assert (stats["rejected"], stats["clients"], stats["dropped"]) == (1, 2, 0)
    for key in before:
        assert torch.equal(before_mix[key][BAD_SLOT], before[key][BAD_SLOT])
        for slot, result in sim.runner.sound.items():
            assert torch.equal(before_mix[key][slot], result.state[key])
    assert not torch.equal(before_mix[key], algorithm.pool[key])  # the kept model still takes part in recombination
    bad_client = algorithm.select_clients(0, numpy_rng(experiment.cfg["seed"], "select", 0))[BAD_SLOT]
    assert any(f"rejected the update of client {bad_client}: " in r.message and reason in r.message
               for r in caplog.records)


@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_fedavg_leaves_the_bad_client_out_of_the_average(experiment, kind):
    damage, _ = CORRUPTIONS[kind]
    sim = _simulation(experiment, "fedavg", damage)
    stats = sim.run_round(0)
    assert (stats["rejected"], stats["clients"]) == (1, 2)
    mean = RunningMean()
    for slot in sorted(sim.runner.sound):
        mean.add(sim.runner.sound[slot].state, float(sim.runner.sound[slot].num_samples))
    expected = mean.result()
    assert all(torch.equal(sim.algorithm.global_model[k], expected[k]) for k in expected)


def test_all_updates_rejected_leaves_fedavg_global_model_unchanged(experiment):
    sim = _simulation(experiment, "fedavg", _nan, slots=(0, 1, 2))
    before = _copy(sim.algorithm.global_model)
    stats = sim.run_round(0)
    assert (stats["rejected"], stats["clients"]) == (3, 0)
    assert stats["train_loss"] != stats["train_loss"]  # NaN: no loss to report
    assert all(torch.equal(sim.algorithm.global_model[k], before[k]) for k in before)


def test_max_update_norm_rejects_large_updates(experiment, caplog):
    cfg = load_config(None, TINY + ["max_update_norm=1e-6", "algorithm=\"fedavg\""])
    experiment.cfg, saved = cfg, experiment.cfg
    try:
        sim = Simulation(experiment, progress="none")
    finally:
        experiment.cfg = saved
    sim.algorithm.setup(experiment.initial_state)
    before = _copy(sim.algorithm.global_model)
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        stats = sim.run_round(0)
    assert (stats["rejected"], stats["clients"]) == (3, 0)
    assert all(torch.equal(sim.algorithm.global_model[k], before[k]) for k in before)
    assert any("exceeds max_update_norm 1e-06" in r.message for r in caplog.records)


def test_update_problem_accepts_a_sound_update_within_the_norm():
    reference = {"w": torch.zeros(2, 2), "steps": torch.tensor(3)}
    update = TrainResult(0, 0, {"w": torch.full((2, 2), 0.5), "steps": torch.tensor(4)}, 10)
    assert update_problem(update, reference) is None
    assert update_problem(update, reference, 1.0, reference) is None  # norm is exactly 1.0
    assert "exceeds" in update_problem(update, reference, 0.99, reference)
    assert update_problem(TrainResult(0, 0, [1, 2], 1), reference) == "the update is not a state dict"
    assert update_problem(TrainResult(0, 0, {"w": [[0.0]] * 2, "steps": torch.tensor(1)}, 1), reference) == "'w' is not a tensor"


pytestmark = pytest.mark.usefixtures("one_torch_thread")
