"""``fedmr study run FILE`` and ``fedmr study report FILE`` (wired into the main parser by ``add_parser``)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError


def add_parser(subparsers: Any) -> None:
    study = subparsers.add_parser("study", help="run a grid of experiments (a study file) and build its results page")
    sub = study.add_subparsers(dest="study_command", required=True)
    run = sub.add_parser("run", help="run every cell of the study that has no finished results (resumable)")
    run.add_argument("file", metavar="FILE.toml", help="study file, e.g. studies/cifar10-cnn.toml")
    run.add_argument("--dry-run", action="store_true", help="list the cells, which are done and where, and stop")
    run.add_argument("--only", metavar="KEY=VALUE", action="append", default=[],
                     help="only the cells that match (repeatable): name=..., priority=2, section=..., or a config "
                          "key such as alpha=0.5, seed=2, algorithm=fedmr@first_stage_rounds=50")
    run.add_argument("--jobs", metavar="N", type=int, default=1, help="cells at once, each on its share of the cores")
    run.add_argument("--ray", metavar="ADDRESS",
                     help="run the cells as Ray tasks: auto (the running cluster), HOST:PORT, or local (a one-machine "
                          "cluster started for this command); the study folder must be shared by all nodes")
    run.add_argument("--cpus-per-cell", metavar="N", type=int, default=1, help="with --ray: CPUs (threads) each cell takes")
    run.add_argument("--retries", metavar="N", type=int, default=3, help="with --ray: times a failed cell is retried")
    run.add_argument("--quiet", action="store_true", help="with one job: log lines instead of a progress bar")
    run.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="assignments",
                     help=f"how and where the cells compute, not what: one of {', '.join(HOW_KEYS)} (e.g. "
                          "device=\"cuda\" vectorize=true on a GPU machine, or another data_dir)")
    report = sub.add_parser("report", help="rebuild the study's results page from its run folders (or, given a claims "
                                           "file, the page that answers the paper's claims across its studies)")
    report.add_argument("file", metavar="FILE.toml", help="study file, e.g. studies/cifar10-cnn.toml, or a claims "
                                                          "file, e.g. studies/claims.toml")
    park = sub.add_parser("park", help="keep each unfinished cell's newest checkpoint in its folder's parked/ (to "
                                       "commit, so another machine resumes it); remove it from finished cells")
    park.add_argument("file", metavar="FILE.toml", help="study file, e.g. studies/cifar10-cnn.toml")


HOW_KEYS = ("device", "workers", "vectorize", "vectorize_memory_gb", "data_dir", "cache_dir", "compile")
"""Keys ``study run --set`` may change: where and how a cell computes, never its numbers' definition
(each is among the changes a checkpoint resumes across, and the reuse of finished runs ignores them)."""


def _how(todo: list[Any], assignments: list[str]) -> list[Any]:
    """The cells with ``--set`` applied (only the keys of ``HOW_KEYS``, each checked by the config)."""
    import dataclasses

    from ..config import parse_assignment

    changes: dict[str, Any] = {}
    for item in assignments:
        keys, value = parse_assignment(item)
        if len(keys) != 1 or keys[0] not in HOW_KEYS:
            raise ConfigError(f"study run --set takes only keys that say how and where a cell computes "
                              f"({', '.join(HOW_KEYS)}), got '{item.partition('=')[0]}'")
        changes[keys[0]] = value
    if not changes:
        return todo
    return [dataclasses.replace(s, cell=dataclasses.replace(s.cell, cfg=s.cell.cfg.replace(**changes))) for s in todo]


def _matches(status: Any, key: str, value: Any) -> bool:
    cell = status.cell
    if key == "name":
        return cell.name == str(value)
    if key == "priority":
        return cell.priority == value
    if key == "section":
        return any(m.section == str(value) for m in cell.memberships)
    if key == "state":
        return status.state == str(value)
    if key == "algorithm":
        return cell.cfg.algorithm == value or any(m.method == value for m in cell.memberships)
    node: Any = cell.cfg
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:  # the RunConfig, then a section
            raise ConfigError(f"--only {key}=...: no such config key (or name, priority, section, state)")
        node = node[part]
    return node == value or str(node) == str(value)


def _select(statuses: list[Any], only: list[str]) -> list[Any]:
    from ..config import parse_assignment

    for item in only:
        if "=" not in item:
            raise ConfigError(f"--only expects KEY=VALUE, got '{item}'")
        keys, value = parse_assignment(item)
        statuses = [s for s in statuses if _matches(s, ".".join(keys), value)]
    return statuses


def _listing(statuses: list[Any], file: str) -> str:
    from .execute import describe

    width = max([len(s.cell.name) for s in statuses] + [4]) + 2
    lines = [f"{file}: {len(statuses)} cells ({describe(statuses)})",
             f"{'prio':<5}{'state':<9}{'rounds':<11}{'cell':<{width}}folder"]
    for s in statuses:
        rounds = f"{s.rounds_done}/{s.cell.cfg.rounds}"
        folder = os.path.normpath(s.folder)  # a reused run as docs/results/x, not docs/results/study/../x
        lines.append(f"{s.cell.priority:<5}{s.state:<9}{rounds:<11}{s.cell.name:<{width}}{folder}")
    return "\n".join(lines)


def _keep_finished(study: Any, statuses: list[Any]) -> None:
    """keep_model for cells finished before it was asked for: their own folder's model, copied once."""
    from .execute import keep_model

    for status in statuses:
        if status.finished and status.cell.keep_model:
            problem = keep_model(status.folder) if status.folder.parent == study.output else (
                f"keep_model: {status.cell.name} is read from {status.folder}, a run outside the study's folder; "
                "its model is not copied")
            if problem:
                print(f"fedmr: warning: {problem}", file=sys.stderr)


