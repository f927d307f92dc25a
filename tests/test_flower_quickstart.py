"""FedMR in a Flower user's own app: a quickstart-style app (written below; its ClientApp imports only
flwr and torch) run by `flwr run` on Flower's simulation engine, 3 SuperNodes.  One ServerApp run
drives three strategies in turn (one Ray start-up): Flower's FedAvg, fedmr's FedMR with
first_stage_rounds = rounds, and plain FedMR.  The nodes record every model they receive and return.

- FedMR: round 1 sends every node the initial model, rounds 2 and 3 send three different models,
  each of them, key by key, one of the models returned the round before (layer-wise recombination),
  and the global model (what evaluate_fn and the federated evaluation get, and Result.arrays) is
  the mean of the models returned in that round.
- Swapping back: with first_stage_rounds = rounds FedMR is FedAvg with equal weights (every node
  holds 64 examples, so FedAvg's sample weights are equal): each node receives the same model in
  every round as under Flower's own FedAvg (up to float rounding of the two averaging codes)."""

from __future__ import annotations

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'fedmr[flower]')")
pytestmark = pytest.mark.slow  # starts Ray / Flower processes

import torch  # noqa: E402
from test_flower_helpers import flwr_run  # noqa: E402
from test_flower_simulation import simulation  # noqa: E402,F401  (the module's SuperLink fixture)

ROUNDS = 3
NODES = 3

PYPROJECT = f"""
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "quickstart"
version = "1.0.0"
dependencies = []

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "someone"

[tool.flwr.app.components]
serverapp = "quickstart.server_app:app"
clientapp = "quickstart.client_app:app"

[tool.flwr.app.config]
num-server-rounds = {ROUNDS}
fraction-train = 1.0
local-epochs = 1
lr = 0.1
strategies = "fedavg"
record-dir = ""
polling-grid = false
"""

TASK = '''
"""The model and the data: a small net on each node's own synthetic 4-class blobs (64 examples)."""
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.bn(self.fc1(x))))


def load_data(partition_id, num_partitions):
    g = torch.Generator().manual_seed(100 + partition_id)
    centres = torch.randn(4, 8, generator=torch.Generator().manual_seed(7)) * 2
    y = torch.randint(0, 4, (80,), generator=g)
    x = centres[y] + torch.randn(80, 8, generator=g)
    return (x[:64], y[:64]), (x[64:], y[64:])


def train(net, data, epochs, lr):
    x, y = data
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.5)
    net.train()
    total = 0.0
    for _ in range(epochs):
        for i in range(0, len(y), 16):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x[i:i + 16]), y[i:i + 16])
            loss.backward()
            opt.step()
            total += float(loss)
    return total / (epochs * 4)


def test(net, data):
    x, y = data
    net.eval()
    with torch.no_grad():
        logits = net(x)
    return float(nn.functional.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())
'''

CLIENT_APP = '''
"""The ClientApp of Flower's PyTorch quickstart (plus recording what it receives and returns)."""
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from quickstart.task import Net, load_data
from quickstart.task import test as test_fn
from quickstart.task import train as train_fn

app = ClientApp()


def record(context, name, state):
    torch.save(state, context.run_config["record-dir"] + "/" + name + ".pt")


@app.train()
def train(msg: Message, context: Context):
    model = Net()
    state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(state)
    pid, parts = context.node_config["partition-id"], context.node_config["num-partitions"]
    config = msg.content["config"]
    name = config["tag"] + "-r" + str(config["server-round"]) + "-p" + str(pid)
    record(context, name + "-in", state)
    torch.manual_seed(1000 * pid + config["server-round"])
    trainset, _ = load_data(pid, parts)
    train_loss = train_fn(model, trainset, context.run_config["local-epochs"], config["lr"])
    record(context, name + "-out", model.state_dict())
    metrics = {"train_loss": train_loss, "num-examples": len(trainset[1])}
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord(metrics)})
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context):
    model = Net()
    state = msg.content["arrays"].to_torch_state_dict()
    model.load_state_dict(state)
    pid, parts = context.node_config["partition-id"], context.node_config["num-partitions"]
    config = msg.content["config"]
    record(context, config["tag"] + "-r" + str(config["server-round"]) + "-p" + str(pid) + "-eval", state)
    _, valset = load_data(pid, parts)
    eval_loss, eval_acc = test_fn(model, valset)
    metrics = {"eval_loss": eval_loss, "eval_acc": eval_acc, "num-examples": len(valset[1])}
    return Message(content=RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
'''

SERVER_APP = '''
"""The ServerApp of Flower's PyTorch quickstart, with FedMR: the two changed lines are marked."""
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedmr.flower import FedMR  # changed line 1 of 2
from fedmr.flower import PollingGrid  # optional, for deployments: see docs/flower.md

from quickstart.task import Net

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    out = context.run_config["record-dir"]
    if context.run_config["polling-grid"]:  # optional, deployed: replies noticed within 0.1 s, not 3 s
        grid = PollingGrid(grid)
    for tag in context.run_config["strategies"].split(","):  # the test runs three strategies in one go
        torch.manual_seed(0)
        arrays = ArrayRecord(Net().state_dict())
        fraction_train = context.run_config["fraction-train"]
        num_rounds = context.run_config["num-server-rounds"]
        if tag == "fedavg":
            strategy = FedAvg(fraction_train=fraction_train, min_available_nodes=3)
        elif tag == "fedmr-stage1":
            strategy = FedMR(fraction_train=fraction_train, min_available_nodes=3, first_stage_rounds=num_rounds)
        else:
            strategy = FedMR(fraction_train=fraction_train, min_available_nodes=3)  # changed line 2 of 2

        def global_model(server_round, arrays, tag=tag):
            torch.save(arrays.to_torch_state_dict(), out + "/" + tag + "-global-" + str(server_round) + ".pt")

        result = strategy.start(
            grid=grid,
            initial_arrays=arrays,
            train_config=ConfigRecord({"lr": context.run_config["lr"], "tag": tag}),
            evaluate_config=ConfigRecord({"tag": tag}),
            num_rounds=num_rounds,
            evaluate_fn=global_model,
        )
        torch.save(result.arrays.to_torch_state_dict(), out + "/" + tag + "-result.pt")
        torch.save({r: dict(m) for r, m in result.evaluate_metrics_clientapp.items()}, out + "/" + tag + "-fedeval.pt")
'''


