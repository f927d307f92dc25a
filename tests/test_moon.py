import torch
import torch.nn.functional as F

from fedmr.algorithms import ALGORITHMS, Federation, TrainResult, TrainTask
from fedmr.algorithms.moon import contrastive_term, frozen_copy, moon_loss
from fedmr.models import CNN
from fedmr.training import LocalSettings, clone_state

FED = Federation(num_clients=4, clients_per_round=2, client_sizes=(30, 30, 30, 30), num_classes=10, seed=1)
SETTINGS = LocalSettings(epochs=2, batch_size=10, lr=0.05, momentum=0.5)


def data(seed=0, n=30):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def states():
    torch.manual_seed(0)
    first = clone_state(CNN(10, 1))
    second = clone_state(CNN(10, 1))
    return first, second


def build(name="moon", **options):
    return ALGORITHMS[name]({**ALGORITHMS[name].defaults, **options}, FED)


def test_loss_is_cross_entropy_when_mu_is_zero():
    global_state, previous_state = states()
    model = CNN(10, 1)
    model.load_state_dict(global_state)
    model.fc1.weight.data.add_(0.05)  # the local model has moved
    x, y = data(n=12)
    loss = moon_loss(frozen_copy(model, global_state), frozen_copy(model, previous_state), 0.0, 0.5)(model, x, y)
    assert torch.equal(loss, F.cross_entropy(model(x), y))
    assert moon_loss(frozen_copy(model, global_state), frozen_copy(model, previous_state), 5.0, 0.5)(model, x, y) > loss


def test_mu_zero_local_update_is_fedavg():
    global_state, previous_state = states()
    x, y = data()
    task = TrainTask(0, 0, global_state, {"previous": previous_state})
    moon = build(mu=0.0).local_update(CNN(10, 1), task, x, y, SETTINGS, torch.Generator().manual_seed(1)).state
    avg = build("fedavg").local_update(CNN(10, 1), task, x, y, SETTINGS, torch.Generator().manual_seed(1)).state
    for key in avg:
        assert torch.equal(moon[key], avg[key])


def test_contrastive_term_pulls_towards_global_and_away_from_previous():
    g = torch.Generator().manual_seed(0)
    z_global, z_previous = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    z = torch.randn(16, 8, generator=g, requires_grad=True)
    before = F.cosine_similarity(z, z_global).mean().item()
    for _ in range(50):
        (grad,) = torch.autograd.grad(contrastive_term(z, z_global, z_previous, 0.5), [z])
        z = (z - 8.0 * grad).detach().requires_grad_(True)  # the batch mean makes each gradient small
    assert F.cosine_similarity(z, z_global).mean().item() > before + 0.3
    assert F.cosine_similarity(z, z_global).mean() > F.cosine_similarity(z, z_previous).mean()
    assert contrastive_term(z, z_global, None, 0.5) == 0


def test_local_training_stays_closer_to_the_global_representation():
    global_state, previous_state = states()
    x, y = data(n=40)
    task = TrainTask(0, 0, global_state, {"previous": previous_state})
    reference = CNN(10, 1)
    reference.load_state_dict(global_state)
    reference.eval()

    def distance_to_global(mu):
        model = CNN(10, 1)
        state = build(mu=mu).local_update(model, task, x, y, SETTINGS, torch.Generator().manual_seed(1)).state
        model.load_state_dict(state)
        model.eval()
        with torch.no_grad():
            return float(1 - F.cosine_similarity(model.features(x), reference.features(x)).mean())

    assert distance_to_global(5.0) < distance_to_global(0.0)


def test_previous_models_are_kept_per_client_id():
    global_state, _ = states()
    algo = build()
    algo.setup(global_state)
    first = algo.configure_train(0, [2, 1])
    assert all("previous" not in t.payload for t in first)  # round 0: no negative yet
    results = [TrainResult(t.client_id, t.slot, {k: v + t.client_id for k, v in t.state.items()}, 30) for t in first]
    algo.aggregate_train(0, iter(results), torch.Generator())
    tasks = algo.configure_train(1, [1, 3, 2])
    for task in tasks:
        expected = {k: v + task.client_id for k, v in global_state.items()} if task.client_id in (1, 2) else global_state
        for key, value in expected.items():  # unseen client 3: the initial model, as MOON's untouched party nets
            assert torch.equal(task.payload["previous"][key], value)
    assert algo.round_metrics()["client_state_mb"] > 0
    fresh = build()
    fresh.setup(global_state)
    fresh.load_server_state(algo.server_state())
    assert set(fresh.server_state()) == set(algo.server_state())
    assert torch.equal(fresh.configure_train(2, [2])[0].payload["previous"]["fc3.bias"], global_state["fc3.bias"] + 2)