def cmd_run(args: argparse.Namespace) -> int:
    from .execute import Progress, run_here, run_pool, run_ray
    from .index import check_folder, resolve, write_index
    from .spec import load_study

    if args.jobs < 1 or args.cpus_per_cell < 1 or args.retries < 0:
        raise ConfigError("--jobs and --cpus-per-cell must be at least 1, --retries at least 0")
    if args.ray and args.jobs != 1:
        raise ConfigError("--jobs is for one machine; with --ray the cluster's CPUs decide (see --cpus-per-cell)")
    study = load_study(args.file)
    check_folder(study)
    statuses = resolve(study)
    chosen = _select(statuses, args.only)
    # cells with a checkpoint first: a study resumed over several sittings finishes what it started
    todo = _how(sorted((s for s in chosen if not s.finished), key=lambda s: s.state != "partial"), args.assignments)
    if args.dry_run:
        print(_listing(chosen, args.file))
        print(f"{len(todo)} to run: fedmr study run {shlex.quote(args.file)}"
              + "".join(f" --only {shlex.quote(o)}" for o in args.only))
        return 0
    write_index(study, statuses)
    _keep_finished(study, chosen)
    print(f"{args.file}: {len(statuses)} cells, {len(statuses) - sum(not s.finished for s in statuses)} finished, "
          f"{len(todo)} to run{' (--only)' if args.only else ''}", file=sys.stderr, flush=True)
    by_name = {s.cell.name: i for i, s in enumerate(statuses)}

    def on_done(status: Any, result: Any) -> None:
        from .index import Status

        statuses[by_name[status.cell.name]] = Status(status.cell, "done", status.folder, status.cell.cfg.rounds)
        write_index(study, statuses)

    if not todo:
        print(f"nothing to run; report: fedmr study report {shlex.quote(args.file)}", file=sys.stderr)
        return 0
    late = float(study.options["late_fraction"])
    parallel = args.jobs if not args.ray else len(todo)
    progress = Progress(len(todo), parallel)
    if args.ray:
        stopped = run_ray(todo, args.ray, args.cpus_per_cell, args.retries, progress, on_done, late)
    elif args.jobs > 1:
        stopped = run_pool(todo, args.jobs, progress, on_done, late)
    else:
        stopped = run_here(todo, progress, on_done, "log" if args.quiet else "bar", late)
    if stopped:
        print(f"fedmr: study stopped; finished cells and checkpoints are saved in {study.output}\n"
              f"continue with: fedmr study run {shlex.quote(args.file)}", file=sys.stderr)
        return 128 + stopped
    if progress.failures:
        print(f"fedmr: {progress.failures} cell(s) failed (see above); rerun to retry them", file=sys.stderr)
        return 1
    print(f"report: fedmr study report {shlex.quote(args.file)}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .claims import read_claims_doc, write_claims
    from .index import resolve, write_index
    from .report import write_report
    from .spec import load_study

    claims = read_claims_doc(args.file)
    if claims is not None:  # a claims file: the page that answers the paper's claims across its studies
        page, line = write_claims(args.file, claims)
        print(f"{page}: {line}")
        return 0
    study = load_study(args.file)
    statuses = resolve(study)
    write_index(study, statuses)
    page = write_report(study, statuses, args.file)
    done = sum(s.finished for s in statuses)
    print(f"{page}: {done} of {len(statuses)} cells finished")
    return 0


def cmd_park(args: argparse.Namespace) -> int:
    from .index import resolve
    from .parking import park
    from .spec import load_study

    study = load_study(args.file)
    for status in resolve(study):
        if status.folder.parent != study.output:  # a reused run elsewhere: finished, nothing of ours to park
            continue
        done = park(status.folder, status.finished)
        if done:
            print(f"{status.cell.name}: {done}")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    return {"run": cmd_run, "report": cmd_report, "park": cmd_park}[args.study_command](args)
