"""Triton ``patch_stats`` (SPEC §2): window sums per tile of patches, gather backward, one file.

Forward (``_ps_fwd``): a program owns a tile of patches × a tile of channels and sweeps the
``ph*pw`` positions of its patches twice: first ``Σbg`` and ``Σbg·x`` (the mean), then, centred
on that mean, ``Σbg·(x - mu)²``, ``Σweight·bg`` and ``Σweight·bg·(x - mu)``. The blocks are never
stored. ``x`` is shifted by the value at each patch's top-left pixel before the first sweep, so the
sums stay small for inputs offset by +100. One sweep of raw moments (``Σbg·x² - mass·mu²``) lost
the variance of patches whose spread is small next to their distance from the shift (a few soft
background pixels at the foreground's edge), and the backward divides by ``sigma³``.

Backward, per valid patch n and channel c (SPEC §2 / COMMON brief), with ``a_u = weight_r·bg_u``,
``Ws = Σa``, ``D = Σa(x - mu)``:
``γ = g_content/σ``, ``β = g_sigma/(Mσ) - g_content·D/(Mσ³)``,
``α = g_mu/M - g_content·Ws/(Mσ) - β·mu``,
``grad_x_u = Σ_{n ∋ u} bg_u (α_n + β_n x_u) + γ_n a_u``,
``grad_weight_r = Σ_{b,n,c} γ bg_u (x_u - mu)``, ``grad_bias = Σ g_content`` (valid patches).

- ``_ps_bwd_patch``: the same tiling as the forward; recomputes ``mu`` in the forward's shifted
  coordinates (a first sweep), then ``Ws`` and ``D`` centred on it (``D`` from the saved, rounded
  ``mu`` is off by ``ulp(mu)·Ws``, amplified by ``1/sigma³``), and writes ``α, β, γ``; in the
  second sweep it reduces ``γ·bg·(x - mu)`` over its tile for each position r (a window row at
  a time) into a per-program partial row, which torch sums over programs (a second kernel is
  unnecessary: the partials are ``programs × ph*pw`` values, deterministic, no atomics).
- ``_ps_bwd_pixel``: each program owns a tile of pixels × channels and gathers from the at most
  ``ceil(ph/sh)·ceil(pw/sw)`` patches that cover each pixel: one writer per gradient value.

All outputs of the op are in the accumulation dtype (float32; float64 for float64 inputs); the
backend casts them to ``x``'s dtype, so the backward sees exact saved statistics.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from ._eager import Direct, eager_grad, register_autograd
from ._triton_util import (acc_dtype, cdiv, check_batch, interpreting, join_f32, launcher,
                           next_pow2, split_f32, traced_op)

# ----------------------------------------------------------------------------------- kernels


@triton.jit
def _tile(pid_k, pid_c, C, Kw, K, sh, sw, Wd, BK: tl.constexpr, BC: tl.constexpr):
    """Patch indices of the tile, their top-left pixel offset, channel indices and masks."""
    n = pid_k * BK + tl.arange(0, BK)
    c = pid_c * BC + tl.arange(0, BC)
    n_ok = n < K
    c_ok = c < C
    top = (n // Kw) * sh * Wd + (n % Kw) * sw
    return n, c, n_ok, c_ok, top


@triton.jit
def _first_sweep(xb, gb, top, n_ok, m2, Wd, acc_t: tl.constexpr, PH: tl.constexpr,
                 PW: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    """Each patch's shift (its top-left pixel), mass and Σbg·(x - shift): the forward's first
    sweep, repeated by the backward so that both centre on the same mean."""
    shift = tl.load(xb + top[:, None], mask=m2, other=0.0).to(acc_t)
    mass = tl.zeros((BK,), acc_t)
    s1 = tl.zeros((BK, BC), acc_t)
    # the inner loops are unrolled: a row's PW loads are in flight together
    for dy in range(0, PH):
        for dx in tl.static_range(PW):
            off = top + dy * Wd + dx
            g = tl.load(gb + off, mask=n_ok, other=0.0).to(acc_t)
            mass += g
            s1 += g[:, None] * (tl.load(xb + off[:, None], mask=m2, other=0.0).to(acc_t) - shift)
    return shift, mass, s1


@triton.jit
def _ps_fwd(X, BG, W, BIAS, MU, SIG, CON, MASS, C, H, Wd, Kw, K, sh, sw, eps, eps_lo, min_mass,
            min_mass_lo, PH: tl.constexpr, PW: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    acc_t = MU.dtype.element_ty
    eps = join_f32(eps, eps_lo, acc_t)
    min_mass = join_f32(min_mass, min_mass_lo, acc_t)
    n, c, n_ok, c_ok, top = _tile(pid_k, pid_c, C, Kw, K, sh, sw, Wd, BK, BC)
    m2 = n_ok[:, None] & c_ok[None, :]
    xb = X + b * C * H * Wd + c[None, :] * (H * Wd)
    gb = BG + b * H * Wd
    shift, mass, s1 = _first_sweep(xb, gb, top, n_ok, m2, Wd, acc_t, PH, PW, BK, BC)
    valid = mass >= min_mass
    safe = tl.where(valid, mass, 1.0)[:, None]
    mu_s = s1 / safe
    # second sweep, centred on the patch mean: Σbg·x² - mass·mu² cancels when a patch's spread is
    # small next to its distance from the shift (a few soft background pixels), and the backward
    # divides by sigma³
    ws = tl.zeros((BK,), acc_t)
    s2 = tl.zeros((BK, BC), acc_t)
    d = tl.zeros((BK, BC), acc_t)
    for dy in range(0, PH):
        for dx in tl.static_range(PW):
            off = top + dy * Wd + dx
            w = tl.load(W + dy * PW + dx).to(acc_t)
            g = tl.load(gb + off, mask=n_ok, other=0.0).to(acc_t)
            xc = tl.load(xb + off[:, None], mask=m2, other=0.0).to(acc_t) - shift - mu_s
            gx = g[:, None] * xc
            ws += w * g
            s2 += gx * xc
            d += w * gx
    sigma = tl.sqrt(s2 / safe + eps)
    bias = tl.load(BIAS).to(acc_t)
    content = bias + d / sigma   # Σ_u a_u (x_u - mu) / sigma, a_u = weight_r·bg_u
    v2 = valid[:, None]
    out = b * K * C + n[:, None] * C + c[None, :]
    tl.store(MU + out, tl.where(v2, mu_s + shift, 0.0), mask=m2)
    tl.store(SIG + out, tl.where(v2, sigma, 0.0), mask=m2)
    tl.store(CON + out, tl.where(v2, content, 0.0), mask=m2)
    if pid_c == 0:  # one writer per patch
        tl.store(MASS + b * K + n, mass, mask=n_ok)


@triton.jit
def _ps_bwd_patch(X, BG, W, MU, SIG, MASS, GMU, GSIG, GCON, ABG, GWP,
                  C, H, Wd, Kw, K, sh, sw, min_mass, min_mass_lo, PH: tl.constexpr,
                  PW: tl.constexpr, PWP: tl.constexpr, BK: tl.constexpr, BC: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    acc_t = ABG.dtype.element_ty
    min_mass = join_f32(min_mass, min_mass_lo, acc_t)
    n, c, n_ok, c_ok, top = _tile(pid_k, pid_c, C, Kw, K, sh, sw, Wd, BK, BC)
    m2 = n_ok[:, None] & c_ok[None, :]
    xb = X + b * C * H * Wd + c[None, :] * (H * Wd)
    gb = BG + b * H * Wd
    st = b * K * C + n[:, None] * C + c[None, :]
    abg = ABG + b * K * 3 * C + n[:, None] * (3 * C) + c[None, :]
    mass = tl.load(MASS + b * K + n, mask=n_ok, other=0.0).to(acc_t)
    valid = (mass >= min_mass)[:, None] & m2
    mu = tl.load(MU + st, mask=m2, other=0.0).to(acc_t)
    sigma = tl.where(valid, tl.load(SIG + st, mask=m2, other=1.0).to(acc_t), 1.0)
    g_mu = tl.load(GMU + st, mask=m2, other=0.0).to(acc_t)
    g_sig = tl.load(GSIG + st, mask=m2, other=0.0).to(acc_t)
    g_con = tl.load(GCON + st, mask=m2, other=0.0).to(acc_t)
    gamma = tl.where(valid, g_con / sigma, 0.0)
    # mu in the forward's shifted coordinates, summed as the forward sums it: D = Σ a·(x - mu)
    # from the saved (rounded) mu is off by ulp(mu)·Σa, which g_content·D/(Mσ³) amplifies
    shift, _, s1 = _first_sweep(xb, gb, top, n_ok, m2, Wd, acc_t, PH, PW, BK, BC)
    safe = tl.where(valid, mass[:, None], 1.0)
    mu_s = s1 / safe
    ws = tl.zeros((BK,), acc_t)
    d = tl.zeros((BK, BC), acc_t)
    # this program's row of partial sums: grad_weight's PH * PW, then grad_bias's one
    row = ((b * tl.num_programs(1) + pid_c) * tl.num_programs(0) + pid_k) * (PH * PW + 1)
    cols = tl.arange(0, PWP)
    for dy in range(0, PH):
        # a window row's sums over the tile's patches as one (BK, PWP) tile, reduced over the
        # patches once per row: a reduction over the whole tile at every position (ph*pw per
        # program, each across the warps) was most of this kernel's 145 µs in GPU run 2
        gw_row = tl.zeros((BK, PWP), acc_t)
        for dx in tl.static_range(PW):
            off = top + dy * Wd + dx
            w = tl.load(W + dy * PW + dx).to(acc_t)
            g = tl.load(gb + off, mask=n_ok, other=0.0).to(acc_t)
            xc = tl.load(xb + off[:, None], mask=m2, other=0.0).to(acc_t) - shift - mu_s
            ws += w * g
            d += (w * g)[:, None] * xc
            gw_row += tl.where(cols[None, :] == dx, (tl.sum(gamma * xc, 1) * g)[:, None], 0.0)
        tl.store(GWP + row + dy * PW + cols, tl.sum(gw_row, 0), mask=cols < PW)
    tl.store(GWP + row + PH * PW, tl.sum(tl.sum(tl.where(valid, g_con, 0.0), 1), 0))
    ms = safe * sigma
    beta = tl.where(valid, g_sig / ms - g_con * d / (ms * sigma * sigma), 0.0)
    alpha = tl.where(valid, g_mu / safe - g_con * ws[:, None] / ms - beta * mu, 0.0)
    tl.store(abg, alpha, mask=m2)
    tl.store(abg + C, beta, mask=m2)
    tl.store(abg + 2 * C, gamma, mask=m2)


@triton.jit
def _ps_bwd_pixel(X, BG, W, ABG, GX, C, H, Wd, Kh, Kw, K, sh, sw,
                  PH: tl.constexpr, PW: tl.constexpr, NI: tl.constexpr, NJ: tl.constexpr,
                  BP: tl.constexpr, BC: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    acc_t = ABG.dtype.element_ty
    abg = ABG + b * K * 3 * C
    p = pid_p * BP + tl.arange(0, BP)
    c = pid_c * BC + tl.arange(0, BC)
    p_ok = p < H * Wd
    c_ok = c < C
    m2 = p_ok[:, None] & c_ok[None, :]
    y = p // Wd
    xx = p % Wd
    xoff = b * C * H * Wd + c[None, :] * (H * Wd) + p[:, None]
    xv = tl.load(X + xoff, mask=m2, other=0.0).to(acc_t)
    g = tl.load(BG + b * H * Wd + p, mask=p_ok, other=0.0).to(acc_t)
    acc = tl.zeros((BP, BC), acc_t)
    # patch rows covering y: i = y//sh - di for di < ceil(PH/sh) while 0 <= i < Kh, y - i*sh < PH
    for di in range(0, NI):
        i = y // sh - di
        ry = y - i * sh
        ok_i = p_ok & (i >= 0) & (i < Kh) & (ry < PH)
        for dj in range(0, NJ):
            j = xx // sw - dj
            rx = xx - j * sw
            ok = ok_i & (j >= 0) & (j < Kw) & (rx < PW)
            w = tl.load(W + ry * PW + rx, mask=ok, other=0.0).to(acc_t)
            # alpha, beta, gamma of a patch sit C apart: one address, three loads
            src = abg + (i * Kw + j)[:, None] * (3 * C) + c[None, :]
            mk = ok[:, None] & c_ok[None, :]
            al = tl.load(src, mask=mk, other=0.0)
            be = tl.load(src + C, mask=mk, other=0.0)
            ga = tl.load(src + 2 * C, mask=mk, other=0.0)
            acc += al + be * xv + ga * w[:, None]
    tl.store(GX + xoff, (g[:, None] * acc).to(GX.dtype.element_ty), mask=m2)


# ---------------------------------------------------------------------------------- launcher


def _blocks(C: int):
    """(patch tile, channel tile, pixel tile, pixel-kernel channel tile). Small patch tiles give
    the 132 SMs of an H100 ~3 programs each at the paper's size (K = 841, C = 64, B = 4 -> 432)."""
    c2 = next_pow2(int(C))
    if interpreting():  # numpy: fewer, larger programs
        return 256, c2, 1024, c2
    return 32, min(16, c2), 64, min(16, c2)


