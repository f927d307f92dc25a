"""The K clients of a round trained as one batched computation (torch.func vmap over stacked models).

Ten small models leave most of a GPU idle; stacking their parameters and
buffers on a leading dimension and vmapping one functional training step over
them runs the round as a few large kernels instead of K x steps small ones.
Every built-in model is covered, and each result equals the sequential path's
(``train_client`` -> ``train_sgd``) to float tolerance:

* Schedules.  Each client draws its batches exactly as ``train_sgd`` does (the
  same generator, one ``randperm`` per epoch, ``batch_slices``' cuts, so a
  trailing batch of one sample is dropped and another short last batch kept).
  Clients are ordered by step count, so the ones still training at step t are
  a prefix; a client past its last step is in no call any more: its
  parameters, momentum and BatchNorm statistics stay as they were.
* BatchNorm.  The stacked buffers go into ``functional_call`` with the
  parameters; train-mode BatchNorm normalises with each model's own batch
  statistics and updates that model's running mean, unbiased running variance
  and ``num_batches_tracked`` in place, natively, under vmap.
* Dropout.  The sequential path seeds torch's default generator per client;
  here each client keeps that generator's state, and its masks are drawn
  outside vmap, client by client, by ``F.dropout`` itself on a tensor of ones
  of the layer input's shape (the same kernel, the same draws, in the same
  order), then applied inside vmap as ``x * mask``.  So dropout models match
  exactly too (tested on the CPU; ``benchmarks/gpu_check.sh`` runs the same
  tests on a GPU).
* Short batches.  A model without buffers or dropout pads a client's short
  batch with zero-weight samples (exact: the loss ignores them) and keeps one
  call per step.  BatchNorm statistics and dropout masks depend on the batch,
  so for such models the clients of a step are split by batch size instead
  (one call per distinct size, usually one).
* Memory.  When K models with their gradients, momentum and activations
  would not fit the budget (``vectorize_memory_gb``; "auto" or 0: most of the
  device's free memory, or of the available RAM on a CPU), the K clients are
  trained in groups, one group after another.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from ..algorithms.base import Algorithm, TrainResult, TrainTask
from ..allocator import keep_freed_memory
from ..errors import ConfigError
from ..seeding import derive_seed, torch_generator
from ..training import LocalSettings, autocast, batch_slices, full_precision
from .client import ClientData

log = logging.getLogger("fedmr")

# what one model costs besides its state: gradients, momentum, the result's copy, update temporaries
_STATE_COPIES = 4
# saved activations, their gradients and temporaries, per element a leaf module outputs
_ACTIVATION_COPIES = 3


def batching_reason(algorithm: Algorithm) -> str | None:
    """Why this algorithm's local step cannot be batched, or None.  The class declares it
    (``batched_local_step``); a subclass that overrides ``local_update`` below the class that
    declared True has not declared it for its own step, so it is refused too."""
    cls = type(algorithm)
    if not getattr(cls, "batched_local_step", False):
        return f"algorithm '{algorithm.name}' has its own local update (batched_local_step = False)"
    declared = next(c for c in cls.__mro__ if "batched_local_step" in vars(c))
    updated = next(c for c in cls.__mro__ if "local_update" in vars(c))
    if updated is not declared and issubclass(updated, declared):
        return (f"algorithm '{algorithm.name}' has its own local update ({updated.__name__}.local_update "
                f"overrides it without declaring batched_local_step)")
    return None


def unsupported_reason(algorithm: Algorithm, model: nn.Module) -> str | None:
    """Why the batched path cannot reproduce this algorithm/model, or None when it can."""
    reason = batching_reason(algorithm)
    if reason is not None:
        return reason
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.dropout._DropoutNd) and type(module) is not nn.Dropout:
            return f"the model's layer '{name}' is a {type(module).__name__} (only nn.Dropout masks are reproduced)"
    return None


def _client_schedule(indices: torch.Tensor, settings: LocalSettings, generator: torch.Generator) -> list[torch.Tensor]:
    """The client's batches as global sample indices, drawn exactly as ``train_sgd`` draws them."""
    n = indices.numel()
    slices = batch_slices(n, settings.batch_size)
    batches: list[torch.Tensor] = []
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator, device=generator.device).to(indices.device)
        shuffled = indices[order]
        batches.extend(shuffled[part] for part in slices)
    return batches


