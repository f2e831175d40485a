"""PTL and LTL, every backend, forward and forward+backward: time and peak memory.

- Paper tables (SPEC §7, batch 4, 256² input, channels of the paper's decoder at width 1):
  PTL at 128² with Table 4's six patch/stride settings, LTL at Table 3's levels 16², 32², 64² and
  all three; forward+backward (one training step of the layer). On CPU each runs once.
- Sweeps (batch 4 on GPU, 1 on CPU): PTL feature size 32²..256² (patch 1/8, stride 1/32 of the
  side), foreground fraction 5..50 % (CPU: 5, 20, 50 %), dtype (CPU: fp32); LTL at 32²:
  foreground fraction (GPU only) and dtype.

The mask is given at the model's input resolution (twice PTL's feature, 256² for LTL), as the
model passes it; the layers area-resize it.
"""
from __future__ import annotations

import pytest
import torch

import benchlib
from regharm_ext import LTL, PTL

SIZES = [32, 64, 128, 256]
FG = benchlib.FG
CHANNELS, CHANNELS_SOURCE = benchlib.paper_channels()
LTL_SIZES = {"16": [16], "32": [32], "64": [64], "all": [16, 32, 64]}


def _skip(backend, device, dtn, elements, fg=0.2, table=False):
    reason = (benchlib.backend_skip_reason(backend, device) or benchlib.dtype_skip_reason(dtn, device)
              or benchlib.fg_skip_reason(fg, device))
    if reason is None and backend == "reference":
        reason = benchlib.reference_too_big(elements, device, table)
    if reason:
        pytest.skip(reason)


def _tagged(items):
    pts = {}
    for tag, key in items:
        pts.setdefault(key, set()).add(tag)
    return pts


def _ptl_points():
    items = [("paper", (128, 0.2, "fp32"))]
    items += [("size", (H, 0.2, "fp32")) for H in SIZES]
    items += [("fg", (128, fg, "fp32")) for fg in FG]
    items += [("dtype", (128, 0.2, dt)) for dt in benchlib.DTYPES]
    return [pytest.param(k, sorted(v), id=f"H{k[0]}-fg{round(k[1] * 100)}-{k[2]}")
            for k, v in _tagged(items).items()]


def _ltl_points():
    items = [("paper", (0.2, "fp32"))]
    items += [("fg", (fg, "fp32")) for fg in FG]
    items += [("dtype", (0.2, dt)) for dt in benchlib.DTYPES]
    return [pytest.param(k, sorted(v), id=f"fg{round(k[0] * 100)}-{k[1]}") for k, v in _tagged(items).items()]


def _run_layers(layers, xs, mask, grads, mode):
    def run():
        if mode == "fwd":
            with torch.no_grad():
                for layer, x in zip(layers, xs):
                    layer(x, mask)
        else:
            outs = [layer(x, mask) for layer, x in zip(layers, xs)]
            torch.autograd.backward(outs, grads)
    return run


def _inputs(B, C, H, dtype, device, need_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, H, generator=g).to(device, dtype).requires_grad_(need_grad)
    return x, torch.randn(B, C, H, H, generator=g).to(device, dtype)


def _ptl_case(backend, device, B, H, patch, stride, fg, dtn, mode):
    dtype, C = benchlib.DTYPES[dtn], CHANNELS[128]
    ph, sh = benchlib.frac_size(patch, H), benchlib.frac_size(stride, H)
    P, K, L = ph * ph, benchlib.patch_count(H, H, (ph, ph), (sh, sh)), H * H
    torch.manual_seed(0)
    layer = PTL(C, patch=patch, stride=stride, feature_size=(H, H), backend=backend).to(device, dtype)
    x, grad = _inputs(B, C, H, dtype, device, mode == "fwdbwd")
    mask = benchlib.blob_mask(B, 2 * H, fg).to(device, dtype)
    info = dict(kind="layer", name="PTL", backend=backend, mode=mode, dtype=dtn, B=B, C=C, H=H, W=H,
                patch=ph, stride=sh, P=P, K=K, L=L, fg=fg)
    return _run_layers([layer], [x], mask, [grad], mode), benchlib.zero_grads(x, layer), info, \
        max(B * C * P * K, B * L * K)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", benchlib.BACKENDS)
