"""The speed suite: seconds per FedMR round on every path, side by side in one run.

    python -m benchmarks                      # CNN (the paper's round) and ResNet-20 (a scaled round, see --help)
    python -m benchmarks --quick              # a short smoke run of the same table
    python -m benchmarks --models cnn --reps 3
    python -m benchmarks --device cuda        # on a GPU: CNN, ResNet-20 and VGG-16, the paper's round each,
                                              # "ratio: N.Nx" = sequential / vectorized per model

Paths: the reference-style loop (as the authors' code: per-sample Dataset and
DataLoader, deep-copied state dicts, each batch moved to the device), the
simulator's sequential path, its worker-process path (CPU only) and its
vectorized (vmap) path, plus a bare training loop over the same tensors.  Rounds of all paths are interleaved, repetition by
repetition, so a busy machine slows them alike and the ratios stay meaningful.
"""

from __future__ import annotations

import argparse
import sys

import torch

from fedmr.engine.runner import cpu_count, resolve_workers
from fedmr.engine.vectorized import unsupported_reason
from fedmr.models import build_model

from .workloads import (
    ReferenceFedMR,
    Round,
    bare_round,
    cifar_dataset,
    cifar_like,
    matmul_gflops,
    median,
    server_cost,
    simulation,
    timed,
    training_flops_per_sample,
)

PAPER = Round()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated: cnn, resnet20, vgg16 (default: cnn,resnet20 on a CPU, all three on cuda)")
    parser.add_argument("--reps", type=int, default=2, help="timed rounds per path after one warm-up round (default 2)")
    parser.add_argument("--quick", action="store_true", help="1 timed round, 100 samples x 1 epoch per client")
    parser.add_argument("--resnet-samples", type=int, default=None,
                        help="samples per client for ResNet-20 and VGG-16 (default on a CPU 100, the paper's round, "
                             "500 x 5 epochs, takes minutes per path on 2 cores: seconds are also given scaled to the "
                             "paper's round; on cuda the paper's 500)")
    parser.add_argument("--resnet-epochs", type=int, default=None,
                        help="local epochs for ResNet-20 and VGG-16 (default 1 on a CPU, 5 on cuda)")
    parser.add_argument("--clients", type=int, default=None, help="clients per round for every model (default 10)")
    parser.add_argument("--samples", type=int, default=None, help="samples per client for every model (a dry run)")
    parser.add_argument("--epochs", type=int, default=None, help="local epochs for every model (a dry run)")
    parser.add_argument("--server-models", default="cnn,resnet20,vgg16", help="pools timed for the server's work")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference-style loop")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads of the one-process paths (default: one per core; 1 for a dry run on a busy machine)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the paths run (cuda: the reference, sequential, vectorized and bare loops on the GPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "python -m benchmarks: error: --device cuda, but torch sees no CUDA GPU "
                       f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})\n")
    if args.models is None:
        args.models = "cnn,resnet20,vgg16" if args.device == "cuda" else "cnn,resnet20"
    return args


def workload(model: str, args: argparse.Namespace) -> Round:
    """The paper's round, scaled down for the large models on a CPU (and by --quick or the dry-run flags)."""
    work = PAPER
    if args.quick:
        work = Round(samples=50 if model != "cnn" else 100, epochs=1)
    elif model != "cnn":
        on_gpu = args.device == "cuda"
        work = Round(samples=args.resnet_samples or (PAPER.samples if on_gpu else 100),
                     epochs=args.resnet_epochs or (PAPER.epochs if on_gpu else 1))
    return Round(clients=args.clients or work.clients, epochs=args.epochs or work.epochs, batch=work.batch,
                 samples=args.samples or work.samples)


def bench_model(model: str, args: argparse.Namespace) -> dict:
    work = workload(model, args)
    images, labels = cifar_like(work.clients * work.samples)
    data = cifar_dataset(images, labels)
    paths = {}
    if not args.no_reference:
        reference = ReferenceFedMR(model, images, labels, work, device=args.device)
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
    bare_model = build_model(model, 10, 3, 32).to(on, memory_format=torch.channels_last)
    start_state = {k: v.clone() for k, v in bare_model.state_dict().items()}
    bare_x, bare_y = data.train_x.to(on), data.train_y.to(on)
    paths["bare loop"] = lambda: bare_round(bare_model, start_state, bare_x, bare_y, work, seed=1)

    times: dict[str, list[float]] = {name: [] for name in paths}
    matmuls: list[float] = []
    reps = 1 if args.quick else max(1, args.reps)
    for rep in range(reps + 1):  # the first round of each path warms caches and forks workers: not timed
        matmuls.append(matmul_gflops(device=on))  # the machine's rate now, next to the rounds it is compared with
        for name, fn in paths.items():
            seconds = timed(fn)
            print(f"  {model} {name}: {seconds:.2f} s{'' if rep else ' (warm-up)'}", file=sys.stderr, flush=True)
            if rep > 0:
                times[name].append(seconds)
    for sim in sims.values():
        sim.runner.close()
    # counted on a batch of 10 at most: the count is linear in the batch (VGG-16's batch of 50 costs seconds on a CPU)
    flops = training_flops_per_sample(model, min(work.batch, 10)) * work.samples_trained
    return {"model": model, "work": work, "times": {k: median(v) for k, v in times.items()},
            "flops": flops, "matmul": median(matmuls), "vectorize_reason": reason, "device": on}


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
    if "vectorized" in times:
        speedup = times["sequential"] / times["vectorized"]
        if res["device"] == "cuda":
            print(f"ratio: {speedup:.1f}x  (sequential / vectorized on the GPU; target >= 5x for the CNN, >= 3x for ResNet-20)")
        else:
            print(f"vectorized speed-up over sequential: {speedup:.2f}x")
    if ref:
        label = "ratio: " if res["device"] != "cuda" else "reference loop / fastest: "
        print(f"{label}{ref / times[best]:.1f}x  (reference loop / {best})")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cores = cpu_count()
    torch.set_num_threads(args.threads or cores)
    workers, threads = resolve_workers("auto", torch.device("cpu"), PAPER.clients)
    matmul = matmul_gflops(device=args.device)
    print(f"# fedmr speed suite: torch {torch.__version__}, {cores} CPUs, torch threads {torch.get_num_threads()}")
    if args.device == "cuda":
        print(f"GPU: {torch.cuda.get_device_name()}; fp32 matmul at start: {matmul:.1f} GFLOP/s; "
              f"vectorize = \"auto\" on cuda: on (every built-in model with FedAvg/FedIndep/FedMR/Clustered)")
    else:
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
    if args.device != "cuda":
        print("GPU figures: run `python -m benchmarks --device cuda` (or benchmarks/gpu_check.sh) on a GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
