"""The hot loop and the choice of runner: train_sgd's batching, make_runner, the speed config keys."""

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedmr.algorithms import Federation, build_algorithm
from fedmr.config import load_config
from fedmr.engine.client import ClientData
from fedmr.engine.parallel import ProcessPoolRunner
from fedmr.engine.runner import SequentialRunner, cpu_count, make_runner, resolve_workers
from fedmr.errors import ConfigError
from fedmr.models import CNN
from fedmr.training import LocalSettings, batch_slices, train_sgd

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_train_sgd_is_the_plain_index_batch_loop():
    """train_sgd must not change a single number against the plain loop that indexes each batch."""
    torch.manual_seed(0)
    x = torch.randn(23, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (23,))
    settings = LocalSettings(epochs=2, batch_size=5, lr=0.05, momentum=0.5)
    fast, plain = CNN().to(memory_format=torch.channels_last), CNN().to(memory_format=torch.channels_last)
    plain.load_state_dict(fast.state_dict())
    loss, steps = train_sgd(fast, x, y, settings, torch.Generator().manual_seed(3))

    generator = torch.Generator().manual_seed(3)
    optimiser = torch.optim.SGD(plain.parameters(), lr=0.05, momentum=0.5)
    losses = []
    for _ in range(2):
        order = torch.randperm(23, generator=generator)
        for part in batch_slices(23, 5):  # 5, 5, 5, 5, 3
            idx = order[part]
            batch_loss = F.cross_entropy(plain(x[idx]), y[idx])
            optimiser.zero_grad()
            batch_loss.backward()
            optimiser.step()
            losses.append(batch_loss.item())
    assert steps == len(losses) == 10
    assert loss == pytest.approx(sum(losses) / len(losses), rel=1e-6)
    for key, value in plain.state_dict().items():
        assert torch.equal(fast.state_dict()[key], value), key


def runner_for(*settings):
    cfg = load_config(None, ["num_clients=4", "clients_per_round=4", *settings])
    algorithm = build_algorithm(cfg, Federation(4, 4, (2,) * 4, 10, 1))
    data = ClientData(torch.zeros(8, 3, 32, 32), torch.zeros(8, dtype=torch.long), [[0, 1], [2, 3], [4, 5], [6, 7]])
    return make_runner(cfg, algorithm, CNN(), data, LocalSettings())


def test_make_runner_follows_the_config():
    assert isinstance(runner_for("workers=1"), SequentialRunner)
    parallel = runner_for("workers=2")
    assert isinstance(parallel, ProcessPoolRunner)
    assert (parallel.workers_wanted, parallel.threads) == (2, max(1, cpu_count() // 2))
    timed = runner_for("workers=1", "client_timeout=2.5")  # a timeout needs a process it can stop
    assert isinstance(timed, ProcessPoolRunner) and timed.timeout == 2.5
    assert resolve_workers("auto", torch.device("cpu"), 10)[0] == min(cpu_count(), 10)
    assert resolve_workers("auto", torch.device("cpu"), 1) == (1, cpu_count())
    assert resolve_workers("auto", torch.device("cuda"), 10) == (1, 1)
    with pytest.raises(ConfigError, match="workers"):
        resolve_workers(4, torch.device("cuda"), 10)
    with pytest.raises(ConfigError, match="client_timeout"):
        runner_for("vectorize=true", "client_timeout=1")


@pytest.mark.parametrize("setting, message", [
    ("vectorize=\"yes\"", "vectorize"),
    ("vectorize=1", "vectorize"),
    ("client_timeout=-1", "client_timeout"),
    ("client_timeout=\"soon\"", "client_timeout"),
    ("workers=0", "workers"),
    ("device=\"tpu\"", "device"),
])
def test_bad_speed_settings_are_refused(setting, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [setting])


def test_the_benchmark_workloads_run_and_count_the_papers_flops():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside src/
    from benchmarks.workloads import ReferenceFedMR, Round, bare_round, cifar_dataset, cifar_like, training_flops_per_sample

    paper = Round()
    assert paper.samples_trained == 25_000
    # the spec's CNN: about 80 GFLOP of training in the paper's round (issue 5)
    assert 75e9 < training_flops_per_sample("cnn") * paper.samples_trained < 85e9
    tiny = Round(clients=2, epochs=1, batch=5, samples=10)
    images, labels = cifar_like(20)
    reference = ReferenceFedMR("cnn", images, labels, tiny)
    before = [dict(w) for w in reference.w_locals]
    reference.round()
    assert any(not torch.equal(before[0][k], reference.w_locals[0][k]) for k in before[0])
    data = cifar_dataset(images, labels)
    model = CNN().to(memory_format=torch.channels_last)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    bare_round(model, start, data.train_x, data.train_y, tiny, seed=1)
    assert not torch.equal(model.state_dict()["fc3.weight"], start["fc3.weight"])


@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.contiguous_format])
def test_the_cnn_is_the_textbook_cnn_bit_for_bit(memory_format):
    """fedmr's CNN pools before the ReLU (faster); values and gradients must equal the usual
    conv -> ReLU -> pool definition exactly, ties in the pooling windows included."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.workloads import TextbookCNN

    torch.manual_seed(0)
    ours, textbook = CNN(), TextbookCNN()
    textbook.load_state_dict(ours.state_dict())
    x = torch.randn(8, 3, 32, 32)
    x[:4, :, 4:20, 4:20] = 0.7  # flat patches: equal activations, so every pooling window has ties
    x[4:, :, :, 10:] = -3.0  # mostly negative pre-activations: whole windows at ReLU's zero
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, 10, (8,))
    ours, textbook = ours.to(memory_format=memory_format), textbook.to(memory_format=memory_format)
    out_ours, out_textbook = ours(x), textbook(x)
    assert torch.equal(out_ours, out_textbook)
    F.cross_entropy(out_ours, y).backward()
    F.cross_entropy(out_textbook, y).backward()
    for (name, p), q in zip(ours.named_parameters(), textbook.parameters()):
        assert torch.equal(p.grad, q.grad), name
