"""The embedded default data: the 1,797 8x8 handwritten digits (UCI optdigits test part, as
scikit-learn ships them), so every command works on a fresh machine with no network.

Images are scaled from 0..16 to [-1, 1] and enlarged 4x (nearest) to 32x32 so
the paper's CIFAR CNN runs on them unchanged with one input channel.
"""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import torch

from . import normalization
from .base import DataSet, DataSource, register

TEST_FRACTION = 0.2
SPLIT_SEED = 0  # fixed, independent of the run's seed, so partition files stay valid


def read_digits() -> tuple[np.ndarray, np.ndarray]:
    with resources.files(__package__).joinpath("digits.csv.gz").open("rb") as raw, gzip.open(raw, "rt") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    return table[:, :64].reshape(-1, 1, 8, 8), table[:, 64].astype(np.int64)


@register("digits")
def load_digits(source: DataSource) -> DataSet:
    images, labels = read_digits()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    n_test = int(round(TEST_FRACTION * len(labels)))
    test, train = order[:n_test], np.sort(order[n_test:])
    pixels = images.repeat(4, axis=2).repeat(4, axis=3).transpose(0, 2, 3, 1)  # (N, 32, 32, 1) in 0..16
    affine = normalization.resolve(source.normalization, "cifar10", 1)
    y = torch.from_numpy(labels)
    test = np.sort(test)
    return DataSet(
        name="digits",
        train_x=normalization.to_tensor(pixels[train], affine, scale=1 / 16),
        train_y=y[train],
        test_x=normalization.to_tensor(pixels[test], affine, scale=1 / 16),
        test_y=y[test],
        num_classes=10, classes=[str(d) for d in range(10)], default_model="cnn", normalization=affine,
    )
