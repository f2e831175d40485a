"""Out-of-bounds checking for Triton kernels run by the CPU interpreter (``TRITON_INTERPRET=1``).

Compiled on a GPU, a kernel that indexes past its tensors reads or corrupts whatever lies there
(an H100 run once reported an illegal address in the Triton attention that no test reproduced);
the interpreter runs the same index arithmetic on numpy, where nothing notices. Inside
:func:`checked_launches` every load and store whose mask is on must fall inside the storage of one
of the launch's tensor arguments, or the access is recorded as (kernel, "load"/"store", count).
"""
from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import numpy as np


def unsupported() -> Optional[str]:
    """Why this Triton's interpreter cannot be checked (None: it can)."""
    try:
        import triton.runtime.interpreter as itp
    except ImportError as exc:
        return f"no Triton interpreter ({exc})"
    missing = [n for n, o in (("GridExecutor._init_args_hst", itp.GridExecutor),
                              ("InterpreterBuilder.create_masked_load", itp.InterpreterBuilder),
                              ("InterpreterBuilder.create_masked_store", itp.InterpreterBuilder))
               if not hasattr(o, n.split(".")[1])]
    if missing or not hasattr(itp, "_get_np_dtype"):
        return f"this Triton's interpreter lacks {', '.join(missing) or '_get_np_dtype'}"
    return None


@contextlib.contextmanager
def checked_launches():
    """Yields the list of violations found while the block runs."""
    import triton.runtime.interpreter as itp
    ranges: List[Tuple[int, int]] = []
    current = [""]
    bad: List[Tuple[str, str, int]] = []
    init, load, store = (itp.GridExecutor._init_args_hst, itp.InterpreterBuilder.create_masked_load,
                         itp.InterpreterBuilder.create_masked_store)

    def init_args(self, args_dev, kwargs):
        args_hst, kwargs_hst = init(self, args_dev, kwargs)
        ranges.clear()
        for a in list(args_hst) + list(kwargs_hst.values()):
            if hasattr(a, "untyped_storage"):
                st = a.untyped_storage()
                ranges.append((st.data_ptr(), st.data_ptr() + st.nbytes()))
        current[0] = getattr(getattr(self, "fn", None), "__name__", "?")
        return args_hst, kwargs_hst

    def check(ptrs, mask, what):
        addr = ptrs.data.astype(np.uint64)
        on = np.broadcast_to(mask.data, addr.shape) if mask is not None else np.ones(addr.shape, bool)
        addr = addr[on]
        if addr.size == 0:
            return
        size = itp._get_np_dtype(ptrs.get_element_ty()).itemsize
        inside = np.zeros(addr.shape, bool)
        for lo, hi in ranges:
            inside |= (addr >= lo) & (addr + size <= hi)
        if not inside.all():
            bad.append((current[0], what, int((~inside).sum())))

    def checked_load(self, ptrs, mask, other, *rest):
        check(ptrs, mask, "load")
        return load(self, ptrs, mask, other, *rest)

    def checked_store(self, ptrs, value, mask, *rest):
        check(ptrs, mask, "store")
        return store(self, ptrs, value, mask, *rest)

    itp.GridExecutor._init_args_hst = init_args
    itp.InterpreterBuilder.create_masked_load = checked_load
    itp.InterpreterBuilder.create_masked_store = checked_store
    try:
        yield bad
    finally:
        itp.GridExecutor._init_args_hst = init
        itp.InterpreterBuilder.create_masked_load = load
        itp.InterpreterBuilder.create_masked_store = store
