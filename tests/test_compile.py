"""``compile = true``: local training's full batches through torch.compile, the same arithmetic as
eager to float tolerance; a "how" key a resume and ``study run --set`` may change."""

from __future__ import annotations

import copy

import pytest
import torch

import fedmr
from fedmr.errors import ConfigError
from fedmr.models import build_model
from fedmr.seeding import torch_generator
from fedmr.training import LocalSettings, compiled, train_sgd

SMALL = {"num_clients": 8, "clients_per_round": 4, "rounds": 2, "eval_every": 1, "local_epochs": 1, "seed": 2,
         "workers": 1}


def test_compiled_training_matches_eager_and_the_short_batch_runs_eagerly():
    # in float64, so that the comparison holds on any CPU: compiled and eager kernels sum in different
    # orders (AVX2, AVX-512 and AMX each their own), which float32 would carry into every weight
    torch.manual_seed(0)
    eager = build_model("cnn", 10, 3, 32).double().to(memory_format=torch.channels_last)
    fast = copy.deepcopy(eager)
    x = torch.randn(120, 3, 32, 32, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (120,))
    torch._dynamo.utils.counters.clear()
    results = []
    for model, flag in ((eager, False), (fast, True)):  # 2 full batches of 50 and one of 20, twice
        results.append(train_sgd(model, x, y, LocalSettings(epochs=2, compile=flag), torch_generator(0, "c")))
    (loss_e, steps_e), (loss_c, steps_c) = results
    assert steps_e == steps_c == 6
    # float64 rounding differences (~1e-16 a sum) stay below 1e-9 after six steps, while a wrong step (a
    # missed update, a stale batch) moves weights by ~1e-2
    assert loss_c == pytest.approx(loss_e, rel=1e-9)
    for (name, a), b in zip(eager.state_dict().items(), fast.state_dict().values()):
        assert a.dtype == b.dtype == torch.float64 or not a.is_floating_point(), name
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12), name
    wrapper = compiled(fast)
    assert compiled(fast) is wrapper  # one compilation per model object and process
    assert list(wrapper.parameters()) == list(fast.parameters())  # it trains the model's own tensors
    assert wrapper.state_dict().keys() != fast.state_dict().keys()  # hence never saved in its place
    # one graph, for the batch of 50: the short last batch went around it (it would be a second)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_compile_is_a_how_key_a_resume_may_change(tmp_path):
    out = tmp_path / "run"
    first = fedmr.run(SMALL, out=out, progress="none")
    assert first.config["compile"] is False
    resumed = fedmr.run({**SMALL, "rounds": 3, "compile": True}, out=out, resume=True, progress="none")
    assert resumed.config["compile"] is True
    assert len(resumed.rows) == 3
    from fedmr.study.cli import HOW_KEYS

    assert "compile" in HOW_KEYS


def test_compile_with_vectorize_true_is_refused():
    with pytest.raises(ConfigError, match="compile.*vectorize = true"):
        fedmr.run({**SMALL, "compile": True, "vectorize": True}, progress="none")


def test_compile_without_a_cpp_compiler_is_one_clear_error(monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-c++-compiler",))
    with pytest.raises(ConfigError, match="compile = true needs a C\\+\\+ compiler"):
        fedmr.run({**SMALL, "compile": True}, progress="none")
