"""The batched (vmap) path: the sequential path's models for ragged clients, and where it refuses."""

import logging
import warnings

import pytest
import torch

from fedmr.algorithms import ALGORITHMS, Federation, build_algorithm
from fedmr.algorithms.base import TrainTask
from fedmr.algorithms.fedavg import FedAvg
from fedmr.config import load_config
from fedmr.engine import Simulation, prepare
from fedmr.engine.client import ClientData
from fedmr.engine.runner import SequentialRunner, make_runner
from fedmr.engine.vectorized import VectorizedRunner, memory_budget, unsupported_reason
from fedmr.errors import ConfigError
from fedmr.models import CNN, VGG16, CNNFemnist, ResNet20, build_model
from fedmr.training import LocalSettings, batch_slices, clone_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the algorithms whose local step is the plain one (FedMR and Clustered inherit it)
BATCHED = {"fedavg", "fedindep", "fedmr", "clustered"}

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


def test_which_algorithms_and_models_are_batched():
    """Every built-in model is batched now (BatchNorm and dropout included); algorithms with their own
    local step declare batched_local_step = False and are refused with that reason."""
    fed = Federation(4, 2, (10,) * 4, 10, 1, ((1,) * 10,) * 4)
    fedavg = FedAvg({}, fed)
    for model in (CNN(), CNNFemnist(), ResNet20(), VGG16()):
        assert unsupported_reason(fedavg, model) is None
    assert "Dropout2d" in unsupported_reason(fedavg, torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Dropout2d()))
    cfg = load_config(None, ["algorithm=fedprox", "num_clients=4", "clients_per_round=2"])
    for name, cls in ALGORITHMS.items():
        reason = unsupported_reason(build_algorithm({**cfg, "algorithm": name}, fed), CNN())
        if name in BATCHED:
            assert cls.batched_local_step and reason is None, name
        else:
            assert not cls.batched_local_step and "own local update" in reason, name

    class Undeclared(FedAvg):  # overrides the local step without saying whether it can be batched
        def local_update(self, *args):
            return super().local_update(*args)

    class Declared(Undeclared):
        batched_local_step = True

    assert "Undeclared.local_update" in unsupported_reason(Undeclared({}, fed), CNN())
    assert unsupported_reason(Declared({}, fed), CNN()) is None
    fedprox = build_algorithm(cfg, fed)
    data = ragged_clients()
    with pytest.raises(ConfigError, match="vectorize = true is not possible here"):
        make_runner({**cfg, "vectorize": True}, fedprox, CNN(), data, LocalSettings())


def test_auto_does_not_vectorize_on_a_cpu_but_true_does():
    cfg = load_config(None, ["num_clients=5", "clients_per_round=5", "workers=1"])
    algorithm = build_algorithm(cfg, Federation(5, 5, tuple(SIZES), 10, 1))
    data = ragged_clients()
    assert isinstance(make_runner(cfg, algorithm, CNN(), data, LocalSettings()), SequentialRunner)
    cfg = cfg.replace(vectorize=True)
    assert isinstance(make_runner(cfg, algorithm, CNN(), data, LocalSettings()), VectorizedRunner)


# ---- BatchNorm, dropout, uneven clients: every state entry against the sequential path ---------------
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])  # benchmarks/gpu_check.sh runs both


class TinyBNDropout(torch.nn.Module):
    """BatchNorm2d, BatchNorm1d and dropout in a model small enough for many steps in a test."""

    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
            torch.nn.Dropout(0.5), torch.nn.Linear(16, 10))

    def forward(self, x):
        return self.body(x)


def clients_of(sizes, side=32, dtype=torch.float32, device="cpu", seed=0):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, 3, side, side, generator=generator, dtype=dtype).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (n,), generator=generator)
    perm = torch.randperm(n, generator=generator).tolist()
    parts = [perm[sum(sizes[:i]) : sum(sizes[: i + 1])] for i in range(len(sizes))]
    return ClientData(x.to(device), y.to(device), parts)


