"""Builds regharm_ext and its compiled ops ``regharm_ext._C``.

- C++ CPU kernels (csrc/ops.cpp, csrc/cpu/*.cpp) are always built, with OpenMP where torch
  uses it (their ``at::parallel_for`` loops run on torch's threads).
- CUDA kernels (csrc/cuda/*.cu and their glue csrc/cuda/*.cpp) are added when CUDA is usable
  (torch built with CUDA and nvcc found) or when ``FORCE_CUDA=1``. ``TORCH_CUDA_ARCH_LIST``
  selects the architectures (default: the local GPU's; use ``9.0`` for H100/H200) and
  ``MAX_JOBS`` the parallel compile jobs, both read by torch's BuildExtension.
- ``REGHARM_NO_EXT=1`` skips ``_C`` entirely (the reference and torch backends still work);
  ``REGHARM_OPENMP=0`` builds it without OpenMP (its CPU kernels then run on one thread).

Install with ``pip install --no-build-isolation .`` so that the build uses the installed torch.
On an H100/H200 machine: ``TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 pip install --no-build-isolation .``
Where no GPU is visible (FORCE_CUDA=1), set TORCH_CUDA_ARCH_LIST: torch cannot guess it there.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _set_cuda_home() -> None:
    """torch takes CUDA_HOME, when unset, as the folder above `which nvcc`; where nvcc is a
    wrapper script (/usr/local/bin/nvcc) that folder has no CUDA headers and the build fails
    late, in the glue. Name the toolkit that has them instead (run before cpp_extension loads)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    roots = ([os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []) + ["/usr/local/cuda"]
    for root in roots:
        if os.path.exists(os.path.join(root, "include", "cuda_runtime_api.h")):
            os.environ["CUDA_HOME"] = root
            return


def _loaded_library(prefix: str) -> list:
    """The shared library this process runs with (torch loaded it) whose file name starts with
    ``prefix``, as a linker input: ``_C`` then needs that library by its own name, which the
    loader finds already loaded; [] where there is none (or no /proc)."""
    try:
        import torch  # noqa: F401  (loads its libraries the way the extension will run)

        with open("/proc/self/maps") as fh:
            for line in fh:
                path = line.split()[-1]
                if os.path.basename(path).startswith((prefix + ".so", prefix + "-")) and \
                        os.path.isfile(path):
                    return [path]
    except OSError:  # not Linux: nothing to do
        pass
    return []


def _shared_libstdcxx() -> list:
    """The shared libstdc++ this process runs with, as a linker input.

    A compiler whose library path finds libstdc++.a before libstdc++.so links a private static
    copy into ``_C`` (seen on the GPU image, whose CXX=/opt/gcc/bin/g++ wrapper puts a folder with
    only libstdc++.a first). That copy's iostreams never get their locale set up, so every
    argument error whose message holds a number (a shape) crashes or comes out cut short. Naming
    the process's own libstdc++.so.6 makes the link resolve to it; where the compiler would have
    linked it anyway this changes nothing."""
    return _loaded_library("libstdc++")


def _openmp_flags() -> tuple:
    """(compile flags, link inputs): ``-fopenmp`` where torch runs its CPU ops on OpenMP and the
    compiler has it, linked against torch's own OpenMP runtime.

    ``at::parallel_for`` is an inline template: compiled without ``_OPENMP`` it runs its whole
    range on the calling thread, so without this flag every CPU kernel here used one core
    whatever ``torch.set_num_threads`` said. Linking the libgomp torch loaded (not the
    compiler's, which a wheel's bundled copy may not be, nor a static one) keeps one runtime per
    process, whose thread count ``torch.set_num_threads`` sets."""
    import subprocess
    import sys
    import tempfile

    import torch

    if os.environ.get("REGHARM_OPENMP", "1") == "0" or not sys.platform.startswith("linux") or \
            "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return [], []
    cxx = os.environ.get("CXX", "c++")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.cpp")
        with open(src, "w") as fh:
            fh.write("#include <omp.h>\nint main() { return omp_get_max_threads() > 0 ? 0 : 1; }\n")
        try:
            ok = subprocess.run([cxx, "-fopenmp", src, "-o", os.path.join(tmp, "omp")],
                                capture_output=True).returncode == 0
        except OSError:
            ok = False
    if not ok:
        print(f"regharm_ext: {cxx} cannot build with -fopenmp; the CPU ops will run on one thread",
              file=sys.stderr)
        return [], []
    return ["-fopenmp"], _loaded_library("libgomp") or ["-fopenmp"]


def cuda_wanted() -> bool:
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    import torch
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None and torch.cuda.is_available()


def extensions():
    if os.environ.get("REGHARM_NO_EXT", "0") == "1":
        return [], {}
    _set_cuda_home()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = _rel("csrc/ops.cpp") + _rel("csrc/ptl_node.cpp") + _rel("csrc/cpu/*.cpp")
    omp_compile, omp_link = _openmp_flags()
    cxx = ["-O3", "-std=c++17"] + omp_compile
    link = _shared_libstdcxx() + omp_link
    if cuda_wanted() and _rel("csrc/cuda/*.cu"):
        ext = CUDAExtension(
            "regharm_ext._C",
            sources + _rel("csrc/cuda/*.cpp") + _rel("csrc/cuda/*.cu"),
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("REGHARM_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math",
                                                     "-lineinfo"]},
            extra_link_args=link,
        )
    else:
        ext = CppExtension("regharm_ext._C", sources, include_dirs=[os.path.join(ROOT, "csrc")],
                           extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    packages=find_packages(include=["regharm_ext", "regharm_ext.*"]),
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
