import pytest
import torch


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
