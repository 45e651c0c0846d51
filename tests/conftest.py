"""Shared pytest fixtures of the torch_ext test suite."""
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same RNG state, so failures reproduce in isolation."""
    torch.manual_seed(0)
    yield


@pytest.fixture
def dynamo_reset():
    """A clean torch.compile cache before and after the test (no recompile-limit carry-over)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
