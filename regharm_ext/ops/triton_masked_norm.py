"""Triton ``masked_norm`` (PTL's foreground content, see :mod:`regharm_ext.ops.norm_composite`):
two kernels forward, two backward, where the composite of torch ops launches ~26.

- ``_norm_stats``: a program per (image, block of channels) sweeps the positions twice, for the
  weighted mean and then the centred variance (exact for inputs offset by +100): mu, rstd.
- ``_norm_tokens``: y (B, HW, C) = (x - mu)·rstd for a (channels x positions) tile, stored
  transposed (Triton stages the tile so that the store is coalesced).
- ``_norm_grad_sums``: Σg and Σg·y per (image, channel), and 1 / Σw per image.
- ``_norm_dx``: dx = rstd·(g - w_n·(Σg + y·Σg·y)) per tile, in x's layout.

Registered as ``torch.ops.regharm_triton.masked_norm`` (returns ``y, mu, rstd``) and
``masked_norm_backward`` with ``torch.library.triton_op``, autograd like the native op's.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._eager import Direct, eager_grad, register_autograd
from ._triton_util import (acc_dtype, cdiv, interpreting, join_f32, launcher, next_pow2,
                           split_f32, traced_op)
from .norm_composite import op_autograd


@triton.jit
def _inverse_mass(W, b, HW, acc_t: tl.constexpr, BL: tl.constexpr):
    """1 / Σ weight of image b, 0 without weight (w_n = 0: mu = var = 0)."""
    mass = tl.zeros([BL], acc_t)
    for start in range(0, HW, BL):
        l = start + tl.arange(0, BL)
        mass += tl.load(W + b * HW + l, mask=l < HW, other=0.0).to(acc_t)
    total = tl.sum(mass, 0)
    return tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)


@triton.jit
def _norm_stats(X, W, MU, RSTD, C, HW, eps, eps_lo, BC: tl.constexpr, BL: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    acc_t = MU.dtype.element_ty
    eps = join_f32(eps, eps_lo, acc_t)
    c = tl.program_id(0) * BC + tl.arange(0, BC)
    c_ok = c < C
    rows = X + (b * C + c[:, None]) * HW
    inv = _inverse_mass(W, b, HW, acc_t, BL)
    s1 = tl.zeros([BC], acc_t)
    for start in range(0, HW, BL):
        l = start + tl.arange(0, BL)
        w = tl.load(W + b * HW + l, mask=l < HW, other=0.0).to(acc_t)
        x = tl.load(rows + l[None, :], mask=c_ok[:, None] & (l < HW)[None, :], other=0.0)
        s1 += tl.sum(x.to(acc_t) * w[None, :], 1)
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
def _norm_grad_sums(G, X, W, MU, RSTD, SUMS, INV, C, HW, BC: tl.constexpr, BL: tl.constexpr):
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    acc_t = MU.dtype.element_ty
    c = pid_c * BC + tl.arange(0, BC)
    c_ok = c < C
    mu = tl.load(MU + b * C + c, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + b * C + c, mask=c_ok, other=0.0)
    sg = tl.zeros([BC], acc_t)
    sgy = tl.zeros([BC], acc_t)
    for start in range(0, HW, BL):
        l = start + tl.arange(0, BL)
        ok = c_ok[:, None] & (l < HW)[None, :]
        g = tl.load(G + (b * HW + l[None, :]) * C + c[:, None], mask=ok, other=0.0).to(acc_t)
        x = tl.load(X + (b * C + c[:, None]) * HW + l[None, :], mask=ok, other=0.0).to(acc_t)
        sg += tl.sum(g, 1)
        sgy += tl.sum(g * (x - mu[:, None]) * rstd[:, None], 1)
    tl.store(SUMS + (b * C + c) * 2, sg, mask=c_ok)
    tl.store(SUMS + (b * C + c) * 2 + 1, sgy, mask=c_ok)
    inv = _inverse_mass(W, b, HW, acc_t, BL)
    tl.store(INV + b, inv, mask=pid_c == 0)


@triton.jit
def _norm_dx(G, X, W, MU, RSTD, SUMS, INV, DX, C, HW, BC: tl.constexpr, BL: tl.constexpr):
    b = tl.program_id(2).to(tl.int64)
    l = tl.program_id(0) * BL + tl.arange(0, BL)
    c = tl.program_id(1) * BC + tl.arange(0, BC)
    c_ok = c < C
    ok = c_ok[:, None] & (l < HW)[None, :]
    mu = tl.load(MU + b * C + c, mask=c_ok, other=0.0)
    rstd = tl.load(RSTD + b * C + c, mask=c_ok, other=0.0)
    sg = tl.load(SUMS + (b * C + c) * 2, mask=c_ok, other=0.0)
    sgy = tl.load(SUMS + (b * C + c) * 2 + 1, mask=c_ok, other=0.0)
    acc_t = mu.dtype
    wn = tl.load(W + b * HW + l, mask=l < HW, other=0.0).to(acc_t) * tl.load(INV + b)
    g = tl.load(G + (b * HW + l[None, :]) * C + c[:, None], mask=ok, other=0.0).to(acc_t)
    x = tl.load(X + (b * C + c[:, None]) * HW + l[None, :], mask=ok, other=0.0).to(acc_t)
    y = (x - mu[:, None]) * rstd[:, None]
    dx = rstd[:, None] * (g - wn[None, :] * (sg[:, None] + y * sgy[:, None]))
    tl.store(DX + (b * C + c[:, None]) * HW + l[None, :], dx.to(DX.dtype.element_ty), mask=ok)


def _blocks(C: int):
    """(channels, positions) of a sweep program and of a tile program."""
    c2 = next_pow2(max(int(C), 1))
    if interpreting():  # numpy: fewer, larger programs
        return (min(c2, 64), 1024), (min(c2, 64), 256)
    return (min(c2, 16), 256), (min(c2, 32), 64)


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
        (sc, sl), (tc, tl_) = _blocks(C)
        launcher(_norm_stats)[(cdiv(C, sc), B)](x, w, mu, rstd, C, HW, *split_f32(eps),
                                                BC=sc, BL=sl, num_warps=4)
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
    sums = torch.empty(B * C * 2, device=x.device, dtype=acc)
    inv = torch.empty(B, device=x.device, dtype=acc)
    if B and C and HW:
        (sc, sl), (tc, tl_) = _blocks(C)
        launcher(_norm_grad_sums)[(cdiv(C, sc), B)](g, x, w, mu, rstd, sums, inv, C, HW,
                                                    BC=sc, BL=sl, num_warps=4)
        launcher(_norm_dx)[(cdiv(HW, tl_), cdiv(C, tc), B)](
            g, x, w, mu, rstd, sums, inv, dx, C, HW, BC=tc, BL=tl_, num_warps=4)
    return dx


_setup, _backward = op_autograd(Direct(torch.ops.regharm_triton.masked_norm_backward,
                                      masked_norm_bwd.eager_body))
_MaskedNorm = register_autograd("regharm_triton::masked_norm", _backward, _setup,
                                masked_norm_fwd.eager_body)


def masked_norm(x, weight, eps: float) -> torch.Tensor:
    """y (Tensor[B, HW, C]); see :func:`regharm_ext.ops.masked_norm`."""
    if eager_grad(x):
        return _MaskedNorm.apply(x, weight, eps)[0]
    return torch.ops.regharm_triton.masked_norm(x, weight, eps)[0]
