"""Helpers shared by the op families."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from . import _C

# What torch.library's own autograd kernel uses to call an op's kernels without autograd.
_below_autograd = torch._C._AutoDispatchBelowAutograd
_any_requires_grad = torch._C._any_requires_grad  # C++; dynamo cannot trace it (any_requires_grad can)
_functorch_transforms_active = torch._C._are_functorch_transforms_active  # dynamo folds it to a constant


def _batched_or_wrapped(t: Tensor) -> bool:
    """Whether t is batched by vmap (functorch's, or the older one of autograd.grad's
    is_grads_batched) or wrapped by a functorch transform: it has no value to read. Not for
    compiled code (dynamo cannot trace the check)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t) or torch._C._functorch.is_legacy_batchedtensor(t)


def any_requires_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether a tensor among `tensors` (None skipped) requires grad."""
    return any(t is not None and t.requires_grad for t in tensors)


def direct_when_no_grad(op):
    """`op` (an OpOverload) as a callable that skips the op's registered autograd kernel when no
    gradient can flow: grad mode off (as inside an autograd.Function's forward, and in a backward
    without create_graph) or no tensor argument requiring grad. That kernel
    (torch.library.register_autograd's, in Python) would only redispatch below autograd there,
    at a sizeable share of a small op's whole Python cost. Compiled code calls the op as
    it is (dynamo traces the op, not this guard)."""

    def call(*args):
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and _any_requires_grad(*args)):
            return op(*args)
        with _below_autograd():
            return op(*args)

    call.__name__ = call.__qualname__ = f"direct_when_no_grad({op})"
    return call


def needs_autograd(*tensors: Optional[Tensor]) -> bool:
    """Whether a call must record autograd history: grad mode on and a tensor requires grad.
    Otherwise the public functions call the forward op directly, without an autograd.Function
    (Function.apply costs as much as a small op's kernel and dispatch together)."""
    return torch.is_grad_enabled() and any_requires_grad(*tensors)


def eager_without_autograd(*tensors: Optional[Tensor]) -> bool:
    """Whether an eager (not compiled) call records no autograd history: the losses then call their
    C++ eager path (torch_ext._C._<op>_eager), which runs the forward op alone at less cost per call
    than the op called from Python. Compiled code calls the op (dynamo traces it)."""
    return not needs_autograd(*tensors) and not torch.compiler.is_compiling()


def autocast_off() -> bool:
    """True when no device has autocast on: one call, where the per-device checks below cost a
    noticeable share of a small op's whole Python path. Compiled code takes the per-device
    checks, which dynamo knows."""
    return not torch.compiler.is_compiling() and not torch._C._is_any_autocast_enabled()


def autocast_enabled_on(tensor: Tensor) -> bool:
    """Whether autocast is enabled on the tensor's device."""
    if autocast_off():
        return False
    device_type = tensor.device.type
    # "meta" and other devices without autocast raise in is_autocast_enabled.
    return torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)


def float32_loss_of_16_bit(*tensors: Tensor) -> bool:
    """Whether a loss over these inputs (as autocast cast them) returns float32 computed from their
    16-bit values (loss_dtype float32): autocast is enabled on their device and they share one
    16-bit dtype. PyTorch's autocast returns such a loss in float32; the ops compute in float32
    from 16-bit inputs, so they need no float32 copy of them, and the loss is not rounded."""
    first = tensors[0]
    return (first.dtype in (torch.float16, torch.bfloat16) and all(t.dtype == first.dtype for t in tensors[1:])
            and autocast_enabled_on(first))


def autocast_to_lower_precision(*tensors: Optional[Tensor]):
    """Cast as autocast casts the inputs of F.linear: floating tensors other than float64 go to
    the autocast dtype of their device when autocast is enabled there; others pass unchanged."""
    if autocast_off():
        return tensors
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return tensors
    device_type = first.device.type
    # "meta" and other devices without autocast raise in is_autocast_enabled.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(
        t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def autocast_to_float32(*tensors: Optional[Tensor]):
    """Cast as autocast casts the inputs of PyTorch's losses (its float32 list): when autocast is
    enabled on their device, floating tensors of a lower precision go to float32."""
    if autocast_off():
        return tensors
    first = next((t for t in tensors if t is not None), None)
    if first is None:
        return tensors
    device_type = first.device.type
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    return tuple(
        t.float() if t is not None and t.dtype in (torch.float16, torch.bfloat16) else t for t in tensors
    )


def cpu_products_in_float32(dtype: torch.dtype) -> bool:
    """Whether torch_ext multiplies CPU matrices of this 16-bit dtype as float32 products, rounded
    once (csrc/matmul.h: ATen's GEMM of that dtype is slow on this CPU); False for other dtypes."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    return _C._cpu_16bit_gemm(str(dtype).removeprefix("torch.")) == "float32"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the kernels accumulate `dtype`'s values in: float64 for float64, else float32
    (csrc/loss_checks.h's accumulate_dtype)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


REDUCTIONS = ("mean", "sum", "none")


def loss_dtype_or_input(op: str, input: Tensor, loss_dtype: Optional[torch.dtype]) -> torch.dtype:
    """The dtype a loss op returns its loss in: loss_dtype (floating), or the input's; the fake
    kernels' copy of csrc/loss_checks.h's loss_dtype_or_input."""
    if loss_dtype is None:
        return input.dtype
    if not loss_dtype.is_floating_point:
        raise ValueError(f"{op}: loss_dtype must be a floating-point dtype, got {loss_dtype}")
    return loss_dtype


def reduction_for_items(num_items_in_batch, reduction: str, name: str) -> str:
    """The reduction to compute: "sum" when num_items_in_batch will divide it (divide_by_items),
    which stands in for the mean's own denominator, so the reduction asked for must be "mean"
    (the default). As the Hugging Face Trainer uses it for gradient accumulation: micro-batches'
    losses, each summed and divided by the whole batch's count, add up to the full batch's mean."""
    if num_items_in_batch is None:
        return reduction
    if reduction != "mean":
        raise ValueError(
            f"{name}: num_items_in_batch divides the summed loss in place of the mean's denominator, so reduction "
            f"must be 'mean' (the default); got reduction={reduction!r}"
        )
    if torch.is_tensor(num_items_in_batch):
        if num_items_in_batch.numel() != 1:
            raise ValueError(
                f"{name}: num_items_in_batch must hold one number, got shape {tuple(num_items_in_batch.shape)}"
            )
    elif isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, (int, float)):
        raise TypeError(
            f"{name}: num_items_in_batch must be a number or a one-element tensor, "
            f"got {type(num_items_in_batch).__name__}"
        )
    elif not num_items_in_batch > 0:
        raise ValueError(f"{name}: num_items_in_batch must be positive, got {num_items_in_batch}")
    return "sum"


def divide_by_items(loss: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """loss / num_items_in_batch (see reduction_for_items); a tensor count is moved to the loss's
    device (the Trainer passes it on the CPU or another device), never read on the host."""
    if num_items_in_batch is None:
        return loss
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(loss.device).reshape(())
    return loss / num_items_in_batch


def resolve_reduction(size_average, reduce, reduction: str) -> str:
    """The reduction string, honouring the deprecated size_average/reduce as torch.nn does."""
    if size_average is not None or reduce is not None:
        from torch.nn import _reduction

        reduction = _reduction.legacy_get_string(size_average, reduce)
    check_reduction(reduction)
    return reduction


def check_reduction(reduction: str) -> None:
    """The one check of a reduction string (the functions' and the fake kernels' alike)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none'; got {reduction!r}")


def check_reduction_with_grad_in_forward(op: str, reduction: str) -> None:
    """A forward op's grad_mask forms gradients for grad_loss = 1: the loss must be one number (as
    csrc/loss_checks.h's check of the same name)."""
    if reduction == "none":
        raise ValueError(
            f"{op}: reduction must be 'mean' or 'sum' (the gradient is formed for a grad_loss of one value), got 'none'"
        )


def _double_backward_error(public_name: str) -> RuntimeError:
    return RuntimeError(
        f"{public_name} does not support double backward (a gradient of its gradient, e.g. "
        "after create_graph=True); use torch.nn.functional for higher-order gradients"
    )


class _NoDoubleBackward(torch.autograd.Function):
    """Identity on a gradient whose own backward raises (differentiable_once). In the setup_context
    style, which torch.func's transforms take (it runs only with create_graph, where the per-call
    cost of that style does not matter)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(public_name, grad, *sources):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.public_name = inputs[0]

    @staticmethod
    def backward(ctx, *grads):
        raise _double_backward_error(ctx.public_name)


def differentiable_once(public_name: str, grads, sources):
    """An autograd.Function's gradients, as its backward returns them: with create_graph (grad
    mode on in backward) each is tied to every tensor of `sources` that requires grad (its inputs,
    grad_output) through a node that raises if differentiated, as csrc/autograd_node.cpp's
    NoDoubleBackward does for the C++ nodes. A gradient can depend on an input the backward never
    reads (fc1's bias shapes fc2's weight gradient through the saved pre-activation): a second
    derivative through it then fails clearly instead of coming back None."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    sources = [t for t in sources if isinstance(t, torch.Tensor) and t.requires_grad]
    return tuple(None if g is None else _NoDoubleBackward.apply(public_name, g, *sources) for g in grads)


