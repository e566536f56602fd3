#!/usr/bin/env bash
# One-shot check of ckbn's CUDA backend on a lent GPU machine (H100/H200, about 8 minutes):
#   1. build ckbn._C in place for sm_90 and import it
#   2. the CUDA tests (tests/test_cuda.py; tests with "cuda" in their id elsewhere), first without
#      the slow ones, then the slow ones (more than 2^31 elements); bench/gpu_smoke.py (every op,
#      both layouts), which also stands in when pytest is missing; bench/sync_nccl_check.py
#      (SyncBatchNorm over NCCL, world size 1)
#   3. compute-sanitizer memcheck and racecheck over bench/gpu_smoke.py
#   4. bench/ops.py --device cuda, with the time that is left
# and prints a summary table last. Each step has its own timeout; a failing step does not stop the
# next. Everything is written to $OUT when set (else bench/out/gpu_check): build.log, tests.log,
# sanitizer.log, bench.log, ops-cuda.{json,md,png}, summary.md.
#
#   CKBN_GPU_CHECK_BUDGET=480 (seconds for the whole script)
#   CKBN_GPU_CHECK_DRY_RUN=1  runs the script's logic on a machine without a GPU: commands that
#                             need one are printed instead of run, the rest run on the CPU.
set -u
cd "$(dirname "$0")/.."
# The in-place build lands in src/ckbn (src layout); every python below imports it from there.
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

OUT_DIR="${OUT:-bench/out/gpu_check}"
BUDGET="${CKBN_GPU_CHECK_BUDGET:-480}"
DRY_RUN="${CKBN_GPU_CHECK_DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
START=$(date +%s)
mkdir -p "$OUT_DIR"
for f in build tests sanitizer bench; do : > "$OUT_DIR/$f.log"; done

NAMES=() RESULTS=() SECONDS_TAKEN=() NOTES=()

record() {  # NAME RESULT SECONDS NOTE
  NAMES+=("$1") RESULTS+=("$2") SECONDS_TAKEN+=("$3") NOTES+=("$4")
  printf '== %-22s %-7s %4ss  %s\n' "$1" "$2" "$3" "$4"
}

time_left() { echo $((BUDGET - ($(date +%s) - START))); }

dry() { [[ "$DRY_RUN" != 0 ]]; }

# step NAME LIMIT LOG [--gpu] [--pytest] CMD...: runs CMD under `timeout`, never past the budget,
# appending its output to LOG. With --gpu the command needs a GPU, and a dry run only prints it.
# With --pytest, exit status 5 (no tests collected) counts as a pass. Returns CMD's status (0 for
# a dry-run print).
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local needs_gpu=0 pytest=0
  if [[ "$1" == --gpu ]]; then needs_gpu=1; shift; fi
  if [[ "$1" == --pytest ]]; then pytest=1; shift; fi
  local left
  left=$(time_left)
  if ((left < 15)); then
    record "$name" SKIP 0 "budget spent"
    return 99
  fi
  ((limit > left - 5)) && limit=$((left - 5))
  echo "### $name (timeout ${limit}s): $*" >> "$log"
  if dry && ((needs_gpu)); then
    echo "[dry run] $*" >> "$log"
    record "$name" DRY 0 "printed to $(basename "$log"), not run"
    return 0
  fi
  local t0 first_line
  t0=$(date +%s)
  first_line=$(($(wc -l < "$log") + 1))
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local dt=$(($(date +%s) - t0))
  if ((pytest && rc == 5)); then
    record "$name" PASS "$dt" "no tests collected"
    return 0
  fi
  case $rc in
    0) record "$name" PASS "$dt" "" ;;
    124 | 137) record "$name" TIMEOUT "$dt" "killed after ${limit}s; see $(basename "$log")" ;;
    *) record "$name" FAIL "$dt" "exit $rc; see $(basename "$log")" ;;
  esac
  if ((rc != 0)); then
    tail -n "+$first_line" "$log" | tail -n 15 | sed 's/^/    | /'
  fi
  return $rc
}

# ---------------------------------------------------------------------------------------------
# 1. Environment and build.
{
  echo "### environment"
  date -u
  nvidia-smi -L 2>&1 || echo "nvidia-smi not available"
  nvcc --version 2>&1 | tail -n 2 || echo "nvcc not on PATH"
  $PYTHON -c 'import sys, torch; print("python", sys.version.split()[0], "| torch", torch.__version__, "| cuda", torch.version.cuda, "| devices", torch.cuda.device_count())'
} >> "$OUT_DIR/build.log" 2>&1

step build 300 "$OUT_DIR/build.log" --gpu \
  env CKBN_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 $PYTHON setup.py build_ext --inplace
if dry; then
  # The CPU side of the build still has to compile; a dry run checks that much, in a scratch
  # directory so that an in-place build of ckbn._C stays as it is.
  SCRATCH=$(mktemp -d)
  step "build (CPU only)" 300 "$OUT_DIR/build.log" env CKBN_CUDA=0 MAX_JOBS=2 $PYTHON setup.py build_ext \
    --build-temp "$SCRATCH/temp" --build-lib "$SCRATCH/lib"
  rm -rf "$SCRATCH"
fi
step import 60 "$OUT_DIR/build.log" --gpu \
  env CKBN_REQUIRE_EXTENSION=1 $PYTHON -c 'import ckbn; assert ckbn.cuda_compiled(), "ckbn._C has no CUDA kernels"; print("ckbn", ckbn.backend(), "cuda kernels: yes")'

