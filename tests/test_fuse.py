"""Tests of ``torch_ext.fuse`` (torch_ext/fuse.py): swapping ``nn.Linear`` + activation pairs for
``torch_ext.FusedLinear`` and torch.nn loss modules for torch_ext's, in a model written with
torch.nn.

The reference is always the model as written (the original, or a deep copy taken before an
in-place fuse): the fused model must give the same outputs and the same gradients of its inputs
and of every parameter (by name) within float32 tolerance, in train and in eval mode. Covered:

* nn.Sequential: every supported activation module (LeakyReLU slopes, GELU both modes), a Linear
  last in its Sequential / followed by Dropout or by an unsupported activation (left alone and
  reported), bias=False, nested Sequentials, an odd-sized stack, Sequentials with named children;
* custom forwards traced by torch.fx: every functional / method / in-place form of the supported
  activations, and what must be left alone (output used twice, unsupported activation, something
  between Linear and activation, a forward that branches on self.training, a forward fx cannot
  trace), nested custom modules, a Linear called from an ancestor's forward, ModuleList,
  ModuleDict, Linears reached from an untraceable ancestor, a forward with an optional argument;
* shared Linears (same / different activations, also called without one), Linear subclasses,
  Linears with hooks, a model that is already fused;
* nn.TransformerEncoderLayer / DecoderLayer: relu, gelu, nn.GELU("tanh"), functions that are left
  alone; batch_first and norm_first; train, eval with grad and eval under no_grad (fast path);
* loss modules with non-default options (type, options, values, gradients), TripletMarginLoss
  with p=inf left alone, a loss module as the whole model;
* pickle, copy.deepcopy and torch.save of fused models (in this process and in a new one): the
  same classes, state_dict and torch_ext op calls, the unfused numbers, and no exec / compile of
  Python source while loading;
* state_dict keys and values, load_state_dict both ways, inplace=False (original untouched,
  equal values, other Parameter objects) and inplace=True (same Parameter objects, an optimizer
  built before fuse() still trains the model);
* train/eval switches after fuse(), mixed train/eval submodules;
* the report (return_report, str, logging at INFO on "torch_ext.fuse", the "nothing to fuse"
  warning) and bad input (TypeError naming the type).

Whole CNN/LSTM/Transformer models and torch.compile of fused models are in test_models.py.
"""
from __future__ import annotations

import ast
import builtins
import collections
import contextlib
import copy
import importlib
import io
import logging
import os
import pickle
import sys
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import torch_ext
from torch_ext import FusedLinear, FuseReport
from utils import assert_close, default_device_type, run_python

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

NOTHING_TO_FUSE = "nothing to fuse"


# ----------------------------------------------------------------------------------------------
# Helpers.

