"""Data-parallel training on fused ops: the CNN classifier of test_models.py with
``torch_ext.FusedLinear(activation="relu")`` and ``torch_ext.CrossEntropyLoss``, wrapped in
``torch.nn.parallel.DistributedDataParallel`` (and, as the README says it works, in FSDP2's
``fully_shard``) over 2 CPU processes (gloo backend on the loopback interface), each process on its
half of a global batch.

The reference is the same fused model in this (single) process on the whole global batch: after
every backward, the data-parallel (averaged) gradients must equal its gradients, and after the SGD steps the
parameters must be equal too (float32, 1e-5). Both halves have the same size and the loss is a
mean, so the average of the two ranks' losses equals the single-process loss as well.

The workers are spawned processes; they report through files in tmp_path (results, or the
traceback of a failure), and the test gives up on them after a timeout instead of hanging.
"""
from __future__ import annotations

import contextlib
import datetime
import faulthandler
import os
import socket
import sys
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import torch_ext
from test_models import CNNClassifier, cnn_batch
from utils import assert_close

WORLD_SIZE = 2
GLOBAL_BATCH = 16  # each rank gets GLOBAL_BATCH // WORLD_SIZE samples
STEPS = 4
LR = 0.1
RTOL = ATOL = 1e-5
TIMEOUT_S = 120  # for the whole group of workers; a normal run takes a few seconds
PG_TIMEOUT_S = 60  # gloo's own timeout, so a worker whose peer died fails instead of waiting forever


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_steps(model: nn.Module, batches, parameters_of: nn.Module):
    """SGD over `batches`; returns the losses and, for each step, the gradients after backward."""
    opt = torch.optim.SGD(parameters_of.parameters(), lr=LR)
    losses, grads = [], []
    for images, labels in batches:
        opt.zero_grad(set_to_none=True)
        _, loss = model(images, labels)
        loss.backward()
        losses.append(loss.item())
        grads.append({name: p.grad.detach().clone() for name, p in parameters_of.named_parameters()})
        opt.step()
    return losses, grads


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from FSDP2's sharded DTensor (or t itself)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _wrap(model: nn.Module, mode: str) -> nn.Module:
    if mode == "ddp":
        return nn.parallel.DistributedDataParallel(model)
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import fully_shard
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard(model, mesh=init_device_mesh("cpu", (WORLD_SIZE,)))
    return model


@contextlib.contextmanager
def gloo_worker(rank: int, port: int, directory: str, world_size: int):
    """A spawned rank's frame: one thread, the gloo group on the loopback interface (destroyed at
    the end), and any failure's traceback written to rank<N>.err for run_workers to report. A
    fatal signal (a C++ abort in gloo, say) leaves the Python stacks of every thread in
    rank<N>.fault instead, which run_workers reports too."""
    faulthandler.enable(open(os.path.join(directory, f"rank{rank}.fault"), "w"), all_threads=True)
    try:
        torch.set_num_threads(1)
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(port)
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
        try:
            yield
        finally:
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(directory, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise


def _worker(rank: int, port: int, directory: str, mode: str) -> None:
    """One rank (mode "ddp" or "fsdp2"): trains on its half of each global batch, saves losses,
    gradients, parameters."""
    with gloo_worker(rank, port, directory, WORLD_SIZE):
        setup = torch.load(os.path.join(directory, "setup.pt"))
        model = CNNClassifier(fused=True)
        model.load_state_dict(setup["state_dict"])
        wrapped = _wrap(model, mode)
        half = GLOBAL_BATCH // WORLD_SIZE
        shards = [(images[rank * half:(rank + 1) * half], labels[rank * half:(rank + 1) * half])
                  for images, labels in setup["batches"]]
        losses, grads = train_steps(wrapped, shards, parameters_of=model)
        grads = [{name: _full(g) for name, g in step.items()} for step in grads]
        params = {name: _full(p.detach()).clone() for name, p in model.named_parameters()}
        torch.save({"losses": losses, "grads": grads, "params": params},
                   os.path.join(directory, f"rank{rank}.pt"))


def run_workers(directory: str, mode: str, worker=None, world_size: int = WORLD_SIZE) -> None:
    """Spawns the ranks (worker(rank, port, directory, mode); default: this file's) and waits for
    them; fails (after terminating them) on error or timeout."""
    worker = _worker if worker is None else worker
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, directory, mode), daemon=True) for rank in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + TIMEOUT_S
    try:
        # Wait for all of them; stop waiting as soon as one fails (its peer would block on it).
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in procs):
                break
            time.sleep(0.05)
    finally:
        hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()

    errors = ""
    for rank in range(world_size):
        for suffix in ("err", "fault"):
            path = os.path.join(directory, f"rank{rank}.{suffix}")
            if os.path.exists(path) and os.path.getsize(path):
                with open(path) as f:
                    errors += f"\n--- rank {rank} ({suffix}) ---\n{f.read()}"
    codes = [p.exitcode for p in procs]
    assert codes == [0] * world_size, (
        f"{mode} workers exited with codes {codes} (ranks {hung} were still running "
        f"{'after the ' + str(TIMEOUT_S) + ' s timeout' if time.monotonic() >= deadline else 'when another failed'} "
        f"and were terminated){errors}")


@pytest.mark.filterwarnings("ignore:FSDP2-wrapped module")  # its note on view outputs (the CNN's loss)
@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_data_parallel_gradients_equal_single_process(tmp_path, mode):
    gen = torch.Generator().manual_seed(3)
    batches = [cnn_batch(gen, GLOBAL_BATCH) for _ in range(STEPS)]
    model = CNNClassifier(fused=True)
    assert any(isinstance(m, torch_ext.FusedLinear) for m in model.modules()), "the CNN has no fused layer"
    assert isinstance(model.criterion, torch_ext.CrossEntropyLoss), "the CNN's loss is not torch_ext's"
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save({"state_dict": initial, "batches": batches}, tmp_path / "setup.pt")

    run_workers(str(tmp_path), mode)

    losses, grads = train_steps(model, batches, parameters_of=model)
    params = dict(model.named_parameters())
    results = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD_SIZE)]

    for step in range(STEPS):
        mean_loss = sum(r["losses"][step] for r in results) / WORLD_SIZE
        assert abs(mean_loss - losses[step]) <= RTOL * abs(losses[step]) + ATOL, (
            f"step {step}: mean of the ranks' losses {[r['losses'][step] for r in results]} = {mean_loss!r}, "
            f"single-process loss {losses[step]!r}")
        for name, expected in grads[step].items():
            assert expected.abs().max() > 0, f"step {step}: the gradient of {name} is zero; the check is empty"
            for rank, r in enumerate(results):
                assert_close(r["grads"][step][name], expected, rtol=RTOL, atol=ATOL,
                             msg=f"step {step}, rank {rank}: {mode} gradient of {name} vs single process")
    for name, expected in params.items():
        assert not torch.equal(expected.detach(), initial[name]), f"{name} did not change in {STEPS} steps"
        for rank, r in enumerate(results):
            assert_close(r["params"][name], expected.detach(), rtol=RTOL, atol=ATOL,
                         msg=f"rank {rank}: parameter {name} after {STEPS} {mode} steps vs single process")
