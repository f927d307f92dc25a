"""The examples under examples/ run as written (shortened to a round or two)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("name, expect", [("tabular_mlp.py", "fedmr: final accuracy"),
                                          ("image_folder.py", "final accuracy"),
                                          ("my_algorithm.py", "__main__:FedAvgM@beta=0.3: final accuracy")])
def test_example_runs(tmp_path, name, expect):
    env = {**os.environ, "FEDMR_EXAMPLE_ROUNDS": "5"}
    proc = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert expect in proc.stdout
