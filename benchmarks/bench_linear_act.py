#!/usr/bin/env python
"""Fused dense + activation against PyTorch eager and torch.compile: benchmarks/run.py with
--ops linear_act (every other option of run.py applies). The cases live in
benchmarks/suite/ops/linear_act.py. On AMD CPUs with AVX-512 float32 runs on torch_ext's own
GEMM (torch_ext.cpu_gemm() == "ours"), so '% of floor' (ATen's bare GEMMs) can pass 100%;
TORCH_EXT_CPU_GEMM=aten compares like with like.

    python benchmarks/bench_linear_act.py
    python benchmarks/bench_linear_act.py --sizes 4096x512x512:gelu 8192x256x256:relu
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run.cli(fixed=["--ops", "linear_act"], prog="benchmarks/bench_linear_act.py", doc=__doc__))
