"""Whether what ``gpu_bench.py`` timed computed the right thing, at the timed sizes and dtype.

The CUDA tests check the kernels at test sizes; the benchmarks run larger grids (more blocks,
other split counts, 32-bit offsets near their limits), where a kernel can be fast and wrong. After
timing an entry, its backend runs once more with a seeded random output gradient, and the outputs
and input gradients of the batch's last image are compared with the float64 ``reference`` backend
on that image (one image keeps the float64 run small; the last one is where batch offsets are
largest). Tolerances are the tests' per-dtype ones (``tests/helpers.py``), relative to the
expected values' magnitude. A criterion of ``gpu_bench.acceptance`` holds only where its backend's
check passed.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import GRAD_TOL, TOL  # noqa: E402  (the per-dtype tolerances, in one place)


def _batched(t, B: int) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[0] == B


def _last_image(t, B: int):
    """Float64 copy of the last image of a batched tensor (shared tensors whole), same
    requires_grad; bool masks keep their dtype."""
    if not isinstance(t, torch.Tensor):
        return t
    out = t[B - 1:] if _batched(t, B) else t
    out = out.detach()
    if out.is_floating_point():
        out = out.double().requires_grad_(t.requires_grad)
    return out


def _excess(actual: torch.Tensor, expected: torch.Tensor, tol) -> float:
    """max |a - e| / (atol·scale + rtol·|e|): <= 1 is within tolerance (scale = max(1, max |e|))."""
    atol, rtol = tol
    e = expected.detach().double()
    a = actual.detach().double()
    if not torch.isfinite(a).all():
        return float("inf")
    scale = max(1.0, float(e.abs().max())) if e.numel() else 1.0
    return float(((a - e).abs() / (atol * scale + rtol * e.abs())).max()) if e.numel() else 0.0


def check(make: Callable[[], Sequence], run: Callable, reference64: Callable, dtype: torch.dtype) -> Dict:
    """``{"ok", "worst", "excess", "compared"}``: ``run`` on fresh inputs from ``make`` against
    ``reference64`` (the float64 reference on the last image); ``excess`` is the largest error as
    a multiple of the tolerance (``ok``: <= 1), ``worst`` names the output or gradient it came from."""
    inputs = list(make())
    B = inputs[0].shape[0]
    outs = run(*inputs)
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=g).to(o.device, o.dtype) for o in outs]
    with_grad = [i for i, t in enumerate(inputs) if _batched(t, B) and t.requires_grad]
    for i in with_grad:
        inputs[i].grad = None
    torch.autograd.backward([o for o in outs if o.requires_grad],
                            [c for o, c in zip(outs, cots) if o.requires_grad])

    ref_in = [_last_image(t, B) for t in inputs]
    ref_outs = reference64(*ref_in)
    ref_outs = list(ref_outs) if isinstance(ref_outs, (tuple, list)) else [ref_outs]
    pairs = [(o, c[B - 1:].double()) for o, c in zip(ref_outs, cots) if o.requires_grad]
    torch.autograd.backward([o for o, _ in pairs], [c for _, c in pairs])

    results = {}
    for n, (o, e) in enumerate(zip(outs, ref_outs)):
        results[f"output {n}"] = _excess(o[B - 1:], e, TOL[dtype])
    for i in with_grad:
        results[f"grad of input {i}"] = _excess(inputs[i].grad[B - 1:], ref_in[i].grad, GRAD_TOL[dtype])
    worst = max(results, key=results.get)
    return dict(ok=results[worst] <= 1.0, worst=worst, excess=round(results[worst], 4),
                compared=sorted(results))