def both_paths(model, data, settings, memory_gb="auto", round_idx=3):
    """(tasks, sequential results, vectorized results, default-generator state after each) for
    clients 0..K-1, each starting from its own model (as FedMR's slots do)."""
    k = len(data)
    algorithm = FedAvg({}, Federation(k, k, tuple(data.sizes()), 10, 1))
    start = clone_state(model)
    tasks = [TrainTask(c, slot, {n: v + 0.01 * slot if v.is_floating_point() else v.clone() for n, v in start.items()})
             for slot, c in enumerate(reversed(range(k)))]
    sequential = list(SequentialRunner(algorithm, model, data, settings, seed=7).run(round_idx, tasks))
    after_sequential = torch.default_generator.get_state()
    runner = VectorizedRunner(algorithm, model, data, settings, seed=7, memory_gb=memory_gb)
    vectorized = list(runner.run(round_idx, tasks))
    return tasks, sequential, vectorized, after_sequential, torch.default_generator.get_state()


def steps_of(n, settings):
    return settings.epochs * len(batch_slices(n, settings.batch_size))


def assert_same_models(data, settings, tasks, sequential, vectorized, rtol, atol):
    assert [r.client_id for r in vectorized] == [r.client_id for r in sequential]
    for seq, vec in zip(sequential, vectorized):
        assert vec.num_samples == seq.num_samples
        assert vec.train_loss == pytest.approx(seq.train_loss, rel=rtol, abs=atol)
        assert list(vec.state) == list(seq.state)  # every entry, buffers included, in state_dict order
        moved = max((seq.state[k].double() - tasks[seq.slot].state[k].double()).abs().max() for k in seq.state)
        assert moved > 1e-3  # the models did train
        for key in seq.state:
            assert vec.state[key].dtype == seq.state[key].dtype, key
            if key.endswith("num_batches_tracked"):  # exactly one update per step the client took
                steps = steps_of(seq.num_samples, settings)
                assert int(vec.state[key]) == int(seq.state[key]) == int(tasks[seq.slot].state[key]) + steps, key
            else:
                torch.testing.assert_close(vec.state[key], seq.state[key], rtol=rtol, atol=atol, msg=key)


# sizes: one batch; a trailing batch of one (dropped); short last batches of 2 and 3 (kept)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name, sizes, settings, dtype, tol", [
    # float64: the same arithmetic, so any difference in logic would show far above 1e-9
    ("cnn", [9, 3, 6, 11], LocalSettings(epochs=2, batch_size=4, lr=0.05, momentum=0.5), torch.float64, 1e-9),
    ("resnet20", [9, 3, 6, 11], LocalSettings(epochs=2, batch_size=4, lr=0.01, momentum=0.5), torch.float64, 1e-9),
    # VGG-16 (BatchNorm and dropout, 33.6M parameters), few steps to stay fast.  Also float64: in
    # float32 its BatchNorm over batches of 3 amplifies the two paths' different rounding past any
    # fixed tolerance on some CPUs (AVX-512/AMX kernels), while float64's rounding stays ~1e-13.
    ("vgg16", [3, 7], LocalSettings(epochs=1, batch_size=3, lr=0.01, momentum=0.5), torch.float64, 1e-9),
])
def test_batched_models_equal_the_sequential_ones_with_batchnorm_and_uneven_clients(name, sizes, settings, dtype,
                                                                                  tol, device):
    data = clients_of(sizes, dtype=dtype, device=device)
    torch.manual_seed(1)
    model = build_model(name, 10, 3, 32).to(device, dtype, memory_format=torch.channels_last)
    tasks, sequential, vectorized, rng_seq, rng_vec = both_paths(model, data, settings)
    assert_same_models(data, settings, tasks, sequential, vectorized, rtol=tol, atol=tol)
    assert torch.equal(rng_vec, rng_seq)  # torch's default generator left as the sequential path leaves it


