"""Time a deployed loopback round: SuperLink + 3 SuperNodes on 127.0.0.1 (insecure), 3 rounds,
before and after the cuts of docs/flower.md ("Deployment cost"), one configuration after the other
in one sitting.  Usage (from the repository root, fedmr[flower] installed):

    python benchmarks/flower_deployed_round.py [--only NAME ...] [--rounds 3]

"before" of fedmr's app runs the code of git `main` (exported to a temporary folder and put first
on PYTHONPATH); every process is stopped after each configuration.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_flower_helpers import FlowerProcesses, flower_env, flwr_run, free_port, wait_for, write_connection  # noqa: E402
from test_flower_quickstart import write_app  # noqa: E402

FAST_ENV = {"FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1"}  # the SuperNode's SuperExec looks for tasks every 0.1 s, not 1 s
FEDMR_RUN = "num_clients=3 clients_per_round=3 local_epochs=1 eval_every=1 seed=5"


def main_checkout(work: Path) -> Path:
    """git main's src/ and flower_app/ (the code before this branch)."""
    dest = work / "main"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "main", "src", "flower_app"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def run_one(work: Path, name: str, spec: dict, rounds: int) -> list[float]:
    """Start the federation, run, stop; the seconds each round took."""
    case = work / name
    case.mkdir()
    home = case / "flwr-home"
    env = flower_env(home)
    if spec.get("pythonpath"):
        env["PYTHONPATH"] = spec["pythonpath"]
    for key in FAST_ENV:  # the tests' environment sets it; "before" runs with Flower's default
        env.pop(key, None)
    node_env = {**env, **(FAST_ENV if spec["fast_nodes"] else {})}
    procs = FlowerProcesses(case, env)
    try:
        port = free_port()
        procs.start("superlink", "flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port),
                    "--disable-runtime-dependency-installation")
        wait_for(lambda: "Uvicorn running" in procs.log("superlink"), 60, "the SuperLink")
        for i in range(3):
            config = f'data-dir="{spec["sites"]}/client-{i:03d}"' if spec.get("sites") else f"partition-id={i} num-partitions=3"
            procs.start(f"supernode-{i}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                        "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", config, env=node_env)
        write_connection(home, "link", port)
        out = case / "out"
        out.mkdir()
        if spec["app"] == "quickstart":
            app = write_app(case / "app")
            flwr_run(env, "link", f'num-server-rounds={rounds} strategies="fedmr" record-dir="{out}" '
                                  f'polling-grid={"true" if spec["polling"] else "false"}', app_dir=app, timeout=900)
            ends = [os.path.getmtime(out / f"fedmr-global-{r}.pt") for r in range(rounds + 1)]
            return [b - a for a, b in zip(ends, ends[1:])]
        run = f'{FEDMR_RUN} rounds={rounds} {spec.get("extra", "")} flower.out="{out / "run"}"'
        flwr_run(env, "link", run, app_dir=spec["app_dir"], timeout=900)
        with (out / "run" / "metrics.csv").open() as fh:
            elapsed = [0.0] + [float(r["elapsed_s"]) for r in csv.DictReader(fh)]
        return [b - a for a, b in zip(elapsed, elapsed[1:])]
    finally:
        procs.stop()
        assert not procs.alive(), f"{name}: processes left running {procs.alive()}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="flower-round-"))
    old = main_checkout(work)
    sites = work / "sites"
    subprocess.run([str(Path(sys.executable).parent / "fedmr"), "partition", "--set", "num_clients=3",
                    "--set", "clients_per_round=3", "--set", "seed=5", "--export", str(sites)], check=True, capture_output=True)
    node = 'dataset="imagefolder" normalization="cifar10" flower.data="node" flower.fraction_evaluate=1.0'
    cases = {
        "quickstart-before": {"app": "quickstart", "fast_nodes": False, "polling": False},
        "quickstart-after": {"app": "quickstart", "fast_nodes": True, "polling": True},
        "fedmr-partition-before": {"app": "fedmr", "fast_nodes": False, "app_dir": old / "flower_app",
                                   "pythonpath": str(old / "src")},
        "fedmr-partition-after": {"app": "fedmr", "fast_nodes": True, "app_dir": ROOT / "flower_app"},
        "fedmr-sites-before": {"app": "fedmr", "fast_nodes": False, "app_dir": ROOT / "flower_app", "sites": sites,
                               "extra": node + " flower.poll_interval=3.0"},
        "fedmr-sites-after": {"app": "fedmr", "fast_nodes": True, "app_dir": ROOT / "flower_app", "sites": sites,
                              "extra": node},
    }
    results = {}
    for name, spec in cases.items():
        if args.only and name not in args.only:
            continue
        start = time.time()
        times = run_one(work, name, spec, args.rounds)
        results[name] = times
        later = times[1:] or times
        print(f"{name:24s} rounds {' '.join(f'{t:5.1f}' for t in times)} s; later rounds mean {statistics.mean(later):5.1f} s "
              f"(whole case {time.time() - start:.0f} s; load {os.getloadavg()[0]:.1f})", flush=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
