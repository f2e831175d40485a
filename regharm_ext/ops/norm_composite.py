"""Masked instance normalization, PTL's foreground content ``C_f`` (SPEC §4 step 3), as an op.

    y, mu, rstd = masked_norm(x, weight, eps)
    x (Tensor[B, C, H, W]), weight (Tensor[B, 1, H, W]) >= 0 (data: no gradient)
    -> y (Tensor[B, H*W, C]) in x's dtype, contiguous: the attention's token layout
       mu, rstd (Tensor[B, C]) in the accumulation dtype (float32; float64 for float64 x)

``w_n = weight / Σ weight`` (0 where the image's weights sum to 0), ``mu = Σ w_n·x``,
``var = Σ w_n·(x - mu)²``, ``rstd = (var + eps)^-1/2``, ``y = (x - mu)·rstd`` at every position.
Backward (x only): ``dx = rstd·(g - w_n·(Σg + y·Σg·y))``, sums over positions, from ``mu`` and
``rstd``; y is recomputed, so autograd keeps x and two (B, C) tensors.

This file holds the composite (plain torch ops: the `reference` and `torch` backends and any
weight that needs a gradient). The `native` and `triton` backends run it as two kernels each way;
in torch ops it is ~14 launches forward and ~12 backward (benchmarks/glue_traffic.py).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def weighted_stats(xa: torch.Tensor, w: torch.Tensor):
    """mu, x - mu, the weighted variance of each channel and w / mass (mass 0: mu = var = 0),
    in w's dtype (16-bit x is promoted inside each op, never copied to float32 first)."""
    mass = w.sum((2, 3), keepdim=True)
    w_norm = w / mass.clamp_min(torch.finfo(w.dtype).tiny)  # no mass: w = 0, so w_norm = 0
    mu = (w_norm * xa).sum((2, 3), keepdim=True)
    xc = xa - mu
    if w.requires_grad:  # √w has no derivative at w = 0
        var = (w_norm * xc.square()).sum((2, 3), keepdim=True)
    else:  # Σ w·xc² as a squared norm of xc·√w: one full-size product, not two
        var = torch.linalg.vector_norm(xc * w_norm.sqrt(), dim=(2, 3), keepdim=True).square()
    return mu, xc, var, w_norm


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # not t.to(dtype) when it is one already: torch 2.11's compiler mishandles an autograd.Function
    # output that .to() returns as itself (wrong gradients under torch.compile)
    return t if t.dtype == dtype else t.to(dtype)


class CompositeNorm(torch.autograd.Function):
    """``y = (x - mu) · r``, ``r = (var + eps)^-1/2``, with the analytic backward
    ``dx = r · (g - (w / mass) · (Σg + y · Σ g·y))`` (the weights are data: no gradient). It keeps
    x (alive anyway) and per-channel statistics, and recomputes y in the backward, where autograd
    of the formula keeps x - mu twice and its square: three tensors of x's size (the PTL peak,
    benchmarks/PERF_NOTES.md). ``tokens``: y in (B, HW, C) layout, as the op returns it."""

    @staticmethod
    def forward(ctx, x, weight, eps, tokens=False):
        mu, xc, var, w_norm = weighted_stats(x, weight.to(acc_dtype(x)))
        r = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, mu, r, w_norm)
        ctx.tokens = tokens
        if not tokens:
            return as_dtype(xc * r, x.dtype)
        B, C = x.shape[:2]
        y_t = xc.flatten(2).transpose(1, 2)
        # written straight in the attention's (B, HW, C) layout: a transposed view would be
        # copied to a contiguous one by the op (one more pass over x's size)
        y = torch.empty(B, x.shape[2] * x.shape[3], C, dtype=x.dtype, device=x.device)
        return torch.mul(y_t, r.view(B, 1, C), out=y)

    @staticmethod
    @once_differentiable  # the statistics are saved without history: no second derivative
    def backward(ctx, grad):
        x, mu, r, w_norm = ctx.saved_tensors
        if ctx.tokens:  # (B, HW, C) -> x's (B, C, H, W), a view
            grad = grad.transpose(1, 2).view(x.shape)
        y = torch.addcmul(-mu * r, x, r)  # x and grad may be 16-bit: each op promotes
        sum_g = grad.sum((2, 3), keepdim=True, dtype=mu.dtype)
        sum_gy = (grad * y).sum((2, 3), keepdim=True)
        # dx = r·g - w·r·(Σg + y·Σgy), written in x's memory layout: an elementwise op follows
        # its first input's, and tokens give grad a transposed one, which autograd would copy
        if torch.compiler.is_compiling():  # the compiler refuses out= of a non-contiguous
            dx = grad * r                      # (channels_last) tensor, and picks layouts itself
        else:
            dx = torch.mul(grad, r, out=torch.empty_like(y))
        dx.addcmul_(w_norm, torch.addcmul(sum_g * r, y, sum_gy * r), value=-1)
        return as_dtype(dx, x.dtype), None, None, None


def composite(x: torch.Tensor, weight: torch.Tensor, eps: float, tokens: bool = True
              ) -> torch.Tensor:
    """y of the op by plain torch ops: Tensor[B, HW, C] (``tokens``) or Tensor[B, C, H, W]. A
    weight that needs a gradient gets one through autograd of the formula."""
    if not weight.requires_grad:
        if tokens and torch.compiler.is_compiling():
            # torch 2.11's compiler gets x's gradient wrong through the tokens layout (the out=
            # write below, and for channels_last x without it too: off by 25): the norm in x's
            # layout, then the transpose, which the compiler fuses anyway
            y = CompositeNorm.apply(x, weight, eps, False)
            return y.flatten(2).transpose(1, 2).contiguous()
        return CompositeNorm.apply(x, weight, eps, tokens)
    _, xc, var, _ = weighted_stats(x.to(acc_dtype(x)), weight.to(acc_dtype(x)))
    y = (xc / torch.sqrt(var + eps)).to(x.dtype)
    return y.flatten(2).transpose(1, 2) if tokens else y


def op_autograd(backward_op):
    """(setup_context, backward) of a kernel backend's masked_norm op, whose backward is the op
    ``backward_op(grad, x, weight, mu, rstd) -> dx``: mu and rstd are internal outputs (the public
    op returns y only) and weight is data."""

    def setup_context(ctx, inputs, output):
        x, weight, _ = inputs
        _, mu, rstd = output
        ctx.save_for_backward(x, weight, mu, rstd)

    def backward(ctx, grad, _grad_mu, _grad_rstd):
        if grad is None:
            return None, None, None
        x, weight, mu, rstd = ctx.saved_tensors
        return backward_op(grad, x, weight, mu, rstd), None, None

    return setup_context, backward

