"""Worker processes: same models as the sequential path, timeouts, errors and clean shutdown."""

import copy
import os
import signal
import time

import pytest
import torch

from fedmr.algorithms import Federation
from fedmr.algorithms.base import TrainTask
from fedmr.algorithms.fedavg import FedAvg
from fedmr.config import load_config
from fedmr.engine import Simulation, prepare
from fedmr.engine.client import ClientData
from fedmr.engine.parallel import ProcessPoolRunner, WorkerError, _dumps, owned
from fedmr.engine.runner import SequentialRunner
from fedmr.maths import replicate, slot, state_nbytes
from fedmr.models import CNN
from fedmr.training import LocalSettings, clone_state

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["num_clients=8", "clients_per_round=4", "rounds=1", "local_epochs=1", "eval_every=1"]


@pytest.fixture(scope="module")
def experiment():
    return prepare(load_config(None, TINY))


def simulate(experiment, *settings):
    exp = copy.copy(experiment)
    exp.cfg = load_config(None, [*TINY, *settings])
    sim = Simulation(exp, progress="none")
    return sim, sim.run()


def test_worker_processes_give_the_sequential_models(experiment):
    seq_sim, seq = simulate(experiment, "workers=1")
    par_sim, par = simulate(experiment, "workers=2")
    assert isinstance(seq_sim.runner, SequentialRunner)
    assert isinstance(par_sim.runner, ProcessPoolRunner)
    for key, value in seq.final_state.items():
        torch.testing.assert_close(par.final_state[key], value, rtol=1e-4, atol=1e-5)
    assert par.rows[-1]["accuracy"] == pytest.approx(seq.rows[-1]["accuracy"], abs=0.01)


class Scripted(FedAvg):
    """A task's payload may ask its client to sleep or to raise."""

    def local_update(self, model, task, x, y, settings, generator):
        started = time.monotonic()  # one clock for every process on the machine
        time.sleep(task.payload.get("sleep", 0))
        if task.payload.get("fail"):
            raise ValueError("scripted failure")
        result = super().local_update(model, task, x, y, settings, generator)
        result.payload["pid"] = os.getpid()
        result.payload["started"] = started
        return result


def small_setup(**script):
    torch.manual_seed(0)
    x = torch.randn(40, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (40,))
    data = ClientData(x, y, [list(range(i * 10, i * 10 + 10)) for i in range(4)])
    algorithm = Scripted({}, Federation(4, 4, (10,) * 4, 10, 1))
    model = CNN()
    tasks = [TrainTask(c, c, clone_state(model), dict(script) if c == script.get("client") else {}) for c in range(4)]
    return algorithm, model, data, LocalSettings(epochs=1, batch_size=5), tasks


def test_a_client_past_the_timeout_is_dropped_and_the_pool_recovers(caplog):
    # The timeout (10 s) is far above what a 10-sample client needs even on a crowded machine (and
    # covers a worker still starting up), and far below the stuck client's sleep (600 s): the round
    # ending well before the sleep would is what proves the stuck client was not waited for.
    algorithm, model, data, settings, tasks = small_setup(client=1, sleep=600)
    runner = ProcessPoolRunner(algorithm, model, data, settings, seed=1, workers=2, client_timeout=10.0)
    try:
        start = time.monotonic()
        with caplog.at_level("WARNING", logger="fedmr"):
            results = list(runner.run(0, tasks))
        assert time.monotonic() - start < 300
        assert [r.client_id for r in results] == [0, 2, 3]
        assert "client 1 ran past client_timeout" in caplog.text
        assert len({r.payload["pid"] for r in results} - {os.getpid()}) >= 1  # trained elsewhere
        assert len(runner._workers) == 2 and all(w.process.is_alive() for w in runner._workers)
        assert [r.client_id for r in runner.run(1, tasks[:1] + tasks[2:])] == [0, 2, 3]
    finally:
        runner.close()