def register_no_double_backward(op_name: str, public_name: str) -> None:
    """Make the backward op `op_name` differentiable once: with create_graph=True its outputs get
    a grad_fn, and differentiating them raises a clear error instead of giving wrong values."""

    def no_double_backward(ctx, *grads):
        raise _double_backward_error(public_name)

    torch.library.register_autograd(op_name, no_double_backward, setup_context=lambda ctx, inputs, output: None)


def forms_grad_in_forward(requires_grad: bool) -> bool:
    """Whether a loss's eager path forms its gradients in the forward op (handed over in backward
    by the C++ node of csrc/autograd_node.h): autograd will ask for them (grad mode on,
    `requires_grad` of the inputs that count) and the call is not being compiled (compiled graphs
    take the forward/backward op pair). The callers add their own conditions (devices, reductions)."""
    return requires_grad and torch.is_grad_enabled() and not torch.compiler.is_compiling()


def hand_over_unit_grads(unit_grads, mask, grad_loss):
    """The gradients a Python autograd.Function's forward op formed for grad_output = 1 (saved with
    ctx.save_for_backward, so saved-tensor hooks such as save_on_cpu see them), those `mask` asks
    for (the others None), for the incoming grad_loss (one value, or a (rows, 1) column for a loss
    per row): as they are when it is the CPU scalar 1 (elsewhere reading it would wait for the
    device), else scaled out of place. Out of place, unlike the C++ node of csrc/autograd_node.h,
    which drops its saved gradients after scaling them in place: a Python Function cannot release
    one saved tensor, so a retained graph's later backward unpacks the same ones again and they
    must still hold grad_output = 1's values (the cost: one gradient-sized buffer while
    grad_output != 1). Without retain_graph the engine frees the saved tensors before
    the gradients are accumulated, so a leaf's first .grad takes them without a copy. While traced
    (torch.compile, opcheck's aot_dispatch: a tensor subclass) or batched by functorch
    (autograd.grad's is_grads_batched) grad_loss has no value to read: scaled."""
    unit_grads = [g if m else None for g, m in zip(unit_grads, mask)]
    if (type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling() and grad_loss.device.type == "cpu"
            and grad_loss.numel() == 1 and not _batched_or_wrapped(grad_loss) and grad_loss.item() == 1.0):
        return unit_grads
    scale = grad_loss.reshape(()) if grad_loss.numel() == 1 else grad_loss  # else a scale per row, (rows, 1)
    return [None if g is None else g.mul(scale) for g in unit_grads]