class _DropoutMasks:
    """Each client's stream of torch's default generator, as ``train_client`` seeds it, and the
    masks its dropout layers would draw from it, call by call."""

    def __init__(self, calls: list[tuple[nn.Dropout, tuple[int, ...]]], device: torch.device):
        self.calls = calls
        self.device = device
        self.generator = (torch.default_generator if device.type == "cpu"
                          else torch.cuda.default_generators[device.index if device.index is not None
                                                             else torch.cuda.current_device()])

    def start(self, seeds: list[int]) -> list[torch.Tensor]:
        states = []
        for s in seeds:
            self.generator.manual_seed(s)
            states.append(self.generator.get_state())
        return states

    def draw(self, states: list[torch.Tensor], clients: list[int], batch: int) -> tuple[torch.Tensor, ...]:
        """(len(clients), batch, *shape) noise per dropout call; advances those clients' streams."""
        if not self.calls:
            return ()
        per_call: list[list[torch.Tensor]] = [[] for _ in self.calls]
        for k in clients:
            self.generator.set_state(states[k])
            for out, (module, shape) in zip(per_call, self.calls):
                out.append(F.dropout(torch.ones((batch, *shape), device=self.device), module.p, True))
            states[k] = self.generator.get_state()
        return tuple(torch.stack(masks) for masks in per_call)


@contextmanager
def _masked_dropout(modules: list[nn.Dropout], queue: list[torch.Tensor]):
    """The dropout layers multiply by the next given mask instead of drawing one (while inside)."""

    def masked(input: torch.Tensor) -> torch.Tensor:  # named as nn.Dropout.forward's argument
        return input * queue.pop(0)

    for module in modules:
        module.forward = masked  # type: ignore[method-assign]
    try:
        yield
    finally:
        for module in modules:
            del module.forward


def _probe(model: nn.Module, sample: torch.Tensor) -> tuple[list[tuple[nn.Dropout, tuple[int, ...]]], int]:
    """One eval-mode forward on two samples: the dropout calls in order with their per-sample input
    shapes, and the elements the leaf modules output per sample (for the memory estimate)."""
    calls: list[tuple[nn.Dropout, tuple[int, ...]]] = []
    elements = [0]

    def on_dropout(module, inputs):
        calls.append((module, tuple(inputs[0].shape[1:])))

    def on_leaf(module, inputs, output):
        if isinstance(output, torch.Tensor):
            elements[0] += output[0].numel()

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            hooks.append(module.register_forward_pre_hook(on_dropout))
        if not any(True for _ in module.children()):
            hooks.append(module.register_forward_hook(on_leaf))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return calls, elements[0]


def memory_budget(setting: Any, device: torch.device) -> float:
    """Bytes the stacked models may take: the configured GB, or for "auto"/0 most of what is free."""
    if setting not in ("auto", 0, 0.0, None):
        return float(setting) * 2**30
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return 0.8 * free
    return 0.5 * available_ram()


def available_ram() -> float:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


