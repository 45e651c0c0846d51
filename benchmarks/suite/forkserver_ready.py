"""Imported last by the memory forkserver (memory.py), after the modules its measuring processes
need: the one-off set-up that every forked process then inherits instead of repeating.

- Inductor probes which vector instruction sets the machine can run the first time it compiles in
  a process (building and loading test programs in subprocesses, which is slow) and caches the answer
  for the process; when torch.compile candidates will be measured, probe here, once.
- gc.freeze(): the garbage collector then skips the imported modules' objects (millions, with
  torch and transformers), so each gc.collect() in a measuring process is cheap rather than a walk
  over all of them.
Neither starts threads, so forking afterwards stays safe.
PRELOADED: the modules the server had imported by then, which each measuring process checks its
preload list against (the server skips a preload that fails to import, silently).
"""
import gc
import sys

if "torch._inductor.codecache" in sys.modules:
    import torch._inductor.cpu_vec_isa

    torch._inductor.cpu_vec_isa.pick_vec_isa()

PRELOADED = frozenset(sys.modules)

gc.collect()
gc.freeze()
