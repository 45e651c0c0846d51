#!/usr/bin/env bash
# The GPU check, in one command on a machine with an NVIDIA GPU and no network (issue 7):
#   1. build torch_ext in place for the local GPU (TORCH_EXT_CUDA=1, MAX_JOBS from nproc, the GPU's arch);
#   2. run the CUDA tests (tests/test_cuda.py: every op on CUDA against PyTorch's ops);
#   3. run the CUDA benchmarks at the sizes of issue 7's goals (bfloat16): without torch.compile,
#      then with it;
# writing logs and result files to ${OUT:-gpu_results}. Sized to finish in under 8 minutes on an
# H200. After the build, every step runs even when an earlier one fails; the exit status is the
# first failure's (a failed build stops the script).
#
#   scripts/gpu_check.sh                   # or: OUT=/somewhere scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
status=0
step() {  # step NAME COMMAND...: run, log to $OUT/NAME.log, report the time and result
  local name=$1; shift
  local t0=$SECONDS
  echo "=== $name: $*"
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name: rc=$rc in $((SECONDS - t0)) s"
  if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
  return $rc
}

# The GPU machine's image has python3 (no plain `python`) and a read-only-in-spirit environment:
# the extension is built in place and found through PYTHONPATH, nothing is installed.
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  export TORCH_CUDA_ARCH_LIST
fi
{ nvidia-smi; "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name())"; \
  echo "MAX_JOBS=$MAX_JOBS TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"; git log -1 --oneline; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step build env TORCH_EXT_CUDA=1 "$PY" setup.py build_ext --inplace || exit 1
step import "$PY" -c "import torch, torch_ext; x = torch.randn(4, 8, device='cuda'); print(torch_ext.cross_entropy(x, torch.tensor([0, 1, 2, 3], device='cuda')))"
step tests "$PY" -m pytest tests/test_cuda.py -q -rs --junitxml="$OUT/tests.xml"
# The goals of issue 7 (bfloat16): cross_entropy 8192x128256, dense 8192x4096->16384 gelu_tanh, mse and
# triplet at their default sizes, linear_cross_entropy N=8192, H=4096, V=128256.
# (--case-seconds bounds each case's timing; torch.compile's compile time comes on top, once per case.)
# First without torch.compile (about a minute), so that the figures against eager and the floors
# are in $OUT even if the device time runs out during the compiles of the full run after it.
GOALS=(--ops cross_entropy linear_act mse triplet linear_cross_entropy mlp
       --sizes cross_entropy=8192x128256 linear_act=8192x4096x16384:gelu_tanh mse=ffn triplet=cnn
               linear_cross_entropy=8192x4096x128256 mlp=llm)
step bench_goals_eager "$PY" benchmarks/run.py --device cuda --dtype bfloat16 --case-seconds 4 --no-compile \
  --out "$OUT" --name cuda_goals_eager "${GOALS[@]}"
step bench_goals "$PY" benchmarks/run.py --device cuda --dtype bfloat16 --case-seconds 8 --out "$OUT" --name cuda_goals \
  "${GOALS[@]}"
echo "results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
