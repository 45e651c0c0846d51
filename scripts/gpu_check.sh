#!/usr/bin/env bash
# The GPU check: one command on a machine with an NVIDIA GPU and no network, sized to the
# machine the project borrows (an H200, 16 cores; a command runs at most 600 s; at most 8 files
# come back from $OUT, each <= 16 MiB, at most two folders down). Under 8 minutes:
#   1. build torch_ext in place for the local GPU (TORCH_EXT_CUDA=1, MAX_JOBS = nproc, the GPU's
#      arch only; nothing is installed or downloaded);
#   2. import it and run one op on the GPU;
#   3. the CUDA tests: tests/test_common.py (the checks every op gets on every device) and
#      tests/test_cuda.py with TORCH_EXT_TEST_DEVICES=cuda (their CPU cases ran in CI), each
#      test under a timeout when pytest-timeout is installed (the GPU image has it); with
#      --all-tests, also every op-family file (pytestmark every_device, tests/devices.py: about
#      11,000 cases, more than this check's 8 minutes hold on one GPU), in parallel workers when
#      pytest-xdist is installed, cut at the deadline (what ran is in the JUnit XML);
#      TORCH_EXT_TEST_SHARD=k/n runs the k-th of n disjoint shares (tests/conftest.py), so
#      that n GPU sessions cover them all;
#   4. the bfloat16 goal benchmarks without torch.compile: ours against eager and
#      the floors, the headline figures (not with --all-tests);
#   5. the same goals with torch.compile, one op at a time (most wanted first) while time is left.
# Steps 2-5 each run under `timeout`, against one deadline (GPU_CHECK_SECONDS, default 470 s after
# the start); after the build every step runs even when an earlier one failed. The exit status is
# the first failure's.
#
# $OUT (default gpu_results; give an empty folder) receives at most 5 files, each rewritten as soon as a step ends, so a
# run cut short still returns what it did: summary.txt (one screen: pass/fail and time per step,
# the headline figures), logs.tar.gz (every log, the tests' JUnit XML, the compile runs' results),
# cuda_goals_eager.json/.txt/.png (benchmarks/run.py's results of step 4). The script ends by
# checking $OUT against the limits above.
#
#   scripts/gpu_check.sh                        # on the GPU machine; OUT=/somewhere to choose $OUT
#   scripts/gpu_check.sh --all-tests            # steps 1-3, with every test file that runs on CUDA
#   scripts/gpu_check.sh --dry-run              # no GPU needed: the CUDA build, test collection,
#                                               # the benchmarks' arguments, bundling, $OUT check
#   scripts/gpu_check.sh --dry-run --no-build   # the same with the torch_ext that Python imports
#                                               # as installed (CI, after its forced CUDA build)
#
# Python: $PYTHON when set, else `python3` on PATH (the GPU image's python3 is the one with torch;
# an activated virtual environment's python3 comes first). It must hold a CUDA build of torch,
# and the tests' and benchmarks' packages (pytest; tabulate, matplotlib for the benchmarks).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)

DRY_RUN=0
BUILD=1
ALL_TESTS=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    --all-tests) ALL_TESTS=1 ;;
    --no-build) BUILD=0 ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$BUILD" = 0 ] && [ "$DRY_RUN" = 0 ]; then
  echo "gpu_check.sh: --no-build goes with --dry-run (a GPU run builds for its own GPU)" >&2; exit 2
fi

PY="${PYTHON:-python3}"
OUT="${OUT:-gpu_results}"
DEADLINE=$(( SECONDS + ${GPU_CHECK_SECONDS:-470} ))
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX") || exit 1
MODE=$([ "$DRY_RUN" = 1 ] && echo dry-run || echo run)
# The files this script may leave in $OUT (the limit is 8).
PLANNED=(summary.txt logs.tar.gz cuda_goals_eager.json cuda_goals_eager.txt cuda_goals_eager.png)