def fuse(model: nn.Module, inplace: bool = False) -> Tuple[nn.Module, FuseReport]:
    """torch_ext.fuse with its report; checks the "nothing to fuse" warning comes exactly when
    nothing was replaced (and no other warning comes)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fused, report = torch_ext.fuse(model, inplace=inplace, return_report=True)
    assert isinstance(report, FuseReport)
    messages = [str(w.message) for w in caught]
    nothing = [m for m in messages if NOTHING_TO_FUSE in m]
    assert bool(nothing) == (not report.replaced), f"warnings {messages} for report:\n{report}"
    assert len(messages) == len(nothing), f"unexpected warnings {messages}"
    return fused, report


def entries(lines: List[str], *words: str) -> List[str]:
    """The report lines that contain every one of `words`."""
    return [line for line in lines if all(w in line for w in words)]


def assert_reported(lines: List[str], *words: str) -> None:
    assert entries(lines, *words), f"no report line with {words} in {lines}"


def fused_linears(model: nn.Module) -> Dict[str, Tuple[str, float]]:
    """path -> (activation, negative_slope) of every FusedLinear in `model`."""
    return {name: (m.activation, m.negative_slope) for name, m in model.named_modules() if isinstance(m, FusedLinear)}


def module_types(model: nn.Module) -> List[Tuple[str, type]]:
    return [(name, type(m)) for name, m in model.named_modules(remove_duplicate=False)]


def _fresh(inputs: Sequence) -> List:
    """Leaf copies of the inputs (floating ones require grad)."""
    out = []
    for t in inputs:
        if isinstance(t, torch.Tensor):
            t = t.detach().clone()
            if t.is_floating_point():
                t.requires_grad_(True)
        out.append(t)
    return out


def _outputs(out) -> List[torch.Tensor]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _forward_backward(model: nn.Module, inputs: Sequence, backward: bool = True):
    for p in model.parameters():
        p.grad = None
    ins = _fresh(inputs)
    torch.manual_seed(1234)  # the same dropout masks for both models (p > 0 only where left alone)
    outs = _outputs(model(*ins))
    if not backward:
        return outs, None, None
    gen = torch.Generator().manual_seed(99)
    total = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype, device="cpu").to(o.device)).sum() for o in outs)
    total.backward()
    input_grads = [t.grad if isinstance(t, torch.Tensor) else None for t in ins]
    param_grads = {name: p.grad for name, p in model.named_parameters()}
    return outs, input_grads, param_grads


def assert_same_outputs_and_grads(fused: nn.Module, ref: nn.Module, inputs: Sequence, msg: str = "",
                                  modes: Sequence[bool] = (True, False), eval_no_grad: bool = False) -> None:
    """fused and ref give the same outputs and gradients (inputs, every parameter by name) in
    each training mode of `modes`, and (eval_no_grad) the same outputs in eval mode under no_grad."""
    assert fused is not ref
    shared = {id(p) for p in fused.parameters()} & {id(p) for p in ref.parameters()}
    assert not shared, "compare against a model with its own parameters"
    for training in modes:
        what = f"{msg} ({'train' if training else 'eval'} mode)"
        fused.train(training)
        ref.train(training)
        outs, in_grads, p_grads = _forward_backward(fused, inputs)
        ref_outs, ref_in_grads, ref_p_grads = _forward_backward(ref, inputs)
        assert len(outs) == len(ref_outs), what
        for i, (o, r) in enumerate(zip(outs, ref_outs)):
            assert_close(o, r, msg=f"{what}: output {i}")
        for i, (g, r) in enumerate(zip(in_grads, ref_in_grads)):
            assert_close(g, r, msg=f"{what}: gradient of input {i}")
        assert sorted(p_grads) == sorted(ref_p_grads), f"{what}: parameter names differ"
        for name, r in ref_p_grads.items():
            assert_close(p_grads[name], r, msg=f"{what}: gradient of {name}")
    if eval_no_grad:
        fused.eval()
        ref.eval()
        with torch.no_grad():
            outs, _, _ = _forward_backward(fused, inputs, backward=False)
            ref_outs, _, _ = _forward_backward(ref, inputs, backward=False)
        for i, (o, r) in enumerate(zip(outs, ref_outs)):
            assert_close(o, r, msg=f"{msg} (eval mode, no_grad): output {i}")


def check_left_alone(model: nn.Module, inputs: Sequence, *reason: str) -> FuseReport:
    """fuse(model) replaces nothing, warns, reports `reason`, and gives the same model back."""
    before = module_types(model)
    fused, report = fuse(model)
    assert report.replaced == [], f"replaced something that must be left alone:\n{report}"
    assert_reported(report.skipped, *reason)
    assert module_types(fused) == before, "fuse() changed a model it had nothing to fuse in"
    assert type(fused) is type(model)
    assert_same_outputs_and_grads(fused, model, inputs, "left alone")
    return report


def x8(*batch: int) -> torch.Tensor:
    return torch.randn(*(batch or (5,)), 8)


# ----------------------------------------------------------------------------------------------
# nn.Sequential.

ACTIVATION_MODULES = [
    ("ReLU", lambda: nn.ReLU(), ("relu", 0.01)),
    ("ReLU-inplace", lambda: nn.ReLU(inplace=True), ("relu", 0.01)),
    ("LeakyReLU-default", lambda: nn.LeakyReLU(), ("leaky_relu", 0.01)),
    ("LeakyReLU-0.2", lambda: nn.LeakyReLU(0.2), ("leaky_relu", 0.2)),
    ("LeakyReLU-0", lambda: nn.LeakyReLU(0.0), ("leaky_relu", 0.0)),
    ("LeakyReLU-negative", lambda: nn.LeakyReLU(-0.3), ("leaky_relu", -0.3)),
    ("LeakyReLU-1.5-inplace", lambda: nn.LeakyReLU(1.5, inplace=True), ("leaky_relu", 1.5)),
    ("GELU", lambda: nn.GELU(), ("gelu", 0.01)),
    ("GELU-tanh", lambda: nn.GELU(approximate="tanh"), ("gelu_tanh", 0.01)),
    ("SiLU", lambda: nn.SiLU(), ("silu", 0.01)),
    ("Sigmoid", lambda: nn.Sigmoid(), ("sigmoid", 0.01)),
    ("Tanh", lambda: nn.Tanh(), ("tanh", 0.01)),
]


@pytest.mark.parametrize("make_act, expected", [c[1:] for c in ACTIVATION_MODULES],
                         ids=[c[0] for c in ACTIVATION_MODULES])
def test_sequential_activation_module(make_act, expected):
    model = nn.Sequential(nn.Linear(8, 16), make_act(), nn.Linear(16, 4))
    fused, report = fuse(model)
    assert type(fused[0]) is FusedLinear
    assert type(fused[1]) is nn.Identity, "the activation's slot must become nn.Identity"
    assert type(fused[2]) is nn.Linear, "the last Linear has nothing after it"
    assert fused_linears(fused) == {"0": expected}
    assert len(report.replaced) == 1
    assert_reported(report.replaced, "0 (Linear 8->16)", expected[0], "FusedLinear")
    assert_reported(report.skipped, "2 (Linear 16->4)", "last in its nn.Sequential")
    assert fused[0].weight is not model[0].weight
    assert torch.equal(fused[0].weight, model[0].weight) and torch.equal(fused[0].bias, model[0].bias)
    assert_same_outputs_and_grads(fused, model, [x8(3, 5)], "Sequential")


def test_sequential_several_pairs_bias_false_and_last_linear():
    model = nn.Sequential(
        nn.Linear(7, 13, bias=False), nn.Tanh(),
        nn.Linear(13, 13), nn.LeakyReLU(0.25),
        nn.Linear(13, 5, bias=False), nn.GELU(approximate="tanh"),
        nn.Linear(5, 3),
    )
    fused, report = fuse(model)
    assert fused_linears(fused) == {"0": ("tanh", 0.01), "2": ("leaky_relu", 0.25), "4": ("gelu_tanh", 0.01)}
    assert fused[0].bias is None and fused[4].bias is None and fused[2].bias is not None
    assert [type(fused[i]) for i in (1, 3, 5)] == [nn.Identity] * 3
    assert type(fused[6]) is nn.Linear
    assert len(report.replaced) == 3
    assert_reported(report.replaced, "0 (Linear 7->13)", "tanh")
    assert_reported(report.replaced, "2 (Linear 13->13)", "leaky_relu", "0.25")
    assert_reported(report.skipped, "6 (Linear 5->3)", "last")
    assert_same_outputs_and_grads(fused, model, [torch.randn(2, 3, 7)], "bias=False stack")


def test_nested_sequentials():
    model = nn.Sequential(
        nn.Sequential(nn.Linear(8, 12), nn.SiLU()),
        nn.Sequential(nn.Linear(12, 6), nn.Sequential(nn.Sigmoid(), nn.Linear(6, 6))),
        nn.Sequential(nn.Sequential(nn.Linear(6, 5), nn.ReLU()), nn.Linear(5, 2)),
        nn.Tanh(),  # follows a Sequential, not a Linear
    )
    fused, report = fuse(model)
    assert fused_linears(fused) == {"0.0": ("silu", 0.01), "2.0.0": ("relu", 0.01)}
    # 1.0 is followed by a Sequential (the Sigmoid is inside it): fuse() does not look into it.
    assert type(fused[1][0]) is nn.Linear and type(fused[1][1][0]) is nn.Sigmoid
    assert type(fused[3]) is nn.Tanh
    assert_reported(report.skipped, "1.0 (Linear 12->6)", "followed by Sequential")
    assert_reported(report.skipped, "1.1.1 (Linear 6->6)", "last")
    assert_reported(report.skipped, "2.1 (Linear 5->2)", "last")
    assert_same_outputs_and_grads(fused, model, [x8(4)], "nested Sequentials")


def test_odd_sized_stack():
    sizes = [1, 3, 17, 65, 2, 129, 1]
    acts = [nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.Sigmoid, lambda: nn.LeakyReLU(0.1)]
    layers: List[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(a, b, bias=i % 2 == 0))
        layers.append(acts[i]())
    model = nn.Sequential(*layers)
    fused, report = fuse(model)
    assert sorted(fused_linears(fused), key=int) == [str(2 * i) for i in range(len(sizes) - 1)]
    assert fused_linears(fused)["10"] == ("leaky_relu", 0.1)
    assert all(type(fused[2 * i + 1]) is nn.Identity for i in range(len(sizes) - 1))
    assert report.skipped == []
    assert_same_outputs_and_grads(fused, model, [torch.randn(7, 1)], "odd-sized stack")
    assert_same_outputs_and_grads(fused, model, [torch.randn(1)], "odd-sized stack, 1-D input", modes=(False,))


class MyReLU(nn.ReLU):
    pass


@pytest.mark.parametrize("after, reason", [
    (lambda: [nn.Dropout(0.5), nn.ReLU()], "followed by Dropout"),
    (lambda: [nn.ELU()], "followed by ELU"),
    (lambda: [nn.Softplus()], "followed by Softplus"),
    (lambda: [nn.PReLU()], "followed by PReLU"),
    (lambda: [MyReLU()], "followed by MyReLU"),  # a subclass could change forward
    (lambda: [nn.Identity(), nn.ReLU()], "followed by Identity"),
    (lambda: [], "last in its nn.Sequential"),
], ids=["dropout", "elu", "softplus", "prelu", "relu-subclass", "identity", "last"])
def test_sequential_left_alone(after, reason):
    model = nn.Sequential(nn.Linear(8, 8), *after())
    check_left_alone(model, [x8(6)], "0 (Linear 8->8)", reason)


def test_sequential_with_named_children():
    """nn.Sequential(OrderedDict(...)): children named, not numbered."""
    model = nn.Sequential(collections.OrderedDict(
        fc1=nn.Linear(8, 16), act1=nn.GELU(), fc2=nn.Linear(16, 8), act2=nn.ReLU(), out=nn.Linear(8, 2)))
    fused, report = fuse(model)
    assert fused_linears(fused) == {"fc1": ("gelu", 0.01), "fc2": ("relu", 0.01)}
    assert type(fused.act1) is nn.Identity and type(fused.act2) is nn.Identity
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_reported(report.skipped, "out", "last")
    assert_same_outputs_and_grads(fused, model, [x8(3)], "named Sequential")


def test_sequential_activation_slot_also_called_elsewhere():
    """The activation's slot becomes Identity: a forward that also calls that slot itself must
    still get the activation there (or the pair must be left alone)."""

    class SlotReused(nn.Module):
        def __init__(self):
            super().__init__()
            self.seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

        def forward(self, x):
            return self.seq(x) + self.seq[1](x)

    model = SlotReused()
    fused, _ = fuse(model)
    assert_same_outputs_and_grads(fused, model, [x8(4)], "Sequential activation slot called elsewhere")


# ----------------------------------------------------------------------------------------------
# Custom forwards (torch.fx).

class FnBlock(nn.Module):
    """fc1 -> activation -> fc2; the subclasses that _fn_block makes write the activation in
    their forward (fuse() reads a forward's source, so each is real code in a real file)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


_FORMS_DIR = tempfile.mkdtemp(prefix="torch_ext_fuse_forms_")
sys.path.insert(0, _FORMS_DIR)
_FN_BLOCKS: Dict[str, type] = {}


def _fn_block(expr: str) -> Callable[[], FnBlock]:
    """A maker of an FnBlock subclass whose forward is `h = self.fc1(x); return self.fc2(<expr>)`
    (expr in terms of self and h), defined at module level in a generated file, so that its
    source can be read and its instances pickled."""
    if expr not in _FN_BLOCKS:
        name = f"fuse_form_{len(_FN_BLOCKS)}"
        with open(os.path.join(_FORMS_DIR, name + ".py"), "w") as f:
            f.write(
                "import torch\nimport torch.nn.functional as F\nfrom test_fuse import FnBlock as _Base\n\n\n"
                "class FnBlock(_Base):\n"
                "    def forward(self, x):\n"
                "        h = self.fc1(x)\n"
                f"        return self.fc2({expr})\n"
            )
        _FN_BLOCKS[expr] = importlib.import_module(name).FnBlock
    return _FN_BLOCKS[expr]


FUNCTIONAL_FORMS = [
    ("F.relu", "F.relu(h)", ("relu", 0.01)),
    ("F.relu-inplace", "F.relu(h, inplace=True)", ("relu", 0.01)),
    ("F.relu-inplace-positional", "F.relu(h, True)", ("relu", 0.01)),
    ("F.relu_", "F.relu_(h)", ("relu", 0.01)),
    ("torch.relu", "torch.relu(h)", ("relu", 0.01)),
    ("torch.relu_", "torch.relu_(h)", ("relu", 0.01)),
    ("x.relu", "h.relu()", ("relu", 0.01)),
    ("x.relu_", "h.relu_()", ("relu", 0.01)),
    ("module-call", "self.act(h)", ("relu", 0.01)),
    ("module-call-kwarg", "self.act(input=h)", ("relu", 0.01)),
    ("F.leaky_relu-default", "F.leaky_relu(h)", ("leaky_relu", 0.01)),
    ("F.leaky_relu-0.2", "F.leaky_relu(h, 0.2)", ("leaky_relu", 0.2)),
    ("F.leaky_relu-kw-inplace", "F.leaky_relu(h, negative_slope=0.3, inplace=True)", ("leaky_relu", 0.3)),
    ("F.leaky_relu-positional-inplace", "F.leaky_relu(h, 0.05, True)", ("leaky_relu", 0.05)),
    ("F.gelu", "F.gelu(h)", ("gelu", 0.01)),
    ("F.gelu-none", 'F.gelu(h, approximate="none")', ("gelu", 0.01)),
    ("F.gelu-tanh", 'F.gelu(h, approximate="tanh")', ("gelu_tanh", 0.01)),
    ("F.silu", "F.silu(h)", ("silu", 0.01)),
    ("F.silu-inplace", "F.silu(h, inplace=True)", ("silu", 0.01)),
    ("torch.sigmoid", "torch.sigmoid(h)", ("sigmoid", 0.01)),
    ("x.sigmoid", "h.sigmoid()", ("sigmoid", 0.01)),
    ("x.sigmoid_", "h.sigmoid_()", ("sigmoid", 0.01)),
    ("F.sigmoid", "F.sigmoid(h)", ("sigmoid", 0.01)),
    ("torch.tanh", "torch.tanh(h)", ("tanh", 0.01)),
    ("x.tanh", "h.tanh()", ("tanh", 0.01)),
    ("x.tanh_", "h.tanh_()", ("tanh", 0.01)),
    ("F.tanh", "F.tanh(h)", ("tanh", 0.01)),
]


@pytest.mark.parametrize("form, expected", [c[1:] for c in FUNCTIONAL_FORMS], ids=[c[0] for c in FUNCTIONAL_FORMS])
def test_custom_forward_functional(form, expected):
    cls = _fn_block(form)
    model = cls()
    fused, report = fuse(model)
    assert isinstance(fused, cls), "the fused module must keep its class (as a subclass)"
    assert type(fused) is not cls and type(fused).__name__ == "FnBlock"
    assert type(model) is cls, "fuse(inplace=False) changed the original's class"
    assert type(fused.fc1) is FusedLinear
    assert (fused.fc1.activation, fused.fc1.negative_slope) == expected
    assert type(fused.fc2) is nn.Linear and type(fused.act) is nn.ReLU
    assert_reported(report.replaced, "fc1 (Linear 8->16)", expected[0])
    assert_reported(report.skipped, "fc2 (Linear 16->4)")
    assert list(fused.state_dict()) == list(model.state_dict())
    assert_same_outputs_and_grads(fused, model, [x8(2, 3)], "custom forward")


class UsedTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        return F.relu(y) + y


class TrainingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.fc(x))
        if self.training:
            h = h * 0.5
        return h


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        if x.sum() > 0:
            return F.relu(self.fc(x))
        return F.relu(self.fc(-x))


