"""Flower app pieces without processes (codec, config, reply checks), and the process helpers the
Flower simulation and deployment tests share: start in own sessions, stop every descendant,
watch that nothing listens outside loopback."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("flwr", reason="flwr is not installed (pip install 'fedmr[flower]')")

import torch  # noqa: E402

from fedmr.algorithms.base import TrainResult, TrainTask  # noqa: E402
from fedmr.config import default_config, read_toml  # noqa: E402
from fedmr.errors import ConfigError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
APP_DIR = ROOT / "flower_app"
BIN = Path(sys.executable).parent
OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",  # Ray's node address becomes 127.0.0.1
    "RAY_USAGE_STATS_ENABLED": "0",
    "PYTHONUNBUFFERED": "1",
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",  # a SuperNode's SuperExec looks for tasks every 0.1 s, not 1 s
}
# Hang guards, not timings: a wait ends as soon as its event happens, and on a slow, loaded 2-core machine
# starting a Flower process (Python, grpc, Ray) can take a minute and a whole `flwr run` several.
START_TIMEOUT = 300.0
RUN_TIMEOUT = 900.0
LOOPBACK = re.compile(r"^(127\.\d+\.\d+\.\d+|\[::1\]|::1|\[::ffff:127\.\d+\.\d+\.\d+\]):\d+$")


def flower_env(home: Path) -> dict[str, str]:
    env = {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(home)}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]; None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _start_time(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[19]) if fields else None  # field 22 of stat: start time, tells a reused pid apart


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields:
                kids.setdefault(int(fields[1]), []).append(int(entry))
    return kids


def _listeners() -> list[tuple[str, set[int]]]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 4:
            rows.append((parts[3], {int(p) for p in re.findall(r"pid=(\d+)", line)}))
    return rows


class FlowerProcesses:
    """Every process a test starts, each in its own session; a watcher thread records their
    descendants and every socket they listen on, so the test can check loopback-only and kill all."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env = workdir, env
        self.procs: list[subprocess.Popen] = []
        self.tracked: dict[int, int | None] = {}  # pid -> start time
        self.listening: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
        log = (self.workdir / f"{name}.log").open("w")
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], stdout=log, stderr=subprocess.STDOUT,
                                env=env or self.env, cwd=self.workdir, start_new_session=True)
        self.procs.append(proc)
        self.tracked[proc.pid] = _start_time(proc.pid)
        return proc

    def _descendants(self) -> set[int]:
        kids, seen = _children(), set()
        todo = [p.pid for p in self.procs]
        while todo:
            pid = todo.pop()
            if pid not in seen:
                seen.add(pid)
                todo.extend(kids.get(pid, []))
        return seen

    def sample(self) -> None:
        for pid in self._descendants():
            self.tracked.setdefault(pid, _start_time(pid))
        for address, pids in _listeners():
            for pid in pids & self.tracked.keys():
                self.listening.add((address, pid))

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.sample()
            except Exception:  # the watcher must never kill the test
                pass

    def outside_loopback(self) -> list[tuple[str, int]]:
        self.sample()
        return sorted(item for item in self.listening if not LOOPBACK.match(item[0]))

    def log(self, name: str) -> str:
        return (self.workdir / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        self._stop.set()
        try:
            self.sample()
        except Exception:
            pass
        for proc in self.procs:
            with _quiet():
                os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pid in self.alive():  # stragglers in other sessions (superexec, Ray), never a reused pid
            with _quiet():
                os.kill(pid, signal.SIGKILL)
        for proc in self.procs:
            with _quiet():
                os.killpg(proc.pid, signal.SIGKILL)
            with _quiet():
                proc.wait(timeout=5)
        deadline = time.monotonic() + 60  # SIGKILLed: they die at once, unless the loaded machine is slow to run them
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)

    def alive(self) -> list[int]:
        """Started or descended processes still running (zombies and reused pids excluded)."""
        alive = []
        for pid, started in self.tracked.items():
            fields = _stat(pid)
            if fields and fields[0] != "Z" and int(fields[19]) == started:
                alive.append(pid)
        return alive


class _quiet:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, PermissionError, subprocess.TimeoutExpired))


def write_connection(home: Path, name: str, port: int, root_certificates: Path | None = None) -> None:
    """A SuperLink connection in Flower's config file (FLWR_HOME/config.toml)."""
    home.mkdir(parents=True, exist_ok=True)
    path = home / "config.toml"
    text = path.read_text() if path.exists() else "[superlink]\n"
    security = f'root-certificates = "{root_certificates}"' if root_certificates else "insecure = true"
    path.write_text(text + f'\n[superlink.{name}]\naddress = "127.0.0.1:{port}"\n{security}\n')


