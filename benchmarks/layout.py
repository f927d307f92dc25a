"""How to spend two cores on study cells: one cell on both cores (worker processes, or threads) against
two cells side by side, one per core, measured as rounds per minute of the whole machine.

    python benchmarks/layout.py [--model resnet20] [--precision bf16] [--compile] [--rounds 3]

Layouts, each in fresh processes, after one untimed warm-up round (compile included):
  * ``one cell, 2 procs x 1 thread``: ``workers = "auto"`` on both cores (the clients of a round
    split between two single-thread worker processes);
  * ``one cell, 1 proc x 2 threads``: ``workers = 1``, torch's two threads;
  * ``two cells, 1 per core``: two processes pinned to one core each (``sched_setaffinity``, as
    ``taskset -c N`` does for the study lanes), each ``workers = 1`` with one thread, timed together.
The round is the paper's client count and batch (10 clients of 500 samples, batch 50) with 1 local
epoch for time; the last line is ``ratio two cells / best one cell: N.NNx`` (machine throughput).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.workloads import Round, cifar_dataset, cifar_like  # noqa: E402

WORK = Round(epochs=1)
LAYOUTS = ("one cell, 2 procs x 1 thread", "one cell, 1 proc x 2 threads", "two cells, 1 per core")


def child(model: str, precision: str, compile: bool, rounds: int, workers: str, core: int | None) -> None:
    """One cell in this process: a warm-up round, then (once the parent says go on stdin, so that
    side-by-side cells overlap) ``rounds`` timed rounds; prints JSON."""
    import torch

    from benchmarks.workloads import simulation

    if core is not None:
        os.sched_setaffinity(0, {core})
        torch.set_num_threads(1)
    images, labels = cifar_like(WORK.clients * WORK.samples)
    sim = simulation(model, cifar_dataset(images, labels), WORK, f"precision=\"{precision}\"",
                     f"compile={str(compile).lower()}", f"workers={workers}")
    try:
        t = time.perf_counter()
        sim.run_round(0)
        warm = time.perf_counter() - t
        print("ready", flush=True)
        sys.stdin.readline()
        t = time.perf_counter()
        for r in range(1, rounds + 1):
            sim.run_round(r)
        seconds = time.perf_counter() - t
    finally:
        sim.runner.close()
    print(json.dumps({"seconds": seconds, "warm": warm}))


def spawn(args: argparse.Namespace, workers: str, core: int | None) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--child", workers, str(-1 if core is None else core),
           "--model", args.model, "--precision", args.precision, "--rounds", str(args.rounds)]
    return subprocess.Popen(cmd + (["--compile"] if args.compile else []), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def started(procs: list[subprocess.Popen[str]]) -> list[subprocess.Popen[str]]:
    """Wait until every cell has warmed up (compile included), then let them all go at once."""
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise SystemExit(f"layout: a cell failed in its warm-up round (exit {proc.wait()})")
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    return procs


def result(proc: subprocess.Popen[str]) -> dict[str, float]:
    out, _ = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"layout: a cell failed (exit {proc.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def measure(args: argparse.Namespace, layout: str) -> tuple[float, float]:
    """(rounds per minute of the machine, warm-up seconds) of one layout."""
    if layout == LAYOUTS[2]:
        cells = [result(p) for p in started([spawn(args, "1", core) for core in (0, 1)])]
        return 60 * 2 * args.rounds / max(c["seconds"] for c in cells), max(c["warm"] for c in cells)
    cell = result(started([spawn(args, "2" if layout == LAYOUTS[0] else "1", None)])[0])
    return 60 * args.rounds / cell["seconds"], cell["warm"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--compile", action="store_true", help="compile = true in every cell")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per cell (default 3)")
    parser.add_argument("--child", nargs=2, metavar=("WORKERS", "CORE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        core = int(args.child[1])
        child(args.model, args.precision, args.compile, args.rounds, args.child[0], None if core < 0 else core)
        return 0
    if len(os.sched_getaffinity(0)) < 2:
        parser.error("needs two cores (its layouts are ways of using two)")
    import torch

    from fedmr.machine import processor, processor_flags

    print(f"device: {processor()}; flags: {' '.join(processor_flags()) or '-'}; torch {torch.__version__}; "
          f"{args.model}, {args.precision}, compile {str(args.compile).lower()}; {WORK.clients} clients x "
          f"{WORK.epochs} epoch x {WORK.samples} samples, batch {WORK.batch}; {args.rounds} timed rounds a cell")
    rates = {}
    for layout in LAYOUTS:
        rate, warm = measure(args, layout)
        rates[layout] = rate
        print(f"  {layout:<30} {rate:6.2f} rounds/min of the machine (warm-up round {warm:.0f} s)", flush=True)
    best_one = max(rates[LAYOUTS[0]], rates[LAYOUTS[1]])
    print(f"ratio two cells / best one cell: {rates[LAYOUTS[2]] / best_one:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