LEFT_ALONE_FORMS = [
    ("output-used-twice", UsedTwice, ("fc (Linear 8->8)", "several users")),
    ("softplus", _fn_block("F.softplus(h)"), ("fc1 (Linear 8->16)", "not followed by a supported activation")),
    ("elu", _fn_block("F.elu(h)"), ("fc1 (Linear 8->16)", "not followed by a supported activation")),
    ("hardtanh", _fn_block("F.hardtanh(h)"), ("fc1 (Linear 8->16)", "not followed by a supported activation")),
    ("scaled-first", _fn_block("F.relu(h * 2)"), ("fc1 (Linear 8->16)", "not followed by a supported activation")),
    ("added-first", _fn_block("torch.tanh(h + 1)"), ("fc1 (Linear 8->16)", "not followed by a supported activation")),
    ("dropout-first", _fn_block("F.relu(F.dropout(h, 0.5, self.training))"),
     ("fc1 (Linear 8->16)", "differs between training and eval mode")),
    ("training-branch", TrainingBranch, ("fc (Linear 8->8)", "differs between training and eval mode")),
    ("data-dependent", DataDependent, ("fc (Linear 8->8)", "torch.fx cannot trace")),
]


@pytest.mark.parametrize("make, reason", [c[1:] for c in LEFT_ALONE_FORMS], ids=[c[0] for c in LEFT_ALONE_FORMS])
def test_custom_forward_left_alone(make, reason):
    model = make()
    check_left_alone(model, [x8(3)], *reason)
    if isinstance(model, DataDependent):  # both branches
        check_left_alone(model, [-x8(3).abs() - 1], *reason)


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.gelu(self.fc(x))


class Outer(nn.Module):
    """Calls block.fc itself too, then `ancestor_act` on it (None: nothing)."""

    def __init__(self, ancestor_act: Optional[str]):
        super().__init__()
        self.block = Inner()
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)
        self.ancestor_act = ancestor_act

    def forward(self, x):
        h = self.block(x) + F.silu(self.proj(x))
        direct = self.block.fc(x)
        if self.ancestor_act == "gelu":
            direct = F.gelu(direct)
        elif self.ancestor_act == "tanh":
            direct = torch.tanh(direct)
        return self.head(h + direct)


def test_nested_custom_modules():
    model = nn.Sequential(Inner(), nn.Linear(8, 8), nn.ReLU())
    fused, report = fuse(model)
    assert fused_linears(fused) == {"0.fc": ("gelu", 0.01), "1": ("relu", 0.01)}
    assert isinstance(fused[0], Inner) and type(fused[0]) is not Inner
    assert_same_outputs_and_grads(fused, model, [x8(4)], "custom module in a Sequential")


@pytest.mark.parametrize("ancestor_act", ["gelu", "tanh", None])
def test_linear_called_from_ancestor(ancestor_act):
    model = Outer(ancestor_act)
    fused, report = fuse(model)
    expected = {"proj": ("silu", 0.01)}
    if ancestor_act == "gelu":  # every use of block.fc followed by GELU: fused in both forwards
        expected["block.fc"] = ("gelu", 0.01)
        assert_reported(report.replaced, "block.fc", "gelu", "2 uses")
    elif ancestor_act == "tanh":
        assert_reported(report.skipped, "block.fc", "different activations")
    else:
        assert_reported(report.skipped, "block.fc", "not followed by a supported activation")
    assert fused_linears(fused) == expected
    assert isinstance(fused, Outer) and isinstance(fused.block, Inner)
    assert_same_outputs_and_grads(fused, model, [x8(5)], f"ancestor uses block.fc with {ancestor_act}")


class Untraceable(nn.Module):
    """fx cannot trace this forward, which calls its grandchild block.fc without an activation;
    block's own (traceable) forward calls it with GELU."""

    def __init__(self):
        super().__init__()
        self.block = Inner()

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent: fx cannot trace
            return self.block(x) + self.block.fc(x)
        return x


class TrainingBranchAncestor(nn.Module):
    """Like Untraceable, but its forward is left alone because it branches on self.training."""

    def __init__(self):
        super().__init__()
        self.block = Inner()

    def forward(self, x):
        h = self.block(x)
        if self.training:
            h = h * 1.0
        return h + self.block.fc(x)


