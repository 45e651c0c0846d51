"""Shared pytest fixtures of the torch_ext test suite."""
import os
import sys
import zlib

import pytest
import torch

from devices import CPU_CHOSEN, DEVICES


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "every_device: run each test of the module once per device, that device being torch's default"
    )
    config.addinivalue_line("markers", "cpu_only(reason): a test of the CPU runtime, run once, on the CPU")
    _share_cores_between_workers()


def pytest_generate_tests(metafunc):
    """Tests of an every_device module (see tests/devices.py) get one case per device."""
    if metafunc.definition.get_closest_marker("every_device") is None:
        return
    if metafunc.definition.get_closest_marker("cpu_only") is None:
        metafunc.parametrize("on_device", DEVICES, indirect=True)


def pytest_collection_modifyitems(config, items):
    _keep_this_shard(config, items)
    if CPU_CHOSEN:
        return
    skip = pytest.mark.skip(reason="a CPU-only test, and TORCH_EXT_TEST_DEVICES leaves the CPU out")
    for item in items:
        if item.get_closest_marker("every_device") is not None and item.get_closest_marker("cpu_only") is not None:
            item.add_marker(skip)


def _keep_this_shard(config, items):
    """TORCH_EXT_TEST_SHARD="k/n" (0 <= k < n) keeps the tests whose id hashes to k modulo n, so
    that n runs too short for the whole suite (a borrowed GPU's minutes) cover it together. The
    hash is of the test's id (crc32), the same in every process and run."""
    shard = os.environ.get("TORCH_EXT_TEST_SHARD", "").strip()
    if not shard:
        return
    k, _, n = shard.partition("/")
    if not (k.isdigit() and n.isdigit() and int(k) < int(n)):
        raise pytest.UsageError(f"TORCH_EXT_TEST_SHARD must be k/n with 0 <= k < n; got {shard!r}")
    k, n = int(k), int(n)
    keep, drop = [], []
    for item in items:
        (keep if zlib.crc32(item.nodeid.encode()) % n == k else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


@pytest.fixture(autouse=True)
def on_device(request):
    """torch's default device for the test: its `on_device` parameter in an every_device module,
    else unchanged. The CPU case runs under `torch.device("cpu")` too, so that what the device
    context does (a torch function mode) is exercised on every machine."""
    device = getattr(request, "param", None)
    if device is None:
        yield None
        return
    with torch.device(device):
        yield device


def _share_cores_between_workers():
    """Under pytest-xdist (the README runs `pytest -n auto`), each worker takes its share of the
    cores for torch's threads, rather than every worker all of them: most tests are small and
    single-threaded, and the workers together should not oversubscribe the machine."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, torch.get_num_threads() // workers))


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


# The loss modules whose eager path forms the gradients in the forward op (their grad_mask) for
# reductions mean and sum, switched by their GRAD_IN_FORWARD_DEVICES.
GRAD_IN_FORWARD_MODULES = ("torch_ext.cross_entropy", "torch_ext.regression_loss")


@pytest.fixture
def set_config():
    """torch_ext.set_config for one test: every switch is restored after it."""
    import torch_ext

    saved = torch_ext.get_config()
    yield torch_ext.set_config
    torch_ext.set_config(**saved)


@pytest.fixture(params=[False, True], ids=["fwd_bwd", "grad_in_forward"])
def grad_in_forward(request, monkeypatch):
    """Runs a test on both eager paths of the losses: the gradients formed in the forward op and
    handed over by backward (the default for reductions mean and sum), and forward and backward
    apart (what compiled graphs and reduction none use), each switched on for every device."""
    import torch_ext  # noqa: F401  (the modules below)

    devices = frozenset({"cpu", "cuda"}) if request.param else frozenset()
    for name in GRAD_IN_FORWARD_MODULES:
        monkeypatch.setattr(sys.modules[name], "GRAD_IN_FORWARD_DEVICES", devices)
    return request.param
