"""``num_items_in_batch`` on the losses (cross_entropy, linear_cross_entropy, mse / huber /
smooth_l1, triplet_margin_loss, and their modules' forward): the summed loss divided by a given
count instead of the mean's own denominator, as the Hugging Face Trainer does for gradient
accumulation.

The reference is PyTorch's own loss with reduction="sum", divided by the count; and the property
it exists for: micro-batches whose losses are each divided by the whole batch's count give,
added up, the full batch's mean loss and gradients (with ignored rows spread unevenly over the
micro-batches, where a per-micro-batch mean would not). Both autograd paths (the eager C++ node
and, under torch.compile, the Python one), counts as ints and as tensors, and bad counts.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torch_ext
from utils import assert_close, leaf

# Every test on every device (tests/devices.py).
pytestmark = pytest.mark.every_device

COUNTS = {"int": lambda n: n, "tensor": lambda n: torch.tensor(n), "float_tensor": lambda n: torch.tensor(float(n))}


def ce_case():
    torch.manual_seed(0)
    x = torch.randn(12, 7)
    t = torch.randint(7, (12,))
    t[[0, 1, 2, 9]] = -100  # three ignored rows in the first micro-batch, one in the second
    return (x,), t


def lce_case():
    torch.manual_seed(0)
    x = torch.randn(12, 5)
    w = torch.randn(7, 5)
    t = torch.randint(7, (12,))
    t[[0, 1, 2, 9]] = -100
    return (x, w), t


def regression_case():
    torch.manual_seed(0)
    return (torch.randn(12, 3),), torch.randn(12, 3)


# name -> (case, ours(tensors, target, **kw), PyTorch's reduction-sum reference, items of the batch)
LOSSES = {
    "cross_entropy": (ce_case, lambda ts, t, **kw: torch_ext.cross_entropy(ts[0], t, **kw),
                      lambda ts, t: F.cross_entropy(ts[0], t, reduction="sum"), lambda t: int((t != -100).sum())),
    "linear_cross_entropy": (lce_case, lambda ts, t, **kw: torch_ext.linear_cross_entropy(ts[0], ts[1], t, **kw),
                             lambda ts, t: F.cross_entropy(F.linear(ts[0], ts[1]), t, reduction="sum"),
                             lambda t: int((t != -100).sum())),
    "mse": (regression_case, lambda ts, t, **kw: torch_ext.mse_loss(ts[0], t, **kw),
            lambda ts, t: F.mse_loss(ts[0], t, reduction="sum"), lambda t: t.numel()),
    "huber": (regression_case, lambda ts, t, **kw: torch_ext.huber_loss(ts[0], t, delta=0.5, **kw),
              lambda ts, t: F.huber_loss(ts[0], t, delta=0.5, reduction="sum"), lambda t: t.numel()),
    "smooth_l1": (regression_case, lambda ts, t, **kw: torch_ext.smooth_l1_loss(ts[0], t, beta=0.5, **kw),
                  lambda ts, t: F.smooth_l1_loss(ts[0], t, beta=0.5, reduction="sum"), lambda t: t.numel()),
}
def triplet_case():
    torch.manual_seed(0)
    return tuple(torch.randn(12, 6) for _ in range(2)), torch.randn(12, 6)


LOSSES["triplet"] = (
    triplet_case, lambda ts, t, **kw: torch_ext.triplet_margin_loss(ts[0], ts[1], t, margin=2.0, **kw),
    lambda ts, t: F.triplet_margin_loss(ts[0], ts[1], t, margin=2.0, reduction="sum"), lambda t: t.shape[0],
)
# The plain mean of each, for the accumulation check.
MEANS = {
    "cross_entropy": lambda ts, t: F.cross_entropy(ts[0], t),
    "linear_cross_entropy": lambda ts, t: F.cross_entropy(F.linear(ts[0], ts[1]), t),
    "mse": lambda ts, t: F.mse_loss(ts[0], t),
    "huber": lambda ts, t: F.huber_loss(ts[0], t, delta=0.5),
    "smooth_l1": lambda ts, t: F.smooth_l1_loss(ts[0], t, beta=0.5),
    "triplet": lambda ts, t: F.triplet_margin_loss(ts[0], ts[1], t, margin=2.0),
}


@pytest.mark.parametrize("count", list(COUNTS))
@pytest.mark.parametrize("name", list(LOSSES))
def test_sum_divided_by_the_count(name, count):
    make, ours, reference, _ = LOSSES[name]
    tensors, target = make()
    n = 5
    got_ts = [leaf(t) for t in tensors]
    got = ours(got_ts, target, num_items_in_batch=COUNTS[count](n))
    ref_ts = [leaf(t) for t in tensors]
    ref = reference(ref_ts, target) / n
    assert got.shape == ()
    assert_close(got, ref)
    got.backward()
    ref.backward()
    for g, r in zip(got_ts, ref_ts):
        assert_close(g.grad, r.grad)


@pytest.mark.parametrize("name", list(LOSSES))
def test_micro_batches_add_up_to_the_full_batch(name):
    make, ours, _, items = LOSSES[name]
    tensors, target = make()
    total = items(target)
    acc = [leaf(t) for t in tensors]
    total_loss = 0.0
    for rows in (slice(0, 5), slice(5, 12)):  # uneven micro-batches (3 of 4 ignored rows in the first)
        # The inputs' rows per micro-batch; a linear head's weight is shared.
        parts = [acc[0][rows], acc[1][rows]] if name == "triplet" else [acc[0][rows]] + acc[1:]
        loss = ours(parts, target[rows], num_items_in_batch=torch.tensor(total))
        loss.backward()
        total_loss += loss.item()
    full = [leaf(t) for t in tensors]
    ref = MEANS[name](full, target)
    ref.backward()
    assert total_loss == pytest.approx(ref.item(), rel=1e-5)
    for g, r in zip(acc, full):
        assert_close(g.grad, r.grad)


@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy", "mse"])
def test_compiled(name, dynamo_reset):
    make, ours, reference, _ = LOSSES[name]
    tensors, target = make()
    fn = torch.compile(lambda ts, t, n: ours(ts, t, num_items_in_batch=n), fullgraph=True, backend="aot_eager")
    got_ts = [leaf(t) for t in tensors]
    got = fn(got_ts, target, torch.tensor(7))
    ref_ts = [leaf(t) for t in tensors]
    ref = reference(ref_ts, target) / 7
    assert_close(got, ref)
    got.backward()
    ref.backward()
    for g, r in zip(got_ts, ref_ts):
        assert_close(g.grad, r.grad)


@pytest.mark.parametrize(
    "count,error,match",
    [
        (0, ValueError, "num_items_in_batch must be positive, got 0"),
        (-3, ValueError, "num_items_in_batch must be positive"),
        (True, TypeError, "num_items_in_batch must be a number or a one-element tensor, got bool"),
        ("4", TypeError, "got str"),
        (torch.tensor([2, 3]), ValueError, r"num_items_in_batch must hold one number, got shape \(2,\)"),
    ],
    ids=["zero", "negative", "bool", "str", "two_numbers"],
)
@pytest.mark.parametrize("name", list(LOSSES))
def test_bad_counts(name, count, error, match):
    make, ours, _, _ = LOSSES[name]
    tensors, target = make()
    with pytest.raises(error, match=match):
        ours(list(tensors), target, num_items_in_batch=count)


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("name", list(LOSSES))
def test_count_needs_reduction_mean(name, reduction):
    make, ours, _, _ = LOSSES[name]
    tensors, target = make()
    with pytest.raises(ValueError, match=f"reduction must be 'mean' .*got reduction='{reduction}'"):
        ours(list(tensors), target, reduction=reduction, num_items_in_batch=4)


MODULES = {
    "CrossEntropyLoss": (ce_case, lambda: torch_ext.CrossEntropyLoss(),
                         lambda ts, t: F.cross_entropy(ts[0], t, reduction="sum")),
    "LinearCrossEntropyLoss": (None, None, None),
    "MSELoss": (regression_case, lambda: torch_ext.MSELoss(), lambda ts, t: F.mse_loss(ts[0], t, reduction="sum")),
    "HuberLoss": (regression_case, lambda: torch_ext.HuberLoss(delta=0.5),
                  lambda ts, t: F.huber_loss(ts[0], t, delta=0.5, reduction="sum")),
    "SmoothL1Loss": (regression_case, lambda: torch_ext.SmoothL1Loss(beta=0.5),
                     lambda ts, t: F.smooth_l1_loss(ts[0], t, beta=0.5, reduction="sum")),
    "TripletMarginLoss": (triplet_case, lambda: torch_ext.TripletMarginLoss(margin=2.0),
                          lambda ts, t: F.triplet_margin_loss(ts[0], ts[1], t, margin=2.0, reduction="sum")),
}


@pytest.mark.parametrize("name", list(MODULES))
def test_modules_forward(name):
    """Each loss module's forward passes num_items_in_batch through (keyword-only)."""
    if name == "LinearCrossEntropyLoss":
        (x, _), t = lce_case()
        module = torch_ext.LinearCrossEntropyLoss(5, 7)
        got = module(x, t, num_items_in_batch=torch.tensor(4))
        ref = F.cross_entropy(F.linear(x, module.linear.weight.detach()), t, reduction="sum") / 4
    else:
        make, build, reference = MODULES[name]
        tensors, t = make()
        got = build()(*tensors, t, num_items_in_batch=4)
        ref = reference(tensors, t) / 4
    assert_close(got, ref)