class SlicesSequential(nn.Module):
    """features[:1] builds a new Sequential on each call: fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))

    def forward(self, x):
        return self.features(x) + self.features[:1](x)


class IndexesSequential(nn.Module):
    def __init__(self):
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(8, 8), nn.ReLU())

    def forward(self, x):
        if x.sum() > -1e9:
            return self.seq(x) + self.seq[0](x)
        return x


@pytest.mark.parametrize("make", [Untraceable, TrainingBranchAncestor, SlicesSequential, IndexesSequential],
                         ids=["untraceable-calls-grandchild", "training-branch-calls-grandchild",
                              "untraceable-slices-sequential", "untraceable-indexes-sequential"])
def test_linear_reached_from_an_untraceable_ancestor(make):
    """A forward fuse() cannot rewrite uses a Linear (deeper down) without activation: fusing that
    Linear would add the activation there, so it must be left alone."""
    model = make()
    fused, report = fuse(model)
    assert_same_outputs_and_grads(fused, model, [x8(4)], f"{make.__name__}")


class ListNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.out = nn.Linear(8, 2)

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x)) + x
        return self.out(x)


class DictNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 4), "b": nn.Linear(8, 4)})

    def forward(self, x):
        return F.silu(self.heads["a"](x)) * self.heads["b"](x)


def test_module_list_iterated_in_forward():
    model = ListNet()
    fused, report = fuse(model)
    assert fused_linears(fused) == {f"layers.{i}": ("tanh", 0.01) for i in range(3)}
    assert isinstance(fused.layers, nn.ModuleList)
    assert_reported(report.skipped, "out (Linear 8->2)")
    assert_same_outputs_and_grads(fused, model, [x8(3)], "ModuleList")


def test_module_dict():
    model = DictNet()
    fused, report = fuse(model)
    assert fused_linears(fused) == {"heads.a": ("silu", 0.01)}
    assert type(fused.heads["b"]) is nn.Linear
    assert_reported(report.replaced, "heads.a")
    assert_reported(report.skipped, "heads.b", "not followed by a supported activation")
    assert_same_outputs_and_grads(fused, model, [x8(3)], "ModuleDict")


def test_module_list_as_the_model_is_left_alone():
    model = nn.ModuleList([nn.Linear(8, 8), nn.ReLU()])
    fused, report = fuse(model)
    assert report.replaced == [] and type(fused[0]) is nn.Linear and type(fused[1]) is nn.ReLU
    assert_reported(report.skipped, "0 (Linear 8->8)", "ModuleList")


class OptionalArg(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, scale=None):
        h = F.relu(self.fc(x))
        if scale is not None:
            h = h * scale
        return h


def test_forward_with_an_optional_argument():
    """`if scale is not None` is always true on an fx Proxy: the traced forward must not be the
    one a call without `scale` runs."""
    model = OptionalArg()
    fused, report = fuse(model)
    assert_same_outputs_and_grads(fused, model, [x8(3)], "optional argument left out")
    assert_same_outputs_and_grads(fused, model, [x8(3), torch.full((8,), 3.0)], "optional argument given")


class TensorConstant(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return F.relu(self.fc(x)) * torch.tensor(2.0)


def test_forward_creating_a_tensor_is_fused():
    """The forward is the same in train and eval mode; a tensor it creates must not make fuse()
    say otherwise."""
    model = TensorConstant()
    fused, report = fuse(model)
    assert not entries(report.skipped, "differs between training and eval mode"), str(report)
    assert fused_linears(fused) == {"fc": ("relu", 0.01)}, str(report)
    assert_same_outputs_and_grads(fused, model, [x8(3)], "tensor constant")


class NoGradPart(nn.Module):
    """A frozen feature extractor inside the forward: no gradient reaches `frozen` or the input."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        with torch.no_grad():
            h = F.relu(self.frozen(x))
        return self.head(h)


