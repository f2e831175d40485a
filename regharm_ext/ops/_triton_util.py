"""Small pieces shared by the Triton op files: accumulation dtype, interpreter detection and the
kernel launcher that makes a launch visible to ``torch.compile``."""
from __future__ import annotations

import torch
import triton
from triton.runtime.jit import JITFunction

try:  # torch >= 2.6
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - older torch: plain launches (no torch.compile capture)
    _wrap_triton = None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else accumulates in float32 (SPEC §1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def is_interpreted(kernel) -> bool:
    """True when ``kernel`` was decorated while ``TRITON_INTERPRET=1`` (runs on CPU tensors)."""
    return not isinstance(kernel, JITFunction)


@triton.jit
def _probe():
    pass


# fixed when this module is imported, like every kernel's own choice; a plain bool also lets
# torch.compile read it as a constant
_INTERPRETING = is_interpreted(_probe)


def interpreting() -> bool:
    """True when this process's kernels are interpreted (CPU tensors only)."""
    return _INTERPRETING


def launcher(kernel):
    """``wrap_triton(kernel)`` for compiled kernels; interpreted ones are launched directly
    (``wrap_triton`` of torch < 2.13 rejects them and the compiler never sees them anyway)."""
    if _wrap_triton is None or is_interpreted(kernel):
        return kernel
    return _wrap_triton(kernel)
