"""Host-side time of the `triton` ops' forward+backward with every kernel launch stubbed out.

On the H100 the Triton kernels of masked_attention took 15 % of the op's measured fwd+bwd time
(benchmarks/PERF_NOTES.md): the rest is the host. This times that host part anywhere, no GPU
needed: the ops run on CPU tensors with compiled (not interpreted) kernels whose launches do
nothing, so what is left is Python, autograd, the query compaction and the allocations. Compare
before and after a change on the same machine; the numbers are not GPU times.

    python benchmarks/host_overhead.py [--reps 200]

The PTL rows time the layer's fwd+bwd on `triton` the same way, as one autograd node
(regharm_ext/ptl_node.py) and unfused (``REGHARM_PTL_NODE=0``). The `native` PTL rows run its
CPU kernels (nothing to stub: C++ calls them), at a size where they take little of the time: the
node in C++ (csrc/ptl_node.cpp), the same node from Python (``REGHARM_PTL_NODE=python``) and
unfused.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.pop("TRITON_INTERPRET", None)  # before triton is imported: compiled kernels

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from helpers import make_attention_inputs, make_patch_inputs  # noqa: E402
from regharm_ext import PTL  # noqa: E402
from regharm_ext.ops import triton_attention as ta  # noqa: E402
from regharm_ext.ops import triton_backend as tb  # noqa: E402
from regharm_ext.ops import triton_masked_norm as tn  # noqa: E402
from regharm_ext.ops import triton_patch_stats as tp  # noqa: E402
from triton_aot_check import _Capture  # noqa: E402  (this folder: the launch stand-in)


def _time(step, reps: int, rounds: int = 5) -> float:
    """Seconds per call: the best of ``rounds`` rounds of ``reps`` calls (this machine's other
    load only ever adds)."""
    for _ in range(10):
        step()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            step()
        best = min(best, (time.perf_counter() - start) / reps)
    return best


def _ptl_step(backend: str, B: int, C: int, size: int, patch: int, box):
    """One fwd+bwd of PTL (stride 2) on a size x size map whose foreground is the box."""
    x = torch.randn(B, C, size, size, requires_grad=True)
    mask = torch.zeros(B, 1, size, size)
    mask[(slice(None), slice(None)) + box] = 1.0
    ptl = PTL(C, patch=patch, stride=2, backend=backend)
    return lambda: ptl(x, mask).sum().backward()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args(argv)
    ta.launcher = tp.launcher = tn.launcher = _Capture(None)  # launches dropped, not run
    tb.unavailable = lambda device: None  # the layer may pick `triton` for CPU tensors here
    torch.set_num_threads(1)  # small tensors: a thread pool only adds noise

    q, k, v, kb, qm = make_attention_inputs(B=4, L=256, N=64, D=64, E=128)
    for t in (q, k, v):
        t.requires_grad_()

    def attention():
        ta.masked_attention(q, k, v, kb, qm, 0.125).sum().backward()

    x, bg, w, b = make_patch_inputs(4, 64, 32, 32, (8, 8), (2, 2))
    for t in (x, w, b):
        t.requires_grad_()

    def patch_stats():
        mu, sigma, content = tp.patch_stats(x, bg, w, b, (8, 8), (2, 2), 1e-5, 0.5)[:3]
        (mu.sum() + sigma.sum() + content.sum()).backward()

    layer = _ptl_step("triton", B=4, C=16, size=32, patch=8, box=(slice(8, 20), slice(10, 24)))
    native = _ptl_step("native", B=2, C=8, size=16, patch=4, box=(slice(4, 11), slice(3, 12)))

    def under(node, step):
        def run():
            os.environ["REGHARM_PTL_NODE"] = node
            try:
                step()
            finally:
                os.environ.pop("REGHARM_PTL_NODE")
        return run

    stubbed = f"launches stubbed, CPU tensors, {torch.__version__}"
    with_cpu = f"CPU kernels included, B 2, C 8, 16², {torch.__version__}"
    for name, step, note in (
            ("masked_attention", attention, stubbed), ("patch_stats", patch_stats, stubbed),
            ("PTL (one node)", layer, stubbed), ("PTL (unfused)", under("0", layer), stubbed),
            ("PTL native (C++ node)", native, with_cpu),
            ("PTL native (Python node)", under("python", native), with_cpu),
            ("PTL native (unfused)", under("0", native), with_cpu)):
        print(f"{name:24s} fwd+bwd host side: {_time(step, args.reps) * 1e6:7.1f} µs ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