@pytest.mark.parametrize("point,sweeps", _ptl_points())
def test_ptl(benchmark, device, point, sweeps, backend, mode):
    H, fg, dtn = point
    run, setup, info, elements = _ptl_case(backend, device, benchlib.sweep_batch(device), H, 1 / 8, 1 / 32,
                                           fg, dtn, mode)
    _skip(backend, device, dtn, elements, fg)
    benchmark.group = f"PTL {mode} H{H} fg{round(fg * 100)} {dtn}"
    benchlib.measure(benchmark, run, device, setup=setup, info=dict(info, sweeps=sweeps))


@pytest.mark.parametrize("backend", benchlib.BACKENDS)
@pytest.mark.parametrize("setting", range(len(benchlib.TABLE4)), ids=[s.replace(", ", "_").replace("/", "")
                                                                         for s in benchlib.TABLE4_LABELS])
def test_ptl_table4(benchmark, device, setting, backend):
    """Table 4: PTL at 128² (256² input), batch 4, forward+backward, six patch/stride settings."""
    patch, stride = benchlib.TABLE4[setting]
    run, setup, info, elements = _ptl_case(backend, device, benchlib.PAPER_B, 128, patch, stride, 0.2,
                                           "fp32", "fwdbwd")
    _skip(backend, device, "fp32", elements, table=True)
    benchmark.group = f"Table 4: PTL fwdbwd 128² patch/stride {benchlib.TABLE4_LABELS[setting]}"
    benchlib.measure(benchmark, run, device, setup=setup, single_cpu_run=True, info=dict(
        info, sweeps=["table4"], table="table4", setting=benchlib.TABLE4_LABELS[setting],
        paper_mb=benchlib.TABLE4_PAPER_MB[setting], channels_source=CHANNELS_SOURCE))


def _ltl_case(backend, device, B, sizes, fg, dtn, mode):
    dtype = benchlib.DTYPES[dtn]
    torch.manual_seed(0)
    layers = [LTL(CHANNELS[h], backend=backend).to(device, dtype) for h in sizes]
    pairs = [_inputs(B, CHANNELS[h], h, dtype, device, mode == "fwdbwd", seed=i) for i, h in enumerate(sizes)]
    xs, grads = [p[0] for p in pairs], [p[1] for p in pairs]
    mask = benchlib.blob_mask(B, benchlib.PAPER_INPUT, fg).to(device, dtype)
    info = dict(kind="layer", name="LTL", backend=backend, mode=mode, dtype=dtn, B=B,
                C=[CHANNELS[h] for h in sizes], H=sizes, L=[h * h for h in sizes], fg=fg)
    return _run_layers(layers, xs, mask, grads, mode), benchlib.zero_grads(*xs, *layers), info, \
        max(B * (h * h) ** 2 for h in sizes)


@pytest.mark.parametrize("mode", ["fwd", "fwdbwd"])
@pytest.mark.parametrize("backend", benchlib.BACKENDS)
@pytest.mark.parametrize("point,sweeps", _ltl_points())
def test_ltl(benchmark, device, point, sweeps, backend, mode):
    fg, dtn = point
    if device.type != "cuda" and fg != 0.2:
        pytest.skip("LTL's foreground sweep runs on GPU only (CPU time budget; LTL's cost is mostly its "
                    "self-attention over all positions, the masked part is swept in the op benchmarks)")
    run, setup, info, elements = _ltl_case(backend, device, benchlib.sweep_batch(device), [32], fg, dtn, mode)
    _skip(backend, device, dtn, elements, fg)
    benchmark.group = f"LTL {mode} 32² fg{round(fg * 100)} {dtn}"
    benchlib.measure(benchmark, run, device, setup=setup, info=dict(info, sweeps=sweeps))


@pytest.mark.parametrize("backend", benchlib.BACKENDS)
@pytest.mark.parametrize("level", benchlib.TABLE3_LEVELS)
def test_ltl_table3(benchmark, device, level, backend):
    """Table 3: LTL at decoder levels 16², 32², 64² or all three (256² input), batch 4, fwd+bwd."""
    run, setup, info, elements = _ltl_case(backend, device, benchlib.PAPER_B, LTL_SIZES[level], 0.2,
                                           "fp32", "fwdbwd")
    _skip(backend, device, "fp32", elements, table=True)
    benchmark.group = f"Table 3: LTL fwdbwd at {level}"
    i = benchlib.TABLE3_LEVELS.index(level)
    benchlib.measure(benchmark, run, device, setup=setup, single_cpu_run=True, info=dict(
        info, sweeps=["table3"], table="table3", setting=level, paper_mb=benchlib.TABLE3_PAPER_MB[i],
        channels_source=CHANNELS_SOURCE))
