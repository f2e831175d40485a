"""The two ops, every backend, forward and forward+backward: time and peak memory.

Base point: the paper's PTL setting (B=4 on GPU, 1 on CPU; C=64, 128², patch 16, stride 4 -> K=841, 20 % foreground;
attention D=64 over K patch tokens valued by [mu | sigma], E=128). Sweeps around it:
feature size 32²..256² (patch 1/8, stride 1/32 of the side), Table 4's patch/stride settings,
foreground fraction 5..50 % (attention only: patch_stats does not depend on it), dtype.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import benchlib
import floor
from regharm_ext import ops

C = 64
SIZES = [32, 64, 128, 256]
FG = benchlib.FG


def _points(with_fg: bool):
    """Unique settings, each tagged with the sweeps it belongs to."""
    pts = {}

    def add(tag, H, p, s, fg=0.2, dtype="fp32"):
        key = (H, benchlib.frac_size(p, H), benchlib.frac_size(s, H), fg, dtype)
        pts.setdefault(key, set()).add(tag)

    add("paper", 128, 1 / 8, 1 / 32)
    for H in SIZES:
        add("size", H, 1 / 8, 1 / 32)
    for p, s in benchlib.TABLE4:
        add("table4", 128, p, s)
    if with_fg:
        for fg in FG:
            add("fg", 128, 1 / 8, 1 / 32, fg)
    for dt in benchlib.DTYPES:
        add("dtype", 128, 1 / 8, 1 / 32, 0.2, dt)
    return [pytest.param(k, sorted(v), id=f"H{k[0]}-p{k[1]}-s{k[2]}-fg{round(k[3] * 100)}-{k[4]}")
            for k, v in pts.items()]


def _skip(backend, device, dtype, elements, fg):
    reason = (benchlib.backend_skip_reason(backend, device) or benchlib.dtype_skip_reason(dtype, device)
              or benchlib.fg_skip_reason(fg, device))
    if reason is None and backend == "reference":
        reason = benchlib.reference_too_big(elements, device)
    if reason:
        pytest.skip(reason)


def _masks(B, H, fg, device, dtype):
    """Foreground m (soft at the edges, area-resized from 2H) and background bg = 1 - m."""
    m = F.interpolate(benchlib.blob_mask(B, 2 * H, fg), size=(H, H), mode="area")
    return m.to(device, dtype), (1 - m).to(device, dtype)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", benchlib.BACKENDS)
@pytest.mark.parametrize("point,sweeps", _points(with_fg=False))
def test_patch_stats(benchmark, device, point, sweeps, backend, mode):
    H, ph, sh, fg, dtn = point
    dtype, B = benchlib.DTYPES[dtn], benchlib.sweep_batch(device)
    P, K = ph * ph, benchlib.patch_count(H, H, (ph, ph), (sh, sh))
    _skip(backend, device, dtn, B * C * P * K, fg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, H, generator=g).to(device, dtype).requires_grad_(mode == "fwdbwd")
    _, bg = _masks(B, H, fg, device, dtype)
    weight = (torch.randn(P, generator=g) / P ** 0.5).to(device, dtype).requires_grad_(mode == "fwdbwd")
    bias = torch.zeros(1).to(device, dtype).requires_grad_(mode == "fwdbwd")
    grads = [torch.randn(B, K, C, generator=g).to(device, dtype) for _ in range(3)]

    def run():
        if mode == "fwd":
            with torch.no_grad():
                ops.patch_stats(x, bg, weight, bias, ph, sh, backend=backend)
        else:
            mu, sigma, content, _ = ops.patch_stats(x, bg, weight, bias, ph, sh, backend=backend)
            torch.autograd.backward([mu, sigma, content], grads)

    benchmark.group = f"patch_stats {mode} H{H} p{ph} s{sh} {dtn}"
    work = floor.patch_stats_work(B, C, H, H, P, K, dtn)
    benchlib.measure(benchmark, run, device, setup=benchlib.zero_grads(x, weight, bias), info=dict(
        kind="op", name="patch_stats", sweeps=sweeps, backend=backend, mode=mode, dtype=dtn,
        B=B, C=C, H=H, W=H, patch=ph, stride=sh, P=P, K=K, fg=fg,
        floor=floor.floor_time(work, mode, dtn)))


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", benchlib.BACKENDS)
@pytest.mark.parametrize("point,sweeps", _points(with_fg=True))
def test_masked_attention(benchmark, device, point, sweeps, backend, mode):
    H, ph, sh, fg, dtn = point
    dtype, B = benchlib.DTYPES[dtn], benchlib.sweep_batch(device)
    L, K, D, E = H * H, benchlib.patch_count(H, H, (ph, ph), (sh, sh)), C, 2 * C
    _skip(backend, device, dtn, B * L * K, fg)
    g = torch.Generator().manual_seed(0)
    need = mode == "fwdbwd"
    q = torch.randn(B, L, D, generator=g).to(device, dtype).requires_grad_(need)
    k = torch.randn(B, K, D, generator=g).to(device, dtype).requires_grad_(need)
    v = torch.randn(B, K, E, generator=g).to(device, dtype).requires_grad_(need)
    m, bg = _masks(B, H, fg, device, torch.float32)
    # as in PTL: a patch is a key when it holds enough background, a position a query when it is
    # (partly) foreground
    mass = F.avg_pool2d(bg, ph, stride=sh).flatten(1) * ph * ph
    key_bias = torch.zeros_like(mass).masked_fill(mass < 0.5, float("-inf"))
    query_mask = (m > 0).flatten(1)
    grad = torch.randn(B, L, E, generator=g).to(device, dtype)
    Q = int(query_mask.sum())

    def run():
        if mode == "fwd":
            with torch.no_grad():
                ops.masked_attention(q, k, v, key_bias, query_mask, backend=backend)
        else:
            out = ops.masked_attention(q, k, v, key_bias, query_mask, backend=backend)
            out.backward(grad)

    benchmark.group = f"masked_attention {mode} L{L} K{K} fg{round(fg * 100)} {dtn}"
    work = floor.masked_attention_work(B, L, K, D, E, Q, dtn)
    benchlib.measure(benchmark, run, device, setup=benchlib.zero_grads(q, k, v), info=dict(
        kind="op", name="masked_attention", sweeps=sweeps, backend=backend, mode=mode, dtype=dtn,
        B=B, C=C, H=H, W=H, patch=ph, stride=sh, K=K, L=L, D=D, E=E, fg=fg,
        active=Q / (B * L), keys=int(torch.isfinite(key_bias).sum()) / B,
        floor=floor.floor_time(work, mode, dtn)))
