"""Memory of a training step: bytes saved for backward, and the peak of one step.

Peak on CPU: peak resident set size (RSS) of one step above the resident size before it, in a
fresh process per candidate, so that nothing another candidate allocated (nor torch_ext's
cache of freed buffers, nor glibc's free lists, nor a compiled candidate's caches) is reused.
The processes are forked from a forkserver: a fresh Python (started by exec, as with spawn)
that has only imported torch, torch_ext and the suite's modules and never run an op, so its
children do not pay those imports (seconds each) and do not inherit OpenMP threads (a plain fork
of a process whose OpenMP threads have run can hang in the child). On CUDA: peak allocated
memory, measured in this process.

A job is (function, args), both picklable: in the child, function(*args) builds its inputs or
model, runs the warm-up, and returns the step to measure (a callable).
"""
from __future__ import annotations

import ctypes
import gc
import multiprocessing
import multiprocessing.connection
import multiprocessing.forkserver
import os
import sys
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

import torch_ext

Job = Tuple[Callable[..., Callable[[], object]], tuple]

METHOD_CPU = (
    "peak RSS of one {step} in a fresh process per candidate, with glibc's mmap threshold fixed at 128 KiB "
    "(each larger block is mapped when allocated and unmapped when freed, so the peak follows the step's live "
    "memory; with glibc's adaptive threshold, freed blocks stay in the heap and identical runs differed by up to "
    "10%): {setup}, torch_ext.empty_cache() and malloc_trim(0), reset the peak RSS (/proc/self/clear_refs), "
    "one step; peak RSS minus RSS before the step"
)
METHOD_CPU_NO_RESET = (
    "peak RSS of one {step} in a fresh process per candidate (this kernel cannot reset the peak: the step's "
    "peak is known only when it exceeds the peak of the set-up before it, else not reported); peak RSS "
    "minus RSS before the step"
)
METHOD_CUDA = (
    "peak allocated CUDA memory of one {step} after a warm-up step: torch.cuda.reset_peak_memory_stats, "
    "max_memory_allocated minus memory_allocated before the step"
)


# Peak resident set size (CPU memory). Linux keeps the peak in /proc/self/status (VmHWM) and resets
# it to the current resident size when "5" is written to /proc/self/clear_refs (Linux >= 4.0).


def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> Optional[int]:
    """Resident set size of this process now (VmRSS), None where /proc is missing."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> Optional[int]:
    """Peak resident set size of this process (VmHWM) since it started or since the last
    reset_peak_rss()."""
    kib = _status_kib("VmHWM")
    return None if kib is None else kib * 1024


def reset_peak_rss() -> bool:
    """Set the peak resident set size to the current one; False where the kernel does not allow it."""
    if _status_kib("VmHWM") is None:
        return False
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    peak, now = _status_kib("VmHWM"), _status_kib("VmRSS")
    # Reset when the peak now sits at the resident size. The kernel's RSS counters are per-CPU
    # approximations and other threads may fault or free pages between the reads, so "at" is
    # within 2 MiB; a kernel that ignored the write would leave the old peak (where that peak is
    # within 2 MiB of the resident size anyway, the difference does not matter). Comparing with
    # the peak before the reset failed in CI when the process sat at its peak: the approximate
    # counters read the same peak after the reset.
    return peak is not None and now is not None and peak <= now + 2048


# mallopt's M_MMAP_THRESHOLD, and the threshold the measuring processes use: above it, glibc maps
# each block on its own and unmaps it when freed. Setting it also stops glibc from raising the
# threshold as large blocks are freed (its default), after which those sizes come from the heap and
# stay resident when freed, by amounts that depend on the order of frees, not on the step.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 << 10


def _glibc(function: str, *args) -> None:
    """Call glibc's malloc `function`; a no-op where glibc is not the allocator."""
    try:
        getattr(ctypes.CDLL("libc.so.6"), function)(*args)
    except (OSError, AttributeError):
        pass


