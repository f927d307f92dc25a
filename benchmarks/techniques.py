"""How to train K models at once: the candidate techniques timed side by side, one SGD step each.

    python -m benchmarks.techniques [--device cuda] [--k 10] [--batch 50] [--reps 20]

For the paper's CNN (and ResNet-20 / VGG-16 where a technique applies), one forward + backward +
momentum-SGD step of K models, each on its own batch:
  * loop       - the K models one after another (what the sequential path does);
  * vmap       - torch.func: vmap(grad(functional_call)) over stacked parameters and buffers
                 (what engine/vectorized.py does; functorch lowers a vmapped convolution to one
                 convolution with groups = K);
  * grouped    - the K CNNs written out by hand as one wide model: convolutions with groups = K
                 over the K batches laid side by side in the channels, batched matmuls for the
                 fully connected layers (CNN only: every architecture would need its own rewrite),
                 in channels_last and in NCHW.
Steps of all techniques alternate in one run, so a busy machine slows them alike; medians.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value, vmap

from fedmr.models import build_model


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def loop_step(models, optimisers, xs, ys):
    for model, opt, x, y in zip(models, optimisers, xs, ys):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def make_vmap_step(model, k, device, lr=0.01, momentum=0.5):
    names = [n for n, _ in model.named_parameters()]
    state = model.state_dict()
    params = {n: torch.stack([state[n]] * k).contiguous() for n in names}
    buffers = {n: torch.stack([v] * k).contiguous() for n, v in state.items() if n not in params}
    moms = {n: torch.zeros_like(p) for n, p in params.items()}

    def loss_fn(p, b, x, y):
        return F.cross_entropy(functional_call(model, {**p, **b}, (x,)), y)

    step = vmap(grad_and_value(loss_fn))

    def run(xs, ys):
        grads, _ = step(params, buffers, xs, ys)
        with torch.no_grad():
            buf = [moms[n] for n in names]
            torch._foreach_mul_(buf, momentum)
            torch._foreach_add_(buf, [grads[n] for n in names])
            torch._foreach_add_([params[n] for n in names], buf, alpha=-lr)

    return run


class GroupedCNN(torch.nn.Module):
    """K copies of the paper's CNN as one model: grouped convolutions, batched matmuls."""

    def __init__(self, k: int, num_classes: int = 10):
        super().__init__()
        self.k = k
        P = torch.nn.Parameter
        self.c1w, self.c1b = P(torch.randn(k * 6, 3, 5, 5) * 0.1), P(torch.zeros(k * 6))
        self.c2w, self.c2b = P(torch.randn(k * 16, 6, 5, 5) * 0.1), P(torch.zeros(k * 16))
        self.f1w, self.f1b = P(torch.randn(k, 400, 120) * 0.05), P(torch.zeros(k, 1, 120))
        self.f2w, self.f2b = P(torch.randn(k, 120, 84) * 0.05), P(torch.zeros(k, 1, 84))
        self.f3w, self.f3b = P(torch.randn(k, 84, num_classes) * 0.05), P(torch.zeros(k, 1, num_classes))

    def forward(self, x):  # x: (B, K*3, 32, 32), model k's batch in channels 3k..3k+2
        k = self.k
        x = F.relu(F.max_pool2d(F.conv2d(x, self.c1w, self.c1b, groups=k), 2))
        x = F.relu(F.max_pool2d(F.conv2d(x, self.c2w, self.c2b, groups=k), 2))
        b = x.shape[0]
        x = x.reshape(b, k, 400).transpose(0, 1)  # (K, B, 400): each model's flattened features
        x = F.relu(torch.baddbmm(self.f1b, x, self.f1w))
        x = F.relu(torch.baddbmm(self.f2b, x, self.f2w))
        return torch.baddbmm(self.f3b, x, self.f3w)  # (K, B, classes)


def grouped_step(model, opt, x, ys):
    logits = model(x)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ys.reshape(-1), reduction="sum") / ys.shape[1]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def techniques(name: str, k: int, batch: int, device: str) -> dict:
    torch.manual_seed(0)
    xs = torch.randn(k, batch, 3, 32, 32, device=device)
    ys = torch.randint(0, 10, (k, batch), device=device)
    cl = torch.channels_last
    models = [build_model(name, 10, 3, 32).to(device, memory_format=cl) for _ in range(k)]
    optimisers = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.5) for m in models]
    xs_cl = [x.contiguous(memory_format=cl) for x in xs]
    vmap_run = make_vmap_step(build_model(name, 10, 3, 32).to(device), k, device)
    # the K batches laid out as (B, H, W, K, C): vmap's grouped convolution then sees a channels_last input
    xs_wide = xs.permute(1, 3, 4, 0, 2).contiguous().permute(3, 0, 4, 1, 2)
    out = {"loop": lambda: loop_step(models, optimisers, xs_cl, ys), "vmap": lambda: vmap_run(xs, ys),
           "vmap (input as B,H,W,K,C)": lambda: vmap_run(xs_wide, ys)}
    if name == "cnn":
        wide = xs.permute(1, 0, 2, 3, 4).reshape(batch, k * 3, 32, 32)
        for label, fmt in (("grouped (channels_last)", cl), ("grouped (NCHW)", torch.contiguous_format)):
            g = GroupedCNN(k).to(device, memory_format=fmt)
            opt = torch.optim.SGD(g.parameters(), lr=0.01, momentum=0.5)
            xg = wide.contiguous(memory_format=fmt)
            out[label] = (lambda g=g, opt=opt, xg=xg: grouped_step(g, opt, xg, ys))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.techniques", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--models", default="cnn,resnet20")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.exit(2, "python -m benchmarks.techniques: error: --device cuda, but torch sees no CUDA GPU\n")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# one SGD step of K = {args.k} models, batch {args.batch} each; device {args.device}, "
          f"torch {torch.__version__}, threads {torch.get_num_threads()}; median of {args.reps} alternated steps")
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        steps = techniques(name, args.k, args.batch, args.device)
        times: dict[str, list[float]] = {label: [] for label in steps}
        for rep in range(args.reps + 2):  # two warm-up steps each
            for label, fn in steps.items():
                _sync(args.device)
                start = time.perf_counter()
                fn()
                _sync(args.device)
                if rep >= 2:
                    times[label].append(time.perf_counter() - start)
        loop = statistics.median(times["loop"])
        print(f"\n## {name}\n| technique | ms per step of K models | vs loop |\n|---|---:|---:|")
        for label, values in times.items():
            ms = statistics.median(values)
            print(f"| {label} | {1000 * ms:.1f} | {loop / ms:.2f}x |")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
