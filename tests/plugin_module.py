"""The user code the plug-in tests import by string: written into a temporary folder by
``write_user_module`` (never imported from tests/), so every test goes through PYTHONPATH or
sys.path exactly as a user's own module would."""

from __future__ import annotations

from pathlib import Path

USER_MODULE = '''
import numpy as np
import torch
from torch import nn

from dataclasses import dataclass

from fedmr import Options, option
from fedmr.algorithms.fedavg import FedAvg


def blobs():
    """Four Gaussian blobs in 20 dimensions: a tabular data set, float64 numpy arrays."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 3, (4, 20))

    def draw(n):
        y = rng.integers(0, 4, n)
        return centers[y] + rng.normal(0, 1.0, (n, 20)), y

    tx, ty = draw(1000)
    vx, vy = draw(300)
    return tx, ty, vx, vy


def mlp(num_classes, input_shape):
    return nn.Sequential(nn.Linear(input_shape[0], 32), nn.ReLU(), nn.Linear(32, num_classes))


def tokens():
    """Integer token sequences of length 8 over 16 tokens; the class is a token placed three times."""
    g = torch.Generator().manual_seed(0)

    def draw(n):
        y = torch.randint(0, 4, (n,), generator=g)
        x = torch.randint(4, 16, (n, 8), generator=g)
        for _ in range(3):
            x[torch.arange(n), torch.randint(0, 8, (n,), generator=g)] = y
        return x, y

    tx, ty = draw(1200)
    vx, vy = draw(300)
    return tx, ty, vx, vy


class GRUNet(nn.Module):
    """Embedding -> GRU -> linear head: a class is a factory too."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.emb = nn.Embedding(16, 8)
        self.gru = nn.GRU(8, 16, batch_first=True)
        self.out = nn.Linear(16, num_classes)

    def forward(self, x):
        h, _ = self.gru(self.emb(x))
        return self.out(h[:, -1])


class LSTMNet(GRUNet):
    def __init__(self, num_classes, input_shape):
        super().__init__(num_classes, input_shape)
        self.gru = nn.LSTM(8, 16, batch_first=True)


class Branchy(nn.Module):
    """Data-dependent control flow: vmap cannot batch it, so the vectorized path must fall back."""

    def __init__(self, num_classes, input_shape):
        super().__init__()
        self.fc = nn.Linear(input_shape[0], num_classes)

    def forward(self, x):
        if x.sum() > 1e9:
            x = x * 0
        return self.fc(x)


@dataclass(frozen=True)
class ServerLROptions(Options):
    server_lr: float = option(1.0, "step towards the clients' mean", low=0.0, high=1.0, low_open=True)


class ServerLR(FedAvg):
    """FedAvg with a server learning rate: a user algorithm (FedAvg is a subclass of fedmr.Algorithm)."""

    name = "serverlr"
    Options = ServerLROptions

    def aggregate_train(self, round_idx, results, rng):
        old = self.global_model
        used = super().aggregate_train(round_idx, results, rng)
        lr = self.options.server_lr
        self.global_model = {k: v + lr * (self.global_model[k] - v) for k, v in old.items()}
        return used


# ---- bad plug-ins -------------------------------------------------------------------------
CONSTANT = 3


class NotAnAlgorithm:
    pass


def returns_int(num_classes, input_shape):
    return 3


def wrong_output(num_classes, input_shape):
    return nn.Linear(input_shape[0], num_classes + 1)


def flat_output(num_classes, input_shape):
    return nn.Sequential(nn.Linear(input_shape[0], 1), nn.Flatten(0))


def factory_raises(num_classes, input_shape):
    raise ValueError("no such layer size")


def three_tuple():
    tx, ty, vx, vy = blobs()
    return tx, ty, vx


def strings():
    tx, ty, vx, vy = blobs()
    return tx, ["a"] * len(ty), vx, vy


def float_labels():
    tx, ty, vx, vy = blobs()
    return tx, ty + 0.5, vx, vy


def negative_labels():
    tx, ty, vx, vy = blobs()
    return tx, ty - 1, vx, vy - 1


def shapes_differ():
    tx, ty, vx, vy = blobs()
    return tx, ty, vx[:, :19], vy


def loader_raises():
    raise OSError("disk not mounted")
'''

BROKEN_MODULE = "import numpy\nraise RuntimeError('half-written module')\n"


def write_user_module(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(USER_MODULE)
    (folder / f"{name}_broken.py").write_text(BROKEN_MODULE)
    return folder
