import copy

import pytest
import torch

from fedmr.algorithms import Federation, TrainResult, build_algorithm
from fedmr.config import load_config
from fedmr.engine import Simulation, prepare
from fedmr.maths import pool_mean, stack_states

TINY = ["num_clients=8", "clients_per_round=4", "rounds=4", "local_epochs=1", "eval_every=2"]


@pytest.fixture(scope="module")
def experiment():
    return prepare(load_config(None, TINY))


def run(experiment, algorithm="fedmr", **options):
    exp = copy.copy(experiment)
    exp.cfg = load_config(None, [*TINY, f"algorithm={algorithm}", *[f"{k}={v}" for k, v in options.items()]])
    return Simulation(exp, progress="none").run()


def test_same_config_gives_the_same_metrics_twice(experiment):
    a, b = run(experiment), run(experiment)
    assert [r["accuracy"] for r in a.rows] == [r["accuracy"] for r in b.rows]
    assert [r["loss"] for r in a.rows] == [r["loss"] for r in b.rows]
    for key in a.final_state:
        assert torch.equal(a.final_state[key], b.final_state[key])


def test_a_different_seed_changes_the_run(experiment):
    exp = prepare(load_config(None, [*TINY, "seed=2"]))
    assert [r["loss"] for r in run(exp).rows] != [r["loss"] for r in run(experiment).rows]


def test_compare_runs_share_the_initial_model_and_partition(tmp_path):
    from fedmr.engine.compare import run_comparison

    cfg = load_config(None, [*TINY, "rounds=1", "eval_every=1"])
    run_comparison(cfg, ["fedavg", "fedmr"], tmp_path, "none")
    assert (tmp_path / "fedavg" / "partition.json").read_text() == (tmp_path / "fedmr" / "partition.json").read_text()
    exp = prepare(cfg)
    fedavg, fedmr = Simulation(exp, algorithm="fedavg", progress="none"), Simulation(exp, algorithm="fedmr", progress="none")
    fedavg.algorithm.setup(exp.initial_state)
    fedmr.algorithm.setup(exp.initial_state)
    start_avg = fedavg.algorithm.configure_train(0, [0, 1, 2, 3])
    start_mr = fedmr.algorithm.configure_train(0, [0, 1, 2, 3])
    for a, b in zip(start_avg, start_mr):
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)


def fake_results(algorithm, tasks, scale):
    results = []
    for task in tasks:
        state = {k: (v.float() + scale * (task.slot + 1)).to(v.dtype) if v.is_floating_point() else v.clone()
                 for k, v in task.state.items()}
        results.append(TrainResult(task.client_id, task.slot, state, num_samples=10 * (task.slot + 1)))
    return results


def make(name, experiment, **options):
    cfg = load_config(None, [*TINY, f"algorithm={name}", *[f"{name}.{k}={v}" for k, v in options.items()]])
    algo = build_algorithm(cfg, experiment.federation)
    algo.setup(experiment.initial_state)
    return algo


def test_first_stage_resets_every_slot_to_the_mean(experiment):
    algo = make("fedmr", experiment, first_stage_rounds=2)
    tasks = algo.configure_train(0, [0, 1, 2, 3])
    results = fake_results(algo, tasks, 1.0)
    expected = pool_mean(stack_states([r.state for r in results]))
    algo.aggregate_train(0, iter(results), torch.Generator().manual_seed(0))
    for key, value in algo.pool.items():
        for i in range(4):
            assert torch.equal(value[i], expected[key])
    # after the first stage, slots are recombined, not reset
    results = fake_results(algo, algo.configure_train(2, [0, 1, 2, 3]), 1.0)
    algo.aggregate_train(2, iter(results), torch.Generator().manual_seed(0))
    assert not torch.equal(algo.pool["fc1.weight"][0], algo.pool["fc1.weight"][1])


def test_fedmr_recombines_and_keeps_the_mean(experiment):
    algo = make("fedmr", experiment)
    results = fake_results(algo, algo.configure_train(0, [0, 1, 2, 3]), 1.0)
    trained = stack_states([r.state for r in results])
    algo.aggregate_train(0, iter(results), torch.Generator().manual_seed(1))
    mixed = any(not torch.equal(algo.pool[k], trained[k]) for k in trained)
    assert mixed
    for key in trained:
        assert torch.allclose(pool_mean(trained)[key].float(), algo.global_state()[key].float(), atol=1e-6)


def test_fedindep_never_mixes(experiment):
    algo = make("fedindep", experiment)
    for r in range(3):
        results = fake_results(algo, algo.configure_train(r, [0, 1, 2, 3]), 1.0)
        algo.aggregate_train(r, iter(results), torch.Generator().manual_seed(r))
    for i in range(4):
        # slot i was only ever trained by itself: initial + 3 * (i + 1)
        expected = experiment.initial_state["fc1.weight"] + 3.0 * (i + 1)
        assert torch.allclose(algo.pool["fc1.weight"][i], expected)


def test_fedavg_weights_by_sample_count(experiment):
    algo = make("fedavg", experiment)
    results = fake_results(algo, algo.configure_train(0, [0, 1, 2, 3]), 1.0)
    algo.aggregate_train(0, iter(results), torch.Generator())
    # offsets 1..4 with weights 10..40: sum(w*o)/sum(w) = (10+40+90+160)/100 = 3.0
    expected = experiment.initial_state["fc1.weight"] + 3.0
    assert torch.allclose(algo.global_state()["fc1.weight"], expected, atol=1e-5)


def test_missing_results_keep_the_slots_previous_model(experiment):
    algo = make("fedindep", experiment)
    results = fake_results(algo, algo.configure_train(0, [0, 1, 2, 3]), 1.0)
    before = algo.pool["fc1.weight"].clone()
    assert algo.aggregate_train(0, iter(results[:2]), torch.Generator()) == 2
    assert torch.equal(algo.pool["fc1.weight"][2:], before[2:])


def test_federation_facts(experiment):
    fed = experiment.federation
    assert isinstance(fed, Federation)
    assert sum(fed.client_sizes) == experiment.data.train_x.shape[0]
    assert len(fed.label_counts) == 8 and sum(map(sum, fed.label_counts)) == sum(fed.client_sizes)


def test_the_simulator_trains(experiment):
    exp = copy.copy(experiment)
    exp.cfg = load_config(None, ["num_clients=8", "clients_per_round=4", "rounds=10", "local_epochs=2",
                                 "eval_every=10", "partition=iid", "algorithm=fedavg", "lr=0.05"])
    out = Simulation(prepare(exp.cfg), progress="none").run()
    assert out.rows[-1]["accuracy"] > 0.5  # random guessing is 0.1