class AutocastPart(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        with torch.autocast(default_device_type(), dtype=torch.bfloat16):
            h = F.gelu(self.fc(x))
        return self.head(h.float())


@pytest.mark.parametrize("make", [NoGradPart, AutocastPart], ids=["no_grad", "autocast"])
def test_forward_with_a_context_manager(make):
    """torch.fx does not record `with torch.no_grad()` / `torch.autocast` blocks: a forward
    rewritten from its trace loses them."""
    model = make()
    fused, report = fuse(model)
    assert_same_outputs_and_grads(fused, model, [x8(3)], make.__name__)


def test_fused_custom_model_can_be_copied_and_saved():
    model = _fn_block("torch.sigmoid(h)")()
    fused, _ = fuse(model)
    clone = copy.deepcopy(fused)
    assert isinstance(clone, FnBlock) and type(clone.fc1) is FusedLinear
    assert_same_outputs_and_grads(clone, model, [x8(3)], "deep copy of a fused model")
    buffer = io.BytesIO()
    torch.save(fused, buffer)  # the whole model, as torch.save(model) does for the original
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert_same_outputs_and_grads(loaded, model, [x8(3)], "torch.save/torch.load of a fused model")


# ----------------------------------------------------------------------------------------------
# Pickling: a fused model pickles as its original classes plus what fuse() changed; loading it
# executes no Python source (a rewritten forward is generated again on the module's first call).

class TorchExtOps(TorchDispatchMode):
    """``with TorchExtOps() as calls:`` counts the calls of each torch_ext op (forward and backward)."""

    def __enter__(self):
        super().__enter__()
        self.calls = collections.Counter()
        return self.calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "torch_ext":
            self.calls[func.name()] += 1
        return func(*args, **(kwargs or {}))


def torch_ext_ops(model: nn.Module, inputs: Sequence) -> collections.Counter:
    """The torch_ext ops one forward and backward of `model` calls, with their counts."""
    with TorchExtOps() as calls:
        _forward_backward(model, inputs)
    return calls


@contextlib.contextmanager
def no_source_execution(class_introspection: bool = False):
    """builtins.exec and builtins.compile raise inside the block: nothing there runs Python source
    text. class_introspection=True lets through what reading a class (not running code) takes:
    ast.parse (compile to a syntax tree only), and typing's compile of a type annotation written
    as a string, which get_type_hints evaluates; rebuilding a fused transformers causal LM's class
    does both (torch_ext reads its forward's source, transformers' PreTrainedModel.__init_subclass__
    reads the new class's type hints). What torch.load imports on its first use is imported before."""
    buffer = io.BytesIO()
    torch.save(torch.zeros(1), buffer)
    buffer.seek(0)
    torch.load(buffer)
    saved_exec, saved_compile = builtins.exec, builtins.compile

    def refuse_exec(*args, **kwargs):
        raise AssertionError("exec() called while loading a fused model")

    def refuse_compile(source, filename, mode, flags=0, *args, **kwargs):
        if class_introspection and (flags & ast.PyCF_ONLY_AST
                                    or sys._getframe(1).f_globals.get("__name__") == "typing"):
            return saved_compile(source, filename, mode, flags, *args, **kwargs)
        raise AssertionError("compile() called while loading a fused model")

    builtins.exec, builtins.compile = refuse_exec, refuse_compile
    try:
        yield
    finally:
        builtins.exec, builtins.compile = saved_exec, saved_compile


def round_trip(model: nn.Module, how: str, class_introspection: bool = False) -> nn.Module:
    """`model` through pickle, copy.deepcopy or torch.save / torch.load, loaded under
    no_source_execution(class_introspection)."""
    if how == "deepcopy":
        with no_source_execution(class_introspection):
            return copy.deepcopy(model)
    if how == "pickle":
        data = pickle.dumps(model)
        with no_source_execution(class_introspection):
            return pickle.loads(data)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    with no_source_execution(class_introspection):
        return torch.load(buffer, weights_only=False)


def class_names(model: nn.Module) -> List[Tuple[str, str]]:
    return [(name, type(m).__qualname__) for name, m in model.named_modules(remove_duplicate=False)]


@pytest.mark.parametrize("class_introspection", [False, True])
def test_no_source_execution_refuses_exec_and_compile(class_introspection):
    with no_source_execution(class_introspection), pytest.raises(AssertionError, match="exec"):
        exec("x = 1")  # noqa: S102
    with no_source_execution(class_introspection), pytest.raises(AssertionError, match="compile"):
        compile("x = 1", "<test>", "exec")
    if class_introspection:
        with no_source_execution(class_introspection):
            ast.parse("x = 1")
    exec("x = 1")  # noqa: S102 (given back after the block)


# Models whose forwards fuse() rewrites from their traces, with their inputs: sigmoid and gelu (a
# loaded forward that applied them again would give other numbers), several rewritten modules, a
# tensor the forward creates (which torch.fx keeps on the module).
PICKLED_MODELS = [
    ("FnBlock-sigmoid", lambda: _fn_block("torch.sigmoid(h)")(), lambda: [x8(3)]),
    ("FnBlock-gelu-tanh", lambda: _fn_block('F.gelu(h, approximate="tanh")')(), lambda: [x8(2, 3)]),
    ("Mixed", lambda: Mixed(), lambda: mixed_inputs()),
    ("TensorConstant", lambda: TensorConstant(), lambda: [x8(3)]),
]


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
@pytest.mark.parametrize("make, make_inputs", [c[1:] for c in PICKLED_MODELS], ids=[c[0] for c in PICKLED_MODELS])
def test_fused_model_round_trips(how, make, make_inputs):
    """pickle / deepcopy / torch.save of a fused model loads, running no exec or compile, into
    the same classes (subclasses of the originals, still rewritten) with the same state_dict,
    calling the same torch_ext ops and giving the unfused model's outputs and gradients; a
    loaded model pickles again before its first call."""
    model = make()
    inputs = make_inputs()
    fused, _ = fuse(model)
    loaded = round_trip(fused, how)
    again = round_trip(loaded, how)  # before loaded's first call
    for copied, what in ((loaded, how), (again, f"{how} twice")):
        assert class_names(copied) == class_names(fused), what
        assert isinstance(copied, type(model)) and type(copied) is not type(model), what
        assert fused_linears(copied) == fused_linears(fused), what
        assert list(copied.state_dict()) == list(fused.state_dict()), what
        for key, value in fused.state_dict().items():
            assert torch.equal(copied.state_dict()[key], value), f"{what}: {key}"
        ops = torch_ext_ops(copied, inputs)
        assert ops and ops == torch_ext_ops(fused, inputs), f"{what}: torch_ext ops {ops}"
        assert_same_outputs_and_grads(copied, model, inputs, f"{what} of a fused {type(model).__name__}")


def test_deepcopy_keeps_the_rewritten_class():
    fused, _ = fuse(_fn_block("torch.sigmoid(h)")())
    clone = copy.deepcopy(fused)
    assert type(clone) is type(fused) and clone.fc1 is not fused.fc1


def load_in_new_process(saved: Dict[str, Tuple[nn.Module, object]], results_of: str, folder, imports: str = "",
                        class_introspection: bool = False) -> dict:
    """torch.save of `saved` ({name: (fused model, inputs)}), then torch.load of it in a new
    process (nothing built or cached there yet) under no_source_execution; returns what the
    expression `results_of` gave there ({name: ...}, from `saved`, after `imports` ran)."""
    torch.save(saved, os.path.join(folder, "fused.pt"))
    # The modules defining the classes are imported first (their own code, which unpickling would
    # run as it imports them), so that only torch.load is under no_source_execution.
    modules = sorted({type(m).__module__ for model, _ in saved.values() for m in model.modules()})
    code = (
        f"{imports}\n"
        "import importlib, torch, test_fuse\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"with test_fuse.no_source_execution(class_introspection={class_introspection!r}):\n"
        f"    saved = torch.load({os.path.join(folder, 'fused.pt')!r}, weights_only=False)\n"
        f"results = {results_of}\n"
        f"torch.save(results, {os.path.join(folder, 'results.pt')!r})\n"
    )
    result = run_python(code, timeout=300)
    assert result.returncode == 0, result.stderr
    return torch.load(os.path.join(folder, "results.pt"), weights_only=False)


@pytest.mark.cpu_only("a subprocess loads a model saved on the CPU")
def test_fused_model_loads_in_a_new_process(tmp_path):
    """torch.load of whole fused models in a new process (nothing built or cached there yet):
    it runs no exec or compile, and each model gives the unfused outputs and gradients and calls
    the same torch_ext ops."""
    cases = {name: (make(), make_inputs()) for name, make, make_inputs in PICKLED_MODELS}
    fused = {name: fuse(model)[0] for name, (model, _) in cases.items()}
    results = load_in_new_process(
        {name: (fused[name], inputs) for name, (_, inputs) in cases.items()},
        "{name: (test_fuse.class_names(model), test_fuse.torch_ext_ops(model, inputs), "
        "test_fuse._forward_backward(model, inputs)) for name, (model, inputs) in saved.items()}",
        str(tmp_path), imports=f"import sys; sys.path.insert(0, {_FORMS_DIR!r})",
    )
    for name, (model, inputs) in cases.items():
        names, ops, (outs, in_grads, p_grads) = results[name]
        assert names == class_names(fused[name]), name
        assert ops and ops == torch_ext_ops(fused[name], inputs), f"{name}: torch_ext ops {ops}"
        ref_outs, ref_in_grads, ref_p_grads = _forward_backward(model, inputs)
        for i, (o, r) in enumerate(zip(outs, ref_outs)):
            assert_close(o, r, msg=f"{name} loaded in a new process: output {i}")
        for i, (g, r) in enumerate(zip(in_grads, ref_in_grads)):
            assert_close(g, r, msg=f"{name} loaded in a new process: gradient of input {i}")
        assert sorted(p_grads) == sorted(ref_p_grads), name
        for key, r in ref_p_grads.items():
            assert_close(p_grads[key], r, msg=f"{name} loaded in a new process: gradient of {key}")


# ----------------------------------------------------------------------------------------------
# Shared Linears, subclasses, hooks, already fused.

def test_shared_linear_same_activation_in_one_sequential():
    fc = nn.Linear(8, 8)
    model = nn.Sequential(fc, nn.ReLU(), nn.Linear(8, 8), nn.Tanh(), fc, nn.ReLU())
    ref = copy.deepcopy(model)
    weight, bias = fc.weight, fc.bias
    fused, report = fuse(model, inplace=True)
    assert fused is model
    assert type(fused[0]) is FusedLinear and fused[0] is fused[4], "both slots must hold the same FusedLinear"
    assert fused[0].weight is weight and fused[0].bias is bias
    assert type(fused[1]) is nn.Identity and type(fused[5]) is nn.Identity
    assert fused_linears(fused) == {"0": ("relu", 0.01), "2": ("tanh", 0.01)}
    assert_reported(report.replaced, "0, 4 (Linear 8->8)", "relu", "2 uses")
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert_same_outputs_and_grads(fused, ref, [x8(3)], "shared Linear")


def test_shared_linear_different_activations():
    fc = nn.Linear(8, 8)
    model = nn.Sequential(fc, nn.ReLU(), fc, nn.GELU())
    check_left_alone(model, [x8(3)], "0, 2 (Linear 8->8)", "different activations")


class SharedElsewhere(nn.Module):
    def __init__(self, act_on_direct_call: bool):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.seq = nn.Sequential(self.fc, nn.ReLU())
        self.act_on_direct_call = act_on_direct_call

    def forward(self, x):
        direct = self.fc(x)
        if self.act_on_direct_call:
            direct = F.relu(direct)
        return self.seq(x) - direct * 0.5


def test_shared_linear_also_called_without_activation():
    check_left_alone(SharedElsewhere(False), [x8(3)], "fc, seq.0 (Linear 8->8)",
                     "not followed by a supported activation")


def test_shared_linear_also_called_with_the_same_activation():
    model = SharedElsewhere(True)
    fused, report = fuse(model)
    assert type(fused.fc) is FusedLinear and fused.fc is fused.seq[0]
    assert type(fused.seq[1]) is nn.Identity
    assert_reported(report.replaced, "fc, seq.0", "2 uses")
    assert_same_outputs_and_grads(fused, model, [x8(3)], "shared Linear, relu everywhere")


class MyLinear(nn.Linear):
    pass


def test_linear_subclass_left_alone():
    model = nn.Sequential(MyLinear(8, 8), nn.ReLU())
    check_left_alone(model, [x8(3)], "0 (MyLinear 8->8)", "subclass of nn.Linear")


HOOKS = {
    "forward": lambda m, log: m.register_forward_hook(lambda mod, args, out: log.append("forward")),
    "forward-pre": lambda m, log: m.register_forward_pre_hook(lambda mod, args: log.append("forward-pre")),
    "forward-with-kwargs": lambda m, log: m.register_forward_hook(lambda mod, args, kw, out: log.append("kw"),
                                                                  with_kwargs=True),
    "full-backward": lambda m, log: m.register_full_backward_hook(lambda mod, gi, go: log.append("backward")),
    "full-backward-pre": lambda m, log: m.register_full_backward_pre_hook(lambda mod, go: log.append("backward-pre")),
}


@pytest.mark.parametrize("hook", list(HOOKS))
def test_linear_with_hook_left_alone(hook):
    log: List[str] = []
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU())
    HOOKS[hook](model[0], log)
    fused, report = fuse(model)
    assert type(fused[0]) is nn.Linear and type(fused[1]) is nn.ReLU, (
        f"a Linear with a {hook} hook was replaced:\n{report}"
    )
    assert_reported(report.skipped, "0 (Linear 8->8)", "hooks")
    assert fused_linears(fused) == {"2": ("relu", 0.01)}
    log.clear()
    fused(x8(2).requires_grad_()).sum().backward()
    assert log, f"the {hook} hook no longer runs"
    assert_same_outputs_and_grads(fused, model, [x8(3)], f"{hook} hook")


