"""``precision = "bf16"``: mixed-precision local training on any CPU (emulated where the CPU has no
bf16 units, so these tests run everywhere), fp32 everywhere the server looks; and the allocator
setting that keeps the training step's buffers, read back in the processes that train."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch import nn

import fedmr
from fedmr.algorithms import Federation
from fedmr.algorithms.base import TrainResult, TrainTask
from fedmr.algorithms.fedavg import FedAvg
from fedmr.allocator import keep_freed_memory, refaulted_fraction, user_tuned
from fedmr.engine.client import ClientData
from fedmr.engine.parallel import ProcessPoolRunner
from fedmr.models import build_model
from fedmr.seeding import torch_generator
from fedmr.training import LocalSettings, autocast, evaluate, train_sgd

SMALL = {"num_clients": 8, "clients_per_round": 4, "rounds": 2, "eval_every": 1, "local_epochs": 1, "seed": 2}


class PlugIn(nn.Module):
    """A user's model: no FLModel base, a LayerNorm and a GELU."""

    def __init__(self, num_classes: int, input_shape: tuple[int, ...]):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(int(torch.tensor(input_shape).prod()), 64), nn.LayerNorm(64),
                                 nn.GELU(), nn.Linear(64, num_classes))

    def forward(self, x):
        return self.net(x)


def _model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "plugin":
        return PlugIn(10, (3, 32, 32))
    return build_model(name, 10, 3, 32).to(memory_format=torch.channels_last)


@pytest.mark.parametrize("name", ["cnn", "resnet20", "plugin"])
def test_bf16_training_learns_and_keeps_the_state_fp32(name):
    """The loss falls, by about what fp32 training of the same model on the same batches gains (the
    reference is computed here, on this CPU); the weights and BatchNorm statistics stay fp32."""
    torch.manual_seed(1)
    x = torch.randn(40, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (40,))
    drops = {}
    for precision in ("fp32", "bf16"):
        model = _model(name)
        dtypes = {k: v.dtype for k, v in model.state_dict().items()}
        _, before = evaluate(model, x, y)
        settings = LocalSettings(epochs=10, batch_size=20, lr=0.05, momentum=0.9, precision=precision)
        train_sgd(model, x, y, settings, torch_generator(0, "test"))
        drops[precision] = before - evaluate(model, x, y)[1]
        assert {k: v.dtype for k, v in model.state_dict().items()} == dtypes  # fp32 weights, BN statistics
        assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())
    assert drops["bf16"] > 0.05, drops  # it learns (ResNet-20, the slowest here, drops by about 0.09)
    assert drops["bf16"] == pytest.approx(drops["fp32"], rel=0.2), drops  # as fp32 does, to bf16's rounding


def test_the_forward_pass_runs_in_bf16_and_fp32_is_untouched():
    model, x = _model("cnn"), torch.randn(4, 3, 32, 32)
    with autocast("bf16", x.device):
        assert model(x).dtype == torch.bfloat16
    with autocast("fp32", x.device):
        assert model(x).dtype == torch.float32


@pytest.mark.parametrize("algorithm, extra", [("fedmr", {}), ("scaffold", {}), ("fedavg", {"vectorize": True}),
                                              ("moon", {"workers": 2})])
def test_every_server_side_tensor_stays_fp32_in_bf16_runs(tmp_path, algorithm, extra):
    result = fedmr.run({**SMALL, "algorithm": algorithm, "precision": "bf16", **extra}, out=tmp_path / "run",
                       progress="none")
    assert result.config["precision"] == "bf16"
    assert 'precision = "bf16"' in (tmp_path / "run" / "config.toml").read_text()
    assert all(v.dtype == torch.float32 for v in result.final_state.values() if v.is_floating_point())
    from safetensors.torch import load_file

    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("*.safetensors"))
    assert checkpoints
    tensors = load_file(str(checkpoints[-1]))
    floating = {k: v.dtype for k, v in tensors.items() if v.is_floating_point()}
    assert floating and set(floating.values()) == {torch.float32}, floating


