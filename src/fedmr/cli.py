"""The ``fedmr`` command line: parses the arguments and dispatches to the engine (run, compare, demo,
data info, partition), the study (:mod:`fedmr.study`) and ``landscape`` (:mod:`fedmr.landscape`);
the workflows themselves live in those packages."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .config import algorithm_help, load_config, settings_help, warn_unused_sections
from .errors import ConfigError, FedMRError

DEMO_SETTINGS = [
    "dataset=\"digits\"", "num_clients=20", "clients_per_round=5", "rounds=150", "eval_every=5",
    "partition=\"dirichlet\"", "alpha=0.1", "seed=1",
]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE.toml", help="TOML config file (defaults are the paper's)")
    parser.add_argument("--set", dest="assignments", metavar="KEY=VALUE", action="append", default=[],
                        help="override one config key, e.g. --set rounds=100 --set fedmr.block_fraction=0.5")
    parser.add_argument("--out", metavar="DIR", help="results folder (default: runs/<name>-<time>)")
    parser.add_argument("--quiet", action="store_true", help="log lines instead of a progress bar")


_ALGORITHMS_EPILOG = "(the general keys, the algorithms and their options)"


class _Parser(argparse.ArgumentParser):
    """Builds the keys-and-algorithms epilog only when that help is shown: the registry imports torch
    (seconds), which ``fedmr --help`` and parsing the arguments need not pay."""

    def format_help(self) -> str:
        if self.epilog is _ALGORITHMS_EPILOG:
            self.epilog = settings_help() + "\n\n" + algorithm_help()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmr", description="Federated learning via model recombination (FedMR) and baselines.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one experiment", epilog=_ALGORITHMS_EPILOG,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _common(run)
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR from its last good checkpoint (uses DIR/config.toml; --set may extend rounds)")
    run.add_argument("--checkpoint-every", metavar="N", type=int,
                     help="rounds between checkpoints (default: at every evaluation, i.e. eval_every)")
    compare = sub.add_parser("compare", help="run several algorithms on the same partition, seed and initial model",
                             epilog=_ALGORITHMS_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    compare.add_argument("--algorithms",
                         help="comma-separated names; a variant adds @key=value, e.g. fedmr@first_stage_rounds=50")
    _common(compare)
    compare.add_argument("--resume", metavar="DIR",
                         help="continue the comparison in DIR: finished runs are kept, the unfinished one goes on from "
                              "its last good checkpoint (uses DIR/config.toml and DIR/compare.json; --set may extend rounds)")
    compare.add_argument("--checkpoint-every", metavar="N", type=int,
                         help="rounds between checkpoints (default: at every evaluation, i.e. eval_every)")
    demo = sub.add_parser("demo", help="compare FedAvg and FedMR on the embedded digits data (about a minute)")
    _common(demo)
    _add_data_commands(sub)
    from .study.cli import add_parser as add_study_parser  # fedmr study run|report

    add_study_parser(sub)
    from .landscape.cli import add_parser as add_landscape_parser  # fedmr landscape MODEL [MODEL_B]

    add_landscape_parser(sub)
    return parser


def _add_data_commands(sub: Any) -> None:
    data = sub.add_parser("data", help="inspect a data set")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    info = data_sub.add_parser("info", help="sizes, classes and per-channel pixel mean/std of a data set")
    info.add_argument("dataset", metavar="DATASET",
                      help="digits, cifar10, cifar100, cifar100-fine, femnist, imagefolder or a loader as "
                           "package.module:function")
    info.add_argument("--data-dir", metavar="DIR", help="where the data set lies (the config key data_dir)")
    info.add_argument("--set", dest="assignments", metavar="KEY=VALUE", action="append", default=[],
                      help="another config key, e.g. --set normalization=\"none\"")
    part = sub.add_parser("partition", help="write the client partition `fedmr run` would use, without training")
    part.add_argument("--config", metavar="FILE.toml", help="TOML config file (defaults are the paper's)")
    part.add_argument("--set", dest="assignments", metavar="KEY=VALUE", action="append", default=[],
                      help="override one config key, e.g. --set num_clients=100")
    part.add_argument("--out", metavar="FILE.json", help="partition file (the authors' JSON format)")
    part.add_argument("--export", metavar="DIR",
                      help="also write one image folder per client (DIR/client-007/train|test/<class>/*.png)")


def _progress(args: argparse.Namespace) -> str:
    """A progress bar where someone watches (stderr is a terminal), else log lines (as --quiet): a
    log file gets no carriage-return bars."""
    return "log" if args.quiet or not sys.stderr.isatty() else "bar"


def _late_stop(signum: int, what: str) -> None:
    if signum:
        print(f"fedmr: {signal.Signals(signum).name} came in the last round, so {what} was finished rather than "
              "stopped: its results are complete", file=sys.stderr)


def _assignments(args: argparse.Namespace, extra: Sequence[str] = ()) -> list[str]:
    assignments = [*extra, *args.assignments]
    if getattr(args, "checkpoint_every", None) is not None:
        assignments.append(f"checkpoint_every={args.checkpoint_every}")
    return assignments


def resume_command(command: str, out: Path, cfg: Mapping[str, Any], specs: Sequence[str] = ()) -> str:
    """The command that resumes a stopped run, as it works pasted into a new shell in this folder:
    prefixed with the PYTHONPATH its plug-ins need (a new shell has none of this one's)."""
    from .imports import import_roots

    variants = {spec.partition("@")[0] for spec in specs}  # compare's plug-in variants, e.g. mine:Algo@beta=0.5
    roots = import_roots({**{name: {} for name in variants if ":" in name}, **cfg})
    prefix = f"PYTHONPATH={shlex.quote(os.pathsep.join(roots))} " if roots else ""
    return f"{prefix}fedmr {command} --resume {shlex.quote(str(out))}"


def cmd_run(args: argparse.Namespace) -> int:
    from .engine.output import new_run_folder
    from .engine.simulator import resumed_config, run_experiment

    assignments = _assignments(args)
    if args.resume:
        if args.config or args.out:
            raise ConfigError("--resume DIR takes its config from DIR/config.toml and writes to DIR; drop --config/--out")
        out = Path(args.resume)
        cfg = resumed_config(out, assignments)
    else:
        cfg = load_config(args.config, assignments)
        warn_unused_sections(cfg, [cfg.algorithm])
        out = Path(args.out) if args.out else new_run_folder(cfg.algorithm, cfg.dataset)
    outcome = run_experiment(cfg, out, _progress(args), resume=bool(args.resume), fresh=not (args.out or args.resume))
    if outcome.stopped_after is not None:
        print(f"fedmr: stopped after round {outcome.stopped_after} of {cfg.rounds}; checkpoint saved in "
              f"{out / 'checkpoints'}\nresume with: {resume_command('run', out, cfg)}", file=sys.stderr)
        return 128 + outcome.stop_signal
    _late_stop(outcome.late_signal, "the run")
    s = outcome.summary
    print(f"{cfg.algorithm}: final accuracy {s['final_accuracy']:.4f}, best {s['best_accuracy']:.4f} "
          f"(round {s['best_round']}), {s['wall_seconds']:.1f}s -> {out}")
    return 0


def cmd_compare(args: argparse.Namespace, extra: Sequence[str] = ()) -> int:
    from .engine.compare import parse_variant, resumed_comparison, run_comparison
    from .engine.output import new_run_folder
    from .results import comparison_table

    assignments = _assignments(args, extra)
    resume = getattr(args, "resume", None)
    if resume:
        if args.config or args.out or args.algorithms:
            raise ConfigError("--resume DIR takes its config and algorithms from DIR and writes to DIR; "
                              "drop --config/--out/--algorithms")
        out = Path(resume)
        cfg, specs = resumed_comparison(out, assignments)
    else:
        if not args.algorithms:
            raise ConfigError("compare needs --algorithms (e.g. --algorithms fedavg,fedmr) or --resume DIR")
        cfg = load_config(args.config, assignments)
        specs = [s.strip() for s in args.algorithms.split(",") if s.strip()]
        if not specs:
            raise ConfigError("--algorithms is empty")
        warn_unused_sections(cfg, [parse_variant(spec)[0] for spec in specs])
        out = Path(args.out) if args.out else new_run_folder(*getattr(args, "default_folder", ("compare", cfg.dataset)))
    outcome = run_comparison(cfg, specs, out, _progress(args), resume=bool(resume), fresh=not (args.out or resume))
    if outcome.stop_signal:
        print(f"fedmr: comparison stopped; every run so far is saved in {out}\n"
              f"resume with: {resume_command('compare', out, cfg, specs)}", file=sys.stderr)
        return 128 + outcome.stop_signal
    _late_stop(outcome.late_signal, "the comparison")
    print(comparison_table(outcome.summaries), end="")
    print(f"table: {out / 'comparison.md'}\nplot:  {out / 'accuracy.png'}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    args.algorithms = "fedavg,fedmr"
    args.default_folder = ("demo",)  # runs/demo-<time>
    return cmd_compare(args, DEMO_SETTINGS)


def cmd_data(args: argparse.Namespace) -> int:
    """``fedmr data info``: load the data set as a run would and describe it."""
    import torch

    from .config import paper_clients_per_round
    from .data import load_dataset
    from .data.base import size_summary
    from .data.normalization import channels, describe, raw_channel_stats

    given = [f"dataset={json.dumps(args.dataset)}"]  # first, so --set may name the loader's options
    if args.data_dir is not None:
        given.append(f"data_dir={json.dumps(args.data_dir)}")
    cfg = load_config(None, [*given, *args.assignments], uses="data")
    start = time.perf_counter()
    data = load_dataset(cfg)
    seconds = time.perf_counter() - start
    names = ", ".join(data.classes[:20]) + (", ..." if len(data.classes) > 20 else "")
    where = "" if cfg.dataset == "digits" or ":" in cfg.dataset else f" from {cfg.data_dir}"
    print(f"{data.name}{where} (loaded in {seconds:.1f} s)")
    kind = "images" if data.is_images else "samples"
    shape = "x".join(map(str, data.input_shape)) if data.is_images else f"of shape {data.input_shape} {data.train_x.dtype}"
    print(f"train: {len(data.train_y)} {kind}, test: {len(data.test_y)} {kind}, {shape}")
    print(f"classes: {data.num_classes} ({names})")
    train, test = (torch.bincount(y.cpu(), minlength=data.num_classes) for y in (data.train_y, data.test_y))
    spread = [f"{int(c.min())} each" if c.min() == c.max() else f"{int(c.min())}-{int(c.max())}" for c in (train, test)]
    print(f"samples per class: train {spread[0]}, test {spread[1]}")
    if data.normalization is not None:
        mean, std = raw_channel_stats(data.train_x, data.normalization)
        print(f"train pixel mean per channel (0..1): {channels(mean)}")
        print(f"train pixel std per channel (0..1):  {channels(std)}")
        print(f"normalization: {cfg.normalization} ({describe(data.normalization)})")
    if data.is_images:  # per-channel statistics mean something for images only
        mean, std = raw_channel_stats(data.train_x, None)
        print(f"normalised train mean per channel: {channels(mean)}; std: {channels(std)}")
    if data.natural_partition is not None:
        writers = len(data.natural_partition)
        k = paper_clients_per_round({"clients_per_round": "auto", "partition": "natural", "num_clients": writers})
        print(f"natural split: {writers} writers (partition = \"natural\", num_clients = {writers}; clients_per_round "
              f"\"auto\" = {k})")
        print(f"training samples per writer: {size_summary([len(p) for p in data.natural_partition])}")
    print(f"default model: {data.default_model}")
    for note in data.notes:
        print(note)
    return 0


def cmd_partition(args: argparse.Namespace) -> int:
    """Draw exactly the partition ``fedmr run`` draws for this config and save it, with its summary."""
    from .data import load_dataset
    from .fileio import atomic_write_text
    from .partition import config_json, format_summary, make_partition, summarize

    cfg = load_config(args.config, args.assignments, uses="partition")
    if not (args.out or args.export):
        raise ConfigError("fedmr partition needs --out FILE.json, --export DIR or both")
    if args.export:
        from .export import export_partition

        doc = export_partition(cfg, args.export)
        print(f"wrote {doc['num_users']} client folders in {args.export} (SuperNodes: --node-config "
              f"\"data-dir={args.export}/client-NNN\"; run config: flower.data=\"node\" dataset=\"imagefolder\""
              + (f" normalization=\"{doc['normalization']}\")" if doc["normalization"] else ")"))
        if not args.out:
            return 0
    data = load_dataset(cfg)
    labels = data.train_y.numpy()
    parts = make_partition(cfg, labels, data.natural_partition)
    summary = summarize(parts, labels, data.num_classes)
    doc = config_json(parts, cfg)
    doc["seed"] = cfg.seed
    doc["summary"] = summary
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc))
    print(format_summary(summary))
    print(f"wrote {out} (use it with --set partition=\"file\" --set partition_file=\"{out}\")")
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from .study.cli import cmd_study as study

    return study(args)


def cmd_landscape(args: argparse.Namespace) -> int:
    from .landscape.cli import cmd_landscape as landscape

    return landscape(args)


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "demo": cmd_demo, "data": cmd_data, "partition": cmd_partition,
            "study": cmd_study, "landscape": cmd_landscape}


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except FedMRError as exc:
        print(f"fedmr: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmr: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fedmr data info ... | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
