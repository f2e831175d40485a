"""Suite-wide setup, kept minimal.

Triton decides between compiling and interpreting a kernel when the kernel is *defined* (at the
import of regharm_ext.ops.triton_*), not when it runs, and any test may import those modules
first (``regharm_ext.backends()`` does). So the choice is made here, before any test module is
imported: on a machine without a GPU the Triton kernels can only run in the interpreter
(``TRITON_INTERPRET=1``), which tests/test_triton.py needs. With a GPU the variable stays unset
so that the CUDA tests compile the kernels; tests/test_triton.py then skips (run it alone with
``CUDA_VISIBLE_DEVICES= python -m pytest tests/test_triton.py`` to exercise the interpreter there).
An explicit TRITON_INTERPRET in the environment always wins.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
