"""PyTorch's own test samples through torch_ext (the goal: every PyTorch OpInfo / ModuleInfo
sample still passes).

For each torch.nn.functional loss torch_ext replaces, every sample input of its OpInfo
(torch.testing._internal.common_methods_invocations.op_db: the shapes, dtypes, targets and
keyword arguments PyTorch tests itself with, linear_cross_entropy's chunked variants with their
LinearCrossEntropyOptions included) goes through torch_ext's function with the same arguments:
the output, and the gradient of every input that requires grad, must equal PyTorch's; where
PyTorch raises, torch_ext raises too. The same for every ModuleInfo sample of the loss modules
(torch.testing._internal.common_modules.module_db): the module built from the sample's constructor
arguments (LinearCrossEntropyLoss with PyTorch's module's parameters loaded), called on its forward
arguments. float32 and float64, CPU.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import torch_ext
from utils import assert_close

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

common_methods_invocations = pytest.importorskip("torch.testing._internal.common_methods_invocations")
common_modules = pytest.importorskip("torch.testing._internal.common_modules")

FUNCTIONS = {
    "nn.functional.cross_entropy": torch_ext.cross_entropy,
    "nn.functional.mse_loss": torch_ext.mse_loss,
    "nn.functional.huber_loss": torch_ext.huber_loss,
    "nn.functional.smooth_l1_loss": torch_ext.smooth_l1_loss,
    "nn.functional.triplet_margin_loss": torch_ext.triplet_margin_loss,
    "nn.functional.linear_cross_entropy": torch_ext.linear_cross_entropy,
}
MODULES = {
    "CrossEntropyLoss": torch_ext.CrossEntropyLoss,
    "MSELoss": torch_ext.MSELoss,
    "HuberLoss": torch_ext.HuberLoss,
    "SmoothL1Loss": torch_ext.SmoothL1Loss,
    "TripletMarginLoss": torch_ext.TripletMarginLoss,
    "LinearCrossEntropyLoss": torch_ext.LinearCrossEntropyLoss,
}
DTYPES = (torch.float32, torch.float64)
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-7, atol=1e-7)}

OPINFOS = [op for op in common_methods_invocations.op_db if op.name in FUNCTIONS]
MODULEINFOS = [m for m in common_modules.module_db if m.module_cls.__name__ in MODULES]


def _id(op) -> str:
    return op.name.replace("nn.functional.", "") + (f".{op.variant_test_name}" if op.variant_test_name else "")


def test_every_loss_has_pytorch_samples():
    # The check is not empty: PyTorch has OpInfos for every function and ModuleInfos for the modules.
    have = {op.name for op in OPINFOS}
    assert have == set(FUNCTIONS), sorted(set(FUNCTIONS) - have)
    assert {"CrossEntropyLoss", "MSELoss", "HuberLoss", "SmoothL1Loss"} <= {m.module_cls.__name__ for m in MODULEINFOS}


def _tensors(args, kwargs):
    return [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]


def _run(fn, args, kwargs, grad_seed: int, params=()):
    """(output or the exception, gradients of the float inputs that require grad and of params)."""
    leaves = []

    def fresh(a):
        if torch.is_tensor(a) and a.is_floating_point() and a.requires_grad:
            a = a.detach().clone().requires_grad_()
            leaves.append(a)
        return a

    args = [fresh(a) for a in args]
    kwargs = {k: fresh(v) for k, v in kwargs.items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # PyTorch's notes on ignored options
            out = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 (compared with PyTorch's below)
        return e, None
    wrt = leaves + list(params)
    if not wrt or not out.requires_grad:
        return out.detach(), []
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(grad_seed), device="cpu")
    g = g.to(out.device)
    grads = torch.autograd.grad(out, wrt, g, allow_unused=True)
    return out.detach(), list(grads)


def _compare(ref, got, what, tol):
    ref_out, ref_grads = ref
    got_out, got_grads = got
    if isinstance(ref_out, Exception):
        assert isinstance(got_out, Exception), f"{what}: PyTorch raises {ref_out!r}, torch_ext returns {got_out!r}"
        return
    assert not isinstance(got_out, Exception), f"{what}: torch_ext raises {got_out!r}, PyTorch does not"
    assert_close(got_out, ref_out, equal_nan=True, msg=f"{what}: output", **tol)
    assert len(got_grads) == len(ref_grads), what
    for i, (g, r) in enumerate(zip(got_grads, ref_grads)):
        if r is None:
            assert g is None or not g.any(), f"{what}: gradient {i}"
            continue
        assert_close(g, r, equal_nan=True, msg=f"{what}: gradient {i}", **tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPINFOS, ids=_id)
def test_opinfo_samples(op, dtype):
    ours = FUNCTIONS[op.name]
    samples = list(op.sample_inputs(torch.get_default_device(), dtype, requires_grad=True))
    assert samples, _id(op)
    for i, s in enumerate(samples):
        args, kwargs = [s.input, *s.args], dict(s.kwargs)
        what = f"{_id(op)} sample {i} ({dtype}; shapes {[tuple(t.shape) for t in _tensors(args, kwargs)]}, {kwargs})"
        _compare(_run(op.op, args, kwargs, i), _run(ours, args, kwargs, i), what, TOL[dtype])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("info", MODULEINFOS, ids=lambda m: m.module_cls.__name__)
def test_moduleinfo_samples(info, dtype, training):
    name = info.module_cls.__name__
    device = torch.get_default_device()
    inputs = info.module_inputs_func(info, device=device, dtype=dtype, requires_grad=True, training=training)
    assert inputs, name
    for i, mi in enumerate(inputs):
        if mi.forward_input is None:
            continue
        c, f = mi.constructor_input, mi.forward_input
        what = f"{name} sample {i} ({mi.desc}, {dtype}, {c.kwargs})"
        torch.manual_seed(i)
        theirs = info.module_cls(*c.args, **c.kwargs).to(dtype).train(training)
        ours = MODULES[name](*c.args, **c.kwargs).to(dtype).train(training)
        ours.load_state_dict(theirs.state_dict())
        assert [n for n, _ in theirs.named_parameters()] == [n for n, _ in ours.named_parameters()], what
        # inputs' gradients, then the parameters' (LinearCrossEntropyLoss's linear.weight / bias)
        _compare(_run(theirs, f.args, f.kwargs, i, list(theirs.parameters())),
                 _run(ours, f.args, f.kwargs, i, list(ours.parameters())), what, TOL[dtype])
