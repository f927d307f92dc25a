"""Local SGD and evaluation on in-memory tensors: the hot loop every algorithm's client runs."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import cast
from weakref import WeakKeyDictionary

import torch
import torch.nn.functional as F
from torch import nn

from .allocator import keep_freed_memory

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
Hook = Callable[[nn.Module], None]


@dataclass(frozen=True)
class LocalSettings:
    """The local optimiser of the spec: plain SGD with momentum, fresh per client per round.

    ``precision`` "bf16" runs the forward pass and the loss under bf16 autocast (so backward runs in
    bf16 too); the weights, their gradients, the momentum and BatchNorm's statistics stay fp32.
    ``compile`` runs the full batches' ``model(x)`` (forward and backward) through ``torch.compile``
    (see ``compiled``): the same arithmetic to float tolerance, faster where inductor's kernels win."""

    epochs: int = 5
    batch_size: int = 50
    lr: float = 0.01
    momentum: float = 0.5
    precision: str = "fp32"
    compile: bool = False


PRECISIONS = ("fp32", "bf16")


def autocast(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The context the training forward pass runs in: bf16 autocast for "bf16", nothing for "fp32"."""
    if precision == "fp32":
        return nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def full_precision(loss: torch.Tensor) -> torch.Tensor:
    """A loss computed under autocast, in fp32 (a bf16 loss would round the sum); any other dtype
    (fp32, or the float64 of a reference run) as it is."""
    return loss.float() if loss.dtype in (torch.bfloat16, torch.float16) else loss


def bf16_is_native(device: torch.device) -> bool:
    """Whether this device computes bf16 in hardware (else autocast emulates it, slower than fp32)."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


_COMPILED: WeakKeyDictionary[nn.Module, nn.Module] = WeakKeyDictionary()


def compiled(model: nn.Module) -> nn.Module:
    """``model`` wrapped by ``torch.compile`` (inductor, static shapes), once per model object and
    process: the runners train every client on one reused model object, so a process compiles once
    (tens of seconds on one core; inductor's on-disk cache shortens later processes).  The wrapper
    shares the model's parameters and buffers; attribute calls (``features``, ``head``) stay eager.
    A wrapped model stays alive with its process (the cache holds it)."""
    fast = _COMPILED.get(model)
    if fast is None:
        import torch._inductor.config as inductor

        inductor.compile_threads = 1  # no compile-worker pool: safe in forked workers, and a lane has one core
        fast = _COMPILED[model] = cast(nn.Module, torch.compile(model, dynamic=False))
    return fast


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(x), y)


def batch_slices(n: int, batch_size: int) -> list[slice]:
    """Batches of one shuffled epoch; a trailing batch of one sample is dropped (BatchNorm cannot train on it)."""
    cuts = list(range(0, n, batch_size))
    slices = [slice(s, min(s + batch_size, n)) for s in cuts]
    if len(slices) > 1 and slices[-1].stop - slices[-1].start == 1:
        slices.pop()
    return slices


def train_sgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    settings: LocalSettings,
    generator: torch.Generator,
    loss_fn: LossFn = cross_entropy,
    after_backward: Hook | None = None,
) -> tuple[float, int]:
    """Train ``model`` in place for ``settings.epochs`` shuffled epochs; returns (mean loss, steps)."""
    keep_freed_memory()
    model.train()
    optimiser = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=settings.momentum)
    n = y.shape[0]
    slices = batch_slices(n, settings.batch_size)
    # full batches run compiled, a client's shorter last batch eagerly (one shape: one compilation)
    fast = compiled(model) if settings.compile else model
    total = torch.zeros((), device=y.device)  # summed on the device: no host sync per step
    steps = 0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator, device=generator.device).to(y.device)
        for part in slices:
            # gathered batch by batch: a batch stays in cache for the first convolution (an epoch's
            # gather, 6 MB for 500 CIFAR images, does not)
            idx = order[part]
            net = fast if part.stop - part.start == settings.batch_size else model
            with autocast(settings.precision, y.device):
                loss = full_precision(loss_fn(net, x[idx], y[idx]))
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            if after_backward is not None:
                after_backward(model)
            optimiser.step()
            total += loss.detach()
            steps += 1
    return float(total) / max(steps, 1), steps


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, *,
             hits: torch.Tensor | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of ``model`` in eval mode over the whole set, in the model's own
    precision (the server's measurement of the fp32 weights).  ``hits``: a bool tensor of ``len(y)``
    filled with whether each sample was classified right (the per-client accuracies of a run are
    read from it: one pass over the test set, not one per client)."""
    keep_freed_memory()
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=y.device)
    loss = torch.zeros((), dtype=torch.float64, device=y.device)
    for start in range(0, y.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss += F.cross_entropy(logits, target, reduction="sum").double()
        hit = logits.argmax(1) == target
        correct += hit.sum()
        if hits is not None:
            hits[start : start + batch_size] = hit
    n = max(y.shape[0], 1)
    return float(correct) / n, float(loss) / n


def clone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the model's state in standard (contiguous) layout."""
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}