@pytest.mark.parametrize("where", ["sequential", "custom-forward"])
def test_activation_with_hook_left_alone(where):
    """A forward hook on the activation module (e.g. to record activations) sees the activation's
    input and output, which a FusedLinear does not give: the pair must be left alone."""
    log: List[torch.Tensor] = []
    if where == "sequential":
        model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
        act, path = model[1], "0 (Linear 8->8)"
    else:
        model = _fn_block("self.act(h)")()
        act, path = model.act, "fc1 (Linear 8->16)"
    act.register_forward_hook(lambda mod, args, out: log.append(out))
    fused, report = fuse(model)
    log.clear()
    fused(x8(2))
    assert len(log) == 1, f"the activation's forward hook ran {len(log)} times after fuse():\n{report}"
    assert_reported(report.skipped, path, "hook")
    assert_same_outputs_and_grads(fused, model, [x8(3)], f"activation hook ({where})")


def test_already_fused_model():
    model = nn.Sequential(FusedLinear(8, 16, activation="gelu"), FusedLinear(16, 4, activation="none"))
    before = module_types(model)
    with pytest.warns(UserWarning, match=NOTHING_TO_FUSE):
        fused = torch_ext.fuse(model)
    assert module_types(fused) == before
    assert fused_linears(fused) == {"0": ("gelu", 0.01), "1": ("none", 0.01)}
    assert_same_outputs_and_grads(fused, model, [x8(3)], "already fused")
    # fusing the fused result again changes nothing
    again, report = fuse(torch_ext.fuse(nn.Sequential(nn.Linear(8, 8), nn.ReLU())))
    assert report.replaced == [] and type(again[0]) is FusedLinear and type(again[1]) is nn.Identity


# ----------------------------------------------------------------------------------------------
# Transformer layers.

TRANSFORMER_ACTIVATIONS = [
    ("relu", lambda: "relu", ("relu", 0.01)),
    ("gelu", lambda: "gelu", ("gelu", 0.01)),
    ("GELU-tanh-module", lambda: nn.GELU(approximate="tanh"), ("gelu_tanh", 0.01)),
    ("F.silu", lambda: F.silu, None),  # a function other than F.relu / F.gelu: left alone
    ("lambda", lambda: (lambda t: F.relu(t)), None),
]


@pytest.mark.parametrize("layer_cls", [nn.TransformerEncoderLayer, nn.TransformerDecoderLayer],
                         ids=["encoder", "decoder"])
@pytest.mark.parametrize("make_act, expected", [c[1:] for c in TRANSFORMER_ACTIVATIONS],
                         ids=[c[0] for c in TRANSFORMER_ACTIVATIONS])
@pytest.mark.parametrize("batch_first, norm_first", [(True, False), (False, True)],
                         ids=["batch_first-post_norm", "seq_first-pre_norm"])
def test_transformer_layer(layer_cls, make_act, expected, batch_first, norm_first):
    model = layer_cls(16, 2, dim_feedforward=24, dropout=0.0, activation=make_act(),
                      batch_first=batch_first, norm_first=norm_first)
    fused, report = fuse(model)

    def tokens(length: int) -> torch.Tensor:  # batch of 3
        return torch.randn(3, length, 16) if batch_first else torch.randn(length, 3, 16)

    inputs = [tokens(5)] if layer_cls is nn.TransformerEncoderLayer else [tokens(5), tokens(4)]
    assert_same_outputs_and_grads(fused, model, inputs, f"{layer_cls.__name__}", eval_no_grad=True)
    assert type(fused) is layer_cls
    if expected is None:
        assert type(fused.linear1) is nn.Linear and fused.activation is model.activation
        assert_reported(report.skipped, "linear1 (Linear 16->24)", "not a supported one")
    else:
        assert type(fused.linear1) is FusedLinear
        assert (fused.linear1.activation, fused.linear1.negative_slope) == expected
        assert type(fused.activation) is nn.Identity
        assert report.replaced == [f"linear1 (Linear 16->24) + {expected[0]} -> FusedLinear"]
    assert type(fused.linear2) is nn.Linear
    assert_reported(report.skipped, "linear2 (Linear 24->16)")
    # MultiheadAttention's out_proj (a Linear subclass no activation follows) is not a candidate:
    # untouched, and not listed, so that a fully fused model's report has no noise.
    assert type(fused.self_attn.out_proj) is type(model.self_attn.out_proj)
    assert not entries(report.skipped + report.replaced, "out_proj"), str(report)
    assert list(fused.state_dict()) == list(model.state_dict())


def test_transformer_layer_inside_custom_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Linear(8, 16)
            self.layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True)
            self.head = nn.Linear(16, 3)

        def forward(self, x):
            return self.head(self.layer(torch.tanh(self.embed(x))))

    model = Net()
    fused, report = fuse(model)
    assert fused_linears(fused) == {"embed": ("tanh", 0.01), "layer.linear1": ("relu", 0.01)}
    assert_same_outputs_and_grads(fused, model, [torch.randn(2, 6, 8)], "Transformer layer in a custom module",
                                  eval_no_grad=True)


# ----------------------------------------------------------------------------------------------
# Loss modules.

def ce_inputs():
    logits = torch.randn(6, 5)
    target = torch.tensor([0, 4, 2, 1, 3, 2])
    return [logits, target]


def ce_ignore_inputs():
    logits, target = ce_inputs()
    target[1] = 3  # ignore_index
    return [logits, target]


def pair_inputs():
    return [torch.randn(4, 6) * 2, torch.randn(4, 6) * 2]


def triplet_inputs():
    return [torch.randn(5, 7), torch.randn(5, 7), torch.randn(5, 7)]


LOSSES = [
    ("CrossEntropyLoss", lambda: nn.CrossEntropyLoss(), ce_inputs, torch_ext.CrossEntropyLoss,
     ("ignore_index", "reduction", "label_smoothing")),
    ("CrossEntropyLoss-options",
     lambda: nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5, ignore_index=3, reduction="sum", label_smoothing=0.15),
     ce_ignore_inputs, torch_ext.CrossEntropyLoss, ("ignore_index", "reduction", "label_smoothing")),
    ("CrossEntropyLoss-none", lambda: nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5, reduction="none"),
     ce_inputs, torch_ext.CrossEntropyLoss, ("ignore_index", "reduction", "label_smoothing")),
    ("MSELoss-sum", lambda: nn.MSELoss(reduction="sum"), pair_inputs, torch_ext.MSELoss, ("reduction",)),
    ("MSELoss-none", lambda: nn.MSELoss(reduction="none"), pair_inputs, torch_ext.MSELoss, ("reduction",)),
    ("HuberLoss", lambda: nn.HuberLoss(delta=0.7, reduction="sum"), pair_inputs, torch_ext.HuberLoss,
     ("reduction", "delta")),
    ("SmoothL1Loss", lambda: nn.SmoothL1Loss(beta=1.7), pair_inputs, torch_ext.SmoothL1Loss, ("reduction", "beta")),
    ("SmoothL1Loss-beta0", lambda: nn.SmoothL1Loss(beta=0.0, reduction="none"), pair_inputs, torch_ext.SmoothL1Loss,
     ("reduction", "beta")),
    ("TripletMarginLoss", lambda: nn.TripletMarginLoss(margin=2.5, p=1.5, swap=True), triplet_inputs,
     torch_ext.TripletMarginLoss, ("margin", "p", "eps", "swap", "reduction")),
    ("TripletMarginLoss-p3-sum", lambda: nn.TripletMarginLoss(margin=0.5, p=3, eps=1e-4, reduction="sum"),
     triplet_inputs, torch_ext.TripletMarginLoss, ("margin", "p", "eps", "swap", "reduction")),
]


