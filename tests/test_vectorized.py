"""The batched (vmap) path: the sequential path's models for ragged clients, and where it refuses."""

import pytest
import torch

from fedmr.algorithms import Federation, build_algorithm
from fedmr.algorithms.base import TrainTask
from fedmr.algorithms.fedavg import FedAvg
from fedmr.config import load_config
from fedmr.engine.client import ClientData
from fedmr.engine.runner import SequentialRunner, make_runner
from fedmr.engine.vectorized import VectorizedRunner, unsupported_reason
from fedmr.errors import ConfigError
from fedmr.models import CNN, ResNet20
from fedmr.training import LocalSettings, clone_state


pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ragged on purpose: one batch, a trailing batch of one sample (dropped), several epochs' worth
SIZES = [23, 7, 11, 16, 30]


def ragged_clients():
    torch.manual_seed(0)
    n = sum(SIZES)
    x = torch.randn(n, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,))
    perm = torch.randperm(n).tolist()  # clients' samples scattered through the set
    cuts, parts = 0, []
    for size in SIZES:
        parts.append(perm[cuts : cuts + size])
        cuts += size
    return ClientData(x, y, parts)


def test_batched_training_gives_the_sequential_models_for_ragged_clients():
    data = ragged_clients()
    algorithm = FedAvg({}, Federation(len(SIZES), len(SIZES), tuple(SIZES), 10, 1))
    model = CNN().to(memory_format=torch.channels_last)
    settings = LocalSettings(epochs=2, batch_size=5, lr=0.05, momentum=0.5)
    start = clone_state(model)
    # each client starts from its own model, as FedMR's pool slots do
    tasks = [TrainTask(c, slot, {k: v + 0.01 * slot for k, v in start.items()}) for slot, c in enumerate([3, 0, 4, 1, 2])]
    sequential = list(SequentialRunner(algorithm, model, data, settings, seed=7).run(2, tasks))
    batched = list(VectorizedRunner(algorithm, model, data, settings, seed=7).run(2, tasks))
    assert [r.client_id for r in batched] == [r.client_id for r in sequential]
    for seq, vec in zip(sequential, batched):
        assert vec.num_samples == seq.num_samples
        assert vec.train_loss == pytest.approx(seq.train_loss, rel=1e-4)
        moved = max((seq.state[k] - tasks[seq.slot].state[k]).abs().max() for k in seq.state)
        assert moved > 1e-3  # the models did train
        for key in seq.state:
            torch.testing.assert_close(vec.state[key], seq.state[key], rtol=1e-4, atol=1e-5)


def test_models_with_batch_statistics_or_dropout_and_custom_local_updates_are_refused():
    fed = Federation(4, 2, (10,) * 4, 10, 1)
    fedavg = FedAvg({}, fed)
    assert unsupported_reason(fedavg, CNN()) is None
    assert "buffers" in unsupported_reason(fedavg, ResNet20())
    assert "dropout" in unsupported_reason(fedavg, torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()))
    cfg = load_config(None, ["algorithm=fedprox", "num_clients=4", "clients_per_round=2"])
    fedprox = build_algorithm(cfg, fed)
    assert "own local update" in unsupported_reason(fedprox, CNN())
    data = ragged_clients()
    with pytest.raises(ConfigError, match="vectorize = true is not possible here"):
        make_runner({**cfg, "vectorize": True}, fedprox, CNN(), data, LocalSettings())


def test_auto_does_not_vectorize_on_a_cpu_but_true_does():
    cfg = load_config(None, ["num_clients=5", "clients_per_round=5", "workers=1"])
    algorithm = build_algorithm(cfg, Federation(5, 5, tuple(SIZES), 10, 1))
    data = ragged_clients()
    assert isinstance(make_runner(cfg, algorithm, CNN(), data, LocalSettings()), SequentialRunner)
    cfg["vectorize"] = True
    assert isinstance(make_runner(cfg, algorithm, CNN(), data, LocalSettings()), VectorizedRunner)
