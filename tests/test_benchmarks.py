"""Smoke test of the benchmark suite, benchmarks/run.py: a --quick run of the op cases at the tiny
size and one of the model cases write their JSON, table and chart, the baseline's huge-page
setting is applied and recorded, and bad input ends in one clear message and a non-zero exit
status. No timing assertions: the numbers are whatever this machine gives."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import torch_ext
from utils import assert_close

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "benchmarks", "run.py")
PHASES = ("fwd", "bwd", "fwd+bwd")


def run_suite(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, RUN, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    proc = run_suite("--quick", "--sizes", "tiny", "--out", str(out), "--name", "smoke")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return out


def test_json_has_every_figure(quick_run):
    with open(quick_run / "smoke.json") as f:
        data = json.load(f)
    meta = data["meta"]
    for key in ("timestamp", "git_commit", "machine", "copy_bandwidth", "gemm_flops", "load_start", "memory_method",
                "thp"):
        assert key in meta, key
    assert meta["machine"]["torch"] == torch.__version__
    assert meta["thp"]["setting"] == "on" and meta["thp"]["THP_MEM_ALLOC_ENABLE"] == "1"
    assert meta["thp"]["set_before_torch_import"]
    assert data["models"] == []  # --sizes narrows the run to the op cases
    assert meta["copy_bandwidth"] > 0 and meta["gemm_flops"] > 0
    assert meta["memory_not_preloaded"] == []  # the measuring processes' server imported the suite once
    ops = {r["op"] for r in data["results"]}
    assert {"linear_act", "cross_entropy", "mse", "huber", "triplet"} <= ops
    for r in data["results"]:
        assert "error" not in r, r.get("error")
        assert r["check"] == "ok", (r["op"], r["check"])
        assert "compile" not in r["candidates"]  # --quick
        for name in ("eager", "ours"):
            assert name in r["candidates"]
            for phase in PHASES:
                entry = r["time_ms"][name][phase]
                assert entry["median"] > 0 and len(entry["samples"]) == r["rounds"]
        for phase in PHASES:
            assert r["speedup"]["vs_eager"][phase] > 0
        assert r["floor"]["ms"]["fwd+bwd"] > 0
        assert r["saved_bytes"]["eager"] is not None, (r["op"], r["notes"])
        assert r["peak_bytes"]["eager"] is not None and r["peak_bytes"]["ours"] is not None, (r["op"], r["notes"])


def test_table_written(quick_run):
    text = (quick_run / "smoke.txt").read_text()
    assert "Time per step" in text and "cross_entropy" in text and "Peak = " in text


def test_table_uses_tabulate(quick_run):
    pytest.importorskip("tabulate")
    assert "|---" in (quick_run / "smoke.txt").read_text()


def test_chart_written(quick_run):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    image = matplotlib.image.imread(str(quick_run / "smoke.png"))
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


@pytest.fixture(scope="module")
def models_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_models")
    proc = run_suite("--quick", "--ops", "none", "--out", str(out), "--name", "models")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(out / "models.json") as f:
        return out, json.load(f)


def test_models_have_every_figure(models_run):
    _, data = models_run
    assert data["results"] == []
    names = [r["model"] for r in data["models"]]
    assert names[:3] == ["cnn", "rnn", "transformer"]
    for r in data["models"]:
        assert "error" not in r, r.get("error")
        assert r["check"] == "ok", (r["model"], r["check"])
        assert r["candidates"] == ["eager", "fused"]  # --quick: no compiled models
        assert r["fuse"]["replaced"], (r["model"], r["fuse"])
        for name in r["candidates"]:
            assert len(r["time_ms"][name]["samples"]) == r["rounds"]
            assert r["throughput"][name] > 0
            assert r["peak_bytes"][name] is not None and r["peak_bytes"][name] > 0, (r["model"], name, r["notes"])
        assert r["speedup"]["vs_eager"]["fused"] > 0
        assert abs(r["loss"]["fused"] - r["loss"]["eager"]) <= 1e-4 * max(1.0, abs(r["loss"]["eager"]))
    assert data["meta"]["model_memory_method"]


def test_models_table_and_chart(models_run):
    out, _ = models_run
    text = (out / "models.txt").read_text()
    assert "Whole models" in text and "fused" in text and "Model peak = " in text and "fuse() replaced" in text
    pytest.importorskip("matplotlib")
    import matplotlib.image

    assert matplotlib.image.imread(str(out / "models.png")).ndim == 3


def test_compile_candidate(tmp_path):
    # Outside --quick the torch.compile candidate is timed, checked against eager and measured.
    proc = run_suite("--ops", "mse", "--sizes", "tiny", "--rounds", "3", "--case-seconds", "0.5", "--out",
                     str(tmp_path), "--name", "compiled")
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(tmp_path / "compiled.json") as f:
        data = json.load(f)
    assert data["meta"]["compile"] is True
    (r,) = data["results"]
    assert r["check"] == "ok" and "compile" in r["candidates"], (r["check"], r["notes"])
    for phase in PHASES:
        assert len(r["time_ms"]["compile"][phase]["samples"]) == r["rounds"]
        assert r["speedup"]["vs_compile"][phase] > 0
    assert r["peak_bytes"]["compile"] is not None, r["notes"]


def test_baseline_thp_off(tmp_path):
    # PyTorch's default allocator settings: recorded, and the results get their own name.
    proc = run_suite("--quick", "--ops", "mse", "--sizes", "tiny", "--no-compile", "--baseline-thp", "off",
                     "--out", str(tmp_path))
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(tmp_path / "cpu_quick_custom_nothp.json") as f:
        meta = json.load(f)["meta"]
    assert meta["thp"]["setting"] == "off" and meta["thp"]["THP_MEM_ALLOC_ENABLE"] == "0"
    assert "THP_MEM_ALLOC_ENABLE=0" in (tmp_path / "cpu_quick_custom_nothp.txt").read_text()


def test_unknown_op_is_a_clear_error():
    proc = run_suite("--ops", "no_such_op", timeout=120)
    assert proc.returncode == 2
    assert "unknown op 'no_such_op'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.fixture(scope="module")
def run_module():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import run
    finally:
        sys.path.pop(0)
    return run


def test_model_selection(run_module):
    # The default run has every model; --ops or --sizes narrow it to op cases unless --models names some.
    from suite import select
    from suite.models import MODELS

    everything = [m for m in MODELS if MODELS[m].available() is None]
    assert select.resolve_models(None)[0] == everything
    assert select.resolve_models(None, ["none"])[0] == everything
    assert select.resolve_models(None, ["mse"])[0] == []
    assert select.resolve_models(None, None, ["tiny"])[0] == []
    assert select.resolve_models(["rnn,cnn"], ["mse"])[0] == ["rnn", "cnn"]
    assert select.resolve_models(["none"])[0] == []


@pytest.mark.parametrize("op, activation", [("linear_act", a) for a in torch_ext.ACTIVATIONS]
                         + [("mlp", a) for a in torch_ext.MLP_ACTIVATIONS])
def test_every_activation_has_its_eager_baseline(run_module, op, activation):
    # `--sizes MxKxN:<activation>` takes any of the op's activations; each has an eager function
    # that gives what the fused op gives.
    from suite.ops import linear_act, mlp

    make = {"linear_act": linear_act.make_workload, "mlp": mlp.make_workload}[op]
    work = make(6, 8, 10, activation, dtype=torch.float64)
    assert_close(work.fns["eager"](*work.inputs), work.fns["ours"](*work.inputs))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--device", "meta"], "unsupported device 'meta'"),
        (["--device", "bogus"], "unknown device 'bogus'"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--sizes", "12xab"], "neither a size name"),
        (["--sizes", "1x2x3x4"], "fits none of the selected ops"),
        (["--ops", "mse", "--sizes", "cross_entropy=10x10"], "which --ops does not select"),
        (["--ops", "triplet", "--sizes", "llm"], "no case to run"),
        (["--models", "resnet"], "unknown model 'resnet'"),
        (["--ops", "none", "--models", "none"], "nothing to run"),
        (["--ops", "none", "--sizes", "llm"], "--ops none selects no op"),
        (["--baseline-thp", "maybe"], "--baseline-thp: expected on or off, got 'maybe'"),
    ],
)
def test_bad_input_is_a_clear_error(run_module, capsys, monkeypatch, args, message):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")  # the suite sets it: restored after the test
    assert run_module.cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available")
def test_cuda_without_gpu_is_a_clear_error(run_module, capsys, monkeypatch):
    monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", "1")
    assert run_module.cli(["--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err


MEASURE_ONE = """
import sys
sys.path.insert(0, {bench!r})
from suite import memory, select
from suite.measure_op import peak_job
if sys.argv[1] == "suite hidden":
    memory.SUITE_PARENT = "/nonexistent"