def test_workers_take_the_largest_clients_first_and_results_keep_task_order():
    torch.manual_seed(0)
    sizes = [3, 12, 6, 9]
    x = torch.randn(30, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    cuts = [0, 3, 15, 21, 30]
    data = ClientData(x, torch.randint(0, 10, (30,)), [list(range(cuts[i], cuts[i + 1])) for i in range(4)])
    assert data.sizes() == sizes
    algorithm = Scripted({}, Federation(4, 4, tuple(sizes), 10, 1))
    model = CNN()
    tasks = [TrainTask(c, c, clone_state(model), {}) for c in range(4)]
    runner = ProcessPoolRunner(algorithm, model, data, LocalSettings(epochs=1, batch_size=5), seed=1, workers=1)
    try:
        results = list(runner.run(0, tasks))
    finally:
        runner.close()
    assert [r.client_id for r in results] == [0, 1, 2, 3]
    trained = sorted(results, key=lambda r: r.payload["started"])
    assert [r.client_id for r in trained] == [1, 3, 2, 0]


def test_a_failing_client_raises_and_close_stops_every_worker():
    algorithm, model, data, settings, tasks = small_setup(client=2, fail=True)
    runner = ProcessPoolRunner(algorithm, model, data, settings, seed=1, workers=2)
    with pytest.raises(WorkerError, match="client 2: ValueError: scripted failure"):
        list(runner.run(0, tasks))
    processes = [w.process for w in runner._workers]
    runner.close()
    assert processes and not any(p.is_alive() for p in processes)


def test_an_abandoned_round_stops_busy_workers_and_the_next_round_works():
    # stuck for far longer than client 0 needs, even on a loaded machine; it is stopped, so the sleep costs nothing
    algorithm, model, data, settings, tasks = small_setup(client=1, sleep=600)
    runner = ProcessPoolRunner(algorithm, model, data, settings, seed=1, workers=2)
    try:
        rounds = runner.run(0, tasks)
        assert next(rounds).client_id == 0
        busy = [w.process for w in runner._workers if w.slot is not None]
        rounds.close()  # what an exception or Ctrl-C in the server does to the generator
        assert busy and not any(p.is_alive() for p in busy)
        tasks[1].payload.clear()
        assert [r.client_id for r in runner.run(1, tasks)] == [0, 1, 2, 3]
    finally:
        runner.close()


def test_workers_ignore_ctrl_c_the_parent_stops_them():
    algorithm, model, data, settings, tasks = small_setup()
    runner = ProcessPoolRunner(algorithm, model, data, settings, seed=1, workers=1)
    try:
        assert len(list(runner.run(0, tasks))) == 4
        worker = runner._workers[0].process
        os.kill(worker.pid, signal.SIGINT)
        assert len(list(runner.run(1, tasks))) == 4
        assert worker.is_alive()
    finally:
        runner.close()
    assert not worker.is_alive()


def test_a_task_sends_one_model_not_the_pool_nor_the_data():
    state = clone_state(CNN())
    pool = replicate(state, 10)
    task = TrainTask(3, 3, slot(pool, 3))
    message = len(_dumps((0, owned(task))))
    assert state_nbytes(state) < message < 1.2 * state_nbytes(state) + 4096


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="needs Linux /proc")
def test_workers_die_with_a_sigkilled_simulator(tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "fedmr.cli", "run", "--quiet", "--out", str(tmp_path / "run"),
           "--set", "workers=2", "--set", "rounds=500", "--set", "num_clients=10",
           "--set", "clients_per_round=4", "--set", "local_epochs=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300  # a hang guard: starting Python, torch and two workers, on a loaded machine
        workers = []
        while time.monotonic() < deadline and len(workers) < 2 and proc.poll() is None:
            workers = _children(proc.pid)
            time.sleep(0.1)
        assert len(workers) == 2, "the run never started its two workers"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)  # hang guards: a SIGKILLed process and its PDEATHSIG'd workers die as soon as they run
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "workers outlived their SIGKILLed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for w in _children(proc.pid):
            os.kill(w, 9)