def fix_mmap_threshold() -> None:
    """Fix glibc's mmap threshold (see MMAP_THRESHOLD_BYTES) in this process."""
    _glibc("mallopt", M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_free_memory() -> None:
    """Give freed heap memory back to the system (glibc malloc_trim), so that the resident size
    counts live memory only."""
    _glibc("malloc_trim", 0)


class SavedTensors:
    """Context manager: the bytes of the distinct storages autograd saves for backward inside it
    (`.bytes`), not counting the storages of `exclude` (inputs and parameters, which exist anyway)."""

    def __init__(self, exclude: Sequence[object] = ()):
        self.excluded = {t.untyped_storage().data_ptr() for t in exclude if isinstance(t, torch.Tensor)}
        self.seen: Dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.excluded and storage.nbytes() > 0:
            self.seen[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.seen.values())

    def __enter__(self) -> SavedTensors:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.hooks.__exit__(*exc)


def step_peak(make_step: Callable[[], Callable[[], object]], device: str) -> dict:
    """{"peak", "retained", "reset"} bytes of one call of the step that make_step() returns
    (after its set-up and warm-up): peak above the memory in use before the step, and what the
    step left allocated. CPU: RSS (see the module docstring); CUDA: allocated memory."""
    step = make_step()
    gc.collect()
    torch_ext.empty_cache()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        gc.collect()
        return {"peak": peak, "retained": torch.cuda.memory_allocated() - base, "reset": True}
    release_free_memory()
    base = rss_bytes()
    if base is None:
        return {"error": "no /proc/self/status: peak RSS is measured on Linux only"}
    reset = reset_peak_rss()
    before = peak_rss_bytes()
    out = step()
    peak = peak_rss_bytes()
    del out
    gc.collect()
    retained = rss_bytes() - base
    if reset:  # (the counters are approximate: a step that allocates nothing new may read a hair under 0)
        return {"peak": max(0, peak - base), "retained": retained, "reset": True}
    if peak > before:
        return {"peak": peak - base, "retained": retained, "reset": False}
    return {"peak": None, "retained": retained, "reset": False, "error": "the step did not exceed the earlier peak"}


def method(device: str, reset: bool, step: str, setup: str) -> str:
    """How the peak was measured, for the notes: `step` names the step, `setup` what ran before it."""
    if device.startswith("cuda"):
        return METHOD_CUDA.format(step=step)
    return (METHOD_CPU if reset else METHOD_CPU_NO_RESET).format(step=step, setup=setup)


def _child(conn, job: Job, device: str, preload: Sequence[str]) -> None:
    fix_mmap_threshold()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fn, args = job
            result = step_peak(lambda: fn(*args), device)
        ready = sys.modules.get("suite.forkserver_ready")  # imported by the forkserver, last, or not at all
        result["not_preloaded"] = [m for m in preload if ready is None or m not in ready.PRELOADED]
        conn.send(result)
    except BaseException as e:  # noqa: BLE001 (reported to the parent)
        conn.send({"error": f"{type(e).__name__}: {e}"})
    finally:
        conn.close()


_CONTEXT = None

SUITE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/, which holds suite/

# Imported once in the forkserver instead of in each child (seconds each).
PRELOAD = ["torch", "torch_ext", "suite.timing", "suite.memory", "suite.ops", "suite.models", "suite.measure_op",
           "suite.measure_model"]
COMPILE_PRELOAD = ["torch._dynamo", "torch._functorch.aot_autograd", "torch._inductor.compile_fx",
                   "torch._inductor.codecache"]


def _context(preload: Sequence[str]):
    """The forkserver context, its server started now, preloading `preload` (set by the first call:
    the server runs once per process); spawn where there is no fork."""
    global _CONTEXT
    if _CONTEXT is None:
        try:
            ctx = multiprocessing.get_context("forkserver")
        except ValueError:  # no fork on this platform: each child imports everything itself
            _CONTEXT = multiprocessing.get_context("spawn")
            return _CONTEXT
        ctx.set_forkserver_preload(list(preload))
        # The server is a fresh interpreter that gets neither this process's sys.path nor its main
        # script (Python 3.11's forkserver passes them under keys its main() never reads), so the
        # suite's own modules are found through PYTHONPATH only. Without it every suite.* preload
        # failed, silently (the server skips an ImportError), and each measuring process imported them
        # itself and collected garbage over everything torch had made, unfrozen (docs/benchmarks.md;
        # child results say what was not preloaded, and main.py reports it).
        before = os.environ.get("PYTHONPATH")
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (SUITE_PARENT, before) if p)
        try:
            multiprocessing.forkserver.ensure_running()
        finally:
            if before is None:
                del os.environ["PYTHONPATH"]
            else:
                os.environ["PYTHONPATH"] = before
        _CONTEXT = ctx
    return _CONTEXT


def measure(jobs: List[Job], device: str, on_done: Callable[[int, dict], None], *, parallel: int = 1,
            timeout_s: float = 600.0, preload: Sequence[str] = ()) -> None:
    """Peak memory of each job's step; on_done(job index, result) as each finishes (result:
    "peak", "retained" in bytes, "seconds" the job took, "error" if it failed, and on CPU
    "not_preloaded": the modules the forkserver was not seen to import for it: all of them where
    it could not import suite.forkserver_ready, the last).
    CPU: one fresh process per job, up to `parallel` at a time (nothing else runs then, and
    peak RSS is per process); a job whose process fails is run once more. `preload`: modules
    the jobs need beyond PRELOAD. CUDA: one job after the other in this process."""
    if device.startswith("cuda"):
        for i, (fn, args) in enumerate(jobs):
            start = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result = step_peak(lambda fn=fn, args=args: fn(*args), device)
            except Exception as e:  # noqa: BLE001
                result = {"error": f"{type(e).__name__}: {e}"}
            gc.collect()
            torch.cuda.empty_cache()
            result["seconds"] = round(time.perf_counter() - start, 2)
            on_done(i, result)
        return
    modules = PRELOAD + list(preload) + ["suite.forkserver_ready"]  # last: it acts on what the others imported
    ctx = _context(modules)
    check = modules[:-1] if ctx.get_start_method() == "forkserver" else []
    pending = list(range(len(jobs)))
    running = {}  # connection -> (index, process, start time)
    failed_once = set()
    while pending or running:
        while pending and len(running) < parallel:
            i = pending.pop(0)
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_child, args=(child, jobs[i], device, check), daemon=True)
            proc.start()
            child.close()
            running[parent] = (i, proc, time.perf_counter())
        ready = multiprocessing.connection.wait(list(running), timeout=1.0)
        for conn in list(running):
            i, proc, start = running[conn]
            result = None
            if conn in ready:
                try:
                    result = conn.recv()
                except EOFError:
                    result = {"error": f"the measuring process ended without a result (exit code {proc.exitcode})"}
            elif time.perf_counter() - start > timeout_s:
                result = {"error": f"the measuring process took over {timeout_s:.0f} s"}
            if result is None:
                continue
            del running[conn]
            conn.close()
            proc.join(5)
            if proc.is_alive():
                proc.kill()
                proc.join()
            if result.get("peak") is None and i not in failed_once:
                failed_once.add(i)
                pending.append(i)
                continue
            result["seconds"] = round(time.perf_counter() - start, 2)  # the process's whole life
            on_done(i, result)
