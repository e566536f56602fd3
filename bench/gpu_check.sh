#!/usr/bin/env bash
# One-shot check of ckbn's CUDA backend on a lent GPU machine (H100/H200), in one call of at most
# 9 minutes:
#   1. build ckbn._C for sm_90 (MAX_JOBS=16) into build/gpu_check/ckbn and import it from there
#   2. the CUDA tests (tests/ops/test_cuda.py; tests with "cuda" in their id elsewhere, torch.compile's
#      aside), bench/gpu_smoke.py (every op, both layouts), bench/sync_nccl_check.py (SyncBatchNorm
#      over NCCL, world size 1)
#   3. compute-sanitizer memcheck, racecheck, synccheck and initcheck over bench/gpu_smoke.py
#   4. bench/flat_vs_planes.py (the flat element-wise kernel against the planes one, 7x7 layers),
#      then bench/ops.py --device cuda over ResNet-50's BatchNorm shapes, with the time that is left
#      but a reserve for
#   5. the cold torch.compile tests (tests/modules/test_compile.py -k cuda), under their own cap
# and prints a summary table last. Every step runs with CKBN_REQUIRE_EXTENSION=1 and each has its
# own timeout; a failing step does not stop the next.
#
#   bash bench/gpu_check.sh              everything above
#   bash bench/gpu_check.sh bench-only   a second call: only the benchmark (building first if the
#                                        machine is a fresh one)
#   bash bench/gpu_check.sh PART,PART    a second call: only these parts (building first likewise),
#                                        from tests, smoke, memcheck, racecheck, synccheck,
#                                        initcheck, bench, compile; e.g. `tests,initcheck`
#
# Python packages the machine lacks travel as wheels in .whl/ (carried, see the device tool's
# README): torch's module_db tests import expecttest, which the GPU machines have not had. Fetch it
# with `python3 -m pip download --no-deps --only-binary=:all: -d .whl expecttest`; every wheel
# there is installed into /tmp/ckbn-site first.
#
# Everything is written to $OUT when set (else bench/out/gpu_check), 8 files at most: build.log,
# tests.log, sanitizer.log, bench.log, ops-cuda.{json,md,png}, summary.md; commit the benchmark as
# bench/results/<card>-<date>.{json,md}.
#
#   CKBN_GPU_CHECK_BUDGET=540 (seconds for the whole script)
#   CKBN_GPU_CHECK_DRY_RUN=1  runs the script's logic on a machine without a GPU: commands that
#                             need one are printed instead of run, the rest run on the CPU (the
#                             build is CPU-only, the smoke and SyncBatchNorm checks run on CPU/gloo).
set -u
cd "$(dirname "$0")/.."
MODE="${1:-all}"
PARTS=(tests smoke memcheck racecheck synccheck initcheck bench compile)
case "$MODE" in
  all) WANTED=",$(IFS=,; echo "${PARTS[*]}")," ;;
  bench-only) WANTED=",bench," ;;
  *)
    WANTED=",$MODE,"
    for part in ${MODE//,/ }; do
      [[ " ${PARTS[*]} " == *" $part "* ]] || { echo "usage: $0 [all|bench-only|PART,PART...] with PART from: ${PARTS[*]}" >&2; exit 2; }
    done
    ;;
esac
wants() { [[ "$WANTED" == *",$1,"* ]]; }

OUT_DIR="${OUT:-bench/out/gpu_check}"
BUDGET="${CKBN_GPU_CHECK_BUDGET:-540}"
DRY_RUN="${CKBN_GPU_CHECK_DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
START=$(date +%s)
# The build under test: a copy of setup.py, csrc and the Python package, built in place. Without
# pyproject.toml in it, setuptools reads no project metadata (the license field needs setuptools
# 77 or later, which a fresh machine may not have), and src/ckbn stays as it is.
BUILD_ROOT="$PWD/build/gpu_check"
export PYTHONPATH="$BUILD_ROOT${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
  $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ckbn-site .whl/*.whl \
    && export PYTHONPATH="$PYTHONPATH:/tmp/ckbn-site"
fi
export CKBN_REQUIRE_EXTENSION=1 BUILD_ROOT PYTHON  # the build step runs build_copy in a child bash
COMPILE_RESERVE=60
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

# Copies the sources into BUILD_ROOT and builds ckbn._C there (CUDA with CKBN_CUDA=1).
build_copy() {
  mkdir -p "$BUILD_ROOT"
  rm -rf "$BUILD_ROOT/csrc" "$BUILD_ROOT/ckbn" "$BUILD_ROOT/build_backend"
  # -p keeps modification times, so that ninja recompiles only what changed since the last build.
  # setup.py imports build_backend/ (the supported torch range, the CUDA-root search).
  cp -p setup.py "$BUILD_ROOT/" && cp -rp csrc "$BUILD_ROOT/csrc" && cp -rp src/ckbn "$BUILD_ROOT/ckbn" \
    && cp -rp build_backend "$BUILD_ROOT/build_backend" \
    && rm -f "$BUILD_ROOT"/ckbn/_C*.so && (cd "$BUILD_ROOT" && $PYTHON setup.py build_ext --inplace)
}

built_with_cuda() {
  $PYTHON -c 'import ckbn, sys; sys.exit(0 if ckbn.cuda_compiled() else 1)' > /dev/null 2>&1
}

if [[ "$MODE" == all ]] || ! built_with_cuda; then
  if dry; then
    # No nvcc work in a dry run: the same copy-and-build, CPU kernels only (slower on a small machine).
    step "build (dry: CPU only)" 900 "$OUT_DIR/build.log" env CKBN_CUDA=0 MAX_JOBS=2 bash -c "$(declare -f build_copy); build_copy"
  else
    step build 300 "$OUT_DIR/build.log" \
      env CKBN_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 bash -c "$(declare -f build_copy); build_copy"
  fi
fi
step import 60 "$OUT_DIR/build.log" --gpu \
  $PYTHON -c 'import ckbn; assert ckbn.cuda_compiled(), "ckbn._C has no CUDA kernels"; print("ckbn", ckbn.backend(), "from", ckbn.__file__, "| cuda kernels: yes")'
if dry; then
  step "import (dry: CPU)" 60 "$OUT_DIR/build.log" \
    $PYTHON -c 'import ckbn; print("ckbn", ckbn.backend(), "from", ckbn.__file__)'
fi

# ---------------------------------------------------------------------------------------------
# 2. Tests (test_gpu_static.py is the static model CI runs; torch.compile's cold tests come last).
# -v names each test as it ends; with pytest-xdist (the GPU machines have it) a test that crashes
# its worker is reported as failed and the run goes on, where without it a segfault (as on
# 2026-12-04) ends the run before any failure's traceback is printed.
PYTEST=($PYTHON -m pytest -v --tb=short -rfEs -p no:cacheprovider --ignore=tests/ops/test_cuda_emulated.py
  --ignore=tests/ops/test_gpu_static.py --ignore=tests/modules/test_compile.py)
$PYTHON -c 'import xdist' 2> /dev/null && PYTEST+=(-n 2)
if wants tests; then
  if ! $PYTHON -c 'import expecttest' 2> /dev/null; then
    # torch's module_db imports expecttest: without it that file fails to collect, and with it the
    # whole run. The other files still run.
    PYTEST+=(--ignore=tests/modules/test_module_db.py)
    record "tests: module_db" SKIP 0 "expecttest not installed: carry it in .whl/ (see this script's header)"
  fi
  if $PYTHON -c 'import pytest' 2> /dev/null; then
    step "tests: test_cuda.py" 150 "$OUT_DIR/tests.log" "${PYTEST[@]}" tests/ops/test_cuda.py -m "not slow"
    step "tests: -k cuda" 100 "$OUT_DIR/tests.log" --pytest "${PYTEST[@]}" tests --ignore=tests/ops/test_cuda.py -k cuda \
      -m "not slow"
    step "tests: slow" 90 "$OUT_DIR/tests.log" --gpu --pytest "${PYTEST[@]}" tests -k cuda -m slow
  else
    echo "pytest is not installed here: the CUDA tests are skipped; bench/gpu_smoke.py below is the only correctness check" | tee -a "$OUT_DIR/tests.log"
    record "tests" SKIP 0 "pytest not installed (gpu_smoke is the fallback)"
  fi
fi
if wants smoke; then
  if dry; then
    step "smoke (dry: cpu)" 60 "$OUT_DIR/tests.log" $PYTHON bench/gpu_smoke.py --device cpu
    step "syncbn (dry: gloo)" 60 "$OUT_DIR/tests.log" $PYTHON bench/sync_nccl_check.py --backend gloo --device cpu
  else
    step smoke 60 "$OUT_DIR/tests.log" $PYTHON bench/gpu_smoke.py --device cuda
    # SyncBatchNorm's collectives over NCCL, in a one-rank group.
    step "syncbn: nccl" 60 "$OUT_DIR/tests.log" $PYTHON bench/sync_nccl_check.py --backend nccl --device cuda
  fi
fi

# ---------------------------------------------------------------------------------------------
# 3. compute-sanitizer over the smoke workload, which exits 3 when ckbn has no CUDA kernels, so
# that a pass means ckbn's kernels ran. Without the caching allocator every tensor is its own
# allocation, so memcheck sees accesses past a tensor's end. memcheck: out-of-bounds and
# misaligned accesses; racecheck: shared-memory races (the block merges, the coefficient tables);
# synccheck: barriers not every thread of the block reaches; initcheck: reads of global memory
# nothing wrote, with the smoke's NaN fill of new tensors off so that such reads stay visible.
# Each leaves the benchmark and the compile tests their time (BENCH_FLOOR, COMPILE_RESERVE).
BENCH_FLOOR=0
wants bench && BENCH_FLOOR=120
KEEP=$BENCH_FLOOR
wants compile && KEEP=$((KEEP + COMPILE_RESERVE))
TOOLS=()
for tool in memcheck racecheck synccheck initcheck; do wants $tool && TOOLS+=("$tool"); done
if ((${#TOOLS[@]})) && { command -v compute-sanitizer > /dev/null 2>&1 || dry; }; then
  FILTER=()
  if command -v compute-sanitizer > /dev/null 2>&1 && compute-sanitizer --help 2>&1 | grep -q -- '--kernel-name'; then
    FILTER=(--kernel-name kns=ckbn)  # check ckbn's kernels, not torch's
  fi
  for tool in "${TOOLS[@]}"; do
    SMOKE_ARGS=(--device cuda) TOOL_FILTER=("${FILTER[@]}") LIMIT=90
    if [[ "$tool" == initcheck ]]; then
      # initcheck records a write only in a kernel it instruments: with ckbn's kernels alone, the
      # inputs torch's kernels wrote read as uninitialized (seen on the H200, 2026-12-04).
      SMOKE_ARGS+=(--no-fill) TOOL_FILTER=() LIMIT=150
    fi
    AVAILABLE=$(($(time_left) - KEEP))
    if ((AVAILABLE < 20)); then
      record "sanitizer: $tool" SKIP 0 "time kept for the benchmark and compile tests"
      continue
    fi
    ((LIMIT > AVAILABLE)) && LIMIT=$AVAILABLE
    step "sanitizer: $tool" $LIMIT "$OUT_DIR/sanitizer.log" --gpu \
      env PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool "$tool" --print-limit 20 \
      ${TOOL_FILTER[@]+"${TOOL_FILTER[@]}"} --error-exitcode 1 $PYTHON bench/gpu_smoke.py "${SMOKE_ARGS[@]}"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT_DIR/sanitizer.log" | tail -n 1 | sed 's/^/    /'
  done
elif ((${#TOOLS[@]})); then
  echo "compute-sanitizer not found on PATH" | tee -a "$OUT_DIR/sanitizer.log"
  record "sanitizer" SKIP 0 "compute-sanitizer not found"
fi

# ---------------------------------------------------------------------------------------------
# 4. Benchmark, with the time left (less the compile tests' reserve): its JSON and markdown are
# rewritten after every row, so a timeout keeps the rows measured so far.
BENCH_DEVICE=cuda
dry && BENCH_DEVICE=cpu
BENCH_ARGS=(--device "$BENCH_DEVICE" --json "$OUT_DIR/ops-$BENCH_DEVICE.json" --md "$OUT_DIR/ops-$BENCH_DEVICE.md"
  --plot "$OUT_DIR/ops-$BENCH_DEVICE.png")
# First the flat element-wise kernel against the planes one on 7x7 layers (a table in bench.log).
if wants bench; then
  if dry; then
    step "flat vs planes (dry: cpu)" 60 "$OUT_DIR/bench.log" $PYTHON bench/flat_vs_planes.py --device cpu --runs 2 --shapes 1
  else
    step "flat vs planes" 60 "$OUT_DIR/bench.log" $PYTHON bench/flat_vs_planes.py
  fi
fi
RESERVE=0
wants compile && RESERVE=$COMPILE_RESERVE
BENCH_LIMIT=$(($(time_left) - RESERVE - 10))
if ! wants bench; then
  :
elif dry; then
  step "bench (dry: cpu)" 120 "$OUT_DIR/bench.log" $PYTHON bench/ops.py --quick "${BENCH_ARGS[@]}"
else
  step bench "$BENCH_LIMIT" "$OUT_DIR/bench.log" $PYTHON bench/ops.py "${BENCH_ARGS[@]}"
fi

# ---------------------------------------------------------------------------------------------
# 5. torch.compile on CUDA: cold compiles take long, so they get what the reserve allows.
if wants compile && $PYTHON -c 'import pytest' 2> /dev/null; then
  step "tests: torch.compile" "$COMPILE_RESERVE" "$OUT_DIR/tests.log" --pytest \
    $PYTHON -m pytest -q -rs -p no:cacheprovider tests/modules/test_compile.py -k cuda
fi

# ---------------------------------------------------------------------------------------------
# Summary.
{
  echo "# ckbn gpu_check summary"
  echo
  echo "$(date -u) | mode $MODE | budget ${BUDGET}s, used $(($(date +%s) - START))s$(dry && echo ' | DRY RUN')"
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
