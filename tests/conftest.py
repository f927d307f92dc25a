import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one thread (no OpenMP barriers between small kernels, which
    cost most on a shared 2-core machine); the thread count is restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fail the test if any data set is loaded: the checks must come first."""
    def refuse(cfg):
        raise AssertionError("data were loaded before the bad input was reported")

    import fedmr.engine.experiment as experiment  # where prepare() loads the data

    monkeypatch.setattr(experiment, "load_dataset", refuse)
