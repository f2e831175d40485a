"""Small pieces shared by the Triton op files: accumulation dtype, interpreter detection and the
kernel launcher that makes a launch visible to ``torch.compile``."""
from __future__ import annotations

import struct
import threading
from typing import Callable, Optional, Tuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

try:  # torch >= 2.6
    from torch.library import wrap_triton as _wrap_triton
except ImportError:  # pragma: no cover - older torch: plain launches (no torch.compile capture)
    _wrap_triton = None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (gradcheck); everything else accumulates in float32 (SPEC §1)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Launch-time integer helpers in plain Python: triton.cdiv and triton.next_power_of_2 are
# ConstexprFunctions since Triton 3.6 (~2 µs a call on a 2-core CPU, ~20 calls per PTL fwd+bwd).
def cdiv(a, b):
    """ceil(a / b) for non-negative ints (SymInts too, under torch.compile)."""
    return (a + b - 1) // b


def split_f32(v: float) -> Tuple[float, float]:
    """(hi, lo): ``v`` as two float32 values, hi the nearest one and lo the rest. A launch passes
    a Python float as float32, which cost float64 kernels 3e-8 of relative accuracy in ``scale``
    and ``eps``; they take ``hi + lo`` in the accumulation dtype (exactly ``hi`` in float32)."""
    try:
        hi = struct.unpack("f", struct.pack("f", v))[0]
    except (TypeError, struct.error):  # a symbolic float under torch.compile: passed as it is
        return v, 0.0
    return hi, v - hi


@triton.jit
def join_f32(hi, lo, acc_t: tl.constexpr):
    """A scalar from :func:`split_f32`'s pair, in the accumulation dtype (torch.compile passes
    Python floats as float64, a launch as float32: either way hi + lo is the value)."""
    return tl.cast(hi, acc_t) + tl.cast(lo, acc_t)


def check_batch(B, op: str) -> None:
    """What a call must not ask of the kernels, refused with the reason (BackendUnavailable)
    rather than failing inside Triton or torch.compile: more than 65535 images (the kernels put
    the image index on grid axis 1 or 2, which CUDA caps there), or torch.compile of interpreted
    kernels (its fake tensors have no data for the interpreter to read)."""
    from ..backends import BackendUnavailable
    if _INTERPRETING and torch.compiler.is_compiling():
        raise BackendUnavailable(f"backend 'triton': torch.compile needs the compiled kernels (a CUDA "
                                 f"GPU); under TRITON_INTERPRET=1 {op} runs in eager calls only: "
                                 f"call it without torch.compile, or compile with backend='native' "
                                 f"or 'torch'")
    if B > 65535:
        raise BackendUnavailable(f"backend 'triton': {op} takes at most 65535 images per call (a CUDA "
                                 f"grid axis), got B={B}; split the batch, or use backend='native' "
                                 f"or 'torch'")


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), as triton.next_power_of_2."""
    return 1 << max(int(n) - 1, 0).bit_length()


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


@triton.jit
def _loop_probe(X, N):
    acc = 0.0
    for _ in range(0, N):
        acc += 1.0
    tl.store(X, acc)


def _interpreter_problem() -> Optional[str]:
    """Why the interpreter cannot run our kernels in this environment, or None. Seen: Triton
    3.6's interpreter turns a runtime loop bound into a 1-element array, which NumPy >= 2.4
    refuses to convert to an int; a loop with a runtime bound is the smallest such kernel."""
    if not _INTERPRETING:
        return None
    x = torch.zeros(1)
    try:
        _loop_probe[(1,)](x, 3)
    except Exception as exc:  # noqa: BLE001 - any failure means the kernels cannot run either
        import numpy
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} "
                f"here ({type(exc).__name__}: {str(exc)[:120]}); install 'numpy<2.4' beside this "
                f"Triton, or a newer Triton")
    if float(x) != 3.0:
        return f"Triton {triton.__version__}'s interpreter miscounts a loop (3 iterations gave {float(x)})"
    return None


# run once at import: a plain value again, for torch.compile
INTERPRETER_PROBLEM = _interpreter_problem()


@triton.jit
def _dot_probe(A, B, C):
    r = tl.arange(0, 16)
    a = tl.load(A + r[:, None] * 16 + r[None, :])
    b = tl.load(B + r[:, None] * 16 + r[None, :])
    tl.store(C + r[:, None] * 16 + r[None, :], tl.dot(a, b))


def _bf16_dot_problem() -> Optional[str]:
    """Why the interpreter cannot run bfloat16 attention, or None. Seen: Triton 3.9's interpreter
    returns ~1e10 from a tl.dot of two bfloat16 tiles (NumPy has no bfloat16), silently."""
    if not _INTERPRETING or INTERPRETER_PROBLEM is not None:
        return None
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(16, 16, generator=g).bfloat16() for _ in range(2))
    c = torch.zeros(16, 16)
    try:
        _dot_probe[(1,)](a, b, c)
        err = float((c - a.float() @ b.float()).abs().max())
    except Exception as exc:  # noqa: BLE001 - any failure means the attention cannot run either
        err, why = float("nan"), f"{type(exc).__name__}: {str(exc)[:120]}"
    else:
        why = f"a 16x16 product off by {err:.3g}"
    if err < 1e-2:
        return None
    return (f"Triton {triton.__version__}'s interpreter gets bfloat16 tl.dot wrong ({why}): "
            f"run the attention in float16 or float32 on CPU, or bfloat16 on a GPU")


BF16_DOT_PROBLEM = _bf16_dot_problem()


class _Launches(threading.local):
    direct = False  # inside eager_body: no tracing wrapper


_LAUNCHES = _Launches()


def launcher(kernel):
    """``wrap_triton(kernel)`` for compiled kernels; interpreted ones are launched directly
    (``wrap_triton`` of torch < 2.13 rejects them and the compiler never sees them anyway), and
    so is every kernel of an :func:`eager_body`."""
    if _wrap_triton is None or is_interpreted(kernel) or _LAUNCHES.direct:
        return kernel
    return _wrap_triton(kernel)


def eager_body(fn: Callable) -> Callable:
    """``fn`` (a ``triton_op``'s Python body) for plain eager calls (``_eager.Direct``): its
    kernels launch as they are, as ``triton_op`` itself runs them for real tensors."""
    def body(*args):
        prev, _LAUNCHES.direct = _LAUNCHES.direct, True
        try:
            return fn(*args)
        finally:
            _LAUNCHES.direct = prev
    return body


def traced_op(name: str):
    """``torch.library.triton_op(name, mutates_args=())`` (the op ``torch.compile`` sees into),
    keeping the body for plain eager calls as the op's ``eager_body``."""
    from torch.library import triton_op

    def dec(fn):
        op = triton_op(name, mutates_args=())(fn)
        op.eager_body = eager_body(fn)
        return op
    return dec
