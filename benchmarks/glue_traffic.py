"""Memory traffic and op count of a layer's forward+backward outside our kernels, on any machine.

Run 1 on the H100 (benchmarks/PERF_NOTES.md) left PTL's forward+backward with ~1.7 ms beyond
its attention and patch_stats kernels: the layer's own torch ops (normalization, blend, their
autograd) and the host time to issue them. Both scale with what this counts, which needs no GPU:
every ATen op the layer runs (fwd+bwd, autograd included), the bytes of its tensor arguments
(read) and of the new tensors it returns (written), in units of x's size. Views are free and
not listed; our own ops (``regharm::*``, ``regharm_triton::*``) are counted apart, as their
kernels' traffic is not their arguments'. On a GPU each listed op is one kernel launch at least,
and a unit (16.8 MB at the paper's PTL setting, float32) takes ~6-7 µs at H100 bandwidth.

    python benchmarks/glue_traffic.py [--backend native] [--dtype float32] [--size 128] [-v]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from benchlib import TensorMemoryTracker, blob_mask  # noqa: E402
from regharm_ext.layers import LTL, PTL  # noqa: E402

OURS = ("regharm::", "regharm_triton::")


class Traffic(TorchDispatchMode):
    """(op name, bytes read, bytes written) of every op that writes a tensor."""

    def __init__(self):
        super().__init__()
        self.rows: List[Tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.name().startswith("aten::empty"):  # allocation only, no kernel
            return out
        # an out= argument is written, not read; an in-place op's self is both
        read_args = (args, {k: v for k, v in kwargs.items() if k != "out"})
        ins = [t for t in tree_flatten(read_args)[0] if isinstance(t, torch.Tensor)]
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        in_storages = {id(t.untyped_storage()) for t in ins}
        mutates = func._schema.is_mutable
        written = sum(t.nbytes for t in outs if mutates or id(t.untyped_storage()) not in in_storages)
        if written:
            self.rows.append((func.name(), sum(t.nbytes for t in ins), written))
        return out


def run(layer_name: str, backend: str, dtype: torch.dtype, size: int, B: int = 4, C: int = 64):
    torch.manual_seed(0)
    x = torch.randn(B, C, size, size, dtype=dtype, requires_grad=True)
    mask = blob_mask(B, size, 0.2).to(dtype)
    if layer_name == "ptl":
        layer = PTL(C, patch=size // 8, stride=max(1, size // 32), backend=backend)
    else:
        layer = LTL(C, backend=backend)
    layer = layer.to(dtype)

    def step():
        layer(x, mask).float().sum().backward()
        x.grad = None
        layer.zero_grad(set_to_none=True)

    step()  # lazy parameters, first-call caches
    with Traffic() as tr:
        step()
    with TensorMemoryTracker() as mem:
        step()
    return tr.rows, x.numel() * x.element_size(), mem.peak


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layer", default="ptl", choices=["ptl", "ltl"])
    ap.add_argument("--backend", default="native")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    ap.add_argument("--size", type=int, default=128, help="feature map side (paper: 128)")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every op")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(4, torch.get_num_threads()))
    rows, unit, peak = run(args.layer, args.backend, getattr(torch, args.dtype), args.size)
    ours = [r for r in rows if r[0].startswith(OURS)]
    glue = [r for r in rows if not r[0].startswith(OURS)]
    big = [r for r in glue if r[1] + r[2] >= unit / 2]
    if args.verbose:
        for name, rd, wr in rows:
            print(f"  {name:42s} read {rd / unit:5.2f}  write {wr / unit:5.2f}")
    moved = sum(r[1] + r[2] for r in glue) / unit
    print(f"{args.layer} {args.backend} {args.dtype} {args.size}²: glue {len(glue)} ops "
          f"({len(big)} of them moving >= half an x), {moved:.1f} x-sizes moved "
          f"({moved * unit / 1e6:.0f} MB); our ops {len(ours)}; peak {peak / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