def flwr_run(env: dict[str, str], connection: str, run_config: str, *, federation_config: str | None = None,
             timeout: float = RUN_TIMEOUT, app_dir: Path = APP_DIR, check: bool = True) -> str:
    """``flwr run <app> <connection> --stream`` (fedmr's flower_app unless told); returns its output
    (fails the test on a non-zero exit when ``check``)."""
    args = [str(BIN / "flwr"), "run", str(app_dir), connection, "--stream", "--run-config", run_config]
    if federation_config:
        args += ["--federation-config", federation_config]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"flwr run did not finish in {timeout}s:\n{out[-4000:]}")
    if check:
        assert proc.returncode == 0, out[-4000:]
    return out


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.3)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


# ---- tests without processes --------------------------------------------------------------

def test_run_config_dotted_keys_and_flower_keys():
    from fedmr.flower.task import split_run_config

    run = split_run_config({"num_clients": 8, "clients_per_round": 4, "fedmr.block_fraction": 0.5, "alpha": 1, "flower.out": "x"})
    assert run.cfg["num_clients"] == 8 and run.cfg["fedmr"]["block_fraction"] == 0.5
    assert run.cfg["alpha"] == 1.0 and isinstance(run.cfg["alpha"], float)
    assert run.flower["out"] == "x"
    with pytest.raises(ConfigError, match="flower.bogus"):
        split_run_config({"flower.bogus": 1})
    with pytest.raises(ConfigError, match="nope"):
        split_run_config({"nope": 1})
    with pytest.raises(ConfigError, match="clients_per_round"):
        split_run_config({"num_clients": 2, "clients_per_round": 3})


def test_app_config_lists_every_fedmr_key():
    """`flwr run --run-config` only overrides keys the app's pyproject declares."""
    declared = read_toml(APP_DIR / "pyproject.toml")["tool"]["flwr"]["app"]["config"]
    for key, value in default_config().items():
        if isinstance(value, dict):
            for sub in value:
                assert sub in declared.get(key, {}), f"flower_app/pyproject.toml lacks {key}.{sub}"
        else:
            assert key in declared, f"flower_app/pyproject.toml lacks '{key}'"


def test_codec_round_trip_keeps_values_dtypes_and_payload():
    from fedmr.flower.task import decode_result, decode_task, encode_result, encode_task

    state = {"w": torch.randn(3, 2), "steps": torch.tensor(7, dtype=torch.long)}
    payload = {"control": torch.randn(4), "prev": {"a": torch.ones(2)}, "mu": 0.01, "tag": "x"}
    task, round_idx = decode_task(encode_task(TrainTask(5, 2, state, payload), 9))
    assert (task.client_id, task.slot, round_idx) == (5, 2, 9)
    assert torch.equal(task.state["w"], state["w"]) and task.state["steps"].dtype == torch.long
    assert torch.equal(task.payload["control"], payload["control"])
    assert torch.equal(task.payload["prev"]["a"], payload["prev"]["a"])
    assert task.payload["mu"] == 0.01 and task.payload["tag"] == "x"
    result = decode_result(encode_result(TrainResult(5, 2, state, 30, 0.25, {"delta": torch.zeros(2)})))
    assert (result.client_id, result.slot, result.num_samples, result.train_loss) == (5, 2, 30, 0.25)
    assert torch.equal(result.payload["delta"], torch.zeros(2))
    with pytest.raises(TypeError, match="payload entry 'bad'"):
        encode_task(TrainTask(0, 0, state, {"bad": object()}), 0)


def _reply(content=None, error=None, node=1):
    return SimpleNamespace(content=content, has_error=lambda: error is not None,
                           error=SimpleNamespace(reason=error), metadata=SimpleNamespace(src_node_id=node))


