import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def float64():
    """Run a test with float64 as the default dtype (modules opt in with pytestmark)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny nets run as fast on one intra-op thread and do not stall when other jobs share a CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def torchrun():
    """Run a script of the repo as 2 gloo ranks under torchrun (`--standalone` picks a free port),
    one thread each; returns the finished process, its output captured."""

    def run(args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        return subprocess.run(
            [*cmd, *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )

    return run
