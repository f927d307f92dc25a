"""Models and data of any shape: DataSet without the image requirement, channels_last only for images,
recurrent models and embeddings recombined by FedMR, and image folders of any size and channel count."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fedmr.cli import main
from fedmr.data import DataSet, dataset_from_arrays
from fedmr.maths import draw_permutations, recombine, stack_states


def test_dataset_takes_features_and_tokens_and_keeps_channels_last_for_images_only():
    rng = np.random.default_rng(0)
    flat = dataset_from_arrays("dataset", (rng.normal(size=(30, 6)), rng.integers(0, 3, 30),
                                           rng.normal(size=(9, 6)), rng.integers(0, 3, 9)), "flat")
    assert flat.train_x.dtype == torch.float32 and flat.input_shape == (6,) and flat.num_classes == 3
    assert flat.default_model == "mlp" and not flat.is_images
    tokens = dataset_from_arrays("dataset", (torch.randint(0, 50, (30, 12), dtype=torch.int32), torch.arange(30) % 2,
                                             torch.randint(0, 50, (9, 12)), torch.arange(9) % 2), "tokens")
    assert tokens.train_x.dtype == torch.int64 and tokens.default_model == "mlp"
    images = dataset_from_arrays("dataset", (torch.randn(30, 3, 20, 20), torch.arange(30) % 5,
                                             torch.randn(9, 3, 20, 20), torch.arange(9) % 5), "images")
    assert images.default_model == "cnn" and images.is_images
    for data in (flat, tokens, images):
        moved = data.to("cpu")
        assert moved.train_x.is_contiguous(memory_format=torch.channels_last) == data.is_images
        assert torch.equal(moved.train_x, data.train_x)
    tiny = dataset_from_arrays("dataset", (torch.randn(30, 1, 8, 8), torch.arange(30) % 2,
                                           torch.randn(9, 1, 8, 8), torch.arange(9) % 2), "tiny")
    assert tiny.default_model == "mlp"  # 8x8 is too small for the CNN: "auto" picks a model that fits


def test_dataset_still_refuses_mismatched_samples_and_labels():
    from fedmr.errors import DataError

    with pytest.raises(DataError, match="differ in number"):
        DataSet("d", torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(1, 2), torch.zeros(1), 2)
    with pytest.raises(DataError, match="share one shape"):
        DataSet("d", torch.zeros(3, 2), torch.zeros(3, dtype=torch.long), torch.zeros(1, 3), torch.zeros(1), 2)


class Recurrent(nn.Module):
    def __init__(self, cell: type[nn.Module]):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.rnn = cell(4, 6, batch_first=True)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        h, _ = self.rnn(self.emb(x))
        return self.out(h[:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_fedmr_recombines_recurrent_models_and_embeddings_entry_by_entry(cell):
    torch.manual_seed(0)
    models = [Recurrent(cell) for _ in range(4)]
    pool = stack_states([m.state_dict() for m in models])
    perms = draw_permutations(list(pool), 4, torch.Generator().manual_seed(1))
    mixed = recombine(pool, perms)
    assert {"emb.weight", "rnn.weight_ih_l0", "rnn.weight_hh_l0", "out.weight"} <= set(mixed)
    for key, value in mixed.items():
        for i in range(4):  # slot i's entry is model perm[i]'s entry, untouched
            assert torch.equal(value[i], models[int(perms[key][i])].state_dict()[key])
    child = Recurrent(cell)
    child.load_state_dict({k: v[0] for k, v in mixed.items()})
    assert child(torch.randint(0, 10, (2, 5))).shape == (2, 3)


def write_images(root, classes: int, per_class: int, size: tuple[int, int], mode: str, test: int = 3):
    for split, count in (("train", per_class), ("test", test)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            image = Image.new(mode, size, 25 * c if mode == "L" else (25 * c, 200 - 20 * c, 9 * c))
            for i in range(count):
                image.save(folder / f"{i:05d}.png")
    return root


@pytest.mark.parametrize("size, mode, shape", [((28, 28), "L", "1x28x28"), ((48, 48), "RGB", "3x48x48")])
def test_image_folders_of_other_sizes_run_with_the_default_model(tmp_path, capsys, size, mode, shape):
    root = write_images(tmp_path / "images", 4, 30, size, mode)
    assert main(["data", "info", "imagefolder", "--data-dir", str(root), "--set", f"cache_dir='{tmp_path}'"]) == 0
    assert f"train: 120 images, test: 12 images, {shape}" in capsys.readouterr().out
    out = tmp_path / "run"
    args = ["run", "--quiet", "--out", str(out), "--set", "dataset=imagefolder", "--set", f"data_dir='{root}'",
            "--set", f"cache_dir='{tmp_path}'", "--set", "num_clients=4", "--set", "clients_per_round=2",
            "--set", "partition=iid", "--set", "rounds=1", "--set", "local_epochs=1"]
    assert main(args) == 0
    assert json.loads((out / "summary.json").read_text())["model"] == "cnn"


def test_too_few_images_for_the_default_clients_says_how_many_they_support(tmp_path, capsys):
    root = write_images(tmp_path / "images", 4, 30, (28, 28), "L")
    code = main(["run", "--out", str(tmp_path / "r"), "--set", "dataset=imagefolder", "--set", f"data_dir='{root}'",
                 "--set", f"cache_dir='{tmp_path}'"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fedmr: error: data set too small: 120 training samples cannot give 100 clients")
    supported = int(err.split("--set num_clients=")[1].split()[0])
    assert 1 <= supported <= 12
    out = tmp_path / "ok"  # the count the message names works
    assert main(["run", "--quiet", "--out", str(out), "--set", "dataset=imagefolder", "--set", f"data_dir='{root}'",
                 "--set", f"cache_dir='{tmp_path}'", "--set", f"num_clients={supported}",
                 "--set", f"clients_per_round={min(supported, 10)}", "--set", "rounds=1", "--set", "local_epochs=1"]) == 0


@pytest.mark.slow
@pytest.mark.parametrize("size, mode", [((28, 28), "L"), ((48, 48), "RGB")])
def test_image_folders_run_with_nothing_but_dataset_and_data_dir(tmp_path, size, mode):
    """The default 100 clients and Dirichlet(0.1) split need many images: 10 classes x 1000."""
    root = write_images(tmp_path / "images", 10, 1000, size, mode, test=20)
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(out), "--set", "dataset=imagefolder", "--set", f"data_dir='{root}'",
                 "--set", f"cache_dir='{tmp_path}'", "--set", "rounds=1"]) == 0  # rounds=1 only to keep it short
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "cnn" and summary["rounds"] == 1
