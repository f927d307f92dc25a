"""Today's fp32 path against the fastest faithful configuration, for ResNet-20 and the paper's CNN, in
one run: a FedMR round through the simulator (workers = "auto"), on synthetic CIFAR-10-shaped data.

    python benchmarks/precision.py [--reps 2] [--device cpu|cuda]

Configurations, each in a fresh process (the allocator setting is per process and cannot be undone),
alternated rep by rep so that a drifting machine slows them alike:
  * ``fp32 today``: fp32 with glibc's malloc defaults (``FEDMR_MALLOC=system``), the path before issue 29;
  * ``fp32 kept``: fp32 with freed memory kept (``fedmr.allocator``, the default now);
  * ``bf16 kept``: ``precision = "bf16"`` as well (where the CPU has native bf16; emulated bf16 is
    slower than fp32, so it is not a candidate there);
  * ``fp32 compiled`` and ``bf16 compiled``: ``compile = true`` as well (full batches through
    ``torch.compile``; each worker process compiles once, in the untimed warm-up round, whose wall
    time is printed as the compile cost).
The fastest of all but the first is the "fastest faithful" one; the last lines are
``ratio resnet20: N.Nx`` and ``ratio cnn: N.Nx`` (today's s/round over that one's).

``--models vgg16`` adds VGG-16 scaled to 2 clients x 1 epoch x 100 samples (its page faults).
ResNet-20 is scaled to 1 local epoch (10 clients x 1 epoch x 500 samples, batch 50: 100 steps, a
fifth of the paper's round) for time; the printed paper-round estimate scales s/round by the samples trained.  The CNN runs the
paper's round (10 clients x 5 epochs x 500 samples).  Each row also gives the minor page faults and
the system CPU time per round of the whole process tree, and the share of the CPU's measured
matmul rate (at the configuration's precision) that the round's training FLOPs reach; then one
client's training step in the configuration's process (one thread, batch 50, through ``train_sgd``):
its minor page faults and system CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import torch  # noqa: E402

from benchmarks.workloads import Round, cifar_dataset, cifar_like, median, timed, training_flops_per_sample  # noqa: E402

WORK = {"resnet20": Round(epochs=1), "cnn": Round(), "vgg16": Round(clients=2, epochs=1, samples=100)}
PAPER = Round()  # 10 clients x 5 epochs x 500 samples: the paper-round estimates scale s/round by its samples
CONFIGS = {"fp32 today": ("fp32", "system", False), "fp32 kept": ("fp32", "kept", False),
           "bf16 kept": ("bf16", "kept", False), "fp32 compiled": ("fp32", "kept", True),
           "bf16 compiled": ("bf16", "kept", True)}


def matmul_rate(dtype: torch.dtype, device: str, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of an n x n matmul at ``dtype`` with this process's threads: the practical peak."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    return 2 * n**3 / min(timed(lambda: a @ b) for _ in range(repeats)) / 1e9


def step_counts(model: str, precision: str, steps: int = 20) -> tuple[float, float]:
    """(minor page faults, system CPU ms) per training step of one client in this process, one thread,
    batch 50, after 3 warm-up steps: the issue's probe, through ``train_sgd``."""
    from fedmr.models import build_model
    from fedmr.seeding import torch_generator
    from fedmr.training import LocalSettings, train_sgd

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    net = build_model(model, 10, 3, 32).to(memory_format=torch.channels_last)
    x = torch.randn(50 * steps, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (50 * steps,))
    train_sgd(net, x[:150], y[:150], LocalSettings(epochs=1, precision=precision), torch_generator(0, "warm"))
    before = resource.getrusage(resource.RUSAGE_SELF)
    train_sgd(net, x, y, LocalSettings(epochs=1, precision=precision), torch_generator(0, "probe"))
    after = resource.getrusage(resource.RUSAGE_SELF)
    torch.set_num_threads(threads)
    return (after.ru_minflt - before.ru_minflt) / steps, 1000 * (after.ru_stime - before.ru_stime) / steps


