import torch
import torch.nn.functional as F

from fedmr.algorithms import ALGORITHMS, Federation, TrainTask
from fedmr.algorithms.scaffold import Scaffold
from fedmr.models import CNN
from fedmr.training import LocalSettings, batch_slices, clone_state

FED = Federation(num_clients=4, clients_per_round=2, client_sizes=(30, 50, 40, 40), num_classes=10, seed=1)
SETTINGS = LocalSettings(epochs=2, batch_size=10, lr=0.05, momentum=0.5)


def data(seed=0, n=30):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def start_state():
    torch.manual_seed(0)
    return clone_state(CNN(10, 1))


def build(name, state, **options):
    algo = ALGORITHMS[name]({**ALGORITHMS[name].defaults, **options}, FED)
    algo.setup(state)
    return algo


def train_round(algo, clients=(0, 1), settings=SETTINGS):
    tasks = algo.configure_train(0, list(clients))
    results = []
    for task in tasks:
        x, y = data(task.client_id, FED.client_sizes[task.client_id])
        results.append(algo.local_update(CNN(10, 1), task, x, y, settings, torch.Generator().manual_seed(task.client_id)))
    algo.aggregate_train(0, iter(results), torch.Generator())
    return tasks, results


def test_zero_variates_take_fedavg_first_step():
    state = start_state()
    scaffold, fedavg = build("scaffold", state), build("fedavg", state)
    tasks, results = train_round(scaffold)
    assert "c" not in tasks[0].payload and "c_i" not in tasks[0].payload  # zero variates
    _, avg_results = train_round(fedavg)
    for mine, theirs in zip(results, avg_results):
        for key in theirs.state:
            assert torch.equal(mine.state[key], theirs.state[key])
    for key, value in fedavg.global_state().items():
        torch.testing.assert_close(scaffold.global_state()[key], value)


def _variates_and_option_two(variates, settings):
    """The client variate the method returns, and option II's c_i - c + (x - y_i) / (K lr) for the same run."""
    state = start_state()
    algo = build("scaffold", state, variates=variates)
    names = [k for k, _ in CNN(10, 1).named_parameters()]
    g = torch.Generator().manual_seed(3)
    c = {k: 0.01 * torch.randn(state[k].shape, generator=g) for k in names}
    c_i = {k: 0.01 * torch.randn(state[k].shape, generator=g) for k in names}
    x, y = data()
    result = algo.local_update(CNN(10, 1), TrainTask(0, 0, state, {"c": c, "c_i": c_i}), x, y, settings,
                               torch.Generator().manual_seed(0))
    steps = settings.epochs * len(batch_slices(30, settings.batch_size))
    displacement = {k: (state[k] - result.state[k]) / (steps * settings.lr) for k in names}
    option_two = {k: c_i[k] - c[k] + displacement[k] for k in names}
    return result.payload["c_i"], option_two, displacement


def test_displacement_variates_follow_option_two_as_written():
    mine, option_two, _ = _variates_and_option_two("displacement", SETTINGS)
    for k, value in option_two.items():
        torch.testing.assert_close(mine[k], value)


def test_mean_gradient_variates_equal_option_two_under_plain_sgd():
    plain = LocalSettings(epochs=2, batch_size=10, lr=0.05, momentum=0.0)
    mine, option_two, _ = _variates_and_option_two("mean-gradient", plain)
    for k, value in option_two.items():
        torch.testing.assert_close(mine[k], value, rtol=1e-4, atol=1e-5)


def test_under_momentum_option_two_overstates_the_mean_gradient():
    """Why mean-gradient is the default: with momentum 0.5 the displacement formula reads the local
    gradients about 1 / (1 - 0.5) = 2 times too large (less over few steps, as momentum builds up)."""
    mine, _, displacement = _variates_and_option_two("mean-gradient", SETTINGS)
    # displacement = (x - y_i) / (K lr) = the mean corrected step direction; its corrections c - c_i are
    # small here, so its projection on the mean gradient shows the momentum's gain
    ratio = sum(float((displacement[k] * mine[k]).sum()) for k in mine) / sum(float((mine[k] * mine[k]).sum()) for k in mine)
    assert 1.5 < ratio < 2.0


def test_local_step_is_corrected_by_c_minus_c_i():
    state = start_state()
    algo = build("scaffold", state)
    model = CNN(10, 1)
    names = [k for k, _ in model.named_parameters()]
    c = {k: torch.full(state[k].shape, 0.3) for k in names}
    c_i = {k: torch.full(state[k].shape, 0.1) for k in names}
    x, y = data(n=20)
    one_step = LocalSettings(epochs=1, batch_size=20, lr=0.1, momentum=0.0)
    result = algo.local_update(model, TrainTask(0, 0, state, {"c": c, "c_i": c_i}), x, y, one_step,
                               torch.Generator().manual_seed(0))
    model.load_state_dict(state)
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for k, grad in zip(names, grads):
        torch.testing.assert_close(result.state[k], state[k] - 0.1 * (grad + 0.2), rtol=1e-4, atol=1e-6)


def test_server_variate_and_client_variates_persist_by_client_id():
    state = start_state()
    algo = build("scaffold", state)
    _, results = train_round(algo, clients=(2, 0))
    n = FED.num_clients
    for key in algo.server_c:
        expected = sum(r.payload["c_i"][key] for r in results) / n  # previous variates were zero
        torch.testing.assert_close(algo.server_c[key], expected)
    # the next round sends each client its own variate, whatever its slot
    tasks = algo.configure_train(1, [0, 3, 2])
    by_client = {r.client_id: r.payload["c_i"] for r in results}
    assert "c_i" not in tasks[1].payload
    for task in (tasks[0], tasks[2]):
        for key, value in by_client[task.client_id].items():
            assert torch.equal(task.payload["c_i"][key], value)
    assert algo.round_metrics()["client_state_mb"] > 0
    # and they survive a checkpoint
    saved = algo.server_state()
    fresh = build("scaffold", state)
    fresh.load_server_state(saved)
    assert set(fresh.server_state()) == set(saved)
    for key in saved:
        assert torch.equal(fresh.server_state()[key], saved[key])


def test_server_learning_rate_scales_the_step():
    state = start_state()
    half = Scaffold({"server_lr": 0.5}, FED)
    half.setup(state)
    full = build("scaffold", state)
    train_round(half), train_round(full)
    for key, value in state.items():
        torch.testing.assert_close(half.global_state()[key] - value, 0.5 * (full.global_state()[key] - value))
