"""The benchmark suite behind benchmarks/run.py, one concern per module.

    cli.py            the command line (no torch import: thp.py's knob must be set before torch loads)
    thp.py            THP_MEM_ALLOC_ENABLE for every process of a run (--baseline-thp), and its notes
    select.py         from the command line to what runs: op cases, model cases, device
    main.py           one run: the machine's figures, the cases, their memory, the result files
    ops/              the op cases: one file per op family (sizes, eager and ours, floors);
                      ops/peers.py the other libraries' implementations; ops/spec.py what a family declares
    models.py         the model cases (CNN, RNN, Transformer, Llama): how each model and batch is built
    measure_op.py     one op case: check ours against eager, time forward and backward, interleaved
    measure_model.py  one model case: check the fused loss, time the training steps, interleaved
    timing.py         interleaved timing, medians, spreads, per-round ratios, copy bandwidth, GEMM rate
    memory.py         saved-for-backward bytes; peak memory of a step in fresh processes (forkserver);
                      forkserver_ready.py the set-up that forkserver does once for all of them
    workload.py       Workload: one op case's inputs and candidates
    report.py         the text tables and notes; chart.py the PNG; progress.py the progress bar
    machine.py        what the results record about the machine (versions, git commit, load)

Adding an op size: a line in its family's SCENARIOS (ops/<family>.py). An op family: a file in
ops/ and one line in ops/__init__.py. A peer: one entry in ops/peers.py. A model: a build
function and one entry in models.py's MODELS.
"""
