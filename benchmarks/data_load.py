"""The image-folder loader's speed on the shared CIFAR-10 copy: the first load (decode every JPEG and
write the cache) against a cached load, and a Dirichlet(0.1) partition of 100 clients.

    python benchmarks/data_load.py [--data ../shared/data/cifar10-jpg.tar.gz]

These were limits in a unit test (first load < 30 s, cached < 3 s, partition < 10 s of CPU) until a
shared machine tripped them; the test now checks what the cache must do, and the figures are here.
Prints CPU and wall seconds for each step, and ``ratio first/cached: N.Nx`` last.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fedmr.config import load_config
from fedmr.data import load_dataset
from fedmr.partition import make_partition

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10-jpg.tar.gz"


def timed(step):
    cpu, wall = time.process_time(), time.perf_counter()
    result = step()
    return result, time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=SHARED, help="a CIFAR-10 image archive or folder")
    args = parser.parse_args()
    if not args.data.exists():
        raise SystemExit(f"no data at {args.data} (see ../shared/data/README.md)")
    with tempfile.TemporaryDirectory() as cache_dir:
        cfg = load_config(None, ['dataset="imagefolder"', f'data_dir="{args.data}"', 'normalization="cifar10"',
                                 f'cache_dir="{cache_dir}"'])
        data, first_cpu, first_wall = timed(lambda: load_dataset(cfg))
        _, cached_cpu, cached_wall = timed(lambda: load_dataset(cfg))
        _, part_cpu, part_wall = timed(lambda: make_partition(cfg, data.train_y.numpy()))
    print(f"first load (decode + write cache): {first_cpu:6.2f} s CPU {first_wall:6.2f} s wall")
    print(f"cached load:                       {cached_cpu:6.2f} s CPU {cached_wall:6.2f} s wall")
    print(f"partition (100 clients, alpha 0.1): {part_cpu:5.2f} s CPU {part_wall:6.2f} s wall")
    print(f"ratio first/cached: {first_wall / cached_wall:.1f}x")


if __name__ == "__main__":
    main()