def test_strategy_refuses_failed_malformed_and_unsound_replies_and_keeps_the_slot():
    from flwr.app import RecordDict

    from fedmr.algorithms import Federation, build_algorithm
    from fedmr.config import validate
    from fedmr.engine.rounds import plan_round
    from fedmr.flower.strategy import AlgorithmStrategy
    from fedmr.flower.task import encode_result

    cfg = validate({**default_config(), "num_clients": 4, "clients_per_round": 4})
    fed = Federation(4, 4, (10, 10, 10, 10), 10, 1)
    algorithm = build_algorithm({**cfg, "algorithm": "fedindep"}, fed)
    initial = {"w": torch.zeros(2, 2)}
    algorithm.setup(initial)
    strategy = AlgorithmStrategy(algorithm, seed=1, reference=initial)
    strategy.plan = plan_round(algorithm, 0, clients=[0, 1, 2, 3])

    def good(slot, value):
        return _reply(encode_result(TrainResult(slot, slot, {"w": torch.full((2, 2), value)}, 10, 0.5)))

    replies = [
        good(2, 2.0),
        _reply(error="ClientApp raised RuntimeError"),                                   # crashed
        _reply(RecordDict()),                                                            # malformed
        _reply(encode_result(TrainResult(1, 1, {"w": torch.full((2, 2), math.nan)}, 10))),  # NaN
        _reply(encode_result(TrainResult(3, 0, {"w": torch.ones(2, 2)}, 10))),            # wrong client for slot 0
        good(2, 5.0),                                                                    # second result for slot 2
    ]
    results, refused, missing = strategy.accepted(replies)
    assert [r.slot for r in results] == [2] and refused == 5 and missing == 0
    strategy.aggregate_train(1, [good(0, 1.0)])
    counts = {k: v for k, v in strategy.last_round.items() if not k.endswith("_mb")}
    assert counts == {"clients": 1, "rejected": 0, "dropped": 3, "train_loss": 0.5}
    # received: the arrays of every reply that came back, sound or not (the crashed and the empty
    # one carry none): 5 models of 16 bytes
    assert strategy.last_round["up_mb"] == pytest.approx(5 * 16 / 2**20)
    pool = algorithm.server_state()["pool.w"]
    assert torch.equal(pool[0], torch.ones(2, 2)) and torch.equal(pool[1], torch.zeros(2, 2))


def test_injected_fault_spec():
    from fedmr.flower.client_app import injected_fault

    assert injected_fault("2:0:crash, 3:1:nan", 1, 0) == "crash"
    assert injected_fault("2:0:crash, 3:1:nan", 2, 1) == "nan"
    assert injected_fault("2:0:crash", 0, 0) is None
    assert injected_fault("", 0, 0) is None


def test_tools_present():
    assert shutil.which("ss"), "the loopback checks need `ss` (iproute2)"
    for tool in ("flwr", "flower-superlink", "flower-supernode"):
        assert (BIN / tool).exists(), tool


def test_committed_manifest_is_the_generated_one():
    """flower_app/pyproject.toml is derived from the declarations (config.DEFAULTS, each algorithm's
    Options, FLOWER_DEFAULTS); regenerate it with `python -m fedmr.flower.manifest flower_app/pyproject.toml`."""
    from fedmr.flower.manifest import manifest_text

    assert (APP_DIR / "pyproject.toml").read_text() == manifest_text(), \
        "flower_app/pyproject.toml is stale: run python -m fedmr.flower.manifest flower_app/pyproject.toml"
    declared = read_toml(APP_DIR / "pyproject.toml")["tool"]["flwr"]["app"]["config"]
    assert {k: v for k, v in declared.items() if k != "flower" and v != {}} == \
        {k: v for k, v in default_config().items() if v != {}}


def test_flower_evaluation_writes_the_simulators_rows(tmp_path):
    """The ServerApp's evaluate_fn hands each round to the simulator's Recorder: the same columns
    with the same values (client_state_mb included) as `fedmr run`, for the same rounds."""
    import csv

    from fedmr.config import load_config
    from fedmr.engine import Simulation, prepare
    from fedmr.engine.recorder import Recorder
    from fedmr.flower.server_app import CentralEvaluation
    from fedmr.results import RunWriter

    cfg = load_config(None, ["algorithm=scaffold", "num_clients=6", "clients_per_round=3", "rounds=3", "local_epochs=1",
                             "eval_every=2", "workers=1"])
    exp = prepare(cfg)
    Simulation(exp, out_dir=tmp_path / "sim", progress="none").run()
    trainer = Simulation(exp, progress="none")  # trains each round as the strategy's clients would
    recorder = Recorder(cfg, exp, trainer.algorithm, RunWriter(tmp_path / "flower"))
    strategy = SimpleNamespace(rounds_before=recorder.start(), last_round={}, last_eval={})  # no federated evaluation
    evaluate = CentralEvaluation(recorder, strategy)
    assert evaluate(0, None) is None
    for r in range(cfg["rounds"]):
        strategy.last_round = trainer.run_round(r)
        record = evaluate(r + 1, None)
        assert (record is None) == (r + 1 == 1)
    recorder.finish({"engine": "flower"})

    def table(folder):
        with (folder / "metrics.csv").open() as fh:
            reader = csv.DictReader(fh)
            return reader.fieldnames, [{k: v for k, v in row.items() if k != "elapsed_s"} for row in reader]

    sim_header, sim_rows = table(tmp_path / "sim")
    flower_header, flower_rows = table(tmp_path / "flower")
    assert flower_header == sim_header
    assert flower_rows == sim_rows and [r["round"] for r in sim_rows] == ["2", "3"]
    assert all(float(r["client_state_mb"]) > 0 for r in flower_rows)


