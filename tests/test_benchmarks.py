"""Smoke test of the benchmark suite, benchmarks/run.py: a --quick run at the tiny size writes its
JSON, table and chart, and bad input ends in one clear message and a non-zero exit status. No
timing assertions: the numbers are whatever this machine gives."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

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
    for key in ("timestamp", "git_commit", "machine", "copy_bandwidth", "gemm_flops", "load_start", "memory_method"):
        assert key in meta, key
    assert meta["machine"]["torch"] == torch.__version__
    assert meta["copy_bandwidth"] > 0 and meta["gemm_flops"] > 0
    ops = {r["op"] for r in data["results"]}
    assert {"linear_act", "cross_entropy", "mse", "huber", "triplet"} <= ops
    for r in data["results"]:
        assert "error" not in r, r.get("error")
        assert r["check"] == "ok", (r["op"], r["check"])
        for name in ("eager", "compile", "ours"):
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
    ],
)
def test_bad_input_is_a_clear_error(run_module, capsys, args, message):
    assert run_module.cli(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is available")
def test_cuda_without_gpu_is_a_clear_error(run_module, capsys):
    assert run_module.cli(["--device", "cuda"]) == 2
    assert "no CUDA GPU is available" in capsys.readouterr().err
