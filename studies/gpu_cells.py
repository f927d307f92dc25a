"""Advance the ResNet-20 study cells on a lent GPU for a few minutes, and bring them back to the CPU lanes.

A lent GPU (docs/study.md, "A GPU for the long cells") gets one prepared command of at most 10 minutes
and gives back at most 8 files of 16 MiB; it sees the working tree, not ../shared/data.  So:

    python studies/gpu_cells.py prepare
        here: .gpu-carry/ (git-ignored) gets the CIFAR-10 copy and the tomli_w wheel the GPU image lacks
    python3 studies/gpu_cells.py run --minutes 8 --out "$OUT"
        on the GPU machine, from the repository root, with carry [".gpu-carry"]: every ResNet-20 cell
        that fits the file limit resumes from its parked/ checkpoint (device cuda, the vectorized path),
        all at once on the one GPU; after --minutes each gets SIGTERM, finishes its round, checkpoints and
        parks; each cell's folder (parked/, metrics.csv, train_loss.csv, config and partition) comes
        back as OUT/<cell>.tar.gz, with OUT/gpu_cells.json saying which rounds ran where and how fast
    python studies/gpu_cells.py harvest FILES_AT
        here, with the CPU lanes of those cells stopped: each cell that came back ahead of its local
        state gets the GPU's folder (parked/ and its rows; local checkpoints/ removed, so the next
        `fedmr study run` resumes from the GPU's checkpoint), and a line in its GPU_ROUNDS.md
    python studies/gpu_cells.py run --device cpu --seconds 60 --out /tmp/gpu-dry \\
            --cells resnet20-alpha0.1-seed1-precision-bf16-fedavg
        the CPU dry run: the same steps on a CPU (a few minutes: the round under way when the time is up
        is finished first), then `harvest --dry-run /tmp/gpu-dry` says what it would change

A GPU and a CPU give the same science, not the same bits: the cell's GPU_ROUNDS.md says which rounds
ran on which device.  SCAFFOLD's ResNet-20 checkpoint holds every client's control variate (about 110
MB), over the file limit: it stays on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDY = "studies/cifar10-cnn.toml"
SECTION = "resnet20"
CARRY = ROOT / ".gpu-carry"
LIMIT = 16 * 2**20  # bytes a returned file may have
SKIP = ("scaffold",)  # checkpoints over the limit (every client's control variate)
KEEP = ("config.toml", "partition.json", "partition_summary.json", "metrics.csv", "train_loss.csv",
        "client_accuracy.csv", "GPU_ROUNDS.md", "summary.json", "final-model.safetensors", "accuracy.png", "loss.png")


def _env() -> dict[str, str]:
    paths = [str(ROOT / "src"), *map(str, sorted(CARRY.glob("tomli_w-*.whl")))]  # a pure-Python wheel imports as a zip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    env.setdefault("FEDMR_CACHE", str(CARRY / "cache"))
    return env


def _cells(names: list[str]) -> list[tuple[str, Path, int]]:
    """(name, folder, rounds parked) of the chosen cells: by default every cell of the ResNet-20 section."""
    sys.path.insert(0, str(ROOT / "src"))
    os.chdir(ROOT)
    from fedmr.study.index import resolve
    from fedmr.study.spec import load_study

    study = load_study(STUDY)
    chosen = []
    for status in resolve(study):
        in_section = any(m.section == SECTION for m in status.cell.memberships)
        if (status.cell.name in names) if names else (in_section and not any(s in status.cell.name for s in SKIP)):
            if not status.finished:
                chosen.append((status.cell.name, status.folder, _parked_round(status.folder)))
    return chosen


def _parked_round(folder: Path) -> int:
    manifests = sorted((folder / "parked").glob("round-*.json"))
    return int(manifests[-1].stem.split("-")[1]) if manifests else 0


def _device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def cmd_prepare(args: argparse.Namespace) -> int:
    CARRY.mkdir(exist_ok=True)
    data = Path(args.data)
    shutil.copy2(data, CARRY / data.name)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:", "-d", str(CARRY),
                    "tomli-w>=1.0"], check=True, stdout=subprocess.DEVNULL)
    size = sum(p.stat().st_size for p in CARRY.rglob("*") if p.is_file() and "cache" not in p.parts)
    print(f"{CARRY}: {', '.join(sorted(p.name for p in CARRY.iterdir()))} ({size / 2**20:.1f} MiB); "
          f"run with carry [\".gpu-carry\"]")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cells = _cells(args.cells)
    if not cells:
        print("gpu_cells: no unfinished cell chosen", file=sys.stderr)
        return 2
    data = args.data or str(next(iter(sorted(CARRY.glob("cifar10-jpg.tar.gz"))), "../shared/data/cifar10-jpg.tar.gz"))
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    settings = [f"device=\"{args.device}\"", f"data_dir=\"{data}\"", "workers=1"]
    if args.device == "cuda":
        settings.append("vectorize=true")
    started = time.time()
    procs = {}
    for name, _folder, _ in cells:
        cmd = [sys.executable, "-m", "fedmr.cli", "study", "run", STUDY, "--only", f"name={name}", "--quiet",
               *[a for s in settings for a in ("--set", s)]]
        log = (out / f"{name}.log").open("w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT), log)
    print(f"gpu_cells: {len(procs)} cells on {args.device} for {seconds:.0f} s: {', '.join(procs)}", flush=True)
    deadline = started + seconds
    while time.time() < deadline and any(p.poll() is None for p, _ in procs.values()):
        time.sleep(1)
    for proc, _ in procs.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # finish the round, checkpoint, park
    for proc, log in procs.values():
        try:
            proc.wait(timeout=args.grace)
        except subprocess.TimeoutExpired:
            proc.kill()  # the round outlasted the grace: its parked checkpoint is the one before
            proc.wait()
        log.close()
    report = {"device": _device_name(args.device), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
              "seconds": round(time.time() - started, 1), "cells": {}}
    wall = time.time() - started
    for name, folder, before in cells:
        after = _parked_round(folder)
        ran = after - before
        report["cells"][name] = {"rounds_before": before, "rounds_after": after,  # start-up and data loading included:
                                 "wall_s_per_round": round(wall / ran, 2) if ran else None}  # an upper bound
        _note(folder, before, after, report["device"], report["started"])
        archive = out / f"{name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for item in [*(folder / k for k in KEEP), folder / "parked"]:
                if item.exists():
                    tar.add(item, arcname=item.relative_to(folder))
        if archive.stat().st_size > LIMIT:
            report["cells"][name]["error"] = f"{archive.stat().st_size / 2**20:.1f} MiB: over the 16 MiB limit"
            archive.unlink()
    (out / "gpu_cells.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report, indent=1))
    return 0


def _note(folder: Path, before: int, after: int, device: str, when: str) -> None:
    if after <= before:
        return
    note = folder / "GPU_ROUNDS.md"
    head = "" if note.exists() else ("Rounds of this cell that ran off the CPU lanes (studies/gpu_cells.py); "
                                     "all other rounds ran on the CPU.\n\n")
    with note.open("a") as fh:
        fh.write(f"{head}- rounds {before + 1}-{after}: {device}, {when}\n")


def cmd_harvest(args: argparse.Namespace) -> int:
    cells = {name: (folder, parked) for name, folder, parked in _cells([])}
    changed = 0
    for archive in sorted(Path(args.files).glob("*.tar.gz")):
        name = archive.name[: -len(".tar.gz")]
        if name not in cells:
            print(f"{name}: not an unfinished cell of {STUDY}; left alone")
            continue
        folder, here = cells[name]
        local = max([here, *[int(p.stem.split("-")[1]) for p in (folder / "checkpoints").glob("round-*.json")]])
        with tempfile.TemporaryDirectory() as tmp:
            with tarfile.open(archive) as tar:
                tar.extractall(tmp, filter="data")
            came = _parked_round(Path(tmp))
            if came <= local:
                print(f"{name}: came back at round {came}, here at {local}; left alone")
                continue
            print(f"{name}: round {local} -> {came}{' (dry run)' if args.dry_run else ''}")
            if args.dry_run:
                continue
            shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # so that the next run resumes the GPU's
            shutil.rmtree(folder / "parked", ignore_errors=True)
            for item in Path(tmp).iterdir():
                target = folder / item.name
                if item.is_dir():
                    shutil.copytree(item, target)
                else:
                    shutil.copy2(item, target)
            changed += 1
    print(f"{changed} cell(s) updated; the lanes resume them with `fedmr study run {STUDY} --only name=CELL`")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="fill .gpu-carry/ (the CIFAR-10 copy and the tomli_w wheel)")
    prep.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"))
    run = sub.add_parser("run", help="advance the cells for a while, then pack them into OUT")
    run.add_argument("--out", required=True)
    run.add_argument("--minutes", type=float, default=8.0)
    run.add_argument("--seconds", type=float, default=None, help="instead of --minutes")
    run.add_argument("--grace", type=float, default=120.0, help="seconds a cell may take to finish its round")
    run.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    run.add_argument("--data", default=None, help="the CIFAR-10 copy (default: .gpu-carry/cifar10-jpg.tar.gz)")
    run.add_argument("--cells", nargs="*", default=[], help="cell names (default: the ResNet-20 cells but SCAFFOLD)")
    harvest = sub.add_parser("harvest", help="put the cells that came back into their folders")
    harvest.add_argument("files")
    harvest.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    return {"prepare": cmd_prepare, "run": cmd_run, "harvest": cmd_harvest}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
