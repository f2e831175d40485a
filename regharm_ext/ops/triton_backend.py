"""The `triton` backend: Triton kernels for the ops (``triton_patch_stats.py``,
``triton_attention.py``, ``triton_masked_norm.py``), registered as ``torch.ops.regharm_triton.*``
with autograd.

Runs on CUDA tensors, and on CPU tensors only through Triton's interpreter
(``TRITON_INTERPRET=1`` set before the kernels are defined, i.e. before importing this module or
triton; slow, meant for tests). Importing this module never fails: without triton every call
explains why it cannot run.
"""
from __future__ import annotations

from typing import Optional

import torch

from ._checks import no_gpu_reason

try:
    from . import triton_attention as _attention
    from . import triton_masked_norm as _masked_norm
    from . import triton_patch_stats as _patch_stats
    from ._triton_util import INTERPRETER_PROBLEM, interpreting
    _IMPORT_ERROR: Optional[str] = None
    # the ops' eager Functions, run by PTL's single autograd node (regharm_ext/ptl_node.py)
    PTL_STEPS = (_patch_stats._PatchStats, _masked_norm._MaskedNorm, _attention._MaskedAttention)
except ImportError as exc:  # triton missing (or too old for the APIs used)
    _IMPORT_ERROR = f"triton is not installed or unusable ({exc}); pip install 'triton>=3.2'"
    PTL_STEPS = None


def unavailable(device: torch.device) -> Optional[str]:
    """None when the kernels can run on tensors of ``device``, else the reason."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if device.type == "cpu":
        if not interpreting():
            return ("the Triton kernels run on CPU tensors only in the interpreter: set "
                    "TRITON_INTERPRET=1 before importing triton to run on CPU (slow)")
        return INTERPRETER_PROBLEM
    if device.type == "cuda":
        if interpreting():
            return ("TRITON_INTERPRET=1 was set when the kernels were defined: they only run on "
                    "CPU tensors in this process; unset it to use the GPU")
        return no_gpu_reason()
    return f"Triton kernels do not run on {device.type} tensors (CUDA, or CPU with TRITON_INTERPRET=1)"


def _need():
    if _IMPORT_ERROR is not None:
        raise RuntimeError(_IMPORT_ERROR)


def patch_stats(x, bg, weight, bias, patch_size, stride, eps: float, min_mass: float):
    """See :func:`regharm_ext.ops.patch_stats`; arguments are already checked."""
    _need()
    return _patch_stats.patch_stats(x, bg, weight, bias, patch_size, stride, eps, min_mass)


def masked_attention(q, k, v, key_bias, query_mask, scale: float):
    """See :func:`regharm_ext.ops.masked_attention`; arguments are already checked."""
    _need()
    return _attention.masked_attention(q, k, v, key_bias, query_mask, scale)


def masked_norm(x, weight, eps: float):
    """See :func:`regharm_ext.ops.masked_norm`."""
    _need()
    return _masked_norm.masked_norm(x, weight, eps)
