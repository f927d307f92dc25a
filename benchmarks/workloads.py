"""The timed pieces of the benchmarks: one round on every path, the reference-style loop, the server.

Everything runs on synthetic CIFAR-10-shaped data (uint8 HWC images, 10
classes): speed does not depend on the pixel values, and no download is needed.
"""

from __future__ import annotations

import copy
import multiprocessing as mp
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from fedmr.config import load_config
from fedmr.data import DataSet, normalization
from fedmr.engine import Simulation, prepare
from fedmr.maths import draw_permutations, pool_mean, recombine_, replicate, state_nbytes
from fedmr.models import build_model
from fedmr.training import batch_slices, clone_state


@dataclass(frozen=True)
class Round:
    """The paper's round by default: 10 clients x 5 local epochs x batch 50 x 500 samples each."""

    clients: int = 10
    epochs: int = 5
    batch: int = 50
    samples: int = 500

    @property
    def samples_trained(self) -> int:
        per_client = sum(s.stop - s.start for s in batch_slices(self.samples, self.batch))
        return self.clients * self.epochs * per_client


def cifar_like(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.int64)


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: count it in the round it belongs to
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# ---- the reference-style loop (as the authors' code does it) --------------------------------
class ToTensor:
    """torchvision's ToTensor() on a PIL RGB image, step by step (torchvision is not a dependency):
    type check, copy out the bytes, HWC -> CHW, scale to [0, 1]."""

    def __call__(self, picture: Image.Image) -> torch.Tensor:
        if not isinstance(picture, Image.Image):
            raise TypeError(f"picture should be a PIL image, got {type(picture)}")
        dtype = torch.get_default_dtype()
        x = torch.from_numpy(np.array(picture, np.uint8, copy=True))
        x = x.view(picture.size[1], picture.size[0], len(picture.getbands()))
        x = x.permute((2, 0, 1)).contiguous()
        return x.to(dtype=dtype).div(255)


class Normalize(nn.Module):
    """torchvision's Normalize(mean, std): an nn.Module whose functional form checks its input, works
    on a copy and converts mean and std to tensors (and checks std for zeros) on every call."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.mean, self.std = mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.ndim < 3:
            raise TypeError("Normalize needs a float image tensor (..., C, H, W)")
        x = x.clone()
        mean = torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
        std = torch.as_tensor(self.std, dtype=x.dtype, device=x.device)
        if (std == 0).any():
            raise ValueError("std has a zero")
        return x.sub_(mean.view(-1, 1, 1)).div_(std.view(-1, 1, 1))


class Compose:
    def __init__(self, steps: list[Callable]):
        self.steps = steps

    def __call__(self, x):
        for step in self.steps:
            x = step(x)
        return x


# the authors' CIFAR-10 transform: ToTensor, then Normalize with 0.5 for every channel
AUTHORS_TRANSFORM = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


class PerSampleImages(Dataset):
    """As torchvision's CIFAR10 behind the authors' DatasetSplit: one uint8 HWC image at a time,
    made a PIL image, then turned into a normalised float tensor by the transform.
    ``python -m benchmarks.reference_fidelity`` times this against the real torchvision pipeline."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: list[int], transform: Callable = AUTHORS_TRANSFORM):
        self.images, self.labels, self.indices, self.transform = images, labels, indices, transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        j = self.indices[i]
        return self.transform(Image.fromarray(self.images[j])), int(self.labels[j])