# ---------------------------------------------------------------------------------------------
# 2. Tests.
TEST_ENV=(env CKBN_REQUIRE_EXTENSION=1)
dry && TEST_ENV=(env)  # no CUDA kernels in a dry run: the tests skip
HAVE_PYTEST=0
if $PYTHON -c 'import pytest' 2> /dev/null; then
  HAVE_PYTEST=1
  step "tests: test_cuda.py" 180 "$OUT_DIR/tests.log" \
    "${TEST_ENV[@]}" $PYTHON -m pytest tests/test_cuda.py -m "not slow" -q -rs -p no:cacheprovider
  step "tests: -k cuda" 120 "$OUT_DIR/tests.log" --pytest \
    "${TEST_ENV[@]}" $PYTHON -m pytest tests --ignore=tests/test_cuda.py --ignore=tests/test_cuda_emulated.py -k cuda \
    -m "not slow" -q -rs -p no:cacheprovider
  step "tests: slow" 120 "$OUT_DIR/tests.log" --gpu --pytest \
    "${TEST_ENV[@]}" $PYTHON -m pytest tests -k cuda -m slow --ignore=tests/test_cuda_emulated.py -q -rs \
    -p no:cacheprovider
else
  echo "pytest is not installed here: the CUDA tests are skipped; bench/gpu_smoke.py below is the only correctness check" | tee -a "$OUT_DIR/tests.log"
  record "tests" SKIP 0 "pytest not installed (gpu_smoke is the fallback)"
fi
if dry; then
  step smoke 120 "$OUT_DIR/tests.log" $PYTHON bench/gpu_smoke.py --device cpu
  step "syncbn (dry: gloo)" 120 "$OUT_DIR/tests.log" $PYTHON bench/sync_nccl_check.py --backend gloo --device cpu
else
  step smoke 120 "$OUT_DIR/tests.log" $PYTHON bench/gpu_smoke.py --device cuda
  # SyncBatchNorm's collectives over NCCL, in a one-rank group.
  step "syncbn: nccl" 120 "$OUT_DIR/tests.log" $PYTHON bench/sync_nccl_check.py --backend nccl --device cuda
fi

# ---------------------------------------------------------------------------------------------
# 3. compute-sanitizer over the smoke workload. Without the caching allocator every tensor is its
# own allocation, so memcheck sees accesses past a tensor's end.
if command -v compute-sanitizer > /dev/null 2>&1 || dry; then
  FILTER=(--print-limit 20)
  if command -v compute-sanitizer > /dev/null 2>&1 && compute-sanitizer --help 2>&1 | grep -q -- '--kernel-name'; then
    FILTER+=(--kernel-name kns=ckbn)  # check ckbn's kernels, not torch's
  fi
  for tool in memcheck racecheck; do
    step "sanitizer: $tool" 120 "$OUT_DIR/sanitizer.log" --gpu \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" "${FILTER[@]}" --error-exitcode 1 \
      $PYTHON bench/gpu_smoke.py --device cuda
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT_DIR/sanitizer.log" | tail -n 1 | sed 's/^/    /'
  done
else
  echo "compute-sanitizer not found on PATH" | tee -a "$OUT_DIR/sanitizer.log"
  record "sanitizer" SKIP 0 "compute-sanitizer not found"
fi

# ---------------------------------------------------------------------------------------------
# 4. Benchmark, with the time left: its JSON and markdown are rewritten after every row, so a
# timeout keeps the rows measured so far.
BENCH_DEVICE=cuda
dry && BENCH_DEVICE=cpu
BENCH_ARGS=(--device "$BENCH_DEVICE" --json "$OUT_DIR/ops-$BENCH_DEVICE.json" --md "$OUT_DIR/ops-$BENCH_DEVICE.md"
  --plot "$OUT_DIR/ops-$BENCH_DEVICE.png")
BENCH_LIMIT=$(($(time_left) - 10))
if dry; then
  step "bench (dry: cpu)" 120 "$OUT_DIR/bench.log" $PYTHON bench/ops.py --quick "${BENCH_ARGS[@]}"
else
  step bench "$BENCH_LIMIT" "$OUT_DIR/bench.log" $PYTHON bench/ops.py "${BENCH_ARGS[@]}"
fi

# ---------------------------------------------------------------------------------------------
# Summary.
{
  echo "# ckbn gpu_check summary"
  echo
  echo "$(date -u) | budget ${BUDGET}s, used $(($(date +%s) - START))s$(dry && echo ' | DRY RUN')"
  echo
  echo "| step | result | seconds | note |"
  echo "|---|---|---|---|"
  for i in "${!NAMES[@]}"; do
    echo "| ${NAMES[$i]} | ${RESULTS[$i]} | ${SECONDS_TAKEN[$i]} | ${NOTES[$i]} |"
  done
  if [[ -s "$OUT_DIR/ops-cuda.json" || -s "$OUT_DIR/ops-cpu.json" ]]; then
    echo
    $PYTHON - "$OUT_DIR" << 'EOF'
import json, os, sys
out = sys.argv[1]
for name in ("ops-cuda.json", "ops-cpu.json"):
    path = os.path.join(out, name)
    if not os.path.exists(path):
        continue
    rows = json.load(open(path))["rows"]
    held = [r for r in rows if r["targets"]]
    missed = [r for r in rows if r["missed"]]
    print(f"benchmark {name}: {len(rows)} rows, {len(held)} with targets, {len(missed)} missed")
    for r in missed[:12]:
        print(f"- missed {r['case']} {'x'.join(map(str, r['shape']))} {r['layout']} {r['dtype']}: "
              f"torch/ckbn {r['ratio']:.2f}" + (f", bandwidth {100 * r['bandwidth']:.0f}%" if r.get("bandwidth") else "")
              + f" ({'; '.join(r['missed'])})")
EOF
  fi
} > "$OUT_DIR/summary.md"
echo
cat "$OUT_DIR/summary.md"
