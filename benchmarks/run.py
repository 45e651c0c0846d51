#!/usr/bin/env python
"""torch_ext benchmark suite: every op family and whole models against PyTorch eager, torch.compile and peers.

    python benchmarks/run.py                          # the default run (a few minutes; docs/benchmarks.md)
    python benchmarks/run.py --quick                  # small sizes, 3 rounds (a fraction of the default run's time)
    python benchmarks/run.py --baseline-thp off       # PyTorch's default allocator settings (writes cpu_nothp.*)
    python benchmarks/run.py --ops cross_entropy linear_cross_entropy --sizes llm
    python benchmarks/run.py --sizes cross_entropy=8192x50257 linear_act=4096x512x2048:gelu
    python benchmarks/run.py --ops none --models rnn llama
    python benchmarks/run.py --device cuda --dtype bfloat16

Op cases: one training step of an op family at a representative size: forward (with autograd
recording, as in training), backward, and the two together, for
  eager          PyTorch's own functions (torch.nn.functional)
  compile        torch.compile of that same eager function (compiled before timing)
  torch chunked  F.linear_cross_entropy with LinearCrossEntropyOptions() (PyTorch >= 2.13)
  Liger          Liger-Kernel's fused ops (CUDA, when installed)
  ours           torch_ext
Model cases: a full training step (zero_grad, forward with the loss, backward, AdamW step) in
samples or tokens per second, and its peak memory, for the model as written (eager), under
torch.compile (compile), through torch_ext.fuse() (fused), and both (fused+compile):
  cnn            VGG-style classifier: 3 conv + ReLU + max-pool stages, Linear + ReLU head, cross-entropy;
                 batch 256, 32x32 synthetic images
  rnn            LSTM language model, hidden 512, vocabulary 32000, 32 x 64 = 2048 tokens, head
                 nn.LinearCrossEntropyLoss (fuse() makes it torch_ext's)
  transformer    classifier of 2 nn.TransformerEncoderLayers (width 256, GELU), 32 x 64 tokens
  llama          transformers' LlamaForCausalLM (when installed): 2 layers, hidden 256, vocabulary
                 32000, 4 x 512 tokens
  (--quick: smaller models, without the compile candidates.)
Timing: the candidates run interleaved, in a new random order each round; each figure is the
median over rounds, with its spread; speed-ups are taken within each round, then their median.
Floors: bytes that must move / measured copy bandwidth for the memory-bound losses; the bare
GEMMs (timed in each round at the same shapes) for dense, mlp and linear_cross_entropy.
Memory: bytes autograd saves for backward, and the peak memory of one step (CPU: peak RSS, each
candidate in a fresh process; CUDA: peak allocated).
Baseline: every process of the run has THP_MEM_ALLOC_ENABLE=1 (set before torch is imported),
which makes PyTorch's CPU allocator use 2 MiB huge pages for large tensors (512x fewer page
faults); --baseline-thp off runs PyTorch's default instead.

Sizes (--sizes NAME picks it for every op that has it; default: the starred ones):
  linear_act            cnn* 256x2048->1024 relu, rnn 2048x1024->1024 tanh, ffn* 8192x256->256 gelu_tanh
  cross_entropy         cnn* 256x1000, rnn* 2048x10000, llm* 4096x32000
                        (the same sizes for cross_entropy_capped: softcap, lse and accuracy, and
                        cross_entropy_autocast: bfloat16 logits under autocast; only when named in --ops)
  mse, huber, smooth_l1 cnn 32x150528, ffn* 4096x4096   (smooth_l1 only when named in --ops; the
                        same sizes for mse_autocast: bfloat16 inputs under autocast, when named)
  triplet               cnn* 8192x512
  linear_cross_entropy  rnn 2048x512->10000, llm* 2048x512->32000   (N x H -> vocabulary V)
  mlp                   ffn* 4096x256->1024 gelu, llm* 2048x512->1376 swiglu   (M x K -> hidden H)
  every op: quick (the --quick size), tiny (for tests)
Explicit sizes: MxKxN[:activation] for linear_act, MxKxH[:activation] for mlp, NxHxV for
linear_cross_entropy, NxD for the others; prefix with OP= to apply to one op only.
Selection: with neither --ops nor --sizes, every model case runs too; with either, only the op
cases, unless --models names some. --ops none runs the models only, --models none the ops only.

Writes NAME.json (every figure, machine, versions, git commit, time, load, THP setting), NAME.txt
(the tables and notes) and NAME.png (chart of speed-ups and peak memory) to --out (default
benchmarks/results). The code is in benchmarks/suite/ (its __init__.py says which file holds what).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from suite import cli as _cli  # noqa: E402  (no torch import: THP_MEM_ALLOC_ENABLE is set before torch loads)


def cli(argv=None, fixed=(), prog="benchmarks/run.py", doc=__doc__) -> int:
    """Run the suite with `argv` (default: the command line) after the options `fixed`."""
    return _cli.cli(argv, doc=doc, prog=prog, fixed=fixed)


if __name__ == "__main__":
    sys.exit(cli())
