#!/usr/bin/env bash
# The one script a GPU session runs, from the repository root:
#     REGHARM_COMMIT=<hash> bash benchmarks/gpu_check.sh [OUT_DIR]   (default: $OUT, else benchmarks/results/run)
# 1. env: GPU, versions, commit (into steps.log)  2. build: editable install with the CUDA ops for sm_90
# 3. bench: benchmarks/gpu_bench.py -> OUT_DIR/gpu_bench.json (the issues' acceptance numbers, each
#    timed entry's results checked against float64 at the timed sizes: benchmarks/bench_check.py;
#    then each time criterion as BENCH_PAIRS (5) alternating ours/baseline pairs in one process);
#    the variant rows (PERF_NOTES items' before/after) come last but the suite
#    (VARIANTS=0 skips them, BENCH_ROWS=all times everything in the bench step; BENCH=0 skips it);
#    it leaves TESTS_RESERVE_S (120) of the deadline to the tests
# 4. tests: the CUDA tests (Triton and native kernels, CUDA training), in parallel with xdist,
#    each test at most 90 s where pytest-timeout is installed
# 4b. throw: benchmarks/cuda_throw_check.py (errors raised in the CUDA glue), into diagnose.log
# 5. sanitize, ncu: the native CUDA kernels under compute-sanitizer (benchmarks/sanitize_cuda.py)
#    and Nsight Compute (benchmarks/ncu_kernels.py), both into OUT_DIR/diagnose.log
# 6. variants: the variant rows into gpu_bench.json
# 7. suite: the pytest-benchmark suite on cuda -> OUT_DIR/cuda.json, with the time that is left
# The whole script ends by DEADLINE_S (default 480 s: build ~75, bench <= 275, tests 120; a
# session's 15 minutes of device time, less a start of a minute or two, then leave room for a
# second call on the still-warm machine); every step has its own limit within
# that and is interrupted with SIGINT (pytest and gpu_bench still write what they have). A
# failing step does not stop the next ones. Each step logs to OUT_DIR/<step>.log (sanitize and ncu
# together to diagnose.log); OUT_DIR/steps.log sums up rc and seconds and holds the env facts.
# At most 8 files come back from the device.
# REGHARM_COMMIT names the commit the tree is: the device copy's .git can be stale, so give the
# literal hash taken on the CPU machine, never $(git rev-parse HEAD) inside the device command.
# From a session with the device tool (commit first; HASH = `git rev-parse HEAD` run here):
#     run(command='REGHARM_COMMIT=HASH bash benchmarks/gpu_check.sh "$OUT"', timeout_s=510)
# then at once (the machine stays warm ~30 s; the build is kept), with the time left:
#     SKIP_BUILD=1 THROW=0 BENCH=0 TESTS=0 DEADLINE_S=<left - 60> REGHARM_COMMIT=HASH \
#       SANITIZE_ARGS="--backend triton --rounds 5" bash benchmarks/gpu_check.sh "$OUT"
# then here, for each call in order: python benchmarks/collect_gpu.py <that reply's files_at>
# (a later call of the same commit is merged into the first's report and logs); commit
# benchmarks/results.
# Dry run without a GPU: SKIP_BUILD=1 BENCH_ARGS="--device cpu --quick" SUITE=0 bash benchmarks/gpu_check.sh /tmp/x
# A rerun that checks fixes first (build, tests, sanitizer, then some acceptance numbers, ~4 min):
#     BENCH_LAST=1 NCU=0 SUITE=0 DEADLINE_S=240 BENCH_ARGS="--only ptl,masked_attention" bash benchmarks/gpu_check.sh "$OUT"
# The Triton kernels alone, no build (tests, the sanitizer on the Triton driver, their numbers):
#     SKIP_BUILD=1 THROW=0 NCU=0 SUITE=0 BENCH_LAST=1 SANITIZE_ARGS="--backend triton --tools memcheck,racecheck" \
#     BENCH_ARGS="--only patch_stats,ptl --backends reference,torch,triton" bash benchmarks/gpu_check.sh "$OUT"
# A focused rerun (build + some acceptance numbers, ~3 min):
#     TESTS=0 SANITIZE=0 NCU=0 SUITE=0 BENCH_ARGS="--only ptl --backends torch,native,native_tf32x3" bash benchmarks/gpu_check.sh "$OUT"
set -u

