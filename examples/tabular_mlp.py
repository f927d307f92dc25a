"""Your own tabular classifier under FedMR and FedAvg: a model factory and a data loader, no files.

    python examples/tabular_mlp.py

The same from the command line (this file is importable as ``tabular_mlp``):

    PYTHONPATH=examples fedmr run --set model=tabular_mlp:mlp --set dataset=tabular_mlp:blobs \
        --set num_clients=20 --set clients_per_round=5 --set rounds=20 --set eval_every=5
"""

import os

import numpy as np
from torch import nn

import fedmr


def blobs():
    """A synthetic tabular data set: 6 classes of Gaussian blobs in 30 features (numpy arrays work)."""
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 2.0, (6, 30))

    def draw(n):
        y = rng.integers(0, 6, n)
        return (centers[y] + rng.normal(0, 3.0, (n, 30))).astype(np.float32), y

    train_x, train_y = draw(3000)
    test_x, test_y = draw(1000)
    return train_x, train_y, test_x, test_y


def mlp(num_classes, input_shape):
    """The model factory: called with the number of classes and one sample's shape, here (30,)."""
    return nn.Sequential(nn.Linear(input_shape[0], 64), nn.ReLU(), nn.Linear(64, num_classes))


if __name__ == "__main__":
    config = {"num_clients": 20, "clients_per_round": 5, "rounds": int(os.environ.get("FEDMR_EXAMPLE_ROUNDS", 20)),
              "eval_every": 5, "alpha": 0.5}
    results = fedmr.compare(config, ["fedavg", "fedmr"], model=mlp, data=blobs())
    for name, result in results.items():
        print(f"{name}: final accuracy {result.summary['final_accuracy']:.3f} (chance 0.167)")
