#!/usr/bin/env python
"""Whole-model training steps, the model as written against torch_ext.fuse(model), each eager
and under torch.compile: benchmarks/run.py with --ops none (every other option of run.py
applies). The models live in benchmarks/suite/models.py, their measurement in
benchmarks/suite/measure_model.py.

    python benchmarks/bench_models.py                       # every model whose libraries are installed
    python benchmarks/bench_models.py --models llama --rounds 7
    python benchmarks/bench_models.py --quick               # small models, no compile
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run  # noqa: E402

if __name__ == "__main__":
    sys.exit(run.cli(fixed=["--ops", "none"], prog="benchmarks/bench_models.py", doc=__doc__))
