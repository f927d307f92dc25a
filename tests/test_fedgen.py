import pytest
import torch
import torch.nn.functional as F

from fedmr.algorithms import ALGORITHMS, Federation, TrainResult, TrainTask
from fedmr.algorithms.fedgen import FedGen, head_keys
from fedmr.errors import ConfigError
from fedmr.models import CNN
from fedmr.training import LocalSettings, clone_state

# three clients, each holding mostly two of four labels
COUNTS = ((20, 20, 0, 1), (0, 1, 20, 20), (10, 0, 10, 0))
FED = Federation(num_clients=3, clients_per_round=3, client_sizes=tuple(map(sum, COUNTS)), num_classes=4, seed=1,
                 label_counts=COUNTS)
SETTINGS = LocalSettings(epochs=1, batch_size=10, lr=0.05, momentum=0.5)


def start_state():
    torch.manual_seed(0)
    return clone_state(CNN(4, 1))


def build(**options):
    algo = FedGen({**FedGen.defaults, **options}, FED)
    algo.setup(start_state())
    return algo


def separable_head(state, scale=3.0):
    """A head whose class c responds to representation coordinate c (84-dim CNN representation)."""
    w = torch.zeros_like(state["fc3.weight"])
    w[torch.arange(4), torch.arange(4)] = scale
    return {**state, "fc3.weight": w, "fc3.bias": torch.zeros(4)}


def test_the_trained_generator_produces_representations_of_the_requested_labels():
    head = separable_head(start_state())
    labels = torch.arange(4).repeat(25)

    def accuracy(algo):
        gen = algo.generator.eval()
        with torch.no_grad():
            z = gen(labels, gen.noise(100, torch.Generator().manual_seed(5)))
        assert z.shape == (100, 84)
        return float((F.linear(z, head["fc3.weight"], head["fc3.bias"]).argmax(1) == labels).float().mean())

    algo = build(generator_steps=20, generator_lr=1e-2)
    assert accuracy(algo) < 0.5  # untrained: about chance
    results = [TrainResult(c, c, head, sum(COUNTS[c])) for c in range(3)]
    algo.aggregate_train(0, iter(results), torch.Generator().manual_seed(0))
    assert accuracy(algo) > 0.95


def test_generator_travels_only_once_trained_and_survives_a_checkpoint():
    algo = build(generator_steps=2)
    assert "generator" not in algo.configure_train(0, [0, 1])[0].payload
    state = start_state()
    algo.aggregate_train(0, iter([TrainResult(0, 0, state, 41), TrainResult(1, 1, state, 41)]), torch.Generator())
    payload = algo.configure_train(1, [2])[0].payload
    assert payload["round"] == 1 and payload["generator"]["out.weight"].shape == (84, 256)
    saved = algo.server_state()
    fresh = build(generator_steps=2)
    fresh.load_server_state(saved)
    again = fresh.server_state()
    assert set(again) == set(saved) and any(k.startswith("generator_adam.") for k in saved)
    for key in saved:
        assert torch.equal(again[key], saved[key])


def local(algo, payload):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 1, 32, 32, generator=g), torch.randint(0, 4, (20,), generator=g)
    task = TrainTask(0, 0, start_state(), payload)
    return algo.local_update(CNN(4, 1), task, x, y, SETTINGS, torch.Generator().manual_seed(1)).state


def test_the_regulariser_changes_the_local_update():
    algo = build(generator_steps=3)
    algo.aggregate_train(0, iter([TrainResult(0, 0, start_state(), 41)]), torch.Generator())
    payload = algo.configure_train(1, [0])[0].payload
    plain = local(ALGORITHMS["fedavg"]({}, FED), {})
    regularised = local(algo, payload)
    assert not torch.equal(plain["fc3.weight"], regularised["fc3.weight"])
    off = build(generator_steps=3, alpha=0.0, beta=0.0)
    off.generator.load_state_dict(algo.generator.state_dict())
    off.trained_rounds = 1
    # with zero weights the update is FedAvg's exactly (the generator's noise has its own stream)
    unweighted = local(off, off.configure_train(1, [0])[0].payload)
    for key in plain:
        assert torch.equal(unweighted[key], plain[key])


def test_a_model_without_a_linear_head_is_refused():
    state = start_state()
    assert head_keys(state, 4) == ("fc3.weight", "fc3.bias")
    with pytest.raises(ConfigError, match="linear classifier"):
        head_keys(state, 10)
    with pytest.raises(ConfigError, match="label counts"):
        FedGen(FedGen.defaults, Federation(3, 3, (1, 1, 1), 4, 1))
