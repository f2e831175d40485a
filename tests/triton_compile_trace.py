"""Traces ``torch.compile(fullgraph=True)`` of PTL + LTL on the `triton` backend, forward and
backward, on a machine without a GPU, and prints which Triton kernels each graph launches (JSON).

A GPU run of tests/test_triton_cuda.py compiles and runs the same module; this checks the part a
CPU can: dynamo traces the ``triton_op`` wrappers and their autograd without a graph break,
AOTAutograd functionalizes every ``wrap_triton`` launch and partitions the joint graph, and torch's
mutation analysis lowers each kernel to Triton IR (for an sm_90 target when no GPU is active).
No kernel runs: the forward compiler stops the compilation once both graphs exist.

    python tests/triton_compile_trace.py [--dtype float32|bfloat16]

The kernels must be compiled kernels, not interpreted ones (``wrap_triton`` passes interpreted
kernels through untraced), so this runs in its own process with ``TRITON_INTERPRET`` unset.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)   # before triton is imported: compiled kernels

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from torch._dynamo.backends.common import aot_autograd  # noqa: E402
from torch._functorch.partitioners import min_cut_rematerialization_partition  # noqa: E402
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import PtlThenLtl, two_masks  # noqa: E402
import regharm_ext.ops.triton_backend as triton_backend  # noqa: E402


class _TargetOnly:
    """The part of a Triton driver torch's mutation analysis asks for: the target to lower to."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


class _Traced(Exception):
    """Stops the compilation once both graphs were captured (nothing is run)."""


class _Fallbacks(logging.Handler):
    """Counts torch's 'assuming every input is mutated' (its mutation analysis failed)."""

    def __init__(self):
        super().__init__()
        self.records = set()

    def emit(self, record):
        if "assuming every input is mutated" in record.getMessage():
            self.records.add(id(record))  # one record may reach this handler on two loggers


def _kernels(gm):
    names = []
    for node in gm.graph.nodes:
        if "triton_kernel_wrapper" in str(node.target):
            names.append(kernel_side_table.get_kernel(node.kwargs["kernel_idx"]).fn.__name__)
    return sorted(names)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)
    try:
        triton.runtime.driver.active.get_current_target()
    except RuntimeError:  # no GPU driver here: lower for the H100/H200
        triton.runtime.driver.set_active(_TargetOnly())
    triton_backend.unavailable = lambda device: None  # CPU tensors are traced, never launched

    graphs = {}

    def partition(joint, inputs, **kw):
        graphs["fw"], graphs["bw"] = min_cut_rematerialization_partition(joint, inputs, **kw)
        return graphs["fw"], graphs["bw"]

    def stop(gm, example_inputs):
        raise _Traced()

    fallbacks = _Fallbacks()
    # torch 2.13 logs it on torch._dynamo, which does not propagate; others on the module's logger
    for name in ("torch", "torch._dynamo", "torch._higher_order_ops.triton_kernel_wrap"):
        logging.getLogger(name).addHandler(fallbacks)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    mod = PtlThenLtl(8, "triton").to(dtype)
    x = torch.randn(2, 8, 12, 12, dtype=dtype, requires_grad=True)
    compiled = torch.compile(mod, fullgraph=True,
                             backend=aot_autograd(fw_compiler=stop, partition_fn=partition))
    error = None
    try:
        compiled(x, two_masks(24, "cpu").to(dtype))
        error = "the compilation was not stopped: no forward graph reached the compiler"
    except Exception as exc:  # noqa: BLE001 - reported, the test decides
        if not isinstance(getattr(exc, "inner_exception", None), _Traced):
            error = f"{type(exc).__name__}: {exc}"[:4000]
    print(json.dumps({"fw": _kernels(graphs["fw"]) if "fw" in graphs else None,
                      "bw": _kernels(graphs["bw"]) if "bw" in graphs else None,
                      "mutation_fallbacks": len(fallbacks.records), "error": error}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