class TextbookCNN(nn.Module):
    """The paper's CIFAR CNN written the usual way (conv -> ReLU -> MaxPool2d module), as the authors'
    code and most FL code bases define it.  The reference loop trains this one, so that speed-ups in
    ``fedmr.models.CNN`` (pooling before the ReLU) count for the simulator and not for the baseline;
    tests/test_speed_paths.py checks the two compute the same values and gradients."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def reference_model(model_name: str) -> nn.Module:
    return TextbookCNN() if model_name == "cnn" else build_model(model_name, 10, 3, 32)


class ReferenceFedMR:
    """Deep-copied state dicts, a DataLoader per client, per-layer shuffles of state dicts."""

    def __init__(self, model_name: str, images: np.ndarray, labels: np.ndarray, work: Round, seed: int = 0,
                 device: str = "cpu"):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.net = reference_model(model_name).to(self.device)
        self.images, self.labels, self.work = images, labels, work
        self.w_locals = [copy.deepcopy(self.net.state_dict()) for _ in range(work.clients)]
        self.splits = [list(range(c * work.samples, (c + 1) * work.samples)) for c in range(work.clients)]

    def client_dataset(self, indices: list[int]) -> Dataset:
        return PerSampleImages(self.images, self.labels, indices)

    def local_train(self, net, indices: list[int]):
        loader = DataLoader(self.client_dataset(indices), batch_size=self.work.batch, shuffle=True)
        optimiser = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.5)
        net.train()
        epoch_loss = []
        for _ in range(self.work.epochs):
            batch_loss = []
            for images, labels in loader:
                images, labels = images.to(self.device), labels.to(self.device)  # as the authors' code
                net.zero_grad()
                loss = F.cross_entropy(net(images), labels)
                loss.backward()
                optimiser.step()
                batch_loss.append(loss.item())
            epoch_loss.append(sum(batch_loss) / len(batch_loss))
        return net.state_dict()

    def round(self) -> None:
        for c in range(self.work.clients):
            net = copy.deepcopy(self.net)
            net.load_state_dict(self.w_locals[c])
            self.w_locals[c] = copy.deepcopy(self.local_train(net, self.splits[c]))
        # server: per-layer recombination, then the mean model, on deep copies
        shuffled = copy.deepcopy(self.w_locals)
        for key in self.w_locals[0]:
            perm = torch.randperm(len(self.w_locals))
            for i, j in enumerate(perm.tolist()):
                shuffled[i][key] = self.w_locals[j][key]
        glob = copy.deepcopy(shuffled[0])
        for key in glob:
            for w in shuffled[1:]:
                glob[key] = glob[key] + w[key]
            glob[key] = torch.div(glob[key], len(shuffled))
        self.w_locals = shuffled
        self.net.load_state_dict(glob)


# ---- the simulator ----------------------------------------------------------------------------
def cifar_dataset(images: np.ndarray, labels: np.ndarray) -> DataSet:
    # what the simulator keeps resident: normalised as the paper's CIFAR-10 (and the reference loop's transform)
    x = normalization.to_tensor(images, normalization.resolve("cifar10", "cifar10", 3))
    y = torch.from_numpy(labels)
    return DataSet("cifar-like", x, y, x[:500], y[:500], 10, default_model="cnn")


def simulation(model_name: str, data: DataSet, work: Round, *settings: str, device: str = "cpu") -> Simulation:
    """A FedMR run over the whole (synthetic) federation, ready for ``run_round``."""
    cfg = load_config(None, [f"model={model_name}", f"num_clients={work.clients}", f"clients_per_round={work.clients}",
                             "partition=iid", f"local_epochs={work.epochs}", f"batch_size={work.batch}",
                             f"device=\"{device}\"", *settings])
    sim = Simulation(prepare(cfg, data), progress="none")
    sim.algorithm.setup(sim.exp.initial_state)
    return sim


def bare_round(model: torch.nn.Module, state: dict, x: torch.Tensor, y: torch.Tensor, work: Round, seed: int) -> None:
    """The same work with nothing around it: per client a fresh SGD over index batches."""
    generator = torch.Generator().manual_seed(seed)
    for c in range(work.clients):
        model.load_state_dict(state)
        xc, yc = x[c * work.samples : (c + 1) * work.samples], y[c * work.samples : (c + 1) * work.samples]
        optimiser = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.5)
        for _ in range(work.epochs):
            order = torch.randperm(work.samples, generator=generator).to(x.device)
            for part in batch_slices(work.samples, work.batch):
                idx = order[part]
                loss = F.cross_entropy(model(xc[idx]), yc[idx])
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()


# ---- rates ------------------------------------------------------------------------------------
def matmul_gflops(n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """fp32 matmul throughput with this process's threads (or on the GPU): the machine's practical peak."""
    if device != "cpu":
        n = max(n, 8192)  # a GPU needs a larger product to reach its rate
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * n**3 / best / 1e9


def training_flops_per_sample(model_name: str, batch: int = 50) -> float:
    """Forward + backward FLOPs of one training step, per sample (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(model_name, 10, 3, 32).to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(x), y).backward()
    return counter.get_total_flops() / batch


# ---- the server -------------------------------------------------------------------------------
def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"{field}:\s+(\d+)", fh.read()).group(1)) / 1024


def _server_child(conn, model_name: str, k: int, repeats: int, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    state = clone_state(build_model(model_name, 10, 3, 32))
    pool = replicate(state, k)
    for key in pool:  # distinct models, as after training
        if pool[key].is_floating_point():
            pool[key].add_(torch.randn_like(pool[key]) * 0.01)
    generator = torch.Generator().manual_seed(0)

    def step():
        recombine_(pool, draw_permutations(list(pool), k, generator))
        return pool_mean(pool)

    step()
    times = [timed(step) for _ in range(repeats)]
    base = _rss_mib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as fh:  # resets the peak (VmHWM) to now
            fh.write("5")
        step()
        extra = max(0.0, _rss_mib("VmHWM") - base)
    except OSError:
        extra = float("nan")
    model_mib = state_nbytes(state) / 2**20
    conn.send({"seconds": median(times), "model_mib": model_mib, "pool_mib": k * model_mib,
               "peak_models": k + extra / model_mib})
    conn.close()


def server_cost(model_name: str, k: int = 10, repeats: int = 3, threads: int = 1) -> dict:
    """Recombination + pool mean of a K-model pool: time, and peak memory in model sizes, measured in a
    fresh forked process so earlier allocations do not hide the peak.  One thread by default: the
    server's thread count while worker processes train."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=_server_child, args=(child, model_name, k, repeats, threads))
    process.start()
    result = parent.recv()
    process.join()
    return result
