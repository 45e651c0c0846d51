"""What every op must do, checked once for all of them, on every device (tests/devices.py).

Over the samples of tests/op_samples.py (each public op, several shapes and options): the
result and gradients match PyTorch's own ops in every dtype the device takes; gradcheck in
float64; torch.library.opcheck of every torch_ext op a sample's forward and backward call (and
its forward under no_grad); torch.compile (fullgraph, aot_eager and inductor) matches eager; a
retained graph's second backward gives the same gradients; torch.func's vjp and per-sample
gradients (vmap of grad) give PyTorch's, and a loss's second derivative raises; saved-tensor hooks
(save_on_cpu, activation offloading) see every tensor held for backward; activation checkpointing (both
torch.utils.checkpoint variants) gives the same bits; non-contiguous inputs; torch.autocast (bfloat16
and float16) gives PyTorch's dtypes and values, and leaves float64 alone; double backward gives
PyTorch's second derivatives through the dense layers, cross_entropy and the regression losses, and
raises a clear error through the other losses;
an integer input (and, on a GPU, an input on another device) is refused with an error naming the
argument; torch_ext.fuse of a model with each kind of replaceable module matches the
model as written. When a GPU is present, every check runs on it too.
"""
from __future__ import annotations

import copy
import gc
import warnings
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

import torch_ext
from devices import DEVICE_DTYPES, DEVICES, cuda_only
from op_samples import CASES, FIRST_CASES, sample
from utils import assert_close, reference_dtype, tolerance

AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]
DENSE_FAMILIES = ("fused_linear", "fused_mlp")  # PyTorch's ops under torch.func (docs/api.md)
# Differentiable twice (create_graph's backward in PyTorch's ops, docs/api.md).
TWICE_DIFFERENTIABLE = DENSE_FAMILIES + ("cross_entropy", "regression_loss")


def _case_id(case):
    return "/".join(case)


def _differentiable(inputs, fixed=frozenset()):
    """The inputs as leaves: floating ones require grad, except those at the indices `fixed`."""
    return [
        t.detach().requires_grad_() if t.is_floating_point() and i not in fixed else t for i, t in enumerate(inputs)
    ]


def _recorded(fn, inputs, fixed=frozenset()):
    """(fn's output on the inputs as leaves, the leaves that require grad)."""
    leaves = _differentiable(inputs, fixed)
    return fn(*leaves), [t for t in leaves if t.requires_grad]