def child(model: str, precision: str, compile: bool, reps: int, device: str) -> None:
    """One configuration in this process: a warm-up round, then ``reps`` timed rounds, then the
    per-step counts (eager: the page faults do not depend on compiling); prints JSON."""
    from benchmarks.workloads import simulation

    work = WORK[model]
    images, labels = cifar_like(work.clients * work.samples)
    sim = simulation(model, cifar_dataset(images, labels), work, f"precision=\"{precision}\"",
                     f"compile={str(compile).lower()}", device=device)
    try:
        # forks the workers, warms the allocator and the kernels, compiles where asked
        warm = timed(lambda: sim.run_round(0))
        times = [timed(lambda r=r: sim.run_round(r)) for r in range(1, reps + 1)]
    finally:
        sim.runner.close()
    steps = 5 if model == "vgg16" else 20
    faults, system_ms = step_counts(model, precision, steps) if device == "cpu" else (float("nan"), float("nan"))
    print(json.dumps({"times": times, "faults": faults, "system_ms": system_ms, "warm": warm}))


def run_child(model: str, config: str, reps: int, device: str) -> dict:
    precision, allocator, compile = CONFIGS[config]
    env = dict(os.environ)
    env.pop("FEDMR_MALLOC", None)
    if allocator == "system":
        env["FEDMR_MALLOC"] = "system"
    out = subprocess.run([sys.executable, __file__, "--child", model, precision, str(compile), "--reps", str(reps),
                          "--device", device],
                         capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=2, help="alternations of the configurations (default 2)")
    parser.add_argument("--rounds", type=int, default=2, help="timed rounds per configuration and rep (default 2)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="resnet20,cnn")
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help=f"configurations to time, comma-separated (default all: {', '.join(CONFIGS)})")
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "PRECISION", "COMPILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], args.child[2] == "True", args.rounds, args.device)
        return 0
    from fedmr.machine import processor, processor_flags
    from fedmr.training import bf16_is_native

    native = bf16_is_native(torch.device(args.device))

    device_name = torch.cuda.get_device_name() if args.device == "cuda" else processor()
    print(f"device: {device_name}; flags: {' '.join(processor_flags()) or '-'}; torch {torch.__version__}; "
          f"cores: {len(os.sched_getaffinity(0))}")
    print(f"bf16: {'native' if native else 'emulated (no bf16 units): measuring the fp32 improvements alone'}")
    asked = [c.strip() for c in args.configs.split(",")]
    unknown = [c for c in asked if c not in CONFIGS]
    if unknown or "fp32 today" not in asked:
        parser.error(f"--configs: {', '.join(unknown) or 'fp32 today is the baseline and must be among them'}; "
                     f"choose among {', '.join(CONFIGS)}")
    configs = [c for c in asked if native or CONFIGS[c][0] == "fp32"]
    rate = {"fp32": matmul_rate(torch.float32, args.device)}
    if native:
        rate["bf16"] = matmul_rate(torch.bfloat16, args.device)
    print("matmul: " + ", ".join(f"{p} {r:.0f} GFLOP/s" for p, r in rate.items()))
    ratios = {}
    for model in args.models.split(","):
        work = WORK[model]
        flops = training_flops_per_sample(model, work.batch) * work.samples_trained
        print(f"\n{model}: {work.clients} clients x {work.epochs} epoch{'s' if work.epochs > 1 else ''} x "
              f"{work.samples} samples, batch {work.batch} ({flops / 1e12:.2f} TFLOP of training a round)")
        seen: dict[str, list[dict]] = {c: [] for c in configs}
        for _ in range(args.reps):
            for config in configs:
                seen[config].append(run_child(model, config, args.rounds, args.device))
        per_round = {c: median([t for r in seen[c] for t in r["times"]]) for c in configs}
        for config in configs:
            s = per_round[config]
            scale = PAPER.samples_trained / work.samples_trained
            paper = f" (paper round about {s * scale:.0f} s)" if scale != 1 else ""
            faults = median([r["faults"] for r in seen[config]])
            system = median([r["system_ms"] for r in seen[config]])
            share = flops / s / 1e9 / rate[CONFIGS[config][0]]
            warm = median([r["warm"] for r in seen[config]])
            print(f"  {config:<13} {s:7.2f} s/round{paper}, {share:.0%} of {CONFIGS[config][0]} matmul; "
                  f"one client's step: {faults:7,.0f} minor faults, {system:4.0f} ms system CPU; "
                  f"first round {warm:.0f} s")
        best = min((c for c in configs if c != "fp32 today"), key=per_round.__getitem__)
        ratios[model] = per_round["fp32 today"] / per_round[best]
        print(f"  fastest faithful: {best}")
    print()
    for model, ratio in ratios.items():
        print(f"ratio {model}: {ratio:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