@pytest.mark.parametrize("make, make_inputs, new_cls, options", [c[1:] for c in LOSSES], ids=[c[0] for c in LOSSES])
def test_loss_module_as_the_model(make, make_inputs, new_cls, options):
    loss = make()
    fused, report = fuse(loss)
    assert type(fused) is new_cls and isinstance(fused, type(loss))
    for name in options:
        assert getattr(fused, name) == getattr(loss, name), name
    if isinstance(loss, nn.CrossEntropyLoss) and loss.weight is not None:
        assert torch.equal(fused.weight, loss.weight)
        assert fused.weight is not loss.weight, "inplace=False must copy the weight"
    assert report.replaced == [f"model ({type(loss).__name__}) -> torch_ext.{new_cls.__name__}"]
    assert type(loss) is not new_cls, "the original loss module was replaced"
    assert list(fused.state_dict()) == list(loss.state_dict())
    assert_same_outputs_and_grads(fused, loss, make_inputs(), type(loss).__name__)


class WithLoss(nn.Module):
    def __init__(self, loss: nn.Module):
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.loss = loss

    def forward(self, x, target):
        return self.loss(self.fc(x), target)


def test_loss_module_inside_a_model():
    model = WithLoss(nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5, label_smoothing=0.1, ignore_index=1))
    fused, report = fuse(model)
    assert type(fused.loss) is torch_ext.CrossEntropyLoss and isinstance(fused.loss, nn.CrossEntropyLoss)
    assert (fused.loss.ignore_index, fused.loss.label_smoothing) == (1, 0.1)
    assert_reported(report.replaced, "loss (CrossEntropyLoss) -> torch_ext.CrossEntropyLoss")
    assert_reported(report.skipped, "fc (Linear 6->5)")
    assert list(fused.state_dict()) == ["fc.weight", "fc.bias", "loss.weight"]
    assert type(fused) is WithLoss, "nothing fused in its forward: its class stays"
    assert_same_outputs_and_grads(fused, model, [torch.randn(4, 6), torch.tensor([0, 1, 4, 2])], "loss in a model")


def test_triplet_margin_loss_p_inf_left_alone():
    fused, report = fuse(nn.ModuleDict({"loss": nn.TripletMarginLoss(p=float("inf"))}))
    assert type(fused["loss"]) is nn.TripletMarginLoss
    assert_reported(report.skipped, "loss (TripletMarginLoss)", "p=inf")
    # The loss as the whole model: left alone, and the report says why.
    loss = nn.TripletMarginLoss(margin=0.3, p=float("inf"))
    fused, report = fuse(loss)
    assert type(fused) is nn.TripletMarginLoss and fused.p == float("inf")
    assert_same_outputs_and_grads(fused, loss, triplet_inputs(), "TripletMarginLoss(p=inf)")
    assert_reported(report.skipped, "TripletMarginLoss", "p=inf")


def test_loss_module_with_hook_keeps_it():
    log: List[str] = []
    loss = nn.MSELoss()
    loss.register_forward_hook(lambda mod, args, out: log.append("hook"))
    model = nn.ModuleDict({"loss": loss})
    fused, report = fuse(model)
    fused["loss"](torch.randn(3), torch.randn(3))
    assert log == ["hook"], f"the loss module's forward hook no longer runs after fuse():\n{report}"


# ----------------------------------------------------------------------------------------------
# state_dict, inplace, parameters.

class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 16), nn.LeakyReLU(0.2))
        self.block = Inner()  # 8 -> 8 after a projection
        self.proj = nn.Linear(16, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 5)
        self.loss = nn.CrossEntropyLoss(weight=torch.rand(5) + 0.5)
        self.register_buffer("scale", torch.tensor(0.5))

    def forward(self, x, target):
        h = self.stem(x)
        h = self.block(torch.sigmoid(self.proj(h))) * self.scale
        return self.loss(self.head(self.norm(h)), target)


def mixed_inputs():
    return [torch.randn(6, 8), torch.tensor([0, 1, 2, 3, 4, 0])]


MIXED_FUSED = {"stem.0": ("gelu", 0.01), "stem.2": ("leaky_relu", 0.2), "block.fc": ("gelu", 0.01),
               "proj": ("sigmoid", 0.01)}


def test_state_dict_keys_values_and_loading():
    model = Mixed()
    fused, report = fuse(model)
    assert fused_linears(fused) == MIXED_FUSED
    assert type(fused.loss) is torch_ext.CrossEntropyLoss
    ref_state, state = model.state_dict(), fused.state_dict()
    assert list(state) == list(ref_state)
    assert "loss.weight" in state and "scale" in state
    for key, value in ref_state.items():
        assert torch.equal(state[key], value), key
    # Load each other's state (strict), after changing the values.
    other = Mixed()
    fused.load_state_dict(other.state_dict())
    model.load_state_dict(other.state_dict())
    assert_same_outputs_and_grads(fused, model, mixed_inputs(), "after loading the same state_dict")
    model.load_state_dict(fused.state_dict())
    assert_same_outputs_and_grads(fused, model, mixed_inputs(), "original loaded the fused state_dict")


def test_inplace_false_leaves_the_original_untouched():
    model = Mixed()
    x, target = mixed_inputs()
    expected = model(x, target).detach()
    before = module_types(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    fused, _ = fuse(model, inplace=False)
    assert fused is not model
    assert module_types(model) == before and type(model) is Mixed and type(model.block) is Inner
    assert type(model.stem[0]) is nn.Linear and type(model.stem[1]) is nn.GELU
    assert type(model.loss) is nn.CrossEntropyLoss
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(model(x, target), expected), "the original's output changed"
    fused_params = dict(fused.named_parameters())
    for name, p in model.named_parameters():
        assert fused_params[name] is not p, f"{name}: inplace=False must not share Parameters"
        assert torch.equal(fused_params[name], p) and fused_params[name].requires_grad == p.requires_grad
    assert_same_outputs_and_grads(fused, model, mixed_inputs(), "inplace=False")


def test_inplace_true_keeps_the_parameter_objects():
    model = Mixed()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    fused, _ = fuse(model, inplace=True)
    assert fused is model
    assert isinstance(model, Mixed) and type(model.stem[0]) is FusedLinear
    assert fused_linears(model) == MIXED_FUSED
    assert dict(model.named_parameters()).keys() == params.keys()
    for name, p in model.named_parameters():
        assert p is params[name], f"{name} is a new Parameter object"
    for name, b in model.named_buffers():
        assert b is buffers[name], f"buffer {name} is a new tensor"
    assert_same_outputs_and_grads(model, ref, mixed_inputs(), "inplace=True")


def test_optimizer_built_before_inplace_fuse_trains_the_fused_model():
    model = Mixed()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    original = {name: (p, p.detach().clone()) for name, p in model.named_parameters()}
    fuse(model, inplace=True)
    for _ in range(3):
        inputs = mixed_inputs()
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(*inputs).backward()
            o.step()
    fused_params = dict(model.named_parameters())
    for name, r in ref.named_parameters():
        p, start = original[name]
        assert fused_params[name] is p
        assert not torch.equal(p, start), f"{name} was not updated"
        assert_close(p.detach(), r.detach(), msg=name)


# ----------------------------------------------------------------------------------------------
# Training and eval mode.

@pytest.mark.parametrize("fuse_in_training", [True, False], ids=["fused-in-train", "fused-in-eval"])
def test_train_eval_after_fuse(fuse_in_training):
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.0), nn.Linear(16, 8), nn.SiLU(), nn.BatchNorm1d(8))
    model.add_module("block", Inner())
    model.train(fuse_in_training)
    fused, _ = fuse(model)
    linears = [m for m in fused.modules() if isinstance(m, FusedLinear)]
    assert len(linears) == 3
    assert all(m.training == fuse_in_training for m in linears)
    for training in (not fuse_in_training, fuse_in_training, not fuse_in_training):
        fused.train(training)
        assert all(m.training == training for m in linears) and fused[5].training == training
    assert_same_outputs_and_grads(fused, model, [torch.randn(6, 8)], "train/eval switches",
                                  modes=(not fuse_in_training, fuse_in_training))


class FrozenNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.bn = nn.BatchNorm1d(8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(F.relu(self.fc(x))))


def frozen_norm_in_train_model() -> nn.Module:
    model = FrozenNorm().train()
    model.bn.eval()
    return model


def train_dropout_in_eval_model() -> nn.Module:
    model = FrozenNorm().eval()
    model.drop.train()
    return model