# The bfloat16 goal ops, most wanted first (the compile step runs them in this order).
GOAL_OPS=(cross_entropy linear_cross_entropy linear_act mlp mse triplet)
declare -A GOAL_SIZE=(
  [cross_entropy]=8192x128256 [linear_cross_entropy]=8192x4096x128256 [linear_act]=8192x4096x16384:gelu_tanh
  [mlp]=llm [mse]=ffn [triplet]=cnn
)
GOAL_SIZES=()
for op in "${GOAL_OPS[@]}"; do GOAL_SIZES+=("$op=${GOAL_SIZE[$op]}"); done

# Where Python finds torch_ext: the in-place build in this checkout, or (--no-build) whatever is
# installed, run from $WORK so that this checkout's sources (without _C) do not shadow it.
if [ "$BUILD" = 1 ]; then
  export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
  RUN_DIR="$REPO"
else
  RUN_DIR="$WORK"
fi
export PYTHONUNBUFFERED=1

status=0
left() { echo $(( DEADLINE - SECONDS )); }

bundle() {  # summary.txt and logs.tar.gz from what exists now; never fails the script
  "$PY" "$REPO/scripts/gpu_check_summary.py" --mode "$MODE" --work "$WORK" --out "$OUT" \
    > "$OUT/summary.txt.tmp" 2> "$WORK/summary_errors.log" \
    && mv "$OUT/summary.txt.tmp" "$OUT/summary.txt" \
    || { { echo "torch_ext GPU check ($MODE): the summary script failed, steps as recorded:";
           cat "$WORK/steps.tsv" 2>/dev/null; cat "$WORK/summary_errors.log"; } > "$OUT/summary.txt";
         rm -f "$OUT/summary.txt.tmp"; }
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
  rm -f "$OUT/logs.tar.gz.tmp"
}

record() {  # record NAME RESULT SECONDS NOTE
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4:-}" >> "$WORK/steps.tsv"
}

# step NAME LIMIT_S COMMAND...: runs in $RUN_DIR under `timeout` (SIGINT first, so pytest and the
# benchmarks stop cleanly), logs to $WORK/NAME.log, records the result and rebundles. With
# CUT_OK=1, reaching the limit (the deadline) is no failure: the step was cut, the check incomplete.
step() {
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS rc
  [ "$limit" -ge 30 ] || limit=30  # (timeout 0 would mean none)
  echo "=== $name (at most ${limit} s): $(printf '%s ' "$@" | tr '\n' ' ' | cut -c1-150)"
  (cd "$RUN_DIR" && timeout --signal=INT --kill-after=20 "$limit" "$@") > "$WORK/$name.log" 2>&1
  rc=$?
  tail -n 15 "$WORK/$name.log"
  local took=$(( SECONDS - t0 )) result=ok
  if [ "$rc" = 124 ] && [ "${CUT_OK:-0}" = 1 ]; then
    result="cut at the deadline"; rc=0
  elif [ "$rc" = 124 ]; then
    result="timed out"
  elif [ "$rc" != 0 ]; then
    result="FAILED (rc $rc)"
  fi
  echo "=== $name: $result in $took s"
  record "$name" "$result" "$took" "${NOTE:-}"
  [ "$rc" != 0 ] && [ "$status" = 0 ] && status=$rc
  bundle
  return "$rc"
}

skip() {  # skip NAME WHY
  echo "=== $1: skipped ($2)"
  record "$1" "skipped" 0 "$2"
  bundle
}

