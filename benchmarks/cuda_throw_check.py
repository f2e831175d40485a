"""Checks that argument errors raised inside the CUDA glue reach Python as RuntimeError, in a
fresh process and after Triton kernels have run in it (a GPU run once lost a pytest worker to a
segfault at such a raise). Prints one line per step, so a crash names the step it happened in;
``gpu_check.sh`` reruns it under cuda-gdb for a native backtrace when it does not exit 0.

    python benchmarks/cuda_throw_check.py
"""
from __future__ import annotations

import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import regharm_ext  # noqa: E402,F401  (loads the ops)
from helpers import make_attention_inputs, make_patch_inputs  # noqa: E402
from regharm_ext.ops import masked_attention  # noqa: E402


def expect_error(label, fn, words):
    print(f"step: {label}", flush=True)
    try:
        fn()
    except RuntimeError as exc:
        if words not in str(exc):
            sys.exit(f"FAIL {label}: the error does not say {words!r}: {str(exc)[:300]}")
        print(f"ok: {label}", flush=True)
        return
    sys.exit(f"FAIL {label}: no error raised")


def main() -> int:
    if not torch.cuda.is_available():
        print("skipped: no CUDA GPU here")
        return 0
    ops = torch.ops.regharm
    x, bg, w, b = make_patch_inputs(1, 2, 10, 10, (3, 3), (1, 1), device="cuda")
    bad_bg = lambda: ops.patch_stats(x, bg[:, :, :5], w, b, 3, 3, 1, 1, 1e-5, 0.5)  # noqa: E731
    expect_error("native CUDA raise, fresh process", bad_bg, "bg must have shape")
    expect_error("torch's own CUDA raise", lambda: torch.ones(2, device="cuda") @ torch.ones(3, device="cuda"),
                 "")
    q, k, v, kb, qm = make_attention_inputs(B=2, L=70, N=40, D=16, E=32, device="cuda")
    q.requires_grad_()
    print("step: triton masked_attention forward+backward", flush=True)
    masked_attention(q, k, v, kb, qm, backend="triton").sum().backward()
    torch.cuda.synchronize()
    expect_error("native CUDA raise after Triton", bad_bg, "bg must have shape")
    xc, bgc, wc, bc = (t.cpu() for t in (x, bg, w, b))
    expect_error("native CPU raise after Triton",
                 lambda: ops.patch_stats(xc, bgc[:, :, :5], wc, bc, 3, 3, 1, 1, 1e-5, 0.5),
                 "bg must have shape")
    print("all raises reached Python", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
