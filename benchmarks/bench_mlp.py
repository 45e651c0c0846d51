#!/usr/bin/env python
"""FusedMLP (the Transformer FFN, plain or gated) against PyTorch eager and torch.compile:
benchmarks/run.py with --ops mlp (every other option of run.py applies). The cases live in
benchmarks/suite/ops/mlp.py.

    python benchmarks/bench_mlp.py
    python benchmarks/bench_mlp.py --sizes 4096x512x1376:swiglu
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run.cli(fixed=["--ops", "mlp"], prog="benchmarks/bench_mlp.py", doc=__doc__))