def _forward_backward(fn, inputs, grad_output=None, fixed=frozenset(), **grad_kwargs):
    """fn's output and the gradients of its differentiable inputs for grad_output (default: a
    seeded random one, of the output's dtype)."""
    out, wrt = _recorded(fn, inputs, fixed)
    if grad_output is None:
        grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    return out, torch.autograd.grad(out, wrt, grad_output, **grad_kwargs), grad_output


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_matches_pytorch(device, dtype, case, grad_in_forward):
    s = sample(*case, device, dtype)
    out, grads, grad_output = _forward_backward(s.fn, s.inputs, fixed=s.fixed)
    assert out.dtype == s.reference(*s.inputs).dtype, "the result's dtype differs from PyTorch's"
    up = [t.to(reference_dtype(dtype)) if t.is_floating_point() else t for t in s.inputs]
    ref, ref_grads, _ = _forward_backward(s.reference, up, grad_output.to(reference_dtype(dtype)), fixed=s.fixed)
    assert_close(out, ref, dtype=dtype, check_dtype=False, msg="result")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == dtype, f"gradient {i}: dtype {g.dtype}"
        assert_close(g, r, dtype=dtype, check_dtype=False, msg=f"gradient {i}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, case):
    s = sample(*case, device, torch.float64)
    assert torch.autograd.gradcheck(s.fn, _differentiable(s.inputs, s.fixed))


class _RecordOps(TorchDispatchMode):
    """Records every torch_ext op called, with copies of its arguments taken before the call (an
    in-place op changes them); a forward op's copies require grad where its arguments did."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "torch_ext":
            forward = func.name().endswith("_fwd")

            def copy(v):
                if not isinstance(v, torch.Tensor):
                    return v
                return v.detach().clone().requires_grad_(forward and v.requires_grad)

            self.calls.append((func, tree_map(copy, args), tree_map(copy, kwargs)))
        return func(*args, **kwargs)


def _opcheck_each_op_of(run) -> None:
    """torch.library.opcheck (schema, fake kernel, autograd registration, aot_dispatch) of every
    torch_ext op `run()` calls, with the arguments it got."""
    recorder = _RecordOps()
    with recorder:
        run()
    assert recorder.calls, "the sample called no torch_ext op"
    for func, args, kwargs in recorder.calls:
        torch.library.opcheck(func, args, kwargs)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op_called(device, case):
    # The ops a sample's eager forward and backward call.
    s = sample(*case, device, torch.float32)
    _opcheck_each_op_of(lambda: _forward_backward(s.fn, s.inputs, fixed=s.fixed))


@pytest.mark.parametrize("case", FIRST_CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op_called_under_autocast(device, case):
    # Under bfloat16 autocast the ops get 16-bit operands and, for the losses over 16-bit
    # logits, a float32 loss_dtype: the fake kernels must give the same dtypes.
    s = sample(*case, device, torch.float32)

    def run():
        with torch.autocast(device, dtype=torch.bfloat16):
            _forward_backward(s.fn, s.inputs, fixed=s.fixed)

    _opcheck_each_op_of(run)


@pytest.mark.parametrize("case", FIRST_CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_every_op_called_in_inference(device, case):
    # The same under no_grad, where the ops are called with nothing asked for backward.
    s = sample(*case, device, torch.float32)

    def run():
        with torch.no_grad():
            s.fn(*s.inputs)

    _opcheck_each_op_of(run)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("case", FIRST_CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_compile_matches_eager(dynamo_reset, device, case, backend):
    s = sample(*case, device, torch.float32)
    out, grads, grad_output = _forward_backward(s.fn, s.inputs, fixed=s.fixed)
    compiled = torch.compile(s.fn, backend=backend, fullgraph=True)
    c_out, c_grads, _ = _forward_backward(compiled, s.inputs, grad_output, fixed=s.fixed)
    assert_close(c_out, out, msg="result")
    for i, (c, g) in enumerate(zip(c_grads, grads)):
        assert_close(c, g, msg=f"gradient {i}")


class _MadeTensors(TorchDispatchMode):
    """Weak references to every tensor an op returns while it is active, with the op's name.
    A tensor the graph keeps alive from C++ stays reachable (PyTorch preserves its Python object)."""

    def __init__(self):
        super().__init__()
        self.made = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.made.append((weakref.ref(t), str(func)))
        return out


def _storages(tensors):
    return {t.untyped_storage().data_ptr() for t in tensors if isinstance(t, torch.Tensor)}


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_saved_tensor_hooks_see_everything_held(device, case, grad_in_forward):
    # Under a pack hook that keeps a copy of each saved tensor (as offloading does) the graph must
    # hold nothing else the forward made: a tensor kept as a ctx attribute, or a C++ member out of
    # the hooks' reach, outlives the forward here and fails. Backward from the copies gives the
    # gradients of an unhooked run; save_on_cpu too.
    s = sample(*case, device, torch.float32)
    out, grads, grad_output = _forward_backward(s.fn, s.inputs, fixed=s.fixed)
    leaves = _differentiable(s.inputs, s.fixed)
    copies = []

    def pack(t):
        copies.append(t.detach().clone())
        return len(copies) - 1

    made = _MadeTensors()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda i: copies[i]), made:
        hooked = s.fn(*leaves)
    gc.collect()
    ours = {id(c) for c in copies} | {id(hooked)}
    kept = _storages(leaves) | _storages([hooked]) | _storages(copies)
    held = [name for ref, name in made.made
            if (t := ref()) is not None and id(t) not in ours and t.numel() > 0
            and t.untyped_storage().data_ptr() not in kept]
    assert not held, f"tensors held for backward outside saved-tensor hooks, made by: {held}"
    wrt = [t for t in leaves if t.requires_grad]
    for i, (g, r) in enumerate(zip(torch.autograd.grad(hooked, wrt, grad_output), grads)):
        assert_close(g, r, msg=f"gradient {i} from the hooks' copies")
    leaves = _differentiable(s.inputs, s.fixed)
    with torch.autograd.graph.save_on_cpu():
        offloaded = s.fn(*leaves)
    wrt = [t for t in leaves if t.requires_grad]
    assert_close(offloaded, out, msg="result under save_on_cpu")
    for i, (g, r) in enumerate(zip(torch.autograd.grad(offloaded, wrt, grad_output), grads)):
        assert_close(g, r, msg=f"gradient {i} under save_on_cpu")


@pytest.mark.parametrize("use_reentrant", [False, True], ids=["non_reentrant", "reentrant"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_activation_checkpointing(device, case, grad_in_forward, use_reentrant):
    # torch.utils.checkpoint, as transformers' gradient_checkpointing_enable() uses it: the forward
    # keeps nothing for backward and is run again there (non-reentrant: from the saved-tensor
    # hooks; reentrant: a forward and a backward of its own inside backward, on a graph that is not
    # retained, so the autograd node hands its saved tensors to the backward op). The same result
    # and gradients, bit for bit, as the plain run.
    # The region starts with a PyTorch op that saves a tensor (a multiply by ones), as a layer's
    # norm does before its MLP: its recomputation must be recorded too. (.backward(), not
    # autograd.grad: the reentrant variant supports only the former.)
    s = sample(*case, device, torch.float32)

    def region(first, *rest):
        return s.fn(first * torch.ones_like(first), *rest)

    out, grads, grad_output = _forward_backward(region, s.inputs, fixed=s.fixed)
    leaves = _differentiable(s.inputs, s.fixed)
    got = torch.utils.checkpoint.checkpoint(region, *leaves, use_reentrant=use_reentrant)
    got.backward(grad_output)
    torch.testing.assert_close(got, out, rtol=0, atol=0, msg="result")
    for i, (leaf, r) in enumerate(zip([t for t in leaves if t.requires_grad], grads)):
        torch.testing.assert_close(leaf.grad, r, rtol=0, atol=0, msg=f"gradient {i}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_retain_graph_backward_twice(device, case, grad_in_forward):
    # A retained graph: the same gradients (bits) from a second backward, PyTorch's for another
    # grad_output on the same graph (nothing kept from an earlier backward), and .backward()
    # twice accumulating twice the first.
    s = sample(*case, device, torch.float64)
    out, wrt = _recorded(s.fn, s.inputs, s.fixed)
    gen = torch.Generator().manual_seed(2)
    g1, g2 = (torch.randn(out.shape, generator=gen, dtype=out.dtype).to(out.device) for _ in range(2))
    first = torch.autograd.grad(out, wrt, g1, retain_graph=True)
    second = torch.autograd.grad(out, wrt, g1, retain_graph=True)
    for i, (a, b) in enumerate(zip(first, second)):
        assert torch.equal(a, b), f"gradient {i} differs in the second backward"
    third = torch.autograd.grad(out, wrt, g2, retain_graph=True)
    _, want_first, _ = _forward_backward(s.reference, s.inputs, g1, fixed=s.fixed)
    _, want_third, _ = _forward_backward(s.reference, s.inputs, g2, fixed=s.fixed)
    for i, (got, want) in enumerate(zip(first + third, want_first + want_third)):
        assert_close(got, want, msg=f"gradient {i % len(wrt)} of backward {1 + 2 * (i // len(wrt))}")
    out.backward(g1, retain_graph=True)
    out.backward(g1)
    for i, (leaf, a) in enumerate(zip(wrt, first)):
        assert_close(leaf.grad, 2 * a, msg=f"gradient {i} accumulated over two backward calls")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_batched_grad_outputs(device, case, grad_in_forward):
    # torch.autograd.grad(..., is_grads_batched=True) (what jacobian(vectorize=True) uses): three
    # grad_outputs at once, each giving PyTorch's gradients, on a retained graph twice (the second
    # backward forms what the first handed over).
    s = sample(*case, device, torch.float64)
    out, wrt = _recorded(s.fn, s.inputs, s.fixed)
    gen = torch.Generator().manual_seed(4)
    grad_outputs = torch.randn((3, *out.shape), generator=gen, dtype=out.dtype).to(device)
    ref_out, ref_wrt = _recorded(s.reference, s.inputs, s.fixed)
    want = torch.autograd.grad(ref_out, ref_wrt, grad_outputs, is_grads_batched=True)
    for attempt in ("first", "second"):
        got = torch.autograd.grad(out, wrt, grad_outputs, is_grads_batched=True, retain_graph=True)
        for i, (g, r) in enumerate(zip(got, want)):
            assert g.shape == r.shape == (3, *wrt[i].shape)
            assert_close(g, r, msg=f"{attempt} backward, gradient {i}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_double_backward(device, case, grad_in_forward):
    # Gradients of gradients (create_graph=True, as a gradient penalty or second-order MAML takes
    # them): the dense layers, cross_entropy and the regression losses form them with PyTorch's
    # differentiable ops, so their second derivatives are PyTorch's; the other losses' gradients can
    # be used, but differentiating them again raises a clear error.
    s = sample(*case, device, torch.float64)
    out, wrt = _recorded(s.fn, s.inputs, s.fixed)
    grads = torch.autograd.grad(out.sum(), wrt, create_graph=True)
    if case[0] not in TWICE_DIFFERENTIABLE:
        assert all(g.requires_grad for g in grads)
        with pytest.raises(RuntimeError, match="double backward"):
            torch.autograd.grad(sum((g * g).sum() for g in grads), wrt)
        return
    ref_out, ref_wrt = _recorded(s.reference, s.inputs, s.fixed)
    ref_grads = torch.autograd.grad(ref_out.sum(), ref_wrt, create_graph=True)
    # (A bias's gradient for out.sum() is a constant, in PyTorch too.)
    assert [g.requires_grad for g in grads] == [r.requires_grad for r in ref_grads]
    got = torch.autograd.grad(sum((g * g).sum() for g in grads), wrt, materialize_grads=True)
    want = torch.autograd.grad(sum((g * g).sum() for g in ref_grads), ref_wrt, materialize_grads=True)
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, msg=f"second-order gradient {i}")


def _functional(fn, inputs, fixed):
    """(f, the differentiable inputs): f(*differentiable) = fn(*inputs) with the inputs not
    differentiated (class indices, class weights) bound, as torch.func takes a function."""
    wrt = [i for i, t in enumerate(inputs) if t.is_floating_point() and i not in fixed]

    def f(*values):
        args = list(inputs)
        for i, v in zip(wrt, values):
            args[i] = v
        return fn(*args)

    return f, [inputs[i] for i in wrt]


def _functional_pair(s):
    """(ours, PyTorch's, the differentiable inputs) of a sample, as _functional makes them."""
    f, values = _functional(s.fn, s.inputs, s.fixed)
    return f, _functional(s.reference, s.inputs, s.fixed)[0], values


def _grad_of_sum(fn, count: int):
    """torch.func.grad of fn(*values).sum() in each of its `count` arguments."""
    return torch.func.grad(lambda *v: fn(*v).sum(), argnums=tuple(range(count)))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_vjp_matches_pytorch(device, case):
    # torch.func.vjp (what torch.func.grad and functional training loops use) gives PyTorch's
    # result and gradients, in float64.
    s = sample(*case, device, torch.float64)
    f, ref_f, values = _functional_pair(s)
    out, vjp = torch.func.vjp(f, *values)
    ref, ref_vjp = torch.func.vjp(ref_f, *values)
    grad_output = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(device)
    assert_close(out, ref, msg="result")
    for i, (g, r) in enumerate(zip(vjp(grad_output), ref_vjp(grad_output))):
        assert_close(g, r, msg=f"gradient {i}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_per_sample_gradients(device, case):
    # vmap over torch.func.grad (per-sample gradients, jacrev's pattern): a batch of three samples
    # of every differentiable input, each sample's gradient PyTorch's for that sample. The loss ops
    # have no batching rule: vmap runs them through PyTorch's fallback, a loop over the samples.
    s = sample(*case, device, torch.float64)
    f, ref_f, values = _functional_pair(s)
    gen = torch.Generator().manual_seed(3)
    batched = [torch.stack([v, v + 0.1 * torch.randn(v.shape, generator=gen, dtype=v.dtype).to(device), -v])
               for v in values]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "There is a performance drop because we have not yet implemented")
        got = torch.vmap(_grad_of_sum(f, len(values)))(*batched)
    want = torch.vmap(_grad_of_sum(ref_f, len(values)))(*batched)
    for i, (g, r) in enumerate(zip(got, want)):
        assert g.shape == r.shape == batched[i].shape
        assert_close(g, r, msg=f"per-sample gradient {i}")


@pytest.mark.parametrize("case", FIRST_CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_under_torch_compile(dynamo_reset, device, case):
    # torch.compile of torch.func.grad: the transform runs eagerly (a graph break at the op), with
    # PyTorch's gradients.
    s = sample(*case, device, torch.float64)
    f, ref_f, values = _functional_pair(s)
    got = torch.compile(_grad_of_sum(f, len(values)), backend="aot_eager")(*values)
    want = _grad_of_sum(ref_f, len(values))(*values)
    for i, (g, r) in enumerate(zip(got, want)):
        assert_close(g, r, msg=f"gradient {i}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_torch_func_second_derivative(device, case):
    # torch.func.grad of torch.func.grad: the dense layers run PyTorch's ops under torch.func, so
    # theirs is PyTorch's; the losses raise the same clear error as double backward outside it.
    s = sample(*case, device, torch.float64)
    f, ref_f, values = _functional_pair(s)

    def second(fn):
        first = torch.func.grad(lambda v: fn(v, *values[1:]).sum())
        return torch.func.grad(lambda v: first(v).square().sum())(values[0])

    if case[0] in DENSE_FAMILIES:
        assert_close(second(f), second(ref_f), msg="second derivative")
        return
    with pytest.raises(RuntimeError, match="double backward"):
        second(f)


@pytest.mark.parametrize("api", ["dual_tensors", "torch_func_jvp"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_forward_mode_ad(device, case, api):
    # Forward-mode AD (torch.autograd.forward_ad's dual tensors, torch.func.jvp): the dense layers
    # run PyTorch's ops there, so their tangent is PyTorch's; the losses raise, naming the
    # function (their kernels form reverse-mode gradients only). A tangent was silently dropped
    # before (the output of a dual input had none).
    s = sample(*case, device, torch.float64)
    f, ref_f, values = _functional_pair(s)
    gen = torch.Generator().manual_seed(4)
    tangents = [torch.randn(v.shape, generator=gen, dtype=v.dtype).to(device) for v in values]

    def jvp(fn):
        if api == "torch_func_jvp":
            return torch.func.jvp(fn, tuple(values), tuple(tangents))
        with fwAD.dual_level():
            out = fn(*(fwAD.make_dual(v, t) for v, t in zip(values, tangents)))
            primal, tangent = fwAD.unpack_dual(out)
            return primal, tangent

    if case[0] in DENSE_FAMILIES:
        (out, tangent), (ref, ref_tangent) = jvp(f), jvp(ref_f)
        assert tangent is not None and ref_tangent is not None
        assert_close(out, ref, msg="result")
        assert_close(tangent, ref_tangent, msg="tangent")
        return
    with pytest.raises(NotImplementedError, match=r"forward-mode AD .* is not supported"):
        jvp(f)


@pytest.mark.parametrize("case", FIRST_CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_inputs_without_tangents_under_a_dual_level(device, case):
    # Inside a forward-AD level, ops over plain tensors (no tangent) compute and differentiate as
    # outside it.
    s = sample(*case, device, torch.float64)
    out, wrt = _recorded(s.fn, s.inputs, s.fixed)
    grads = torch.autograd.grad(out.sum(), wrt)
    with fwAD.dual_level():
        out2, wrt2 = _recorded(s.fn, s.inputs, s.fixed)
        grads2 = torch.autograd.grad(out2.sum(), wrt2)
    assert_close(out2, out, msg="result")
    for i, (g2, g) in enumerate(zip(grads2, grads)):
        assert_close(g2, g, msg=f"gradient {i}")


def _non_contiguous(t):
    """The same values in a layout that is not contiguous (a transposed copy, or every other
    element of a wider tensor)."""
    if not t.is_floating_point():
        return t
    if t.dim() >= 2:
        return t.mT.contiguous().mT
    return torch.stack([t, torch.zeros_like(t)], -1)[..., 0]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, case):
    s = sample(*case, device, torch.float32)
    strided = [_non_contiguous(t) for t in s.inputs]
    assert not any(t.is_contiguous() for t in strided if t.is_floating_point() and t.numel() > 1)
    out, grads, grad_output = _forward_backward(s.fn, strided, fixed=s.fixed)
    ref, ref_grads, _ = _forward_backward(s.reference, s.inputs, grad_output, fixed=s.fixed)
    assert_close(out, ref, msg="result")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, msg=f"gradient {i}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast(device, case, dtype):
    # Under torch.autocast the result has the dtype PyTorch's ops give there (the dense layers the
    # low precision, the losses float32), with values and float32 gradients within that
    # precision's tolerance of PyTorch's under the same autocast.
    s = sample(*case, device, torch.float32)
    with torch.autocast(device, dtype=dtype):
        out, grads, grad_output = _forward_backward(s.fn, s.inputs, fixed=s.fixed)
        ref, ref_grads, _ = _forward_backward(s.reference, s.inputs, grad_output, fixed=s.fixed)
    assert out.dtype == ref.dtype, f"dtype {out.dtype} under autocast, PyTorch's {ref.dtype}"
    rtol, atol = tolerance(dtype)
    assert_close(out, ref, rtol=2 * rtol, atol=2 * atol, check_dtype=False, msg="result")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == r.dtype == torch.float32
        assert_close(g, r, rtol=2 * rtol, atol=2 * atol, check_dtype=False, msg=f"gradient {i}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_keeps_float64(device, case, dtype):
    # Autocast leaves float64 alone, as PyTorch's ops do: float64 results and gradients.
    s = sample(*case, device, torch.float64)
    with torch.autocast(device, dtype=dtype):
        out, grads, grad_output = _forward_backward(s.fn, s.inputs, fixed=s.fixed)
        ref, ref_grads, _ = _forward_backward(s.reference, s.inputs, grad_output, fixed=s.fixed)
    assert out.dtype == ref.dtype == torch.float64
    assert_close(out, ref, msg="result")
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert g.dtype == torch.float64, f"gradient {i}: dtype {g.dtype}"
        assert_close(g, r, msg=f"gradient {i}")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
@pytest.mark.parametrize("device", DEVICES)
def test_integer_input_is_refused_by_name(device, case):
    # Every floating input given as integers: a clear error that names the argument (PyTorch's
    # ops refuse integer inputs to these functions too), never a result.
    s = sample(*case, device, torch.float32)
    for i, t in enumerate(s.inputs):
        if not t.is_floating_point():
            continue
        bad = list(s.inputs)
        bad[i] = t.to(torch.int32)
        with pytest.raises((TypeError, ValueError, RuntimeError), match=rf"\b{s.names[i]}\b"):
            s.fn(*bad)


@cuda_only
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_input_on_another_device_is_refused_by_name(case):
    # Each input on the CPU while the others are on the GPU (the class weight too): an error
    # naming that argument, as PyTorch's ops raise for mixed devices.
    s = sample(*case, "cuda", torch.float32)
    for i, t in enumerate(s.inputs):
        bad = list(s.inputs)
        bad[i] = t.cpu()
        with pytest.raises((TypeError, ValueError, RuntimeError), match=rf"\b{s.names[i]}\b"):
            s.fn(*bad)


class _Classifier(nn.Module):
    """A model with each kind of module fuse() replaces: Linear + activation pairs of an
    nn.Sequential, a Transformer encoder layer's feed-forward block, and a loss module."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.SiLU())
        self.block = nn.TransformerEncoderLayer(16, 2, dim_feedforward=32, dropout=0.0, activation="gelu",
                                                batch_first=True)
        self.head = nn.Linear(16, 5)
        self.loss = nn.CrossEntropyLoss(label_smoothing=0.1)

    def forward(self, x, target):
        return self.loss(self.head(self.block(self.embed(x))).flatten(0, 1), target.flatten())


class _Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 12), nn.Tanh(), nn.Linear(12, 3))
        self.loss = nn.HuberLoss(delta=0.5)

    def forward(self, x, target):
        return self.loss(self.net(x), target)


FUSE_MODELS = {
    # name -> (model maker, (input, target) maker, how many modules fuse() replaces)
    "classifier": (_Classifier, lambda gen: (torch.randn(3, 7, 8, generator=gen),
                                             torch.randint(0, 5, (3, 7), generator=gen)), 4),
    "regressor": (_Regressor, lambda gen: (torch.randn(4, 8, generator=gen), torch.randn(4, 3, generator=gen)), 3),
}


@pytest.mark.parametrize("name", FUSE_MODELS)
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_fused_model_matches_the_model(device, dtype, name):
    # torch_ext.fuse on a model on this device in this dtype: it replaces what it should, and the
    # fused model's loss and every parameter's gradient match the model's as written (computed in
    # the reference dtype from the same low-precision values, as test_matches_pytorch does).
    make_model, make_inputs, replaced = FUSE_MODELS[name]
    torch.manual_seed(0)
    model = make_model().to(device=device, dtype=dtype)
    fused, report = torch_ext.fuse(model, return_report=True)
    assert len(report.replaced) == replaced, str(report)
    x, target = make_inputs(torch.Generator().manual_seed(0))
    reference = copy.deepcopy(model).to(reference_dtype(dtype))
    results = []
    for m, in_dtype in ((fused, dtype), (reference, reference_dtype(dtype))):
        xs = x.to(device=device, dtype=in_dtype).requires_grad_()
        t = target.to(device=device, dtype=in_dtype if target.is_floating_point() else None)
        loss = m(xs, t)
        loss.backward()
        results.append((loss, xs.grad, {n: p.grad for n, p in m.named_parameters()}))
    (loss, grad_x, grads), (ref_loss, ref_grad_x, ref_grads) = results
    assert loss.dtype == dtype, "the loss's dtype differs from the model's as written"
    rtol, atol = tolerance(dtype)
    assert_close(loss, ref_loss, rtol=2 * rtol, atol=2 * atol, check_dtype=False, msg="loss")
    assert_close(grad_x, ref_grad_x, rtol=2 * rtol, atol=2 * atol, check_dtype=False, msg="input gradient")
    assert grads.keys() == ref_grads.keys()
    for n, g in grads.items():
        assert g.dtype == dtype, n
        assert_close(g, ref_grads[n], rtol=2 * rtol, atol=2 * atol, check_dtype=False, msg=f"gradient of {n}")


def _float64_model_and_fused(make_model, device):
    """(a seeded float64 model on device, torch_ext.fuse of a copy of it, fuse's report)."""
    torch.manual_seed(0)
    model = make_model().to(device=device, dtype=torch.float64)
    fused, report = torch_ext.fuse(copy.deepcopy(model), return_report=True)
    return model, fused, report


@pytest.mark.parametrize("name", FUSE_MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_per_sample_gradients(device, name):
    # Per-sample gradients as torch.func computes them (vmap of grad of functional_call, each
    # sample a batch of one): the fused model's are the model's as written, in float64.
    make_model, make_inputs, _ = FUSE_MODELS[name]
    model, fused, _ = _float64_model_and_fused(make_model, device)
    x, target = make_inputs(torch.Generator().manual_seed(0))
    x = x.to(device=device, dtype=torch.float64)
    target = target.to(device=device, dtype=torch.float64 if target.is_floating_point() else None)

    def per_sample(m):
        params = {n: p.detach() for n, p in m.named_parameters()}

        def loss(p, xi, ti):
            return torch.func.functional_call(m, p, (xi[None], ti[None]))

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "There is a performance drop because we have not yet implemented")
            return torch.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, target)

    got, want = per_sample(fused), per_sample(model)
    assert got.keys() == want.keys()
    for n, g in want.items():
        assert got[n].shape == g.shape == (x.shape[0], *dict(model.named_parameters())[n].shape), n
        assert g.abs().max() > 0, f"{n}: the check is empty"
        assert_close(got[n], g, msg=f"per-sample gradient of {n}")


def _pinn_residual(model, x):
    """A physics-informed loss: mean((laplacian of u(x) + u(x))^2), the laplacian by two rounds of
    autograd.grad with create_graph (gradients of gradients through every layer)."""
    u = model(x)
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    laplacian = sum(torch.autograd.grad(du[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(x.shape[1]))
    return (laplacian + u.squeeze(-1)).square().mean()


def _gradient_penalty(model, x):
    """WGAN-GP's penalty: mean((|d critic / d x| - 1)^2) plus the critic's mean output."""
    out = model(x)
    (grad,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return out.mean() + (grad.flatten(1).norm(dim=1) - 1).square().mean()


HIGHER_ORDER_MODELS = {
    # name -> (model, loss of (model, x) that differentiates the model twice, input shape)
    "pinn_tanh_mlp": (lambda: nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(),
                                            nn.Linear(16, 1)), _pinn_residual, (9, 2)),
    "wgan_gp_critic": (lambda: nn.Sequential(nn.Linear(6, 16), nn.LeakyReLU(0.2), nn.Linear(16, 16),
                                             nn.LeakyReLU(0.2), nn.Linear(16, 1)), _gradient_penalty, (7, 6)),
    "gelu_mlp_block": (lambda: nn.Sequential(nn.Linear(3, 12), nn.GELU(), nn.Linear(12, 3)), _gradient_penalty,
                       (5, 3)),
}


@pytest.mark.parametrize("name", HIGHER_ORDER_MODELS)
@pytest.mark.parametrize("device", DEVICES)
def test_fused_model_higher_order_gradients(device, name):
    # Losses that differentiate the model twice (a PDE residual's laplacian, a gradient penalty):
    # the fused model's loss and parameter gradients are the model's as written, in float64.
    make_model, loss_of, shape = HIGHER_ORDER_MODELS[name]
    model, fused, report = _float64_model_and_fused(make_model, device)
    assert report.replaced, str(report)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    results = []
    for m in (fused, model):
        loss = loss_of(m, x.clone().requires_grad_())
        loss.backward()
        results.append((loss, {n: p.grad for n, p in m.named_parameters()}))
    (loss, grads), (ref_loss, ref_grads) = results
    assert_close(loss, ref_loss, msg="loss")
    assert grads.keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert g.abs().max() > 0, f"{n}: the check is empty"
        assert_close(grads[n], g, msg=f"gradient of {n}")


def _loss_ops(device):
    """(name, call(loss_dtype)) of the forward ops that take loss_dtype, on small 16-bit inputs."""
    x = torch.randn(6, 10, device=device).bfloat16()
    t = torch.randint(0, 10, (6,), device=device)
    h, w = torch.randn(6, 4, device=device).bfloat16(), torch.randn(10, 4, device=device).bfloat16()
    ops = torch.ops.torch_ext
    return [
        ("cross_entropy_fwd", lambda d: ops.cross_entropy_fwd(x, t, None, -100, "mean", 0.0, 0.0, [False, False],
                                                              loss_dtype=d)[0]),
        ("linear_cross_entropy_fwd", lambda d: ops.linear_cross_entropy_fwd(
            h, w, None, t, None, -100, "sum", 0.0, 0.0, 4, [False, False, False], loss_dtype=d)[0]),
        ("triplet_margin_loss_fwd", lambda d: ops.triplet_margin_loss_fwd(
            x, x.flip(0), x.roll(1, 0), 10.0, 2.0, 1e-6, False, "none", [False, False, False], loss_dtype=d)[0]),
        ("regression_loss_fwd", lambda d: ops.regression_loss_fwd(
            x, x.roll(1, 0), None, "huber", 0.5, "none", [False, False], loss_dtype=d)[0]),
    ]


@pytest.mark.parametrize("op_index", range(4))
@pytest.mark.parametrize("device", DEVICES)
def test_loss_dtype(device, op_index):
    # The losses' loss_dtype: None gives the input's dtype; float32 the loss as computed, which
    # rounded to bfloat16 is the None result (to one bfloat16 rounding: a float64 sum rounded
    # through float32 may round once more); a non-floating dtype is refused, naming the argument,
    # by the kernel and by the fake kernel alike.
    name, call = _loss_ops(device)[op_index]
    plain, wide = call(None), call(torch.float32)
    assert plain.dtype == torch.bfloat16 and wide.dtype == torch.float32, name
    assert not torch.equal(wide, plain.float()), f"{name}: the float32 loss is the rounded one"
    assert_close(plain, wide, dtype=torch.bfloat16, check_dtype=False, msg=name)
    for mode in ("real", "fake"):
        with pytest.raises(ValueError, match="loss_dtype must be a floating-point dtype"):
            if mode == "real":
                call(torch.int64)
            else:
                with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True):
                    call(torch.int64)
