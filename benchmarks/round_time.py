"""One FedMR round (CNN, CIFAR-10-shaped uint8 images, 10 clients x 5 local epochs x batch 50 x 500
samples each): this simulator with its default runner against a reference-style loop as the authors'
code does it, in the same run.

    python benchmarks/round_time.py [--reps 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.workloads import ReferenceFedMR, Round, cifar_dataset, cifar_like, median, simulation, timed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="timed rounds of each, after one warm-up (default 2)")
    args = parser.parse_args(argv)
    work = Round()
    images, labels = cifar_like(work.clients * work.samples)
    reference = ReferenceFedMR("cnn", images, labels, work)
    sim = simulation("cnn", cifar_dataset(images, labels), work)  # the defaults: workers = "auto"
    ref_times, sim_times = [], []
    try:
        for rep in range(args.reps + 1):  # interleaved, so a busy machine slows both alike
            r, s = timed(reference.round), timed(lambda rep=rep: sim.run_round(rep))
            if rep:
                ref_times.append(r)
                sim_times.append(s)
    finally:
        sim.runner.close()
    ref, fast = median(ref_times), median(sim_times)
    print(f"reference-style loop: {ref:.2f} s/round")
    print(f"fedmr simulator ({type(sim.runner).__name__}): {fast:.2f} s/round")
    print(f"ratio: {ref / fast:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
