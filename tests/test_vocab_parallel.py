"""Vocab-parallel linear_cross_entropy: ``linear_cross_entropy(...,
process_group=group)`` over 2 and 4 CPU processes (gloo on the loopback interface), each rank
holding a contiguous slice of the classifier's vocabulary (uneven slices, in rank order).

The reference is PyTorch in this single process on the whole weight: ``F.cross_entropy`` (with
tests/test_cross_entropy.py's ``reference`` for z_loss) on ``softcap * tanh(logits / softcap)``,
``torch.logsumexp`` and ``argmax`` for the extra outputs, and its autograd for the gradients. Each
rank's loss, lse, accuracy and input gradient must equal the unsharded ones, and its weight / bias
gradients the unsharded gradients' rows of its slice: for every reduction, ignore_index (some and
all rows ignored), label_smoothing, z_loss, softcap, class weights, a bias, chunk sizes, 3-D input,
float32 and float64. Workers are spawned as in tests/test_ddp.py (its run_workers).
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import torch_ext
from test_cross_entropy import reference
from test_ddp import gloo_worker, run_workers
from utils import assert_close

VOCAB, HIDDEN = 37, 6
SHARDS = {2: [17, 20], 4: [9, 10, 8, 10]}  # uneven slices of the vocabulary, in rank order

# (name, options of linear_cross_entropy, input shape, dtype, bias, ignored rows)
CASES = [
    ("mean", dict(reduction="mean"), (11, HIDDEN), torch.float32, False, "some"),
    ("sum_smoothing_weight", dict(reduction="sum", label_smoothing=0.1, weighted=True), (11, HIDDEN), torch.float32,
     True, "some"),
    ("none_z_softcap", dict(reduction="none", z_loss=1e-3, softcap=5.0), (2, 5, HIDDEN), torch.float32, True, "none"),
    ("everything_chunk3", dict(reduction="mean", label_smoothing=0.2, z_loss=1e-3, softcap=3.0, weighted=True,
                               chunk_size=3, ignore_index=4), (13, HIDDEN), torch.float32, True, "some"),
    ("all_ignored_sum", dict(reduction="sum", softcap=3.0), (5, HIDDEN), torch.float32, True, "all"),
    ("float64", dict(reduction="mean", label_smoothing=0.1, z_loss=1e-2, softcap=2.0, weighted=True, chunk_size=4),
     (9, HIDDEN), torch.float64, True, "some"),
]


def make_case(name, options, shape, dtype, bias, ignored, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    w = (torch.randn(VOCAB, HIDDEN, generator=g, dtype=torch.float64) * 2).to(dtype)
    b = torch.randn(VOCAB, generator=g, dtype=torch.float64).to(dtype) if bias else None
    t = torch.randint(0, VOCAB, shape[:-1], generator=g)
    ignore_index = options.get("ignore_index", -100)
    if ignored == "some":
        t.view(-1)[::3] = ignore_index
    elif ignored == "all":
        t.fill_(ignore_index)
    weight = torch.rand(VOCAB, generator=g, dtype=torch.float64).to(dtype) + 0.5 if options.get("weighted") else None
    return dict(x=x, w=w, b=b, t=t, weight=weight)


def call_options(options):
    out = {k: v for k, v in options.items() if k != "weighted"}
    return out


def reference_results(case, options):
    """Loss, lse, accuracy and gradients (x, w, b) of the unsharded loss, by PyTorch."""
    x = case["x"].detach().double().clone().requires_grad_()
    w = case["w"].detach().double().clone().requires_grad_()
    b = case["b"].detach().double().clone().requires_grad_() if case["b"] is not None else None
    t, weight = case["t"], case["weight"]
    opts = call_options(options)
    cap = opts.get("softcap")
    logits = F.linear(x, w, b).reshape(-1, VOCAB)
    if cap:
        logits = cap * torch.tanh(logits / cap)
    rows = reference(logits, t.reshape(-1), None if weight is None else weight.double(), opts.get("ignore_index", -100),
                     "none", opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0))
    loss = reference(logits, t.reshape(-1), None if weight is None else weight.double(),
                     opts.get("ignore_index", -100), opts.get("reduction", "mean"), opts.get("label_smoothing", 0.0),
                     opts.get("z_loss", 0.0))
    if opts.get("reduction") == "none":
        loss = loss.reshape(t.shape)
    g = torch.linspace(0.5, 1.5, loss.numel(), dtype=torch.float64).reshape(loss.shape)
    grads = torch.autograd.grad((loss * g).sum(), [v for v in (x, w, b) if v is not None])
    kept = t.reshape(-1) != opts.get("ignore_index", -100)
    accuracy = ((logits.argmax(1) == t.reshape(-1)) & kept).sum() / kept.sum()
    del rows
    return dict(loss=loss.detach(), lse=torch.logsumexp(logits, 1).detach().reshape(t.shape), accuracy=accuracy,
                grad_x=grads[0], grad_w=grads[1], grad_b=grads[2] if b is not None else None, g=g)


def autocast_case():
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-2, 3, (14, HIDDEN), generator=g).float()
    w = torch.randint(-2, 3, (VOCAB, HIDDEN), generator=g).float()
    return x, w, torch.randint(0, VOCAB, (14,), generator=g)


def _worker(rank: int, port: int, directory: str, mode: str) -> None:
    """One rank: every case on its slice of the vocabulary; saves the results."""
    world = int(mode)
    with gloo_worker(rank, port, directory, world):
        setup = torch.load(os.path.join(directory, "setup.pt"))
        sizes = SHARDS[world]
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        results = {}
        for name, options, case, g in setup["cases"]:
            x = case["x"].clone().requires_grad_()
            w = case["w"][lo:hi].clone().requires_grad_()
            b = case["b"][lo:hi].clone().requires_grad_() if case["b"] is not None else None
            loss, lse, accuracy = torch_ext.linear_cross_entropy(
                x, w, case["t"], linear_bias=b, weight=case["weight"], process_group=dist.group.WORLD,
                return_lse=True, return_accuracy=True, **call_options(options))
            (loss * g.to(loss.dtype)).sum().backward()
            results[name] = dict(loss=loss.detach(), lse=lse, accuracy=accuracy, grad_x=x.grad, grad_w=w.grad,
                                 grad_b=None if b is None else b.grad, lse_requires_grad=lse.requires_grad)
        # retain_graph: a second backward (handed the same saved gradients, scaled again) adds the
        # same again; all rows ignored under mean: loss NaN, gradients 0 (as PyTorch).
        name, options, case, g = setup["cases"][3]
        x = case["x"].clone().requires_grad_()
        w = case["w"][lo:hi].clone().requires_grad_()
        loss = torch_ext.linear_cross_entropy(x, w, case["t"], weight=case["weight"], process_group=dist.group.WORLD,
                                              **call_options(options))
        loss.backward(retain_graph=True)
        first = (x.grad.clone(), w.grad.clone())
        loss.backward()
        results["retain_graph"] = dict(first=first, second=(x.grad - first[0], w.grad - first[1]))
        # Saved-tensor hooks (save_on_cpu, offloading) pack the gradients formed in forward too:
        # input and weight shapes packed twice each (the tensor and its gradient); the gradients
        # then come from the hooks' copies.
        x = case["x"].clone().requires_grad_()
        w = case["w"][lo:hi].clone().requires_grad_()
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda s: packed.append(tuple(s.shape)) or s.clone(),
                                                      lambda s: s):
            loss = torch_ext.linear_cross_entropy(x, w, case["t"], weight=case["weight"],
                                                  process_group=dist.group.WORLD, **call_options(options))
        loss.backward()
        results["hooks"] = dict(x_packed=packed.count(tuple(x.shape)), w_packed=packed.count(tuple(w.shape)),
                                grad_x=x.grad, grad_w=w.grad, no_hooks=first)
        x = case["x"].clone().requires_grad_()
        w = case["w"][lo:hi].clone().requires_grad_()
        loss = torch_ext.linear_cross_entropy(x, w, torch.full((x.shape[0],), -100), process_group=dist.group.WORLD)
        loss.backward()
        results["all_ignored_mean"] = dict(loss=loss.detach(), grad_x=x.grad, grad_w=w.grad)
        # A DTensor weight (and bias) sharded on dim 0: the same as the slices, gradients as DTensors.
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        name, options, case, g = setup["cases"][3]  # everything_chunk3 (bias, weight, softcap, ...)
        w_dt = distribute_tensor(case["w"].clone(), mesh, [Shard(0)]).requires_grad_()
        b_dt = distribute_tensor(case["b"].clone(), mesh, [Shard(0)]).requires_grad_()
        x = case["x"].clone().requires_grad_()
        loss = torch_ext.linear_cross_entropy(x, w_dt, case["t"], linear_bias=b_dt, weight=case["weight"],
                                              **call_options(options))
        (loss * g).sum().backward()
        results["dtensor"] = dict(loss=loss.detach(), grad_x=x.grad, grad_w=w_dt.grad.full_tensor(),
                                  grad_b=b_dt.grad.full_tensor(), grad_w_placements=str(w_dt.grad.placements))
        # Under bfloat16 autocast the loss is float32 and not rounded to bfloat16 (integer operands: every
        # logit exact in bfloat16); a float64 input stays float64, as autocast leaves it.
        x, w, t = autocast_case()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results["autocast"] = {
                red: torch_ext.linear_cross_entropy(x, w[lo:hi], t, reduction=red, label_smoothing=0.1,
                                                    process_group=dist.group.WORLD) for red in ("mean", "sum", "none")}
            results["autocast_float64"] = torch_ext.linear_cross_entropy(
                x.double(), w[lo:hi].double(), t, process_group=dist.group.WORLD).dtype
        # A class-probability target is refused with a clear error, on every rank alike.
        try:
            torch_ext.linear_cross_entropy(torch.randn(3, HIDDEN), torch.randn(hi - lo, HIDDEN),
                                           torch.rand(3, VOCAB), process_group=dist.group.WORLD)
            results["prob_error"] = ""
        except ValueError as e:
            results["prob_error"] = str(e)
        torch.save(results, os.path.join(directory, f"rank{rank}.pt"))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_equals_unsharded(tmp_path, world):
    cases, refs = [], {}
    for i, (name, options, shape, dtype, bias, ignored) in enumerate(CASES):
        case = make_case(name, options, shape, dtype, bias, ignored, seed=i)
        refs[name] = reference_results(case, options)
        cases.append((name, options, case, refs[name]["g"]))
    torch.save({"cases": cases}, tmp_path / "setup.pt")
    run_workers(str(tmp_path), str(world), worker=_worker, world_size=world)

    sizes = SHARDS[world]
    for rank in range(world):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        assert "process_group" in got["prob_error"] and "class indices" in got["prob_error"], got["prob_error"]
        first, second = got["retain_graph"]["first"], got["retain_graph"]["second"]
        for a, b_, what in zip(first, second, ("input", "weight")):
            assert a.abs().max() > 0, what
            assert_close(b_, a, rtol=1e-5, atol=1e-6,
                         msg=f"rank {rank}: retain_graph, second backward's {what} gradient")
        hooks = got["hooks"]
        assert hooks["x_packed"] == 2 and hooks["w_packed"] == 2, hooks
        assert torch.equal(hooks["grad_x"], hooks["no_hooks"][0]) and torch.equal(hooks["grad_w"], hooks["no_hooks"][1])
        ign = got["all_ignored_mean"]
        assert torch.isnan(ign["loss"]) and not ign["grad_x"].any() and not ign["grad_w"].any(), ign
        x, w, t = autocast_case()
        for red, loss in got["autocast"].items():
            assert loss.dtype == torch.float32, (red, loss.dtype)
            want = F.cross_entropy(F.linear(x, w).bfloat16().float(), t, reduction=red, label_smoothing=0.1)
            assert_close(loss, want, msg=f"rank {rank}: autocast loss, reduction {red}")
        assert got["autocast_float64"] == torch.float64
        d, ref = got["dtensor"], refs["everything_chunk3"]
        assert "Shard(dim=0)" in d["grad_w_placements"], d["grad_w_placements"]
        for key in ("loss", "grad_x", "grad_w", "grad_b"):
            assert_close(d[key], ref[key], check_dtype=False, rtol=2e-5, atol=2e-5,
                         msg=f"DTensor weight, rank {rank}: {key}")
        for name, options, _shape, dtype, bias, ignored in CASES:
            r, ref = got[name], refs[name]
            tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
            what = f"world {world}, rank {rank}, {name}"
            assert r["loss"].dtype == dtype and r["grad_x"].dtype == dtype, what
            equal_nan = ignored == "all" and options.get("reduction") == "mean"
            assert_close(r["loss"], ref["loss"], check_dtype=False, equal_nan=equal_nan, msg=f"{what}: loss", **tol)
            assert_close(r["lse"], ref["lse"], check_dtype=False, msg=f"{what}: lse", **tol)
            assert not r["lse_requires_grad"], what
            if ignored != "all":
                assert_close(r["accuracy"], ref["accuracy"], check_dtype=False, msg=f"{what}: accuracy", **tol)
            else:
                assert torch.isnan(r["accuracy"]), what
            assert_close(r["grad_x"], ref["grad_x"], check_dtype=False, msg=f"{what}: grad of input", **tol)
            assert_close(r["grad_w"], ref["grad_w"][lo:hi], check_dtype=False, msg=f"{what}: grad of weight", **tol)
            if bias:
                assert_close(r["grad_b"], ref["grad_b"][lo:hi], check_dtype=False, msg=f"{what}: grad of bias", **tol)
            if ignored != "all":
                assert ref["grad_w"][lo:hi].abs().max() > 0, f"{what}: the check is empty"


def test_process_group_under_torch_func_is_refused():
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="with process_group, torch.func transforms"):
        torch.func.grad(lambda x: torch_ext.linear_cross_entropy(x, torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                                                 process_group=object()))(x)


def test_process_group_needs_an_initialized_group():
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        torch_ext.linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]),
                                       process_group=object())


@pytest.mark.parametrize("case", ["chunk_size_zero", "weight_requires_grad"])
def test_process_group_call_checks_its_arguments_first(case):
    # The same argument errors as the one-process path, before any collective is attempted.
    x, w, t = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2])
    if case == "chunk_size_zero":
        with pytest.raises(ValueError, match="chunk_size must be >= 1, got 0"):
            torch_ext.linear_cross_entropy(x, w, t, chunk_size=0, process_group=object())
    else:
        with pytest.raises(RuntimeError, match="not differentiable with respect to weight"):
            torch_ext.linear_cross_entropy(x, w, t, weight=torch.ones(5, requires_grad=True), process_group=object())
