"""Keep the training step's large buffers in the process instead of returning them to the kernel.

glibc's malloc serves blocks above its mmap threshold with fresh ``mmap`` pages and hands freed
memory at the top of the heap back above its trim threshold.  A training step allocates and frees
the same large activation buffers (ResNet-20 at batch 50: up to ~13 MB each) every step, so each
step faults them in again: 22,700 minor page faults and 45 ms of system time per 255 ms ResNet-20
step on one CPU measured (docs/benchmarks.md).  Raising both thresholds keeps those blocks in the
heap, where the next step reuses them (160 faults, 1 ms).  The memory held is the step's own
working set, which the next step needs again.

``keep_freed_memory`` is called where training starts (``train_sgd``, ``evaluate``, the vectorized
trainer), so it holds in the simulator, in forked workers, in the vectorized path and in a Flower
ClientApp, without environment variables.  It leaves glibc alone where the user tuned it
(``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set, or ``FEDMR_MALLOC=system``), and
does nothing on a C library other than glibc.
"""

from __future__ import annotations

import ctypes
import os
import resource

THRESHOLD = 1_000_000_000  # bytes: above any step's buffer, as measured with the environment variables
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
_state: dict[int, bool] = {}  # pid -> in force; a forked worker inherits the setting and sets it again


def _glibc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc only
    except (OSError, AttributeError):
        return None
    return libc


def user_tuned() -> bool:
    return (os.environ.get("FEDMR_MALLOC") == "system"
            or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")))


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds in this process (once); True when they are in force."""
    pid = os.getpid()
    if pid not in _state:
        libc = None if user_tuned() else _glibc()
        ok = libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD)) \
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, THRESHOLD))
        _state[pid] = ok
    return _state[pid]


def refaulted_fraction(buffers: int = 2, size: int = 40 << 20, bursts: int = 20) -> float:
    """The fraction of a step-like burst's pages that fault again when it is repeated: ``buffers``
    blocks of ``size`` bytes allocated and written together, then all freed, as a training step's
    activations are; the least over up to ``bursts`` repeats, stopping at the first that faults
    nothing again.  ~0 when freed memory is kept; ~1 under glibc's defaults, which map blocks this
    large afresh and unmap them on free.  A reading of what the allocator does in this process, not
    of what was asked of it.

    The first bursts of a process may fault even when freed memory is kept: small allocations made
    between bursts split the freed blocks, so the heap grows until it holds a whole burst's worth of
    unsplit free space.  In a fresh Python process on glibc 2.36 that took 5 bursts (readings 1.0,
    0.5, 1.0, 1.0, 1.0, then 0.0), so 5 were too few (a worker in CI read 0.5); 20 leave room."""
    import torch

    pages = buffers * size / resource.getpagesize()
    least = float("inf")
    for _ in range(bursts):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        # written in the comprehension, so that no loop variable keeps a block alive into the next burst
        # (one that did made each burst allocate beside a live block, and read as refaults: 0.5 or 1.0)
        blocks = [torch.empty(size, dtype=torch.uint8).fill_(1) for _ in range(buffers)]
        del blocks
        least = min(least, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / pages)
        if least < 0.01:
            break
    return least