OUT_DIR="${1:-${OUT:-benchmarks/results/run}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # importable even if the install fails
unset TRITON_INTERPRET                                  # the kernels must be compiled here
PY="${PYTHON:-$(command -v python3 || command -v python)}"
DEADLINE_S="${DEADLINE_S:-480}"
T0=$(date +%s)

step() {  # step [--log FILE] NAME LIMIT_S CMD...: runs CMD for at most LIMIT_S (exported to it as
          # STEP_LIMIT_S), never past the deadline; logs to OUT_DIR/NAME.log, or appends to FILE
  local log="" name limit start rc left
  if [ "$1" = --log ]; then log=$2; shift 2; fi
  name=$1 limit=$2
  shift 2
  log="$OUT_DIR/${log:-$name.log}"
  [ "$log" = "$OUT_DIR/$name.log" ] && : >"$log"
  start=$(date +%s)
  left=$(( DEADLINE_S - (start - T0) - 10 ))
  if [ "$left" -lt 20 ]; then
    echo "$name skipped: ${left}s left before the deadline" | tee -a "$OUT_DIR/steps.log"; return 0
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s): $*"
  STEP_LIMIT_S=$limit timeout -s INT --kill-after=10 "$limit" "$@" >>"$log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s (limit ${limit}s)" | tee -a "$OUT_DIR/steps.log"
  tail -n 12 "$log"
  return 0
}

: >"$OUT_DIR/steps.log"
echo "== env" | tee -a "$OUT_DIR/steps.log"   # in steps.log: the 8 files back are all taken
timeout 20 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
  echo "REGHARM_COMMIT=${REGHARM_COMMIT:-unset} (what the JSON records; git HEAD here: $(git rev-parse HEAD 2>/dev/null || echo none))"; nproc;
  "$0" -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())";
  "$0" -c "import triton; print(\"triton\", triton.__version__)"' "$PY" 2>&1 | tee -a "$OUT_DIR/steps.log"

if [ "${SKIP_BUILD:-0}" = 1 ]; then echo "build skipped (SKIP_BUILD=1)" | tee -a "$OUT_DIR/steps.log"; else
step build 150 bash -c 'export TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16;
  "$0" -m pip install --no-build-isolation --no-deps -e . \
  || { echo "pip install failed; trying build_ext --inplace"; "$0" setup.py build_ext --inplace \
  || { echo "build_ext failed; trying without OpenMP"; REGHARM_OPENMP=0 "$0" setup.py build_ext --inplace; }; }
  "$0" -c "import regharm_ext, torch; print(regharm_ext.backends(\"cuda\")); import regharm_ext._C;
