"""What a run computed on, in words: the processor (or GPU) and the CPU features that change its speed."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# the flags that decide the speed of the paths fedmr has (fp32 vector width, native bf16, AMX tiles)
SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo_field(name: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def processor() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what the platform says)."""
    return _cpuinfo_field("model name") or platform.processor() or "unknown CPU"


def processor_flags() -> list[str]:
    """Which of ``SPEED_FLAGS`` this CPU has (empty where ``/proc/cpuinfo`` is not readable)."""
    have = set((_cpuinfo_field("flags") or "").split())
    return [f for f in SPEED_FLAGS if f in have]


def cpu_count() -> int:
    """CPUs this process may use (the affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def describe(device: torch.device) -> str:
    """The device a run trains on, in words: a GPU's name, or the CPU's model name and speed flags."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    flags = processor_flags()
    return f"{processor()} ({' '.join(flags)})" if flags else processor()