def test_fp32_is_the_default_and_changes_nothing():
    assert LocalSettings().precision == "fp32"
    assert fedmr.run(dict(SMALL, workers=1), progress="none").config["precision"] == "fp32"


def test_a_bad_precision_is_one_line_and_exit_2(tmp_path):
    run = subprocess.run([sys.executable, "-c", "from fedmr.cli import main; raise SystemExit(main())", "run",
                          "--set", "precision=fp16", "--out", str(tmp_path / "x")], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "fedmr: error: config key 'precision' must be \"fp32\" or \"bf16\", got 'fp16' (did you mean 'bf16'?)"]
    assert not (tmp_path / "x").exists()


def test_a_resume_refuses_to_change_the_precision(tmp_path):
    out = tmp_path / "run"
    fedmr.run({**SMALL, "workers": 1}, out=out, progress="none")
    with pytest.raises(fedmr.FedMRError, match="precision"):
        fedmr.run({**SMALL, "workers": 1, "rounds": 3, "precision": "bf16"}, out=out, resume=True, progress="none")


def test_a_checkpoint_written_before_precision_existed_resumes_as_fp32():
    from fedmr.engine.checkpoint import _mismatch

    current = {"config": {"seed": 1, "precision": "fp32"}, "partition_sha256": "p", "initial_model_sha256": "m"}
    saved = {"config": {"seed": 1}, "partition_sha256": "p", "initial_model_sha256": "m"}
    assert _mismatch(saved, current) is None
    bf16 = {**current, "config": {"seed": 1, "precision": "bf16"}}
    assert _mismatch(saved, bf16) == "config key 'precision' was 'fp32', now 'bf16'"


def test_emulated_bf16_is_said_once(monkeypatch, caplog):
    import fedmr.engine.experiment as experiment

    monkeypatch.setattr(experiment, "bf16_is_native", lambda device: False)
    with caplog.at_level(logging.WARNING, logger="fedmr"):
        fedmr.run({**SMALL, "workers": 1, "rounds": 1, "precision": "bf16"}, progress="none")
    said = [r.getMessage() for r in caplog.records if "emulated" in r.getMessage()]
    assert said == ['precision = "bf16": this CPU has no native bf16 units, so bf16 is emulated here and slower '
                    'than fp32']


# ---- the allocator: read back in the processes that train -----------------------------------------
class ReportsRefaults(FedAvg):
    """FedAvg whose clients report, as their training loss, how much of a repeated burst of large
    allocations faults again in the process that trained them (after training, as the next step would)."""

    name = "reports-refaults"

    def local_update(self, model, task, x, y, settings, generator) -> TrainResult:
        result = super().local_update(model, task, x, y, settings, generator)
        result.train_loss = refaulted_fraction()
        return result


@pytest.mark.skipif(user_tuned(), reason="the environment sets glibc's malloc thresholds (or FEDMR_MALLOC=system)")
def test_worker_processes_keep_freed_memory():
    if not keep_freed_memory():
        pytest.skip("not glibc: the allocator setting does not apply")
    torch.manual_seed(0)
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    data = ClientData(x, y, [list(range(12)), list(range(12, 24))])
    model = _model("cnn")
    algorithm = ReportsRefaults({}, Federation(2, 2, (12, 12), 10, 1))
    runner = ProcessPoolRunner(algorithm, model, data, LocalSettings(epochs=1, batch_size=6), seed=0, workers=2)
    try:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        results = list(runner.run(0, [TrainTask(0, 0, state), TrainTask(1, 1, state)]))
    finally:
        runner.close()
    assert len(results) == 2
    assert all(r.train_loss < 0.05 for r in results), [r.train_loss for r in results]


def test_without_the_setting_the_probe_sees_the_refaults():
    """The probe can fail: with glibc's defaults (FEDMR_MALLOC=system) the same burst faults again."""
    code = ("from fedmr.allocator import keep_freed_memory, refaulted_fraction; import sys; "
            "ok = keep_freed_memory(); print(ok, refaulted_fraction())")
    env = {"FEDMR_MALLOC": "system", "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    ok, fraction = run.stdout.split()
    assert ok == "False"
    if keep_freed_memory():  # glibc
        assert float(fraction) > 0.5