def _grid_sizes(H, W, ph, pw, sh, sw):
    Kh, Kw = (H - ph) // sh + 1, (W - pw) // sw + 1
    return Kh, Kw, Kh * Kw


@traced_op("regharm_triton::patch_stats")
def patch_stats_fwd(x: torch.Tensor, bg: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    ph: int, pw: int, sh: int, sw: int, eps: float, min_mass: float
                    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """mu, sigma, content (Tensor[B, K, C]) and mass (Tensor[B, K]) in the accumulation dtype."""
    x, bg, weight, bias = (t.contiguous() for t in (x, bg, weight, bias))
    B, C, H, W = x.shape
    Kh, Kw, K = _grid_sizes(H, W, ph, pw, sh, sw)
    acc = acc_dtype(x.dtype)
    mu = torch.empty(B, K, C, device=x.device, dtype=acc)
    sigma = torch.empty_like(mu)
    content = torch.empty_like(mu)
    mass = torch.empty(B, K, device=x.device, dtype=acc)
    BK, BC, _, _ = _blocks(C)
    if B and C:
        launcher(_ps_fwd)[(cdiv(K, BK), cdiv(C, BC), B)](
            x, bg, weight, bias, mu, sigma, content, mass, C, H, W, Kw, K, sh, sw, *split_f32(eps),
            *split_f32(min_mass), PH=ph, PW=pw, BK=BK, BC=BC, num_warps=4)
    return mu, sigma, content, mass


@traced_op("regharm_triton::patch_stats_backward")
def patch_stats_bwd(grad_mu: torch.Tensor, grad_sigma: torch.Tensor, grad_content: torch.Tensor,
                    x: torch.Tensor, bg: torch.Tensor, weight: torch.Tensor, mu: torch.Tensor,
                    sigma: torch.Tensor, mass: torch.Tensor, ph: int, pw: int, sh: int, sw: int,
                    min_mass: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """grad_x (x's dtype), grad_weight (weight's dtype), grad_bias (Tensor[1], weight's dtype)."""
    x, bg, weight = (t.contiguous() for t in (x, bg, weight))
    B, C, H, W = x.shape
    Kh, Kw, K = _grid_sizes(H, W, ph, pw, sh, sw)
    acc = acc_dtype(x.dtype)
    grads = [g.to(acc).contiguous() for g in (grad_mu, grad_sigma, grad_content)]
    abg = torch.empty(B, K, 3, C, device=x.device, dtype=acc)   # alpha, beta, gamma
    grad_x = torch.empty_like(x)
    BK, BC, BP, BCP = _blocks(C)
    tiles = (cdiv(K, BK), cdiv(C, BC), B)
    P = ph * pw
    partial = torch.empty(tiles[0] * tiles[1] * B, P + 1, device=x.device, dtype=acc)
    if B and C:
        launcher(_ps_bwd_patch)[tiles](
            x, bg, weight, mu, sigma, mass, *grads, abg, partial,
            C, H, W, Kw, K, sh, sw, *split_f32(min_mass), PH=ph, PW=pw, PWP=next_pow2(pw), BK=BK, BC=BC,
            num_warps=4)
        launcher(_ps_bwd_pixel)[(cdiv(H * W, BP), cdiv(C, BCP), B)](
            x, bg, weight, abg, grad_x, C, H, W, Kh, Kw, K, sh, sw, PH=ph, PW=pw,
            NI=cdiv(ph, sh), NJ=cdiv(pw, sw), BP=BP, BC=BCP, num_warps=4)
    else:
        grad_x.zero_()
        partial.zero_()
    sums = partial.sum(0).to(weight.dtype)  # grad_weight, then grad_bias (valid patches' grad_content)
    return grad_x, sums[:P], sums[P:].clone()  # outputs may not alias each other


def _setup_context(ctx, inputs, output):
    x, bg, weight, bias, ph, pw, sh, sw, eps, min_mass = inputs
    mu, sigma, _, mass = output
    ctx.save_for_backward(x, bg, weight, mu, sigma, mass)
    ctx.args = (ph, pw, sh, sw, min_mass)
    ctx.bias_dtype = bias.dtype


_patch_stats_backward = Direct(torch.ops.regharm_triton.patch_stats_backward, patch_stats_bwd.eager_body)


def _backward(ctx, g_mu, g_sigma, g_content, g_mass):
    x, bg, weight, mu, sigma, mass = ctx.saved_tensors
    g_mu, g_sigma, g_content = (torch.zeros_like(mu) if g is None else g
                                for g in (g_mu, g_sigma, g_content))
    gx, gw, gb = _patch_stats_backward(
        g_mu, g_sigma, g_content, x, bg, weight, mu, sigma, mass, *ctx.args)
    return gx, None, gw, gb.to(ctx.bias_dtype), None, None, None, None, None, None


_PatchStats = register_autograd("regharm_triton::patch_stats", _backward, _setup_context,
                                patch_stats_fwd.eager_body)


def patch_stats(x, bg, weight, bias, patch_size, stride, eps: float, min_mass: float):
    """mu, sigma, content (Tensor[B, K, C]) and mass (Tensor[B, K]) in x's dtype (SPEC §2)."""
    check_batch(x.shape[0], "patch_stats")
    (ph, pw), (sh, sw) = patch_size, stride
    args = (x, bg, weight, bias, ph, pw, sh, sw, eps, min_mass)
    op = _PatchStats.apply if eager_grad(x, weight, bias) else torch.ops.regharm_triton.patch_stats
    outs = op(*args)
    return tuple(t.to(x.dtype) for t in outs)