# check_out: $OUT against the limits of what comes back from the GPU machine.
check_out() {
  local problems=() count=0 total=0 size rel depth
  [ "${#PLANNED[@]}" -le 8 ] || problems+=("this script plans ${#PLANNED[@]} files (> 8)")
  while IFS= read -r -d '' f; do
    rel=${f#"$OUT"/}
    if [ ! -f "$f" ] || [ -L "$f" ]; then problems+=("$rel is not a plain file"); continue; fi
    count=$((count + 1))
    size=$(stat -c %s "$f"); total=$((total + size))
    [ "$size" -le $((16 << 20)) ] || problems+=("$rel is $size bytes (> 16 MiB)")
    depth=$(awk -F/ '{print NF}' <<< "$rel")
    [ "$depth" -le 3 ] || problems+=("$rel is more than two folders down")
    [[ "$rel" =~ ^[A-Za-z0-9._/-]+$ ]] || problems+=("$rel: names may hold letters, digits, '.', '_' and '-' only")
  done < <(find "$OUT" -mindepth 1 ! -type d -print0)
  [ "$count" -le 8 ] || problems+=("$count files (> 8)")
  [ "$total" -le $((64 << 20)) ] || problems+=("$total bytes in all (> 64 MiB)")
  if [ "${#problems[@]}" = 0 ]; then
    echo "=== \$OUT check: ok: $count files, $total bytes in $OUT ($(ls "$OUT" | tr '\n' ' '))"
    return 0
  fi
  printf '=== $OUT check FAILED: %s\n' "${problems[@]}"
  return 1
}

finish() {
  bundle
  check_out || { [ "$status" = 0 ] && status=1; }
  rm -rf "$WORK"
  exit "$status"
}
trap 'echo "=== interrupted"; record interrupted "stopped by a signal" $SECONDS; finish' TERM INT

# ---- environment ---------------------------------------------------------------------------
rm -f "$OUT/summary.txt" "$OUT/logs.tar.gz" "$OUT"/cuda_goals_eager.*
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  echo "gpu_check.sh: $PY has no CUDA build of torch (set PYTHON, or activate the environment that has it)" >&2
  record environment "FAILED" 0 "$PY: no CUDA build of torch"; status=1; finish
fi
if [ "$DRY_RUN" = 0 ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: no GPU is visible to torch; use --dry-run on a machine without one" >&2
  record environment "FAILED" 0 "no GPU visible to torch"; status=1; finish
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  if [ "$DRY_RUN" = 1 ]; then
    TORCH_CUDA_ARCH_LIST=9.0  # the H200's, which the GPU run builds for
  else
    TORCH_CUDA_ARCH_LIST=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  fi
fi
export TORCH_CUDA_ARCH_LIST
TIMEOUT_PLUGIN=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo yes || echo no)
{
  echo "mode: $MODE, python: $PY ($("$PY" -c 'import sys; print(sys.version.split()[0])'))"
  "$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"
  [ "$DRY_RUN" = 0 ] && nvidia-smi
  echo "cores: $(nproc), MAX_JOBS=$MAX_JOBS, TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST, pytest-timeout: $TIMEOUT_PLUGIN"
  git -C "$REPO" log -1 --oneline 2>/dev/null || echo "(no git history in this copy)"
} > "$WORK/environment.log" 2>&1
cat "$WORK/environment.log"
record environment ok 0 ""

# ---- 1. build --------------------------------------------------------------------------------
if [ "$BUILD" = 1 ]; then
  step build "$(( $(left) - 150 ))" env TORCH_EXT_CUDA=1 "$PY" setup.py build_ext --inplace || finish
else
  skip build "--no-build: the installed torch_ext"
fi

# ---- 2. import -------------------------------------------------------------------------------
IMPORT_CHECK='
import torch, torch_ext
assert torch_ext._C.built_with_cuda(), "torch_ext was built without its CUDA kernels"
for op in ("linear_act_fwd", "cross_entropy_fwd", "regression_loss_fwd", "triplet_margin_loss_fwd", "mlp_act_fwd", "linear_cross_entropy_fwd"):
    assert torch._C._dispatch_has_kernel_for_dispatch_key("torch_ext::" + op, "CUDA"), op + ": no CUDA kernel"
print("torch_ext", torch_ext.__file__, "with CUDA kernels")
if torch.cuda.is_available():
    x = torch.randn(4, 8, device="cuda")
    print("cross_entropy on", torch.cuda.get_device_name(), "=", torch_ext.cross_entropy(x, torch.tensor([0, 1, 2, 3], device="cuda")).item())
'
step import 60 "$PY" -c "$IMPORT_CHECK" || finish

# ---- 3. tests --------------------------------------------------------------------------------
TEST_FILES=("$REPO/tests/test_common.py" "$REPO/tests/test_cuda.py")
if [ "$ALL_TESTS" = 1 ]; then
  while IFS= read -r f; do TEST_FILES+=("$f"); done \
    < <(grep -l '^pytestmark = pytest.mark.every_device' "$REPO"/tests/test_*.py)
fi
PYTEST=(env TORCH_EXT_TEST_DEVICES=cuda "$PY" -m pytest "${TEST_FILES[@]}" -p no:cacheprovider
        --rootdir "$REPO" -o faulthandler_timeout=120)
if [ "$DRY_RUN" = 1 ]; then
  NOTE="collection only" step tests 120 "${PYTEST[@]}" --collect-only -q
else
  extra_args=()
  [ "$TIMEOUT_PLUGIN" = yes ] && extra_args=(--timeout=120)
  # With every file: 4 workers share the GPU (each its own CUDA context) and the 16 cores.
  [ "$ALL_TESTS" = 1 ] && "$PY" -c "import xdist" 2>/dev/null && extra_args+=(-n 4)
  CUT_OK=$ALL_TESTS NOTE="${#TEST_FILES[@]} files${TORCH_EXT_TEST_SHARD:+, shard $TORCH_EXT_TEST_SHARD}; per-test timeout: $([ "$TIMEOUT_PLUGIN" = yes ] && echo 120 s || echo none, no pytest-timeout)" \
    step tests "$(( $(left) - (ALL_TESTS ? 10 : 150) ))" "${PYTEST[@]}" -q -rfEs --junitxml="$WORK/tests.xml" "${extra_args[@]}"
fi
[ "$ALL_TESTS" = 1 ] && finish

# ---- 4. and 5. benchmarks ----------------------------------------------------------------------
BENCH=("$PY" "$REPO/benchmarks/run.py" --device cuda --dtype bfloat16)
if [ "$DRY_RUN" = 1 ]; then
  # No GPU to run them: check their arguments as run.py parses them (a typo here would cost the
  # GPU run its benchmarks).
  BENCH_ARGS_CHECK='
import sys
sys.path.insert(0, sys.argv[1])
from suite import cli, select
runs = [["--ops", *sys.argv[3].split(), "--sizes", *sys.argv[2].split(), "--no-compile"]]
runs += [["--ops", s.split("=")[0], "--sizes", s] for s in sys.argv[2].split()]
for argv in runs:
    args = cli.parse_args(["--device", "cuda", "--dtype", "bfloat16", *argv], "", "benchmarks/run.py")
    cases, notes = select.resolve_cases(select.resolve_ops(args.ops), args.sizes, args.quick)
    assert not notes, notes
    print(" ".join(argv), "->", ", ".join(f"{c.op} {c.label()}" for c in cases))
'
  NOTE="arguments only" step bench_args 60 "$PY" -c "$BENCH_ARGS_CHECK" "$REPO/benchmarks" "${GOAL_SIZES[*]}" "${GOAL_OPS[*]}"
else
  if [ "$(left)" -gt 60 ]; then
    step bench_eager "$(( $(left) - 20 ))" "${BENCH[@]}" --case-seconds 3 --no-compile --out "$OUT" \
      --name cuda_goals_eager --ops "${GOAL_OPS[@]}" --sizes "${GOAL_SIZES[@]}"
  else
    skip bench_eager "$(left) s left before the deadline"
  fi
  mkdir -p "$WORK/bench_compile"
  for op in "${GOAL_OPS[@]}"; do
    if [ "$(left)" -lt 45 ]; then skip "compile_$op" "$(left) s left before the deadline"; continue; fi
    CUT_OK=1 step "compile_$op" "$(( $(left) - 10 ))" "${BENCH[@]}" --case-seconds 3 --out "$WORK/bench_compile" \
      --name "cuda_goals_compile_$op" --ops "$op" --sizes "$op=${GOAL_SIZE[$op]}"
  done
fi
finish