def test_federated_evaluation_weighs_by_examples_and_refuses_unweighted_replies(monkeypatch, caplog):
    from flwr.app import ArrayRecord, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmr.algorithms import Federation, build_algorithm
    from fedmr.config import validate
    from fedmr.flower.strategy import AlgorithmStrategy

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):  # what a ServerApp process sets
        monkeypatch.setattr(TaskIdentity, name, value)
    cfg = validate({**default_config(), "num_clients": 4, "clients_per_round": 2})
    algorithm = build_algorithm({**cfg, "algorithm": "fedavg"}, Federation(4, 2, (5, 5, 5, 5), 10, 1))
    strategy = AlgorithmStrategy(algorithm, seed=1, reference={}, fraction_evaluate=0.5,  # the Recorder's schedule:
                                 evaluation_due=lambda done: done % 2 == 0 or done == 5)  # eval_every 2, rounds 5
    strategy.node_of = {0: 10, 1: 11, 2: 12, 3: 13}
    arrays = ArrayRecord({"w": torch.zeros(2)})
    assert list(strategy.configure_evaluate(1, arrays, None, None)) == []  # not an evaluation round
    sent = list(strategy.configure_evaluate(2, arrays, None, None))
    assert len(sent) == 2 and len({m.metadata.dst_node_id for m in sent}) == 2
    assert list(strategy.configure_evaluate(5, arrays, None, None)), "the last round is always evaluated"

    def answer(node, **metrics):
        return _reply(RecordDict({"metrics": MetricRecord(metrics)}), node=node)

    replies = [answer(10, accuracy=0.5, loss=1.0, **{"num-examples": 30}),
               answer(11, accuracy=1.0, loss=0.0, **{"num-examples": 10}),
               answer(12, accuracy=0.0, loss=9.0),  # no "num-examples": left out, logged
               _reply(error="ClientApp raised DataError", node=13)]
    with caplog.at_level("WARNING", logger="fedmr.flower"):
        record = strategy.aggregate_evaluate(2, replies)
    assert record["fed_accuracy"] == pytest.approx(0.625) and record["fed_loss"] == pytest.approx(0.75)
    assert strategy.last_eval == {"fed_accuracy": 0.625, "fed_loss": 0.75, "fed_examples": 40}
    assert any('evaluation reply of node 12: no "num-examples"' in r.getMessage() for r in caplog.records)
    assert any("node 13 failed to evaluate" in r.getMessage() for r in caplog.records)


def test_sites_keep_their_client_ids_when_supernodes_restart_with_new_node_ids():
    from fedmr.flower.strategy import site_order

    def info(path, n, counts):
        return {"data-dir": path, "num-examples": n, "label-counts": counts}

    held = [info("/srv/b", 40, [20, 20]), info("/srv/a", 30, [10, 20]), info("/srv/c", 50, [25, 25]),
            info("/srv/a", 30, [20, 10])]  # two machines that name their folder alike
    first = site_order({101: held[0], 7: held[1], 55: held[2], 9: held[3]})
    restarted = site_order({3: held[0], 999: held[1], 12: held[2], 500: held[3]})  # new random node ids
    assert [s[1] for s in first] == [s[1] for s in restarted] == [held[1], held[3], held[0], held[2]]
    # only sites holding exactly the same are told apart by node id
    assert [n for n, _ in site_order({8: held[0], 2: dict(held[0])})] == [2, 8]


def test_a_plugin_the_superlink_cannot_import_names_the_superlinks_environment():
    """The ServerApp imports plug-ins in the SuperLink's environment, which for a managed local SuperLink
    is that of the first `flwr run`: the error says so, and how to restart it (docs/flower.md)."""
    from fedmr.config import load_config
    from fedmr.errors import ConfigError, PluginError
    from fedmr.flower.server_app import in_flower

    with pytest.raises(PluginError) as caught:
        load_config(None, ["model=\"not_on_the_path_anywhere:mlp\""])
    message = str(in_flower(caught.value))
    assert message.startswith("config key 'model': cannot import module 'not_on_the_path_anywhere'; is it on PYTHONPATH?")
    assert "SuperLink's environment" in message and "pgrep -af flower-superlink" in message
    other = ConfigError("config key 'rounds' must be at least 1, got 0")
    assert in_flower(other) is other