def save_with_formed_grads(ctx, saved, output, grad_mask, first_grad):
    """A loss Function's setup_context, for a forward op that may have formed gradients: saves
    `saved` (what backward needs), and when grad_mask asked for gradients also those the op
    returned from output[first_grad] on, so that saved-tensor hooks (save_on_cpu, offloading) see
    them too. ctx.formed: grad_mask, or None when nothing was formed (the common case: compiled
    graphs, reduction none; no more per-call work than a plain forward). The outputs after the
    loss are not differentiable."""
    if any(grad_mask):
        ctx.formed = tuple(bool(m) for m in grad_mask)
        ctx.save_for_backward(*saved, *output[first_grad:])
        ctx.mark_non_differentiable(*non_differentiable(output))
    else:
        ctx.formed = None
        ctx.save_for_backward(*saved)
        ctx.mark_non_differentiable(*output[1:first_grad])
    ctx.set_materialize_grads(False)  # no zero-filled gradients for the other outputs in backward


def hand_over_formed(ctx, wanted, unit_grads, grad_loss):
    """The backward of a Function whose forward op may have formed gradients (ctx.formed: its
    grad_mask, or None when it formed none): (the gradients handed over for the `wanted` inputs,
    None where not formed, and the mask of those the backward op must still form). With
    create_graph (grad mode on in backward) the backward op forms them all: it is differentiable
    once, with a clear error beyond."""
    if ctx.formed is None or torch.is_grad_enabled():
        return [None] * len(wanted), wanted
    handed = [w and f for w, f in zip(wanted, ctx.formed)]
    missing = [w and not h for w, h in zip(wanted, handed)]
    return hand_over_unit_grads(unit_grads, handed, grad_loss), missing


