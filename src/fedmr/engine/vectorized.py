"""The K clients of a round trained as one batched computation (torch.func vmap over stacked parameters).

Ten tiny models leave most of a GPU idle; stacking their parameters on a leading
dimension and vmapping one functional training step over them runs the round
as a few large kernels instead of K x steps small ones.

Each client keeps its own schedule exactly as ``train_sgd`` draws it (the same
generator, one ``randperm`` per epoch, the same batch cuts), so the models
match the sequential path to float tolerance.  Clients differ in size, hence
in batch counts and in the size of an epoch's last batch: clients are ordered
by step count so the ones still training at step t are a prefix (sliced views,
no gather), and short batches are padded with zero-weight samples.  Padding is
exact only for models without batch statistics or random layers, so the path
accepts models with no buffers and no dropout, trained by the plain local
update (cross-entropy SGD with momentum).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..algorithms.base import Algorithm, TrainResult, TrainTask
from ..errors import ConfigError
from ..seeding import torch_generator
from ..training import LocalSettings, batch_slices
from .client import ClientData


def unsupported_reason(algorithm: Algorithm, model: nn.Module) -> str | None:
    """Why the batched path cannot reproduce this algorithm/model, or None when it can."""
    if type(algorithm).local_update is not Algorithm.local_update:
        return f"algorithm '{algorithm.name}' has its own local update"
    if any(True for _ in model.buffers()):
        return "the model has buffers (BatchNorm statistics)"
    if any(isinstance(m, nn.modules.dropout._DropoutNd) for m in model.modules()):
        return "the model has dropout layers"
    return None


def _client_schedule(indices: torch.Tensor, settings: LocalSettings, generator: torch.Generator) -> list[torch.Tensor]:
    """The client's batches as global sample indices, drawn exactly as ``train_sgd`` draws them."""
    n = indices.numel()
    slices = batch_slices(n, settings.batch_size)
    batches = []
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator, device=generator.device).to(indices.device)
        shuffled = indices[order]
        batches.extend(shuffled[part] for part in slices)
    return batches


def _padded_schedule(schedules: list[list[torch.Tensor]], batch_size: int, device: torch.device):
    """(steps, K, B) sample indices and 0/1 weights; clients with fewer steps are simply absent later."""
    steps = max(len(s) for s in schedules)
    index = torch.zeros(steps, len(schedules), batch_size, dtype=torch.long)
    weight = torch.zeros(steps, len(schedules), batch_size)
    for k, batches in enumerate(schedules):
        for t, batch in enumerate(batches):
            index[t, k, : batch.numel()] = batch.cpu()
            weight[t, k, : batch.numel()] = 1.0
    return index.to(device), weight.to(device)


def train_batched(model: nn.Module, tasks: Sequence[TrainTask], data: ClientData, settings: LocalSettings,
                  seed: int, round_idx: int) -> list[TrainResult]:
    """Train every task's model at once; returns results in task order."""
    device = data.train_x.device
    schedules = [_client_schedule(data.indices[t.client_id], settings,
                                  torch_generator(seed, "client", round_idx, t.client_id)) for t in tasks]
    # longest first: the clients still training at step t are always a prefix
    order = sorted(range(len(tasks)), key=lambda i: -len(schedules[i]))
    schedules = [schedules[i] for i in order]
    active_until = [len(s) for s in schedules]
    index, weight = _padded_schedule(schedules, settings.batch_size, device)

    names = [name for name, _ in model.named_parameters()]
    params = {n: torch.stack([tasks[i].state[n].detach().to(device) for i in order]).contiguous() for n in names}
    momentum = {n: torch.zeros_like(p) for n, p in params.items()}
    losses = torch.zeros(len(tasks), device=device)

    def loss_one(p, x, y, w):
        logits = functional_call(model, p, (x,))
        return (F.cross_entropy(logits, y, reduction="none") * w).sum() / w.sum()

    step = vmap(grad_and_value(loss_one))
    keys = list(params)
    model.train()
    for t in range(index.shape[0]):
        a = sum(1 for s in active_until if s > t)
        idx = index[t, :a]
        x = data.train_x[idx.reshape(-1)].reshape(a, idx.shape[1], *data.train_x.shape[1:])
        p = {n: params[n][:a] for n in keys}
        grads, loss = step(p, x, data.train_y[idx], weight[t, :a])
        with torch.no_grad():
            buf = [momentum[n][:a] for n in keys]
            torch._foreach_mul_(buf, settings.momentum)
            torch._foreach_add_(buf, [grads[n] for n in keys])
            torch._foreach_add_([p[n] for n in keys], buf, alpha=-settings.lr)
            losses[:a] += loss
    mean_loss = (losses / torch.tensor(active_until, device=device, dtype=losses.dtype)).tolist()

    results: list[TrainResult | None] = [None] * len(tasks)
    for k, i in enumerate(order):
        task = tasks[i]
        state = {n: params[n][k].clone() for n in keys}
        results[i] = TrainResult(task.client_id, task.slot, state, int(data.indices[task.client_id].numel()), mean_loss[k])
    return results  # type: ignore[return-value]


class VectorizedRunner:
    """Trains the round's clients as one vmapped computation and yields them in task order."""

    def __init__(self, algorithm: Algorithm, model: nn.Module, data: ClientData, settings: LocalSettings, seed: int):
        reason = unsupported_reason(algorithm, model)
        if reason is not None:
            raise ConfigError(f"vectorize = true is not possible here: {reason} (use vectorize = \"auto\" or false)")
        self.model, self.data, self.settings, self.seed = model, data, settings, seed

    def run(self, round_idx: int, tasks: Sequence[TrainTask]) -> Iterator[TrainResult]:
        if tasks:
            yield from train_batched(self.model, tasks, self.data, self.settings, self.seed, round_idx)

    def close(self) -> None:
        pass
