import pytest
import torch
import torch.nn.functional as F

from fedmr.algorithms import ALGORITHMS, Federation, TrainTask
from fedmr.algorithms.fedprox import proximal_loss
from fedmr.config import load_config
from fedmr.errors import ConfigError
from fedmr.models import CNN
from fedmr.training import LocalSettings, clone_state

FED = Federation(num_clients=4, clients_per_round=2, client_sizes=(40, 40, 40, 40), num_classes=10, seed=1)
SETTINGS = LocalSettings(epochs=2, batch_size=10, lr=0.05, momentum=0.5)


def data(seed=0, n=40):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def local(name, state, **options):
    algo = ALGORITHMS[name]({**ALGORITHMS[name].defaults, **options}, FED)
    x, y = data()
    return algo.local_update(CNN(10, 1), TrainTask(0, 0, state), x, y, SETTINGS, torch.Generator().manual_seed(7)).state


def test_mu_zero_is_fedavg_exactly():
    torch.manual_seed(0)
    start = clone_state(CNN(10, 1))
    prox, avg = local("fedprox", start, mu=0.0), local("fedavg", start)
    for key in avg:
        assert torch.equal(prox[key], avg[key]), key


def test_gradient_has_the_proximal_term():
    torch.manual_seed(0)
    model = CNN(10, 1)
    anchor = [p.detach().clone() + 0.1 * torch.randn_like(p) for p in model.parameters()]
    x, y = data(n=8)
    mu = 0.3
    grads = torch.autograd.grad(proximal_loss(mu, anchor)(model, x, y), list(model.parameters()))
    plain = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    for g, g0, p, a in zip(grads, plain, model.parameters(), anchor):
        torch.testing.assert_close(g - g0, mu * (p.detach() - a), rtol=1e-4, atol=1e-6)


def test_a_large_mu_keeps_the_client_near_the_global_model():
    torch.manual_seed(0)
    start = clone_state(CNN(10, 1))

    def drift(state):
        return sum(float((state[k] - start[k]).pow(2).sum()) for k in start)

    assert drift(local("fedprox", start, mu=5.0)) < 0.8 * drift(local("fedprox", start, mu=0.0))


def test_negative_mu_is_a_config_error():
    with pytest.raises(ConfigError, match="fedprox.mu"):
        load_config(None, ["fedprox.mu=-1"])
