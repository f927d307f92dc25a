"""What ``fedmr landscape``'s defaults cost on the paper's CNN and ResNet-20 (CIFAR-10-shaped inputs): one
forward pass and one Hessian-vector product over ``--samples`` images, timed, and the top eigenvalue run
in full (power iteration, the default iterations) on that subset; then the defaults extrapolated
linearly in the number of samples (every computation is a sum over the subset's batches).

    python benchmarks/landscape_cost.py [--model cnn|resnet20] [--samples N] [--threads N]

The models hold the initial weights (their cost does not depend on the values); the images are random.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from fedmr.landscape.hessian import top_eigenvalue  # noqa: E402
from fedmr.landscape.objective import Objective  # noqa: E402
from fedmr.landscape.settings import DEFAULTS  # noqa: E402
from fedmr.models import build_model  # noqa: E402

TEST_SAMPLES = 10_000  # CIFAR-10's test set


def timed(work, reps: int = 2) -> float:
    work()  # warm-up: torch.func traces the first product
    start = time.perf_counter()
    for _ in range(reps):
        work()
    return (time.perf_counter() - start) / reps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="cnn", choices=["cnn", "resnet20"])
    parser.add_argument("--samples", type=int, default=200, help="images timed (default 200)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, 10, input_shape=(3, 32, 32)).to(memory_format=torch.channels_last)
    x = torch.randn(args.samples, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (args.samples,))
    objective = Objective(model, x, y, DEFAULTS["batch_size"])
    v = tuple(torch.randn_like(p) for p in objective.params)
    forward = timed(objective.evaluate)
    hvp = timed(lambda: objective.hvp(v))
    start = time.perf_counter()
    eig = top_eigenvalue(objective.hvp, objective.params, torch.Generator().manual_seed(1), DEFAULTS["power_iters"],
                         DEFAULTS["tolerance"])
    eigen_s = time.perf_counter() - start
    scale = DEFAULTS["samples"] / args.samples
    n = DEFAULTS["samples"]
    parts = {
        "train (1 forward pass)": forward * scale,
        f"test ({TEST_SAMPLES} images)": forward * TEST_SAMPLES / args.samples,
        f"eigen (at most {DEFAULTS['power_iters']} products; twice that when shifted)": hvp * scale * DEFAULTS["power_iters"],
        f"trace ({DEFAULTS['trace_vectors']} products)": hvp * scale * DEFAULTS["trace_vectors"],
        f"1d ({DEFAULTS['directions']} x {DEFAULTS['points']} forward passes)":
            forward * scale * DEFAULTS["directions"] * DEFAULTS["points"],
        f"2d ({DEFAULTS['grid']} x {DEFAULTS['grid']} forward passes)": forward * scale * DEFAULTS["grid"] ** 2,
    }
    params = sum(p.numel() for p in objective.params)
    print(f"{args.model}: {params} parameters, {args.samples} CIFAR-shaped images, {args.threads} thread(s)")
    print(f"measured: forward pass {forward:.3f} s, Hessian-vector product {hvp:.3f} s "
          f"({hvp / forward:.1f}x a forward pass)")
    print(f"measured: top eigenvalue in full, {eig.iterations} products"
          f"{'' if eig.converged else ' (not converged)'}: {eigen_s:.1f} s")
    print(f"extrapolated to the defaults (--samples {n}):")
    for name, seconds in parts.items():
        print(f"  {name}: {seconds:.0f} s")
    print(f"  all of the defaults: {sum(parts.values()) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
