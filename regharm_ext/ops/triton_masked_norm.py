"""Triton ``masked_norm`` (PTL's foreground content, see :mod:`regharm_ext.ops.norm_composite`):
two kernels forward, two backward, where the composite of torch ops launches ~26.

- ``_norm_stats``: a program per (image, channel) sweeps the positions twice, for the weighted
  mean and then the centred variance (exact for inputs offset by +100): mu, rstd.
- ``_norm_tokens``: y (B, HW, C) = (x - mu)·rstd for a (channels x positions) tile, stored
  transposed (Triton stages the tile so that the store is coalesced).
- ``_norm_grad_sums``: partial Σg and Σg·y per (image, channel) and Σw per image, over a split
  of the positions.
- ``_norm_dx``: adds the splits' partial sums up (in a fixed order), then
  dx = rstd·(g - w_n·(Σg + y·Σg·y)) per tile, in x's layout.

Run 2 (H100, PTL's setting B 4, C 64, 128²) timed ``_norm_grad_sums`` at 168 µs and
``_norm_stats`` at 76 µs when a program took 16 channels of an image: 16 programs for 132 SMs.
Now the statistics take a program per channel (256) and the gradient sums split the positions
too (256 programs).

Registered as ``torch.ops.regharm_triton.masked_norm`` (returns ``y, mu, rstd``) and
``masked_norm_backward`` with ``torch.library.triton_op``, autograd like the native op's.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._eager import Direct, eager_grad, register_autograd
from ._triton_util import (acc_dtype, cdiv, check_batch, interpreting, join_f32, launcher,
                           next_pow2, split_f32, traced_op)
from .norm_composite import op_autograd


@triton.jit
def _inverse(total):
    """1 / Σ weight, 0 without weight (w_n = 0: mu = var = 0); a subnormal Σ counts as the
    smallest normal number, as the composite's clamp_min(tiny) does (1 / 1e-40 is inf in float32,
    and inf times a zero weight NaN)."""
    if total.dtype == tl.float64:
        tiny = tl.full([], 2.2250738585072014e-308, tl.float64)
    else:
        tiny = tl.full([], 1.1754943508222875e-38, tl.float32)
    return tl.where(total > 0, 1.0 / tl.maximum(total, tiny), 0.0)


@triton.jit
def _norm_stats(X, W, MU, RSTD, C, HW, eps, eps_lo, BC: tl.constexpr, BL: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    acc_t = MU.dtype.element_ty
    eps = join_f32(eps, eps_lo, acc_t)
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    c_ok = c < C
    rows = X + (b * C + c[:, None]) * HW
    mass = tl.zeros([BL], acc_t)
    s1 = tl.zeros([BC], acc_t)
    for start in range(0, HW, BL):
        l = start + tl.arange(0, BL)
        w = tl.load(W + b * HW + l, mask=l < HW, other=0.0).to(acc_t)
        x = tl.load(rows + l[None, :], mask=c_ok[:, None] & (l < HW)[None, :], other=0.0)
        mass += w
        s1 += tl.sum(x.to(acc_t) * w[None, :], 1)
    inv = _inverse(tl.sum(mass, 0))
    mu = s1 * inv
    s2 = tl.zeros([BC], acc_t)
    for start in range(0, HW, BL):
        l = start + tl.arange(0, BL)
        w = tl.load(W + b * HW + l, mask=l < HW, other=0.0).to(acc_t)
        x = tl.load(rows + l[None, :], mask=c_ok[:, None] & (l < HW)[None, :], other=0.0)
        d = x.to(acc_t) - mu[:, None]
        s2 += tl.sum(w[None, :] * d * d, 1)
    tl.store(MU + b * C + c, mu, mask=c_ok)
    tl.store(RSTD + b * C + c, 1.0 / tl.sqrt(s2 * inv + eps), mask=c_ok)


@triton.jit
def _norm_tokens(X, MU, RSTD, Y, C, HW, BC: tl.constexpr, BL: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    l = tl.program_id(0) * BL + tl.arange(0, BL)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    ok = (c < C)[:, None] & (l < HW)[None, :]
    mu = tl.load(MU + b * C + c, mask=c < C, other=0.0)
    rstd = tl.load(RSTD + b * C + c, mask=c < C, other=0.0)
    x = tl.load(X + (b * C + c[:, None]) * HW + l[None, :], mask=ok, other=0.0)
    y = (x.to(mu.dtype) - mu[:, None]) * rstd[:, None]
    tl.store(Y + (b * HW + l[None, :]) * C + c[:, None], y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _norm_grad_sums(G, X, W, MU, RSTD, PART, C, HW, SPAN, BC: tl.constexpr, BL: tl.constexpr):
    """Over positions [split·SPAN, + SPAN): PART[split, 2(bC + c)] = Σg, [.. + 1] = Σg·y, and
    PART[split, 2BC + b] = Σw (written by the programs of channel block 0)."""
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    n_b = tl.num_programs(1)
    acc_t = MU.dtype.element_ty
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < C
    mu = tl.load(MU + b * C + c, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + b * C + c, mask=c_ok, other=0.0)
    sg = tl.zeros([BC], acc_t)
    sgy = tl.zeros([BC], acc_t)
    mass = tl.zeros([BL], acc_t)
    begin = split * SPAN
    end = tl.minimum(begin + SPAN, HW)
    for start in range(begin, end, BL):
        l = start + tl.arange(0, BL)
        l_ok = l < end
        ok = c_ok[:, None] & l_ok[None, :]
        g = tl.load(G + (b * HW + l[None, :]) * C + c[:, None], mask=ok, other=0.0).to(acc_t)
        x = tl.load(X + (b * C + c[:, None]) * HW + l[None, :], mask=ok, other=0.0).to(acc_t)
        sg += tl.sum(g, 1)
        sgy += tl.sum(g * (x - mu[:, None]) * rstd[:, None], 1)
        mass += tl.load(W + b * HW + l, mask=l_ok, other=0.0).to(acc_t)
    row = PART + split * (2 * n_b * C + n_b)
    tl.store(row + (b * C + c) * 2, sg, mask=c_ok)
    tl.store(row + (b * C + c) * 2 + 1, sgy, mask=c_ok)
    tl.store(row + 2 * n_b * C + b, tl.sum(mass, 0), mask=pid_c == 0)


@triton.jit
def _norm_dx(G, X, W, MU, RSTD, PART, DX, C, HW, NSPLIT, BC: tl.constexpr, BL: tl.constexpr,
             NS: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    n_b = tl.num_programs(2)
    l = tl.program_id(0) * BL + tl.arange(0, BL)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = c < C
    ok = c_ok[:, None] & (l < HW)[None, :]
    mu = tl.load(MU + b * C + c, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + b * C + c, mask=c_ok, other=0.0)
    acc_t = mu.dtype
    # the splits' partial sums (NS >= NSPLIT rows; a tree sum in a fixed order: deterministic)
    sp = tl.arange(0, NS)
    starts = PART + sp.to(tl.int64) * (2 * n_b * C + n_b)
    s_ok = (sp < NSPLIT)[:, None] & c_ok[None, :]
    sg = tl.sum(tl.load(starts[:, None] + (b * C + c[None, :]) * 2, mask=s_ok, other=0.0), 0)
    sgy = tl.sum(tl.load(starts[:, None] + (b * C + c[None, :]) * 2 + 1, mask=s_ok, other=0.0), 0)
    inv = _inverse(tl.sum(tl.load(starts + 2 * n_b * C + b, mask=sp < NSPLIT, other=0.0), 0))
    wn = tl.load(W + b * HW + l, mask=l < HW, other=0.0).to(acc_t) * inv
    g = tl.load(G + (b * HW + l[None, :]) * C + c[:, None], mask=ok, other=0.0).to(acc_t)
    x = tl.load(X + (b * C + c[:, None]) * HW + l[None, :], mask=ok, other=0.0).to(acc_t)
    y = (x - mu[:, None]) * rstd[:, None]
    dx = rstd[:, None] * (g - wn[None, :] * (sg[:, None] + y * sgy[:, None]))
    tl.store(DX + (b * C + c[:, None]) * HW + l[None, :], dx.to(DX.dtype.element_ty), mask=ok)


def _blocks(C: int):
    """(channels, positions) of a gradient-sums program and of a tile program."""
    c2 = next_pow2(max(int(C), 1))
    if interpreting():  # numpy: fewer, larger programs
        return (min(c2, 64), 1024), (min(c2, 64), 256)
    return (min(c2, 16), 256), (min(c2, 32), 64)


def _stats_block(HW: int):
    """Positions per step of a statistics program (one channel): many loads in flight per step,
    few steps (the program count is B·C, a few hundred at PTL's sizes)."""
    return 1024 if interpreting() else min(4096, max(next_pow2(HW), 128))


def _splits(HW: int, BL: int):
    """(splits, positions per split) of the gradient sums: at least 4 steps of BL per split (1
    in the interpreter, so that its tests see several splits), at most 16 splits."""
    nsplit = max(1, min(16, cdiv(HW, (1 if interpreting() else 4) * BL)))
    span = cdiv(cdiv(HW, nsplit), BL) * BL
    return cdiv(HW, span), span


@traced_op("regharm_triton::masked_norm")
def masked_norm_fwd(x: torch.Tensor, weight: torch.Tensor, eps: float
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """y (Tensor[B, HW, C], x's dtype), mu and rstd (Tensor[B, C], the accumulation dtype)."""
    B, C, H, W = x.shape
    HW = H * W
    acc = acc_dtype(x.dtype)
    x = x.contiguous()
    w = weight.to(acc).contiguous()
    y = torch.empty(B, HW, C, device=x.device, dtype=x.dtype)
    mu = torch.empty(B, C, device=x.device, dtype=acc)
    rstd = torch.empty(B, C, device=x.device, dtype=acc)
    if B and C and HW:
        _, (tc, tl_) = _blocks(C)
        launcher(_norm_stats)[(C, B)](x, w, mu, rstd, C, HW, *split_f32(eps), BC=1,
                                      BL=_stats_block(HW), num_warps=4)
        launcher(_norm_tokens)[(cdiv(HW, tl_), cdiv(C, tc), B)](
            x, mu, rstd, y, C, HW, BC=tc, BL=tl_, num_warps=4)
    else:
        mu.zero_()
        rstd.zero_()
    return y, mu, rstd


@traced_op("regharm_triton::masked_norm_backward")
def masked_norm_bwd(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mu: torch.Tensor,
                    rstd: torch.Tensor) -> torch.Tensor:
    """dx (Tensor[B, C, H, W], x's dtype)."""
    B, C, H, W = x.shape
    HW = H * W
    acc = acc_dtype(x.dtype)
    x = x.contiguous()
    g = grad.to(x.dtype).contiguous()
    w = weight.to(acc).contiguous()
    mu, rstd = mu.to(acc).contiguous(), rstd.to(acc).contiguous()
    dx = torch.empty(B, C, H, W, device=x.device, dtype=x.dtype)
    if B and C and HW:
        (sc, sl), (tc, tl_) = _blocks(C)
        nsplit, span = _splits(HW, sl)
        part = torch.empty(nsplit, 2 * B * C + B, device=x.device, dtype=acc)
        launcher(_norm_grad_sums)[(cdiv(C, sc), B, nsplit)](g, x, w, mu, rstd, part, C, HW, span,
                                                            BC=sc, BL=sl, num_warps=4)
        launcher(_norm_dx)[(cdiv(HW, tl_), cdiv(C, tc), B)](
            g, x, w, mu, rstd, part, dx, C, HW, nsplit, BC=tc, BL=tl_, NS=next_pow2(nsplit),
            num_warps=4)
    return dx


_setup, _backward = op_autograd(Direct(torch.ops.regharm_triton.masked_norm_backward,
                                      masked_norm_bwd.eager_body))
_MaskedNorm = register_autograd("regharm_triton::masked_norm", _backward, _setup,
                                masked_norm_fwd.eager_body)


def masked_norm(x, weight, eps: float) -> torch.Tensor:
    """y (Tensor[B, HW, C]); see :func:`regharm_ext.ops.masked_norm`."""
    check_batch(x.shape[0], "masked_norm")
    if eager_grad(x):
        return _MaskedNorm.apply(x, weight, eps)[0]
    return torch.ops.regharm_triton.masked_norm(x, weight, eps)[0]
