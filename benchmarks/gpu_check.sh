#!/usr/bin/env bash
# The one script a GPU session runs, from the repository root:
#     bash benchmarks/gpu_check.sh [OUT_DIR]        (default: $OUT, else benchmarks/results/run)
# 1. environment (GPU, versions, commit)  2. build + editable install of regharm_ext (CUDA ops for
# sm_90)  3. the Triton CUDA tests  4. benchmarks/gpu_bench.py -> OUT_DIR/gpu_bench.json
# 5. the other CUDA tests and tests/test_backends.py.
# Every step logs to OUT_DIR/<step>.log and has its own time limit; a failing step does not stop
# the next ones (partial results always come back). OUT_DIR/steps.log sums up rc and seconds.
# Sized for ~6 minutes on an H100 (16 cores); each step has a limit (30 + 180 + 150 + 180 + 150 s)
# so a stuck step cannot eat the others' time. Writes 7 files (the device tool returns 8).
# Dry run without a GPU: SKIP_BUILD=1 BENCH_ARGS="--device cpu --quick" bash benchmarks/gpu_check.sh /tmp/x
set -u

OUT_DIR="${1:-${OUT:-benchmarks/results/run}}"
mkdir -p "$OUT_DIR"
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # importable even if the install fails
unset TRITON_INTERPRET                                  # the kernels must be compiled here

step() {  # step NAME LIMIT_S CMD...
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  rc=$?
  echo "$name rc=$rc $(( $(date +%s) - start ))s" | tee -a "$OUT_DIR/steps.log"
  tail -n 25 "$OUT_DIR/$name.log"
  return 0
}

: >"$OUT_DIR/steps.log"
step env 30 bash -c 'nvidia-smi; git rev-parse HEAD; git status --short | head -20;
  python -c "import sys, torch; print(sys.version); print(\"torch\", torch.__version__, torch.version.cuda, torch.cuda.get_device_name())";
  python -c "import triton; print(\"triton\", triton.__version__)"; nproc'

if [ "${SKIP_BUILD:-0}" = 1 ]; then echo "build skipped (SKIP_BUILD=1)" | tee -a "$OUT_DIR/steps.log"; else
step build 180 bash -c 'TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python -m pip install --no-build-isolation --no-deps -e . \
  || { echo "pip install failed; trying build_ext --inplace"; TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python setup.py build_ext --inplace; }
  python -c "import regharm_ext; print(regharm_ext.backends(\"cuda\"))"'
fi

# the Triton CUDA tests (they do not need the build), the benchmark, then the other CUDA tests
# (tests/*cuda*.py) and the CPU backend tests, not the slow ones: the most wanted results first
step tests_triton 150 python -m pytest tests/test_triton_cuda.py -q -rs --durations=10

# shellcheck disable=SC2086
step bench 180 python benchmarks/gpu_bench.py --out "$OUT_DIR" ${BENCH_ARGS:-}

mapfile -t cuda_tests < <(ls tests/*cuda*.py 2>/dev/null | grep -v test_triton_cuda.py)
step tests 150 python -m pytest "${cuda_tests[@]}" tests/test_backends.py -q -rs -m "not slow" \
  --durations=15

# the full pytest-benchmark suite (sweeps, Tables 3/4 memory, end to end): a second call, since
# one device call is capped at 600 s: RUN_SUITE=1 SKIP_BUILD=1 bash benchmarks/gpu_check.sh
if [ "${RUN_SUITE:-0}" = 1 ]; then
step suite 420 python -m pytest benchmarks/ --benchmark-only --bench-device cuda --bench-target 0.1 \
  -q -p no:cacheprovider --benchmark-json "$OUT_DIR/cuda-bench.json"
fi

echo "== done; results in $OUT_DIR"
cat "$OUT_DIR/steps.log"