def test_resnet20_is_batched_without_a_per_model_fallback():
    """vmap warns when an op has no batching rule and runs it model by model (adaptive_avg_pool2d
    on channels_last did, in ResNet-20's last pooling, on the weighted path of uneven clients)."""
    data = clients_of([6, 3])
    model = build_model("resnet20", 10, 3, 32).to(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        both_paths(model, data, LocalSettings(epochs=1, batch_size=4, lr=0.01, momentum=0.5))
    assert not [w for w in caught if "batching rule" in str(w.message)]


@pytest.mark.parametrize("device", DEVICES)
def test_a_finished_client_stops_changing_while_larger_ones_go_on(device):
    """Client sizes 3 .. 41 with batch 4: the smallest takes 3 steps, the largest 30.  If a finished
    client took part in any later call (an extra update, momentum drift, one more BatchNorm update),
    its model would differ from the sequential one, and num_batches_tracked would not be its steps.
    (Batch 4: BatchNorm over batches of 2 is so ill-conditioned that rounding alone moves the models.)"""
    settings = LocalSettings(epochs=3, batch_size=4, lr=0.05, momentum=0.9)
    data = clients_of([3, 41, 7, 22], side=8, dtype=torch.float64, device=device)
    torch.manual_seed(2)
    model = TinyBNDropout().to(device, torch.float64)
    tasks, sequential, vectorized, rng_seq, rng_vec = both_paths(model, data, settings)
    assert_same_models(data, settings, tasks, sequential, vectorized, rtol=1e-10, atol=1e-10)
    assert torch.equal(rng_vec, rng_seq)
    small = next(r for r in vectorized if r.num_samples == 3)
    assert int(small.state["body.1.num_batches_tracked"]) == 3
    # the small client's task trained alone gives the same model as beside the large ones
    task = tasks[small.slot]
    algorithm = FedAvg({}, Federation(4, 4, tuple(data.sizes()), 10, 1))
    [alone] = VectorizedRunner(algorithm, model, data, settings, seed=7).run(3, [task])
    for key in small.state:
        torch.testing.assert_close(alone.state[key], small.state[key], rtol=1e-12, atol=1e-12, msg=key)


def test_dropout_masks_are_each_clients_own_stream():
    """The same client trained with different dropout seeds differs; with the sequential seeds it matches
    (the test above).  Guards against masks drawn from one shared stream."""
    settings = LocalSettings(epochs=1, batch_size=4, lr=0.1, momentum=0.5)
    data = clients_of([8, 8], side=8, dtype=torch.float64)
    model = TinyBNDropout().to(torch.float64)
    tasks = [TrainTask(0, 0, clone_state(model)), TrainTask(1, 1, clone_state(model))]
    algorithm = FedAvg({}, Federation(2, 2, (8, 8), 10, 1))
    one = list(VectorizedRunner(algorithm, model, data, settings, seed=7).run(0, tasks))
    other = list(VectorizedRunner(algorithm, model, data, settings, seed=7).run(1, tasks))  # another round: other masks
    assert not torch.allclose(one[0].state["body.9.weight"], other[0].state["body.9.weight"])


def test_models_are_split_into_groups_under_a_memory_budget(caplog):
    settings = LocalSettings(epochs=2, batch_size=3, lr=0.05, momentum=0.5)
    data = clients_of([5, 9, 4, 7, 3], side=8, dtype=torch.float64)
    model = TinyBNDropout().to(torch.float64)
    algorithm = FedAvg({}, Federation(5, 5, tuple(data.sizes()), 10, 1))
    per_model = VectorizedRunner(algorithm, model, data, settings, seed=7).trainer.model_bytes
    budget_gb = 2.5 * per_model / 2**30  # room for two models at a time
    assert VectorizedRunner(algorithm, model, data, settings, 7, memory_gb=budget_gb).trainer.group_size == 2
    assert VectorizedRunner(algorithm, model, data, settings, 7, memory_gb=1e-12).trainer.group_size == 1
    with caplog.at_level(logging.INFO, logger="fedmr"):
        tasks, sequential, vectorized, _, _ = both_paths(model, data, settings, memory_gb=budget_gb)
    assert "5 models in 3 groups of up to 2" in caplog.text
    assert_same_models(data, settings, tasks, sequential, vectorized, rtol=1e-10, atol=1e-10)


def test_vgg16_fits_the_automatic_budget_and_the_setting_is_checked():
    """K VGG-16 models with gradients and momentum: what one costs, and the config key's values."""
    data = clients_of([4, 4], dtype=torch.float32)
    algorithm = FedAvg({}, Federation(2, 2, (4, 4), 10, 1))
    trainer = VectorizedRunner(algorithm, VGG16(), data, LocalSettings(), seed=1).trainer
    assert 4 * 128e6 < trainer.model_bytes < 2e9  # four copies of 128 MiB of state plus activations of batch 50
    assert trainer.budget == pytest.approx(memory_budget("auto", torch.device("cpu")), rel=0.2)
    assert memory_budget(0, torch.device("cpu")) > 0 and memory_budget(1.5, torch.device("cpu")) == 1.5 * 2**30
    for good in ("\"auto\"", "0", "2.5", "16"):
        load_config(None, [f"vectorize_memory_gb={good}"])
    for bad in ("-1", "\"lots\"", "true", "nan", "inf", "1e400", "10" * 200):
        with pytest.raises(ConfigError, match="vectorize_memory_gb"):
            load_config(None, [f"vectorize_memory_gb={bad}"])


@pytest.mark.parametrize("algorithm", sorted(BATCHED))
def test_batched_algorithms_give_the_same_run(algorithm):
    """Whole runs on the digits data (Dirichlet clients of uneven size): metrics and final models agree."""
    settings = ["num_clients=8", "clients_per_round=4", "rounds=2", "local_epochs=1", "eval_every=1",
                "workers=1", f"algorithm=\"{algorithm}\""]
    outcomes = {}
    for vectorize in ("false", "true"):
        exp = prepare(load_config(None, [*settings, f"vectorize={vectorize}"]))
        sim = Simulation(exp, progress="none")
        assert isinstance(sim.runner, VectorizedRunner if vectorize == "true" else SequentialRunner)
        outcomes[vectorize] = sim.run()
    sequential, vectorized = outcomes["false"], outcomes["true"]
    for row_s, row_v in zip(sequential.rows, vectorized.rows):
        assert row_v["clients"] == row_s["clients"]
        assert row_v["train_loss"] == pytest.approx(row_s["train_loss"], rel=1e-4)
        assert row_v["accuracy"] == pytest.approx(row_s["accuracy"], abs=1e-3)
        assert row_v["client_acc_mean"] == pytest.approx(row_s["client_acc_mean"], abs=1e-2)  # one-sample flips, as above
    for key, value in sequential.final_state.items():
        torch.testing.assert_close(vectorized.final_state[key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_auto_on_a_gpu_falls_back_with_one_logged_reason(caplog):
    """make_runner only looks at the data's device before it picks a path: a stand-in on "cuda" shows the
    choice without a GPU.  FedProx's own local step goes to the sequential path, saying why."""

    class StandIn:
        def __init__(self):
            self.train_x = type("T", (), {"device": torch.device("cuda")})()

    cfg = load_config(None, ["algorithm=fedprox", "num_clients=4", "clients_per_round=2"])
    fedprox = build_algorithm(cfg, Federation(4, 2, (10,) * 4, 10, 1))
    with caplog.at_level(logging.INFO, logger="fedmr"):
        runner = make_runner(cfg, fedprox, CNN(), StandIn(), LocalSettings())
    assert isinstance(runner, SequentialRunner)
    assert caplog.text.count("runner: not vectorized: algorithm 'fedprox' has its own local update") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run benchmarks/gpu_check.sh there)")
def test_auto_vectorizes_every_builtin_model_on_a_gpu():
    cfg = load_config(None, ["num_clients=3", "clients_per_round=3", "device=\"cuda\""])
    data = clients_of([6, 4, 5], device="cuda")
    algorithm = build_algorithm(cfg, Federation(3, 3, (6, 4, 5), 10, 1))
    for name in ("cnn", "resnet20", "vgg16"):
        model = build_model(name, 10, 3, 32).to("cuda", memory_format=torch.channels_last)
        assert isinstance(make_runner(cfg, algorithm, model, data, LocalSettings()), VectorizedRunner), name
