#!/usr/bin/env python
"""The fused losses (cross_entropy, mse, huber, smooth_l1, triplet) against PyTorch eager and
torch.compile: benchmarks/run.py with --ops set to them (every other option of run.py applies;
a later --ops narrows them). The cases live in benchmarks/suite/ops/losses.py.

    python benchmarks/bench_losses.py
    python benchmarks/bench_losses.py --ops cross_entropy --sizes 8192x50257 --no-compile
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run.cli(fixed=["--ops", "cross_entropy", "mse", "huber", "smooth_l1", "triplet"],
                     prog="benchmarks/bench_losses.py", doc=__doc__))
