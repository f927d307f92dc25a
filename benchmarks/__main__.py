"""The speed suite: seconds per FedMR round on every path, side by side in one run.

    python -m benchmarks                      # CNN (the paper's round) and ResNet-20 (a scaled round, see --help)
    python -m benchmarks --quick              # a short smoke run of the same table
    python -m benchmarks --models cnn --reps 3

Paths: the reference-style loop (as the authors' code: per-sample Dataset and
DataLoader, deep-copied state dicts), the simulator's sequential path, its
worker-process path and its vectorized (vmap) path, plus a bare training loop
over the same tensors.  Rounds of all paths are interleaved, repetition by
repetition, so a busy machine slows them alike and the ratios stay meaningful.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fedmr.engine.runner import cpu_count, resolve_workers
from fedmr.engine.vectorized import unsupported_reason
from fedmr.models import build_model

from .workloads import (ReferenceFedMR, Round, bare_round, cifar_dataset, cifar_like, matmul_gflops, median,
                        server_cost, simulation, timed, training_flops_per_sample)

PAPER = Round()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="cnn,resnet20", help="comma-separated: cnn, resnet20 (default: both)")
    parser.add_argument("--reps", type=int, default=2, help="timed rounds per path after one warm-up round (default 2)")
    parser.add_argument("--quick", action="store_true", help="1 timed round, 100 samples x 1 epoch per client")
    parser.add_argument("--resnet-samples", type=int, default=100,
                        help="samples per client for ResNet-20 (default 100; the paper's round, 500 x 5 epochs, takes "
                             "minutes per path on 2 cores: seconds are also given scaled to the paper's round)")
    parser.add_argument("--resnet-epochs", type=int, default=1, help="local epochs for ResNet-20 (default 1)")
    parser.add_argument("--server-models", default="cnn,resnet20,vgg16", help="pools timed for the server's work")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-style loop")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the simulator paths run (cuda: the sequential and vectorized GPU paths)")
    return parser.parse_args(argv)


def workload(model: str, args: argparse.Namespace) -> Round:
    if model == "resnet20":
        return Round(samples=50 if args.quick else args.resnet_samples, epochs=1 if args.quick else args.resnet_epochs)
    if args.quick:
        return Round(samples=100, epochs=1)
    return PAPER


def bench_model(model: str, args: argparse.Namespace) -> dict:
    work = workload(model, args)
    images, labels = cifar_like(work.clients * work.samples)
    data = cifar_dataset(images, labels)
    paths = {}
    if not args.no_reference:
        reference = ReferenceFedMR(model, images, labels, work)
        paths["reference loop"] = reference.round
    on = args.device
    sims = {"sequential": simulation(model, data, work, "workers=1", "vectorize=false", device=on)}
    if on == "cpu":
        sims["parallel"] = simulation(model, data, work, "workers=\"auto\"", "vectorize=false")
    reason = unsupported_reason(sims["sequential"].algorithm, sims["sequential"].model)
    if reason is None:
        sims["vectorized"] = simulation(model, data, work, "workers=1", "vectorize=true", device=on)
    counters = {name: iter(range(10**6)) for name in sims}
    for name, sim in sims.items():
        paths[name] = (lambda s=sim, c=counters[name]: s.run_round(next(c)))
    bare_model = build_model(model, 10, 3, 32).to(memory_format=torch.channels_last)
    start_state = {k: v.clone() for k, v in bare_model.state_dict().items()}
    paths["bare loop"] = lambda: bare_round(bare_model, start_state, data.train_x, data.train_y, work, seed=1)

    times: dict[str, list[float]] = {name: [] for name in paths}
    matmuls: list[float] = []
    reps = 1 if args.quick else max(1, args.reps)
    for rep in range(reps + 1):  # the first round of each path warms caches and forks workers: not timed
        matmuls.append(matmul_gflops())  # the machine's rate now, next to the rounds it is compared with
        for name, fn in paths.items():
            seconds = timed(fn)
            print(f"  {model} {name}: {seconds:.2f} s{'' if rep else ' (warm-up)'}", file=sys.stderr, flush=True)
            if rep > 0:
                times[name].append(seconds)
    for sim in sims.values():
        sim.runner.close()
    flops = training_flops_per_sample(model, work.batch) * work.samples_trained
    return {"model": model, "work": work, "times": {k: median(v) for k, v in times.items()},
            "flops": flops, "matmul": median(matmuls), "vectorize_reason": reason}


def print_model(res: dict) -> None:
    work, times = res["work"], res["times"]
    scale = PAPER.samples_trained / work.samples_trained
    ref = times.get("reference loop")
    print(f"\n## {res['model']}: {work.clients} clients x {work.epochs} epochs x {work.samples} samples, batch {work.batch} "
          f"({work.samples_trained} samples, {res['flops'] / 1e9:.1f} GFLOP of training per round); "
          f"fp32 matmul {res['matmul']:.1f} GFLOP/s (median over the repetitions)")
    scaled_note = f" | s/round scaled to the paper's round (x{scale:g})" if scale != 1 else ""
    print(f"| path | s/round{scaled_note} | speed-up vs reference | samples/s | GFLOP/s | % of matmul |")
    print("|---|---:|" + ("---:|" if scale != 1 else "") + "---:|---:|---:|---:|")
    for name, seconds in times.items():
        gflops = res["flops"] / seconds / 1e9
        speedup = f"{ref / seconds:.2f}x" if ref else "-"
        scaled = f" {seconds * scale:.2f} |" if scale != 1 else ""
        print(f"| {name} | {seconds:.3f} |{scaled} {speedup} | {work.samples_trained / seconds:,.0f} | {gflops:.1f} | "
              f"{100 * gflops / res['matmul']:.1f}% |")
    if res["vectorize_reason"]:
        print(f"| vectorized | n/a: {res['vectorize_reason']} | | | | |")
    best = min((n for n in times if n not in ("reference loop", "bare loop")), key=times.get)
    print(f"fastest simulator path: {best}")
    print(f"sequential / bare loop: {times['sequential'] / times['bare loop']:.3f} (target <= 1.15)")
    if ref:
        print(f"ratio: {ref / times[best]:.1f}x  (reference loop / {best})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = cpu_count()
    torch.set_num_threads(cores)
    workers, threads = resolve_workers("auto", torch.device("cpu"), PAPER.clients)
    matmul = matmul_gflops()
    print(f"# fedmr speed suite: torch {torch.__version__}, {cores} CPUs, torch threads {torch.get_num_threads()}")
    print(f"fp32 matmul (2048x2048, {torch.get_num_threads()} threads) at start: {matmul:.1f} GFLOP/s")
    print(f"workers = \"auto\" here: {workers} processes x {threads} threads; vectorize = \"auto\" on a CPU: off")
    cnn_round = None
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        res = bench_model(model, args)
        print_model(res)
        if model == "cnn":
            cnn_round = min(v for k, v in res["times"].items() if k not in ("reference loop", "bare loop"))
        sys.stdout.flush()
    print("\n## server: recombination + pool mean, K = 10 (FedMR's per-round server work, 1 thread)")
    print("| pool | model MiB | ms | % of the CNN round | peak memory (model sizes, K + extra) |")
    print("|---|---:|---:|---:|---:|")
    for model in [m.strip() for m in args.server_models.split(",") if m.strip()]:
        cost = server_cost(model)
        share = f"{100 * cost['seconds'] / cnn_round:.2f}%" if cnn_round else "-"
        print(f"| {model} | {cost['model_mib']:.1f} | {1000 * cost['seconds']:.1f} | {share} | {cost['peak_models']:.1f} |")
    print("GPU figures: still to be measured (no GPU here)" if not torch.cuda.is_available() else "")
    return 0


if __name__ == "__main__":
    sys.exit(main())
