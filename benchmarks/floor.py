"""The floor of the two ops: the bytes that must move and the FLOPs that must run, and the time an
ideal kernel would need on a roofline (default: an H100 SXM).

Counting rules (minimal work of an exact algorithm, not of our kernels):
- Bytes: each input read once and each output written once, in the op's dtype (``s`` bytes per
  element; ``key_bias``, ``lse`` and masses' float32 inputs at 4 bytes, ``query_mask`` at 1).
  Backward also reads what the forward saved (for attention: out and lse; for patch_stats:
  mu, sigma) and the incoming gradients.
- FLOPs: multiply-adds count 2. ``patch_stats``: the weighted window ``Σ weight·bg·x`` is a strided
  correlation with position-dependent weights, 2·B·C·K·P for any exact method short of an FFT;
  the plain window sums (``Σbg·x``, ``Σbg·x²``) can be summed-area tables, O(B·C·H·W).
  Backward: the transposed correlation for ``grad_x`` (2·B·C·K·P) and the correlation for
  ``grad_weight`` (2·B·C·K·P), box terms again O(B·C·H·W). ``masked_attention``: only the Q active
  queries do work: forward 2·Q·N·(D+E) (QKᵀ, PV); backward recomputes QKᵀ and runs dP = dO·Vᵀ,
  dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q: 2·Q·N·(3D+2E). exp() is not counted (special-function units).
"""
from __future__ import annotations

from typing import Dict

# H100 SXM5 (80 GB HBM3) data-sheet peaks
H100 = {
    "name": "H100 SXM roofline (3.35 TB/s HBM3; 67 TFLOP/s FP32 CUDA cores; 989 TFLOP/s BF16/FP16 dense tensor cores)",
    "bandwidth": 3.35e12,
    "flops": {"fp32": 67e12, "bf16": 989e12, "fp16": 989e12},
}
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def patch_stats_work(B: int, C: int, H: int, W: int, P: int, K: int, dtype: str = "fp32") -> Dict[str, Dict[str, float]]:
    """Bytes and FLOPs of ``patch_stats`` forward and backward.

    P = ph·pw positions per patch, K patches."""
    s = ELEM_BYTES[dtype]
    x, bg, stats = B * C * H * W, B * H * W, B * K * C
    fwd_bytes = s * (x + bg + P + 1) + s * (3 * stats + B * K)
    fwd_flops = 2 * B * C * K * P + 8 * B * C * H * W + 12 * stats
    # backward reads x, bg, weight, the three incoming gradients and the saved mu, sigma;
    # writes grad_x, grad_weight, grad_bias
    bwd_bytes = s * (x + bg + P + 3 * stats + 2 * stats) + s * (x + P + 1)
    bwd_flops = 4 * B * C * K * P + 8 * B * C * H * W + 20 * stats
    return {"fwd": {"bytes": fwd_bytes, "flops": fwd_flops},
            "bwd": {"bytes": bwd_bytes, "flops": bwd_flops}}


def masked_attention_work(B: int, L: int, N: int, D: int, E: int, Q: int, dtype: str = "fp32") -> Dict[str, Dict[str, float]]:
    """Bytes and FLOPs of ``masked_attention`` forward and backward.

    L queries per image of which Q active in the whole batch; N keys; D, E head widths."""
    s = ELEM_BYTES[dtype]
    reads = s * (Q * D + B * N * D + B * N * E) + 4 * B * N + B * L     # q (active), k, v, bias, mask
    fwd_bytes = reads + s * B * L * E                                   # out, every row (0 if inactive)
    fwd_flops = 2 * Q * N * (D + E)
    # training forward also writes lse (Q floats); backward reads q, k, v, bias, mask, out and dO
    # of the active rows, lse; writes dq (every row), dk, dv
    bwd_bytes = reads + s * 2 * Q * E + 4 * Q + s * (B * L * D + B * N * D + B * N * E)
    bwd_flops = 2 * Q * N * (3 * D + 2 * E)
    return {"fwd": {"bytes": fwd_bytes, "flops": fwd_flops},
            "bwd": {"bytes": bwd_bytes + 4 * Q, "flops": bwd_flops}}


def floor_time(work: Dict[str, Dict[str, float]], mode: str, dtype: str = "fp32", roof: Dict = H100) -> Dict[str, float]:
    """Roofline time of ``mode`` (``fwd`` or ``fwdbwd``): max(bytes / bandwidth, FLOPs / peak)."""
    parts = ["fwd"] if mode == "fwd" else ["fwd", "bwd"]
    nbytes = sum(work[p]["bytes"] for p in parts)
    flops = sum(work[p]["flops"] for p in parts)
    t_mem, t_flop = nbytes / roof["bandwidth"], flops / roof["flops"][dtype]
    return {"bytes": nbytes, "flops": flops, "t_mem_s": t_mem, "t_flop_s": t_flop,
            "floor_s": max(t_mem, t_flop), "bound": "memory" if t_mem >= t_flop else "compute"}
