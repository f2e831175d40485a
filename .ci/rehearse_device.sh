#!/usr/bin/env bash
# Rehearses, on a CPU machine, what a GPU session's device run does: the device image's torch and
# Triton (PyPI's torch 2.11.0 is the cu130 build, with Triton 3.6.0), the extension built with
# its CUDA kernels for sm_90 (FORCE_CUDA=1, needs nvcc), the whole test suite, and a dry run of
# benchmarks/gpu_check.sh. Not part of CI: it downloads about 3 GB once. It works on a clone of
# HEAD (commit first), so this checkout's own build of regharm_ext._C is left alone.
#     bash .ci/rehearse_device.sh [VENV_DIR] [WORK_DIR]   (defaults /tmp/regharm-device-venv, /tmp/regharm-rehearsal)
# NumPy < 2.4: Triton 3.6's interpreter fails with newer NumPy (the CPU tests need it; a GPU does not).
set -euo pipefail
VENV="${1:-/tmp/regharm-device-venv}"
WORK="${2:-/tmp/regharm-rehearsal}"
rm -rf "$WORK"
git clone -q "$(cd "$(dirname "$0")/.." && pwd)" "$WORK/tree"
cd "$WORK/tree"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.11.0 "numpy<2.4" ninja setuptools wheel
# xdist and pytest-timeout as in the device image: gpu_check.sh's tests step runs -n 8 --timeout 90
"$VENV/bin/pip" install -q pillow safetensors tqdm pytest pytest-benchmark pytest-xdist pytest-timeout
export PATH="$VENV/bin:$PATH"
FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" pip install -q --no-build-isolation --no-deps -e .
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
python -m pytest tests -q -p no:cacheprovider
PYTHON="$VENV/bin/python" SKIP_BUILD=1 SUITE=0 BENCH_ARGS="--device cpu --quick" REGHARM_COMMIT="$(git rev-parse HEAD)" \
  bash benchmarks/gpu_check.sh "$WORK/out"