class BatchedTrainer:
    """The functional step of one model, vmapped over a group of stacked models."""

    def __init__(self, model: nn.Module, data: ClientData, settings: LocalSettings, seed: int,
                 memory_gb: Any = "auto"):
        self.model, self.data, self.settings, self.seed = model, data, settings, seed
        self.device = data.train_x.device
        keep_freed_memory()
        self.param_names = [name for name, _ in model.named_parameters()]
        self.state_names = list(model.state_dict())
        self.buffer_names = [n for n in self.state_names if n not in set(self.param_names)]
        calls, per_sample = _probe(model, data.train_x[:2])
        self.masks = _DropoutMasks(calls, self.device)
        self.dropouts = list(dict.fromkeys(module for module, _ in calls))
        # batch statistics and dropout masks depend on the batch: such models cannot pad short batches
        self.exact_batches = bool(self.buffer_names) or bool(self.dropouts)
        state = model.state_dict()
        state_bytes = sum(t.numel() * t.element_size() for t in state.values())
        activation_bytes = per_sample * settings.batch_size * data.train_x.element_size() * _ACTIVATION_COPIES
        self.model_bytes = _STATE_COPIES * state_bytes + activation_bytes
        self.budget = memory_budget(memory_gb, self.device)
        self.group_size = max(1, int(self.budget // self.model_bytes))
        self._plain = vmap(grad_and_value(self._loss))
        self._weighted = vmap(grad_and_value(self._weighted_loss))

    # ---- the functional step of one model ------------------------------------------------------
    def _logits(self, params, buffers, x, masks):
        queue = list(masks)
        with _masked_dropout(self.dropouts, queue):
            return functional_call(self.model, {**params, **buffers}, (x,))

    def _loss(self, params, buffers, x, y, masks):
        with autocast(self.settings.precision, self.device):
            return full_precision(F.cross_entropy(self._logits(params, buffers, x, masks), y))

    def _weighted_loss(self, params, buffers, x, y, w, masks):
        with autocast(self.settings.precision, self.device):
            losses = full_precision(F.cross_entropy(self._logits(params, buffers, x, masks), y, reduction="none"))
        return (losses * w).sum() / w.sum()

    # ---- a round ----------------------------------------------------------------------------
    def train(self, tasks: Sequence[TrainTask], round_idx: int) -> list[TrainResult]:
        """Train every task's model; results in task order."""
        # drawn on the host (as train_sgd draws them) and moved to the device once per group, not batch by batch
        schedules = [_client_schedule(self.data.indices[t.client_id].cpu(), self.settings,
                                      torch_generator(self.seed, "client", round_idx, t.client_id)) for t in tasks]
        seeds = [derive_seed(self.seed, "dropout", round_idx, t.client_id) for t in tasks]
        # longest first: the clients still training at step t are always a prefix (of a group too)
        order = sorted(range(len(tasks)), key=lambda i: -len(schedules[i]))
        groups = [order[i : i + self.group_size] for i in range(0, len(order), self.group_size)]
        if len(groups) > 1:
            log.info("vectorized: %d models in %d groups of up to %d (memory budget %.1f GB, about %.0f MB per model)",
                     len(tasks), len(groups), self.group_size, self.budget / 2**30, self.model_bytes / 2**20)
        results: list[TrainResult | None] = [None] * len(tasks)
        streams: dict[int, torch.Tensor] = {}
        self.model.train()
        for group in groups:
            trained, ends = self._train_group([tasks[i] for i in group], [schedules[i] for i in group],
                                              [seeds[i] for i in group])
            for i, result, end in zip(group, trained, ends):
                results[i], streams[i] = result, end
        if tasks:  # torch's default generators as the sequential path leaves them: the last client's stream
            torch.default_generator.manual_seed(seeds[-1])
            self.masks.generator.manual_seed(seeds[-1])
            if self.dropouts:
                self.masks.generator.set_state(streams[len(tasks) - 1])
        return results  # type: ignore[return-value]

    def _train_group(self, tasks: list[TrainTask], schedules: list[list[torch.Tensor]],
                     seeds: list[int]) -> tuple[list[TrainResult], list[torch.Tensor]]:
        device, data = self.device, self.data
        stack = {n: torch.stack([t.state[n].detach().to(device) for t in tasks]).contiguous() for n in self.state_names}
        params = {n: stack[n] for n in self.param_names}
        buffers = {n: stack[n] for n in self.buffer_names}
        momentum = {n: torch.zeros_like(p) for n, p in params.items()}
        losses = torch.zeros(len(tasks), device=device)
        streams = self.masks.start(seeds) if self.dropouts else [torch.empty(0)] * len(tasks)
        steps = [len(s) for s in schedules]
        sizes = [[int(b.numel()) for b in s] for s in schedules]
        index, weight = _padded_schedule(schedules, self.settings.batch_size, device)
        for t in range(max(steps, default=0)):
            active = sum(1 for s in steps if s > t)
            for clients, batch in self._calls_at(sizes, t, active):
                self._step(params, buffers, momentum, losses, index[t], weight[t], streams, clients, batch)
        mean_loss = [total / max(s, 1) for total, s in zip(losses.tolist(), steps)]  # as train_sgd divides
        results = []
        for k, task in enumerate(tasks):
            state = {n: stack[n][k].clone() for n in self.state_names}
            results.append(TrainResult(task.client_id, task.slot, state,
                                       int(data.indices[task.client_id].numel()), mean_loss[k]))
        return results, streams

    def _calls_at(self, sizes: list[list[int]], t: int, active: int) -> list[tuple[list[int], int]]:
        """The step's batched calls: (clients, batch size).  Padded models: one call for the whole
        active prefix; exact-batch models: one call per distinct batch size (usually one)."""
        if not self.exact_batches:
            return [(list(range(active)), self.settings.batch_size)]
        by_size: dict[int, list[int]] = {}
        for k in range(active):
            by_size.setdefault(sizes[k][t], []).append(k)
        return [(clients, size) for size, clients in by_size.items()]

    def _step(self, params, buffers, momentum, losses, index, weight, streams, clients: list[int], batch: int):
        """One SGD step (with momentum, as torch.optim.SGD) of the given clients' models."""
        data, settings, keys = self.data, self.settings, self.param_names
        prefix = clients == list(range(len(clients)))
        # a prefix is a view into the stacks, updated in place; other clients are gathered and written back
        sel: Any = slice(0, len(clients)) if prefix else torch.tensor(clients, device=self.device)
        idx = index[sel, :batch]
        x = data.train_x[idx.reshape(-1)].reshape(*idx.shape, *data.train_x.shape[1:])
        y = data.train_y[idx]
        masks = self.masks.draw(streams, clients, batch) if self.dropouts else ()
        p = {n: params[n][sel] for n in keys}
        b = {n: v[sel] for n, v in buffers.items()}
        if self.exact_batches:
            grads, loss = self._plain(p, b, x, y, masks)
        else:
            grads, loss = self._weighted(p, b, x, y, weight[sel], masks)
        with torch.no_grad():
            buf = [momentum[n][sel] for n in keys]
            torch._foreach_mul_(buf, settings.momentum)
            torch._foreach_add_(buf, [grads[n] for n in keys])
            torch._foreach_add_([p[n] for n in keys], buf, alpha=-settings.lr)
            losses[sel] += loss  # promoted, then rounded to the total's dtype, as train_sgd's total
            if prefix:
                return
            for n, m in zip(keys, buf):
                params[n].index_copy_(0, sel, p[n])
                momentum[n].index_copy_(0, sel, m)
            for n in self.buffer_names:  # BatchNorm updated the gathered copy in place
                buffers[n].index_copy_(0, sel, b[n])


def _padded_schedule(schedules: list[list[torch.Tensor]], batch_size: int, device: torch.device):
    """(steps, K, B) sample indices and 0/1 weights; a client's rows past its last step stay unused."""
    steps = max((len(s) for s in schedules), default=0)
    index = torch.zeros(steps, len(schedules), batch_size, dtype=torch.long)
    weight = torch.zeros(steps, len(schedules), batch_size)
    for k, batches in enumerate(schedules):
        for t, batch in enumerate(batches):
            index[t, k, : batch.numel()] = batch
            weight[t, k, : batch.numel()] = 1.0
    return index.to(device), weight.to(device)


class VectorizedRunner:
    """Trains the round's clients as batched computations and yields them in task order."""

    def __init__(self, algorithm: Algorithm, model: nn.Module, data: ClientData, settings: LocalSettings, seed: int,
                 memory_gb: Any = "auto"):
        reason = unsupported_reason(algorithm, model)
        if reason is not None:
            raise ConfigError(f"vectorize = true is not possible here: {reason} (use vectorize = \"auto\" or false)")
        self.trainer = BatchedTrainer(model, data, settings, seed, memory_gb)

    def run(self, round_idx: int, tasks: Sequence[TrainTask]) -> Iterator[TrainResult]:
        if tasks:
            yield from self.trainer.train(tasks, round_idx)

    def close(self) -> None:
        pass


def batching_problem(model: nn.Module, data: ClientData) -> str | None:
    """Why vmap cannot train this model (it runs one batched step of two copies on two samples), or None.
    A user model may use operations without a batching rule; it is then trained one client at a time.
    The built-in models are batchable by construction (tests/test_vectorized.py) and are not probed."""
    from ..models import FLModel

    if isinstance(model, FLModel):
        return None
    params = {n: torch.stack([p.detach(), p.detach()]) for n, p in model.named_parameters()}
    # stacked copies of the buffers, as the batched step passes them (BatchNorm updates them in place)
    buffers = {n: torch.stack([b.detach().clone(), b.detach().clone()]) for n, b in model.named_buffers()}
    x = data.train_x[:2].unsqueeze(0).expand(2, *data.train_x[:2].shape)
    y = data.train_y[:2].unsqueeze(0).expand(2, -1)

    def loss_one(p, bufs, xb, yb):
        return F.cross_entropy(functional_call(model, {**p, **bufs}, (xb,)), yb)

    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):  # a dropout draw moves no run's stream
            vmap(grad_and_value(loss_one), randomness="different")(params, buffers, x, y)
    except Exception as exc:  # noqa: BLE001 - any failure means: not batchable
        lines = str(exc).strip().splitlines()
        text = lines[0] if lines else ""
        return f"{type(exc).__name__}: {text[:100]}{'...' if len(text) > 100 else ''}"
    finally:
        model.train(was_training)
    return None