def write_app(folder):
    pkg = folder / "quickstart"
    pkg.mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "__init__.py").write_text("")
    (pkg / "task.py").write_text(TASK)
    (pkg / "client_app.py").write_text(CLIENT_APP)
    (pkg / "server_app.py").write_text(SERVER_APP)
    return folder


def test_client_app_imports_only_flwr_and_torch():
    imports = [line.split()[1] for line in CLIENT_APP.splitlines() + TASK.splitlines()
               if line.startswith(("import ", "from "))]
    assert {name.split(".")[0] for name in imports} <= {"torch", "flwr", "quickstart"}


@pytest.fixture(scope="module")
def quickstart_runs(simulation, tmp_path_factory):  # noqa: F811
    work, env, _ = simulation
    app = write_app(tmp_path_factory.mktemp("quickstart-app"))
    rec = tmp_path_factory.mktemp("records")
    flwr_run(env, "sim", f'strategies="fedavg,fedmr-stage1,fedmr" record-dir="{rec}"', app_dir=app,
             federation_config=f"num-supernodes={NODES} client-resources-num-cpus=1 init-args-num-cpus=2")

    def load(name):
        return torch.load(rec / f"{name}.pt")

    return load


def same(a, b, atol=0.0, rtol=0.0):
    return a.keys() == b.keys() and all(torch.allclose(a[k].double(), b[k].double(), rtol=rtol, atol=atol) for k in a)


# Flower's FedAvg (sum of x_i / 3 in numpy) and FedMR's pool mean round differently: a few float32 ulps of
# each entry (1-3 measured, with AVX2 and with scalar kernels), carried along by the next round's 4 SGD steps;
# entries reach 2.5 (running_var), where 1e-6 absolute is only 4 ulps, so the bound also scales: 8 ulps.
AVERAGING_RTOL = 8 * torch.finfo(torch.float32).eps


def test_fedmr_sends_different_models_from_round_two_and_returns_the_pool_mean(quickstart_runs):
    load = quickstart_runs
    first = [load(f"fedmr-r1-p{p}-in") for p in range(NODES)]
    assert all(same(first[0], m) for m in first[1:]), "round 1: every slot is the initial model"
    for r in range(2, ROUNDS + 1):
        received = [load(f"fedmr-r{r}-p{p}-in") for p in range(NODES)]
        returned = [load(f"fedmr-r{r - 1}-p{p}-out") for p in range(NODES)]
        assert not any(same(received[i], received[j]) for i in range(NODES) for j in range(i)), \
            f"round {r}: the nodes must receive {NODES} different models"
        for key in received[0]:  # layer-wise recombination: each layer is one of last round's models' layers
            for model in received:
                assert any(torch.equal(model[key], back[key]) for back in returned), (r, key)
            assert sorted(float(m[key].double().sum()) for m in received) == \
                   sorted(float(m[key].double().sum()) for m in returned), (r, key)
        mixed = any(not any(all(torch.equal(m[k], back[k]) for k in m) for back in returned) for m in received)
        assert mixed, f"round {r}: some model must mix layers of different nodes' models"
    for r in range(1, ROUNDS + 1):
        returned = [load(f"fedmr-r{r}-p{p}-out") for p in range(NODES)]
        mean = {k: torch.stack([m[k].double() for m in returned]).mean(0) for k in returned[0]}
        glob = load(f"fedmr-global-{r}")
        floats = [k for k in glob if glob[k].is_floating_point()]
        assert all(torch.allclose(glob[k].double(), mean[k], atol=1e-6) for k in floats), f"round {r}: pool mean"
        for p in range(NODES):  # federated evaluation got the global model
            assert same(load(f"fedmr-r{r}-p{p}-eval"), glob)
    assert same(load("fedmr-result"), load(f"fedmr-global-{ROUNDS}"))
    fed = load("fedmr-fedeval")
    assert sorted(fed) == list(range(1, ROUNDS + 1)) and all({"eval_loss", "eval_acc"} <= set(m) for m in fed.values())


def test_swapping_back_to_fedavg_gives_the_same_models_every_round(quickstart_runs):
    load = quickstart_runs
    for r in range(1, ROUNDS + 1):
        avg = [load(f"fedavg-r{r}-p{p}-in") for p in range(NODES)]
        assert all(same(avg[0], m) for m in avg[1:]), "FedAvg sends one model"
        for p in range(NODES):
            assert same(load(f"fedmr-stage1-r{r}-p{p}-in"), avg[p], atol=1e-6, rtol=AVERAGING_RTOL), (r, p)
            assert same(load(f"fedmr-stage1-r{r}-p{p}-out"), load(f"fedavg-r{r}-p{p}-out"), atol=1e-5,
                        rtol=AVERAGING_RTOL), (r, p)
        # (FedAvg's average turns integer buffers into floats; the values are compared)
        assert same(load(f"fedmr-stage1-global-{r}"), load(f"fedavg-global-{r}"), atol=1e-5, rtol=AVERAGING_RTOL), r
    # and the runs differ from plain FedMR, so the comparison can fail
    assert not same(load("fedmr-result"), load("fedavg-result"), atol=1e-4)
