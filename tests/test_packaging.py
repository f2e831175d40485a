"""The source distribution holds what building and running the package needs elsewhere: every
C++/CUDA source and header (setup.py lists only the .cpp/.cu files it compiles on the machine
that makes the sdist, so headers and the CUDA files of a CPU machine need MANIFEST.in), the
embedded photos with their credits and the default weights. Built through setuptools' PEP 517
hook on a copy of the tree, without compiling anything (REGHARM_NO_EXT=1)."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE_SUFFIXES = {".h", ".cuh", ".cu", ".cpp"}


@pytest.fixture(scope="module")
def sdist_names(tmp_path_factory):
    tree = tmp_path_factory.mktemp("sdist") / "tree"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.pyd", "*.egg-info", "build")
    tree.mkdir()
    for name in ("setup.py", "pyproject.toml", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, tree / name)
    for folder in ("csrc", "regharm_ext"):
        shutil.copytree(ROOT / folder, tree / folder, ignore=ignore)
    env = dict(os.environ, REGHARM_NO_EXT="1")
    proc = subprocess.run(
        [sys.executable, "-c",
         "from setuptools import build_meta; print(build_meta.build_sdist('dist'))"], cwd=tree, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"sdist failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    archive = tree / "dist" / proc.stdout.strip().splitlines()[-1]
    with tarfile.open(archive) as tar:
        # drop the "regharm_ext-0.1.0/" prefix
        return {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}


def test_sdist_has_every_cpp_and_cuda_source(sdist_names):
    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").rglob("*")
               if p.suffix in SOURCE_SUFFIXES}
    assert {"csrc/op_args.h", "csrc/cuda/masked_attention_kernels.cu"} <= sources
    missing = sorted(sources - sdist_names)
    assert not missing, f"not in the sdist (see MANIFEST.in): {missing}"


def test_sdist_has_the_embedded_data_and_weights(sdist_names):
    photos = sorted((ROOT / "regharm_ext/data/photos").glob("*.jpg"))
    assert len(photos) >= 85
    wanted = {p.relative_to(ROOT).as_posix() for p in photos} | {
        "regharm_ext/data/photos/CREDITS.tsv", "regharm_ext/weights/default.safetensors",
        "regharm_ext/weights/default.json"}
    missing = sorted(wanted - sdist_names)
    assert not missing, f"not in the sdist: {missing[:10]}"
