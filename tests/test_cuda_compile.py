"""The CUDA sources compile on a machine without a GPU.

- every csrc/cuda/*.cu with nvcc for sm_80 and sm_90 (no GPU, no torch CUDA libraries needed),
  with the flags torch's CUDAExtension adds (no implicit half/bfloat16 conversions);
- the torch glue csrc/cuda/*.cpp and csrc/ptl_node.cpp (as the CUDA build compiles it) with
  ``g++ -fsyntax-only`` against torch's headers (a CPU wheel ships ATen/c10 CUDA headers) and
  the CUDA include directory.

Skipped, with the reason, when nvcc (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin) or g++ is
missing. All compilations start at once in a temporary directory, each .cu once with both
gencodes.
"""
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc/cuda").glob("*.cu"))
# the torch glue, and PTL's native node, whose CUDA branch compiles only with REGHARM_WITH_CUDA
GLUE_FILES = sorted((ROOT / "csrc/cuda").glob("*.cpp")) + [ROOT / "csrc/ptl_node.cpp"]
GENCODES = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


def _find_nvcc():
    candidates = [shutil.which("nvcc")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def _find_cuda_include(nvcc):
    """The CUDA headers next to nvcc (which may be a wrapper script elsewhere)."""
    candidates = [os.environ.get("CUDA_HOME"), str(Path(nvcc).resolve().parents[1]),
                  "/usr/local/cuda"]
    for c in filter(None, candidates):
        if (Path(c) / "include" / "cuda_runtime_api.h").exists():
            return Path(c) / "include"
    return None


NVCC = _find_nvcc()
CUDA_INCLUDE = _find_cuda_include(NVCC) if NVCC else None


def _torch_nvcc_flags():
    from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    return list(COMMON_NVCC_FLAGS)


# The attention kernels keep their tiles in registers (attention_registers.cuh): a spill to local
# memory would be a silent slowdown, so ptxas warns and the test below fails on any warning.
NO_SPILLS = {"masked_attention_kernels.cu", "masked_norm_kernels.cu", "attention_registers_f16.cu",
             "attention_registers_bf16.cu", "attention_registers_f32.cu",
             "attention_registers_f32_mma_lanes.cu", "attention_registers_tf32x3.cu"}


def _nvcc_cmd(src: Path, out: Path):
    extra = ["-Xptxas", "-warn-spills"] if src.name in NO_SPILLS else []
    return [NVCC, "-c", str(src), "-o", str(out), "-std=c++17", "-O3", "--use_fast_math",
            f"-I{ROOT / 'csrc'}", *_torch_nvcc_flags(), *GENCODES, *extra]


def _glue_cmd(src: Path):
    import torch.utils.cpp_extension as ce
    includes = [f"-isystem{p}" for p in ce.include_paths()] + [f"-isystem{CUDA_INCLUDE}"]
    defines = ["-DREGHARM_WITH_CUDA"]
    torch_include = Path(ce.include_paths()[0])
    if not (torch_include / "c10/cuda/impl/cuda_cmake_macros.h").exists():
        # a CPU wheel lacks this generated header; it only sets export macros
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    return ["g++", "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", *includes,
            f"-I{ROOT / 'csrc'}", *defines, str(src)]


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """Starts every compilation at once; {file name: (returncode, output, seconds)}."""
    tmp = tmp_path_factory.mktemp("cuda_compile")
    jobs = {}
    if NVCC:
        for src in CU_FILES:
            jobs[src.name] = _nvcc_cmd(src, tmp / (src.stem + ".o"))
    if NVCC and CUDA_INCLUDE and shutil.which("g++"):
        for src in GLUE_FILES:
            jobs[src.name] = _glue_cmd(src)
    start = time.time()
    procs = {n: subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n, c in jobs.items()}
    results = {}
    for name, proc in procs.items():
        output, _ = proc.communicate()
        results[name] = (proc.returncode, output, time.time() - start)
    return results


def _built_for_this_gpu():
    """Where a GPU runs the CUDA kernels, the build has compiled these sources already (and
    test_cuda_native.py tests them): the check would only spend the GPU session's time."""
    if os.environ.get("REGHARM_CUDA_COMPILE_TEST") == "1":
        return False
    import torch
    if not torch.cuda.is_available():
        return False
    from regharm_ext.backends import unavailable_reason
    return unavailable_reason("native", "cuda") is None


needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found on PATH, in $CUDA_HOME/bin or /usr/local/cuda/bin: the "
                         "CUDA sources were not compiled")
not_built_here = pytest.mark.skipif(
    _built_for_this_gpu(), reason="the extension here was built with these CUDA sources; "
                                  "REGHARM_CUDA_COMPILE_TEST=1 compiles them again")


def test_there_are_cuda_sources():
    assert {p.name for p in CU_FILES} >= {"patch_stats_kernels.cu", "masked_attention_kernels.cu",
                                          "masked_norm_kernels.cu"}
    assert {p.name for p in GLUE_FILES} >= {"patch_stats_cuda.cpp", "masked_attention_cuda.cpp",
                                            "masked_norm_cuda.cpp"}


@pytest.mark.parametrize("name", [p.name for p in CU_FILES])
@needs_nvcc
@not_built_here
def test_cuda_kernels_compile_for_sm80_and_sm90(compiled, name):
    rc, output, seconds = compiled[name]
    assert rc == 0, f"nvcc failed on {name} after {seconds:.0f} s:\n{output[-8000:]}"
    assert "warning" not in output.lower(), f"nvcc warnings on {name}:\n{output[-8000:]}"


@needs_nvcc
@not_built_here
@pytest.mark.skipif(shutil.which("g++") is None or CUDA_INCLUDE is None,
                    reason="g++ or the CUDA headers (cuda_runtime_api.h) not found: glue not checked")
@pytest.mark.parametrize("name", [p.name for p in GLUE_FILES])
def test_cuda_glue_compiles_against_torch_headers(compiled, name):
    rc, output, seconds = compiled[name]
    assert rc == 0, f"g++ -fsyntax-only failed on {name} after {seconds:.0f} s:\n{output[-8000:]}"