MIXED_MODE_MODELS = {
    "frozen-batchnorm-in-train-model": frozen_norm_in_train_model,
    "train-dropout-in-eval-model": train_dropout_in_eval_model,
    "sequential-in-eval": lambda: nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).eval(),
    "transformer-layer-in-eval": lambda: nn.TransformerEncoderLayer(16, 2, 32).eval(),
}


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("make", list(MIXED_MODE_MODELS.values()), ids=list(MIXED_MODE_MODELS))
def test_fuse_keeps_every_modules_training_mode(make, inplace):
    """fuse() must not change a submodule's mode (a frozen BatchNorm in a model in train mode, a
    Dropout kept on in eval mode), and what it puts in (FusedLinear, the Identity in the
    activation's slot) takes the mode of what it replaces."""
    model = make()
    before = {name: m.training for name, m in model.named_modules()}
    fused, report = fuse(model, inplace=inplace)
    assert report.replaced, str(report)
    after = {name: m.training for name, m in fused.named_modules()}
    # A module that is new at a path (the Identity where a function activation was) takes its parent's.
    expected = {name: before.get(name, before[name.rpartition(".")[0]]) for name in after}
    changed = {name: (expected[name], mode) for name, mode in after.items() if mode != expected[name]}
    assert not changed, f"fuse() changed the training mode of {changed}"


# ----------------------------------------------------------------------------------------------
# The report, logging, the "nothing to fuse" warning, bad input.

def test_report_and_logging(caplog):
    model = Mixed()
    caplog.set_level(logging.INFO, logger="torch_ext.fuse")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # something replaced: no warning
        result = torch_ext.fuse(model, return_report=True)
    assert isinstance(result, tuple) and len(result) == 2
    fused, report = result
    assert isinstance(fused, Mixed) and isinstance(report, FuseReport)
    for path in MIXED_FUSED:
        assert_reported(report.replaced, path, "FusedLinear")
    assert_reported(report.replaced, "loss (CrossEntropyLoss) -> torch_ext.CrossEntropyLoss")
    assert_reported(report.skipped, "head (Linear 8->5)")
    assert len(report.replaced) == len(MIXED_FUSED) + 1
    text = str(report)
    lines = text.splitlines()
    assert lines[0] == f"torch_ext.fuse: replaced {len(report.replaced)}, left alone {len(report.skipped)}"
    assert lines[1:] == [f"  replaced  {r}" for r in report.replaced] + [f"  left      {s}" for s in report.skipped]
    records = [r for r in caplog.records if r.name == "torch_ext.fuse"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert records[0].getMessage() == text
    # Without return_report: just the model.
    assert isinstance(torch_ext.fuse(model), Mixed)


@pytest.mark.parametrize("inplace", [False, True])
def test_nothing_to_fuse_warns_and_returns_the_model_unchanged(inplace, caplog):
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Softplus(), UsedTwice())
    ref = copy.deepcopy(model)
    before = module_types(model)
    caplog.set_level(logging.INFO, logger="torch_ext.fuse")
    with pytest.warns(UserWarning, match=NOTHING_TO_FUSE) as record:
        fused = torch_ext.fuse(model, inplace=inplace)
    assert "Sequential" in str(record[0].message) and "returned it unchanged" in str(record[0].message)
    assert (fused is model) == inplace
    assert module_types(fused) == before and type(fused[4]) is UsedTwice
    assert list(fused.state_dict()) == list(ref.state_dict())
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in fused.state_dict().items())
    assert_same_outputs_and_grads(fused, ref, [x8(3)], "nothing to fuse")
    with pytest.warns(UserWarning, match=NOTHING_TO_FUSE):
        _, report = torch_ext.fuse(model, return_report=True)
    assert report.replaced == [] and len(report.skipped) == 3
    assert str(report).splitlines()[0] == "torch_ext.fuse: replaced 0, left alone 3"


@pytest.mark.parametrize("model", [nn.Identity(), nn.ReLU(), nn.Linear(4, 4), nn.Sequential(), nn.LSTM(4, 4)],
                         ids=["identity", "relu", "linear", "empty-sequential", "lstm"])
def test_nothing_to_fuse_in_small_models(model):
    with pytest.warns(UserWarning, match=NOTHING_TO_FUSE):
        fused, report = torch_ext.fuse(model, return_report=True)
    assert type(fused) is type(model) and report.replaced == []


@pytest.mark.parametrize("bad, name", [(None, "NoneType"), (torch.randn(3), "Tensor"), (lambda x: x, "function"),
                                       (nn.Linear, "type"), ([nn.Linear(2, 2)], "list")],
                         ids=["None", "tensor", "lambda", "class", "list"])
def test_not_a_module(bad, name):
    with pytest.raises(TypeError, match=rf"torch\.nn\.Module.*\b{name}\b"):
        torch_ext.fuse(bad)
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        torch_ext.fuse(bad, inplace=True, return_report=True)


class _FeedForward(nn.Module):
    """torchtitan's (and Meta's Llama reference) FeedForward: w2(F.silu(w1(x)) * w3(x))."""

    def __init__(self, dim: int = 8, hidden: int = 16):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class _TraceableDecoder(nn.Module):
    """Pre-norm residual blocks around a gated MLP, in forwards fuse() traces whole."""

    def __init__(self):
        super().__init__()
        self.norms = nn.ModuleList([nn.LayerNorm(8), nn.LayerNorm(8)])
        self.ffs = nn.ModuleList([_FeedForward(), _FeedForward()])

    def forward(self, x):
        for norm, ff in zip(self.norms, self.ffs):
            x = x + ff(norm(x))
        return x


def test_gated_mlp_with_a_function_activation_in_a_traced_model():
    # The gated MLP as torchtitan and Meta's Llama write it (F.silu, no activation module), in a
    # model fuse() traces: the MLP's forward becomes fused_mlp swiglu on its own w1 / w3 / w2, where
    # the fx path alone made a FusedLinear of w1 + silu and left w3 and the product to eager ops.
    torch.manual_seed(0)
    model = _TraceableDecoder()
    fused, report = torch_ext.fuse(model, return_report=True)
    for i in range(2):
        assert f"ffs.{i} (_FeedForward: w1, w3, w2 + silu function) -> torch_ext.fused_mlp swiglu" in report.replaced, \
            str(report)
        assert type(fused.ffs[i].w1) is nn.Linear and isinstance(fused.ffs[i], _FeedForward)
    with TorchExtOps() as ops:
        fused(torch.randn(3, 8))
    assert any("mlp" in name for name in ops), ops
    assert_same_outputs_and_grads(fused, model, [torch.randn(2, 5, 8)], "gated MLP, function activation")
    for how in ("pickle", "deepcopy"):
        loaded = round_trip(fused, how)
        assert type(loaded.ffs[0]).__name__ == type(fused.ffs[0]).__name__, how
        with TorchExtOps() as ops:
            loaded(torch.randn(3, 8))
        assert any("mlp" in name for name in ops), (how, ops)
        assert_same_outputs_and_grads(loaded, model, [torch.randn(2, 5, 8)], f"gated MLP, function activation, {how}")


class _Mlp(nn.Module):
    """timm's Mlp shape: fc1, act, fc2 statements; `dropout` adds a statement after fc2."""

    def __init__(self, dropout: bool = False):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)
        self.drop = nn.Dropout(0.0) if dropout else None

    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.fc2(x)
        return x


class _MlpThenDropout(_Mlp):
    def forward(self, x):
        x = self.fc1(x)
        x = self.act(x)
        x = self.fc2(x)
        x = self.drop(x)
        return x


@pytest.mark.parametrize("kind", ["whole_forward", "more_after_fc2"])
def test_mlp_statements_in_a_traced_model(kind):
    # An MLP module whose whole forward is fc1 -> act -> fc2, in a model fuse() traces: fused_mlp
    # (which keeps only the pre-activation for backward) rather than the fx path's FusedLinear
    # fc1, whose output fc2 saves again. A forward that does more stays with the fx path's pair.
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(8)
            self.mlp = _Mlp() if kind == "whole_forward" else _MlpThenDropout(dropout=True)

        def forward(self, x):
            return x + self.mlp(self.norm(x))

    torch.manual_seed(0)
    model = Net()
    fused, report = torch_ext.fuse(model, return_report=True)
    if kind == "whole_forward":
        assert any("mlp (_Mlp: fc1, fc2 + GELU) -> torch_ext.fused_mlp gelu (in its forward)" in r
                   for r in report.replaced), str(report)
        assert type(fused.mlp.fc1) is nn.Linear
    else:
        assert "mlp.fc1 (Linear 8->16) + gelu -> FusedLinear" in report.replaced, str(report)
    assert_same_outputs_and_grads(fused, model, [torch.randn(2, 5, 8)], kind)