case = select.resolve_cases(["cross_entropy"], ["tiny"], False)[0][0]
results = []
memory.measure([(peak_job, (case, "ours", "float32", "cpu"))], "cpu", lambda i, r: results.append(r))
print(results[0]["peak"] is not None, results[0]["not_preloaded"])
"""


@pytest.mark.parametrize("where", ["suite found", "suite hidden"])
def test_memory_processes_report_what_their_server_did_not_preload(where):
    # The peak-memory processes fork from a server that imported torch, torch_ext and the suite once;
    # Python's forkserver does not inherit sys.path, so the suite reaches it through PYTHONPATH. Where
    # that fails, the server skips the imports silently: each result says what was missing.
    code = MEASURE_ONE.format(bench=os.path.join(ROOT, "benchmarks"))
    proc = subprocess.run([sys.executable, "-c", code, where], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured, missing = proc.stdout.split(" ", 1)
    assert measured == "True", proc.stdout
    if where == "suite found":
        assert missing.strip() == "[]", proc.stdout
    else:
        assert "'suite.timing'" in missing, proc.stdout


def test_vocab_parallel_benchmark(tmp_path):
    # benchmarks/bench_vocab_parallel.py at a tiny size: every candidate (one process, 2 ranks of
    # ours, 2 ranks of PyTorch's loss_parallel) gives the same loss, and the table and JSON are written.
    script = os.path.join(ROOT, "benchmarks", "bench_vocab_parallel.py")
    proc = subprocess.run([sys.executable, script, "--tokens", "64", "--hidden", "16", "--vocab", "301", "--steps", "1",
                           "--out", str(tmp_path / "vp")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    with open(tmp_path / "vp.json") as f:
        results = json.load(f)["results"]
    assert set(results) == {"unsharded", "ours", "loss_parallel"}
    losses = [r["loss"] for r in results.values()]
    assert max(losses) - min(losses) <= 1e-5 * abs(losses[0]), losses
    assert results["ours"]["world"] == 2 and len(results["ours"]["peak_bytes_per_rank"]) == 2
    assert "| ours | 2 x" in (tmp_path / "vp.txt").read_text()
    bad = subprocess.run([sys.executable, script, "--world", "1"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "--world must be at least 2" in bad.stderr


def test_allocator_benchmark():
    # benchmarks/bench_allocator.py at a tiny size: one row per configuration (its figures, or the
    # library it misses), PyTorch's default as the 1.00 reference; a bad --shape is a clear error.
    script = os.path.join(ROOT, "benchmarks", "bench_allocator.py")
    proc = subprocess.run([sys.executable, script, "--shape", "8x16", "--steps", "2", "--rounds", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| eager") or line.startswith("| ours")]
    assert len(rows) == 9, proc.stdout
    assert rows[0].startswith("| eager, glibc |") and "| 1.00 |" in rows[0], rows[0]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1].startswith("missing: ") or (float(cells[1]) > 0 and float(cells[3]) > 0), row
    bad = subprocess.run([sys.executable, script, "--shape", "512"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "expected ROWSxCLASSES" in bad.stderr
    # --configs narrows the run (the ratios then against its first configuration); no match: an error.
    some = subprocess.run([sys.executable, script, "--shape", "8x16", "--steps", "2", "--rounds", "1", "--configs",
                           "cache off"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert some.returncode == 0, some.stderr[-3000:]
    rows = [line for line in some.stdout.splitlines() if line.startswith("| eager") or line.startswith("| ours")]
    assert len(rows) == 4 and all(row.startswith("| ours, cache off") for row in rows), some.stdout
    assert "| 1.00 |" in rows[0], rows[0]
    none = subprocess.run([sys.executable, script, "--configs", "nothing"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert none.returncode == 2 and "matches none of" in none.stderr


def test_gemm_probe_size_shrinks_for_a_slow_gemm(run_module):
    # The suite's GEMM-rate probe is 2048^3 unless that would run long (bfloat16 on a CPU without
    # AVX-512 is ATen's reference loop): then the largest power of two that fits the budget.
    from suite import timing

    assert timing.gemm_probe_size("cpu", torch.float32, budget_s=1e9) == 2048
    assert timing.gemm_probe_size("cpu", torch.float32, n_max=1024, budget_s=1e9) == 1024
    assert timing.gemm_probe_size("cpu", torch.float32, budget_s=0.0) == 256