assert torch._C._dispatch_has_kernel_for_dispatch_key(\"regharm::patch_stats\", \"CUDA\"), \"built without CUDA\""' "$PY"
fi

: >"$OUT_DIR/diagnose.log"

# the acceptance numbers first: they are what a GPU session is for (BENCH_LAST=1: after the
# tests and the sanitizer instead, for a rerun that checks fixes first)
# shellcheck disable=SC2086
bench() {  # the tests after it keep TESTS_RESERVE_S (their ~70-90 s on an H100) of the deadline
  local limit=300 reserve=0
  [ "${TESTS:-1}" = 1 ] && [ "${BENCH_LAST:-0}" != 1 ] && reserve=${TESTS_RESERVE_S:-120}
  local left=$(( DEADLINE_S - ($(date +%s) - T0) - 10 - reserve ))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    echo "bench skipped: ${limit}s left before the tests' reserve" | tee -a "$OUT_DIR/steps.log"; return 0
  fi
  step bench "$limit" "$PY" benchmarks/gpu_bench.py --isolate --rows "${BENCH_ROWS:-lines}" --pairs "${BENCH_PAIRS:-5}" --out "$OUT_DIR" ${BENCH_ARGS:-}
}
[ "${BENCH_LAST:-0}" = 1 ] || [ "${BENCH:-1}" = 0 ] || bench

# every test that needs a GPU; xdist (in the device image) compiles the Triton kernels in parallel
xdist=()
"$PY" -c "import xdist" 2>/dev/null && xdist=(-n 8)
"$PY" -c "import pytest_timeout" 2>/dev/null && xdist+=(--timeout 90)   # a hung test, not the step
export TORCHINDUCTOR_COMPILE_THREADS=2   # 8 workers, 16 cores: no pool of 16 compilers in each
if [ "${TESTS:-1}" = 1 ]; then
step tests 180 "$PY" -m pytest tests/test_triton_cuda.py tests/test_cuda_native.py tests/test_masked_norm.py \
  tests/test_crash_safety.py tests/test_native.py tests/test_ptl_node.py -k "cuda or libstdcxx" -p no:cacheprovider -q -rfEs --durations=10 "${xdist[@]}"
fi

# an argument error raised in the CUDA glue must reach Python (a pytest worker once segfaulted
# at one); a native backtrace from cuda-gdb when it does not. Into diagnose.log (8 files come
# back). After the acceptance numbers and the tests: it took 22-42 s of their time on the H100
if [ "${THROW:-1}" = 1 ]; then
step --log diagnose.log throw 60 bash -c '"$0" benchmarks/cuda_throw_check.py && exit 0
  gdb=$(command -v cuda-gdb || echo /usr/local/cuda/bin/cuda-gdb)
  echo "== rerun under $gdb"; timeout 40 "$gdb" -q -batch -ex run -ex bt --args "$0" benchmarks/cuda_throw_check.py
  exit 1' "$PY"
fi

# the GPU's own view of the CUDA kernels, both into diagnose.log (8 files come back at most):
# out-of-bounds accesses, shared-memory races, barrier misuse, uninitialized reads
# (compute-sanitizer; the CPU emulator cannot see these), then where their time goes (ncu)
if [ "${SANITIZE:-1}" = 1 ]; then
# shellcheck disable=SC2086
step --log diagnose.log sanitize 120 bash -c '"$0" benchmarks/sanitize_cuda.py --budget $(( STEP_LIMIT_S - 10 )) '"${SANITIZE_ARGS:-}" "$PY"
fi
# the variant rows (each PERF_NOTES item's before/after), added to gpu_bench.json after the
# tests, the sanitizer and ncu: the acceptance lines and their pairs came first (bench);
# logged to bench.log (8 files come back at most)
variants() {
  if [ "${VARIANTS:-1}" = 1 ] && [ "${BENCH_ROWS:-lines}" = lines ]; then
    # shellcheck disable=SC2086
    step --log bench.log variants 240 "$PY" benchmarks/gpu_bench.py --isolate --rows variants \
      --out "$OUT_DIR" ${BENCH_ARGS:-}
  fi
}
# ncu before the variants: PERF_NOTES' next steps read its kernel times
if [ "${NCU:-1}" = 1 ]; then
step --log diagnose.log ncu 75 bash -c '"$0" benchmarks/ncu_kernels.py --budget $(( STEP_LIMIT_S - 10 ))' "$PY"
fi
[ "${BENCH_LAST:-0}" = 1 ] || variants

[ "${BENCH_LAST:-0}" = 1 ] && { bench; variants; }


if [ "${SUITE:-1}" = 1 ]; then
# ops first (the floor and paper-point rows), then layers (Tables 3/4, sweeps), then end to end
step suite 400 "$PY" -m pytest benchmarks/test_bench_ops.py benchmarks/test_bench_layers.py \
  benchmarks/test_bench_e2e.py --benchmark-only --bench-device cuda --bench-target 0.05 \
  -q -p no:cacheprovider --benchmark-json "$OUT_DIR/cuda.json"
fi

rm -f "$OUT_DIR"/*.tmp   # a report cut mid-write: the 8 files that come back are the results
echo "== done in $(( $(date +%s) - T0 ))s; results in $OUT_DIR"
cat "$OUT_DIR/steps.log"
"$PY" - "$OUT_DIR/gpu_bench.json" <<'EOF' || true
import json, sys
try:
    report = json.load(open(sys.argv[1]))
except OSError:
    sys.exit("no gpu_bench.json")
for label, a in report.get("acceptance", {}).items():
    pairs = (f" = median of {a['pairs']} pairs, range {a['ratio_range']}, separate runs "
             f"{a['ratio_separate']}") if a.get("pairs") else ""
    print(f"{'HOLDS' if a['holds'] else 'FAILS'}  {label}: ratio {a['ratio']}{pairs} (bound {a['bound']}), "
          f"result check {a.get('checked', 'not run')}")
for r in report["results"]:
    if "error" in r:
        print("ERROR", r["bench"], r["backend"], r["error"][:300])
    elif r.get("check") and not r["check"].get("ok"):
        print("WRONG RESULT", r["bench"], r["backend"], json.dumps(r["check"])[:300])
EOF
