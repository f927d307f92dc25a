"""Is the reference loop's emulated data pipeline as slow as the real torchvision one?

The reference-style loop (benchmarks/workloads.py) re-enacts torchvision's per-sample ToTensor +
Normalize, because torchvision is not a dependency (and PyPI's torchvision does not import beside
the CPU torch 2.13.0 build the project pins).  This script runs both side by side where torchvision
is installed, on the same synthetic CIFAR-10 files written in the real python-pickle format:

    python -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.14.1 torchvision==0.29.1 \\
        matplotlib tqdm safetensors tomli-w scipy && /tmp/tv/bin/pip install --no-deps -e .
    /tmp/tv/bin/python -m benchmarks.reference_fidelity

It checks that both give the same tensors, then prints seconds for 5 epochs of one 500-sample
client (loading only, and loading plus the CNN's training) and the ratio real / emulated.
"""

from __future__ import annotations

import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .workloads import ReferenceFedMR, Round, cifar_like, median, timed


class Split(Dataset):
    """The authors' DatasetSplit: a client's indices into the whole training set."""

    def __init__(self, dataset: Dataset, indices: list[int]):
        self.dataset, self.indices = dataset, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        return self.dataset[self.indices[i]]


def write_cifar_files(root: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Synthetic images in CIFAR-10's python format: 1 training batch with everything, tiny others."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rows = images.transpose(0, 3, 1, 2).reshape(len(images), -1)  # the files store CHW rows
    batches = {"data_batch_1": (rows, labels)}
    for name in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"):
        batches[name] = (rows[:1], labels[:1])
    for name, (data, targets) in batches.items():
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": data, "labels": [int(t) for t in targets]}, fh)
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, fh)


def main() -> int:
    try:
        import torchvision
        from torchvision import datasets, transforms
    except Exception as exc:  # noqa: BLE001 - ImportError, or torchvision's operator errors on a mismatched torch
        print(f"torchvision is not usable here ({type(exc).__name__}: {exc}); see this script's docstring")
        return 2

    class UncheckedCIFAR10(datasets.CIFAR10):
        # synthetic files: their MD5 sums are not CIFAR-10's, so skip the two checks
        def _check_integrity(self) -> bool:
            return True

        def _load_meta(self) -> None:
            self.classes = [f"class{i}" for i in range(10)]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    work = Round(clients=1)
    images, labels = cifar_like(work.samples)
    with tempfile.TemporaryDirectory() as tmp:
        write_cifar_files(Path(tmp), images, labels)
        transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
        real_set = UncheckedCIFAR10(tmp, train=True, download=False, transform=transform)
        emulated = ReferenceFedMR("cnn", real_set.data, np.asarray(real_set.targets), work)
        real = ReferenceFedMR("cnn", real_set.data, np.asarray(real_set.targets), work)
        real.client_dataset = lambda indices: Split(real_set, indices)
        indices = real.splits[0]
        a, b = emulated.client_dataset(indices), real.client_dataset(indices)
        same = all(torch.equal(a[i][0], b[i][0]) and a[i][1] == b[i][1] for i in range(0, len(indices), 37))
        print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, threads {torch.get_num_threads()}")
        print(f"same tensors from both pipelines: {same}")

        def load_only(ref: ReferenceFedMR):
            loader = DataLoader(ref.client_dataset(indices), batch_size=work.batch, shuffle=True)
            for _ in range(work.epochs):
                for _batch in loader:
                    pass

        paths = {"emulated load": lambda: load_only(emulated), "torchvision load": lambda: load_only(real),
                 "emulated train": lambda: emulated.local_train(emulated.net, indices),
                 "torchvision train": lambda: real.local_train(real.net, indices)}
        times: dict[str, list[float]] = {name: [] for name in paths}
        for rep in range(6):  # interleaved; the first repetition is a warm-up
            for name, fn in paths.items():
                t = timed(fn)
                if rep:
                    times[name].append(t)
        m = {name: median(ts) for name, ts in times.items()}
        samples = work.samples * work.epochs
        print("| one client, 5 epochs x 500 samples | emulated (s) | torchvision (s) | torchvision / emulated |")
        print("|---|---:|---:|---:|")
        for what in ("load", "train"):
            e, r = m[f"emulated {what}"], m[f"torchvision {what}"]
            print(f"| {what} ({e / samples * 1e6:.1f} vs {r / samples * 1e6:.1f} us/sample) | {e:.3f} | {r:.3f} | {r / e:.3f} |")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
