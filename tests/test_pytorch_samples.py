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
arguments. Every float dtype PyTorch declares for the op or module (float32, float64, and
bfloat16 / float16 where it declares them), on every device (tests/devices.py). In bfloat16 and
float16 PyTorch's run in that dtype says whether it raises and what dtypes come out; the values
are compared with its float32 run on the same values (as in the family files: the two
low-precision results each carry their own rounding).
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch

import torch_ext
from utils import assert_close, reference_dtype

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

# PyTorch's test helpers import expecttest (the test extra installs it): imported plainly, so that
# a missing package fails the run rather than skipping the whole file.
from torch.testing._internal import common_methods_invocations, common_modules  # noqa: E402

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


def _id(op) -> str:
    return op.name.replace("nn.functional.", "") + (f".{op.variant_test_name}" if op.variant_test_name else "")


# Compared at utils.tolerance(dtype), as in the family files.
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)

OPINFOS = [op for op in common_methods_invocations.op_db if op.name in FUNCTIONS]
MODULEINFOS = [m for m in common_modules.module_db if m.module_cls.__name__ in MODULES]
# Each with the dtypes PyTorch declares for it (its OpInfo's for the CPU, its ModuleInfo's).
OPINFO_CASES = [
    pytest.param(op, dtype, id=f"{_id(op)}-{str(dtype)[6:]}")
    for op in OPINFOS for dtype in DTYPES if dtype in op.supported_dtypes("cpu")
]
MODULEINFO_CASES = [
    pytest.param(info, dtype, id=f"{info.module_cls.__name__}-{str(dtype)[6:]}")
    for info in MODULEINFOS for dtype in DTYPES if dtype in info.dtypes
]


def test_every_loss_has_pytorch_samples():
    # The check is not empty: PyTorch has OpInfos for every function and ModuleInfos for the modules.
    have = {op.name for op in OPINFOS}
    assert have == set(FUNCTIONS), sorted(set(FUNCTIONS) - have)
    assert {"CrossEntropyLoss", "MSELoss", "HuberLoss", "SmoothL1Loss"} <= {m.module_cls.__name__ for m in MODULEINFOS}


def _tensors(args, kwargs):
    return [a for a in list(args) + list(kwargs.values()) if torch.is_tensor(a)]


def _upcast(a):
    """A reduced-precision float tensor in its reference dtype (the same values), a leaf as the
    sample's was."""
    if torch.is_tensor(a) and a.is_floating_point() and reference_dtype(a.dtype) != a.dtype:
        return a.detach().to(reference_dtype(a.dtype)).requires_grad_(a.requires_grad)
    return a


def _run(fn, args, kwargs, grad_seed: int, params=(), upcast: bool = False):
    """(output or the exception, gradients of the float inputs that require grad and of params).
    upcast: the reduced-precision tensors of the sample go in as float32, and the output's
    gradient holds the same values as in the run without (drawn, then rounded to the sample's
    dtype)."""
    leaves = []

    def fresh(a):
        if torch.is_tensor(a) and a.is_floating_point() and a.requires_grad:
            a = a.detach().clone().requires_grad_()
            leaves.append(a)
        return a

    sample_dtype = next((a.dtype for a in _tensors(args, kwargs) if a.is_floating_point()), None)
    if upcast:
        args, kwargs = [_upcast(a) for a in args], {k: _upcast(v) for k, v in kwargs.items()}
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
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), device="cpu")
    g = g.to(sample_dtype if upcast and sample_dtype is not None else out.dtype).to(out)
    grads = torch.autograd.grad(out, wrt, g, allow_unused=True)
    return out.detach(), list(grads)


def _compare(ref, got, what, dtype):
    """ref: PyTorch's run in the sample's dtype, and the values to compare with (that run's, or
    its float32 run's on the same values: see _reference); got: ours."""
    (ref_out, ref_grads), (value_out, value_grads) = ref
    got_out, got_grads = got
    if isinstance(ref_out, Exception):
        assert isinstance(got_out, Exception), f"{what}: PyTorch raises {ref_out!r}, torch_ext returns {got_out!r}"
        return
    assert not isinstance(got_out, Exception), f"{what}: torch_ext raises {got_out!r}, PyTorch does not"
    assert got_out.dtype == ref_out.dtype, f"{what}: output dtype {got_out.dtype}, PyTorch's {ref_out.dtype}"
    assert_close(got_out, value_out, dtype=dtype, equal_nan=True, check_dtype=False, msg=f"{what}: output")
    assert len(got_grads) == len(ref_grads), what
    for i, (g, r, v) in enumerate(zip(got_grads, ref_grads, value_grads)):
        if r is None:
            assert g is None or not g.any(), f"{what}: gradient {i}"
            continue
        assert g.dtype == r.dtype, f"{what}: gradient {i} dtype {g.dtype}, PyTorch's {r.dtype}"
        assert_close(g, v, dtype=dtype, equal_nan=True, check_dtype=False, msg=f"{what}: gradient {i}")


def _reference(fn, args, kwargs, grad_seed: int, dtype: torch.dtype, module: bool = False):
    """PyTorch's result for a sample: its run in the sample's dtype, or for bfloat16 / float16
    (where that run's own rounding error is as large as the one under test) its float32 run on
    the same values, after the run in the sample's dtype has shown whether PyTorch raises."""
    params = list(fn.parameters()) if module else []
    in_dtype = _run(fn, args, kwargs, grad_seed, params)
    if reference_dtype(dtype) == dtype or isinstance(in_dtype[0], Exception):
        return in_dtype, in_dtype
    if module:
        fn = copy.deepcopy(fn).to(reference_dtype(dtype))
        params = list(fn.parameters())
    return in_dtype, _run(fn, args, kwargs, grad_seed, params, upcast=True)


@pytest.mark.parametrize("op,dtype", OPINFO_CASES)
def test_opinfo_samples(op, dtype):
    ours = FUNCTIONS[op.name]
    samples = list(op.sample_inputs(torch.get_default_device(), dtype, requires_grad=True))
    assert samples, _id(op)
    for i, s in enumerate(samples):
        args, kwargs = [s.input, *s.args], dict(s.kwargs)
        what = f"{_id(op)} sample {i} ({dtype}; shapes {[tuple(t.shape) for t in _tensors(args, kwargs)]}, {kwargs})"
        _compare(_reference(op.op, args, kwargs, i, dtype), _run(ours, args, kwargs, i), what, dtype)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("info,dtype", MODULEINFO_CASES)
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
        _compare(_reference(theirs, f.args, f.kwargs, i, dtype, module=True),
                 _run(ours, f.args, f.kwargs, i, list(ours.parameters())), what, dtype)
