"""Every random draw derives from the run's one ``seed`` plus a named stream and counters.

Streams are derived, not consumed in sequence, so the draws of round t for
client c do not depend on how many draws came before them: sequential,
parallel and resumed runs see the same numbers.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def derive_seed(seed: int, stream: str, *counters: int) -> int:
    """A 63-bit seed for ``stream`` (e.g. "select", "client") at the given counters."""
    entropy = [int(seed) & 0xFFFFFFFF, zlib.crc32(stream.encode()), *(int(c) & 0xFFFFFFFF for c in counters)]
    hi, lo = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return (int(hi) << 31) ^ int(lo)


def numpy_rng(seed: int, stream: str, *counters: int) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, stream, *counters))


def torch_generator(seed: int, stream: str, *counters: int, device: str | torch.device = "cpu") -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, stream, *counters))
    return gen