def fake_grads(like, mask, shapes):
    """A fake kernel's gradient outputs: for each input, an empty tensor of its shape (like `like`)
    when `mask` asks for it, else None, as the C++ kernels return them."""
    return tuple(like.new_empty(shape) if m else None for m, shape in zip(mask, shapes))


def non_differentiable(output):
    """A forward op's outputs after the loss that are tensors: the gradients its grad_mask did not
    ask for are None."""
    return [o for o in output[1:] if o is not None]


def transforms_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, functional per-sample gradients) is
    running, or a forward-mode AD level (torch.autograd.forward_ad.dual_level) is open: the losses
    then take their Function's for_transforms variant and the dense layers PyTorch's ops, which
    carry tangents (one C call and a module attribute per op call to find out; the C++ eager
    nodes would drop a dual input's tangent). Dynamo fails tracing these Functions inside a
    transform (an internal error in torch 2.13), so a compiled transform breaks the graph here and
    runs eagerly."""
    if not _functorch_transforms_active() and _forward_ad._current_level < 0:  # (dynamo folds both)
        return False
    if torch.compiler.is_compiling():
        torch._dynamo.graph_break()
    return True


def for_transforms(function, op, setup_context, public_name: str):
    """`function` (an autograd.Function over `op` whose forward is forward_with_ctx(op,
    setup_context)) as torch.func's transforms take one: in the setup_context style, with
    generate_vmap_rule (under vmap the op runs through PyTorch's batching fallback, a loop over the
    batch). The public functions call it with a grad_mask that forms no gradient in forward (the
    backward op forms them). torch.func differentiates with create_graph on: the backward runs
    with grad mode off (the backward ops' own autograd kernels are not of this style) and ties its
    gradients to what it read through differentiable_once, so a second derivative (torch.func.grad
    of torch.func.grad) raises as double backward does outside torch.func. Forward-mode AD
    (torch.func.jvp, jacfwd, hessian; torch.autograd.forward_ad's dual tensors) raises, naming
    the function: the kernels form reverse-mode gradients only."""

    def forward(*inputs):
        return op(*inputs)

    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"{public_name}: forward-mode AD (torch.func.jvp, jacfwd, hessian, torch.autograd.forward_ad) is not "
            "supported (the kernels form reverse-mode gradients only); use torch.nn.functional's loss there"
        )

    def backward(ctx, *grads):
        with torch.no_grad():
            result = function.backward(ctx, *grads)
        return differentiable_once(public_name, result, (*ctx.saved_tensors, *grads))

    return type(
        f"{function.__name__}ForTransforms",
        (torch.autograd.Function,),
        {
            "__doc__": f"{function.__name__} in the setup_context style, for torch.func's transforms (for_transforms).",
            "__module__": function.__module__,
            "generate_vmap_rule": True,
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
            "jvp": staticmethod(jvp),
        },
    )


def grads_of_composite(loss_of, grad_loss: Tensor, inputs, output_mask):
    """The gradients of loss_of(*inputs) (a loss written in PyTorch's differentiable ops) for
    grad_loss, for the inputs output_mask asks for (None for the others): a loss's
    CompositeImplicitAutograd backward for a backward that records a graph (create_graph), whose
    gradients autograd can differentiate again. An input that does not require grad (a direct call
    of the op) is differentiated as a detached copy."""
    recording = torch.is_grad_enabled()
    with torch.enable_grad():
        leaves = [t if not m or t.requires_grad else t.detach().requires_grad_() for t, m in zip(inputs, output_mask)]
        wanted = [t for t, m in zip(leaves, output_mask) if m]
        if not wanted:
            return (None,) * len(output_mask)
        loss = loss_of(*leaves)
        grads = iter(torch.autograd.grad(loss, wanted, grad_loss, create_graph=recording))
    return tuple(next(grads) if m else None for m in output_mask)


def forward_with_ctx(op, setup_context):
    """An autograd.Function forward in the ctx style: forward(ctx, *inputs) runs `op` and then
    `setup_context` (the one the op's own register_autograd uses). Why not the setup_context
    style: Function.apply binds that style's signature with inspect.signature on every call,
    which is most of the Python cost of a small op (a CNN's cross-entropy head). torch.func's
    transforms accept only that style: they take for_transforms' variant."""

    def forward(ctx, *inputs):
        output = op(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return staticmethod(forward)
