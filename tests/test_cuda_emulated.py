"""The CUDA kernels of csrc/cuda executed on the CPU (tests/cuda_emu: every CUDA thread a fiber)
against `reference`: index math, tiling, masking, padding, shared-memory layouts and barriers are
checked on any machine, before a GPU ever runs them. What only a GPU shows (speed, the real
tensor-core fragment layouts, memory-model corner cases) is tested in test_cuda_native.py.

Each kernel sees its inputs between NaN guard zones and its outputs between sentinel zones
(emulated.py), and the emulator reports divergent barriers, deadlocks, misaligned WMMA or vector
accesses and shared memory beyond the launch size.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "cuda_emu"))

import emulated  # noqa: E402
from helpers import (EDGE_ATTN_CASES, EDGE_PATCH_CASES, NORM_CASES, assert_close,  # noqa: E402
                     make_attention_inputs, make_norm_inputs, make_patch_inputs)
from regharm_ext.ops import reference  # noqa: E402

# with a GPU the real kernels are tested (test_cuda_native.py); REGHARM_EMULATE_CUDA=1 insists
ON_GPU = torch.cuda.is_available() and os.environ.get("REGHARM_EMULATE_CUDA") != "1"
pytestmark = [
    pytest.mark.skipif(emulated.unavailable() is not None,
                       reason=f"CUDA emulator: {emulated.unavailable()}"),
    pytest.mark.skipif(ON_GPU, reason="a GPU runs the real kernels here (test_cuda_native.py); "
                                      "set REGHARM_EMULATE_CUDA=1 to emulate them anyway"),
]

H100, A100, RTX = 227 * 1024, 163 * 1024, 99 * 1024  # opt-in shared memory per block
ORDERS = {"forward": 0, "reverse": 1, "shuffled": 2}  # fiber schedules


@pytest.fixture(scope="module")
def emu():
    return emulated.Emulator(emulated.build())


@pytest.fixture
def configured(emu):
    def configure(smem=H100, sms=4, order="forward", tf32x3=False, tiles=False, cc_major=9,
                  dq_atomic=None, simt_lanes="paired", fwd_split=None, reverse_blocks=False,
                  ps_gather="auto", key_order=True, pipeline=True):
        emu.configure(smem, sms, ORDERS[order], seed=7, tf32x3=tf32x3, tiles=tiles,
                      cc_major=cc_major, dq_atomic=dq_atomic, simt_lanes=simt_lanes,
                      fwd_split=fwd_split, reverse_blocks=reverse_blocks, ps_gather=ps_gather,
                      key_order=key_order, pipeline=pipeline)
        return emu
    configure()
    return configure


# ---- patch_stats ------------------------------------------------------------------------------

PATCH_CASES = {  # name: (B, C, H, W), patch, stride, offset, bg kind
    **EDGE_PATCH_CASES,
    "many_tiles": ((1, 2, 40, 72), (4, 4), (1, 2), 0.0, "soft"),       # 37 x 35 patches
    "gaps": ((1, 2, 23, 19), (3, 2), (5, 4), 0.0, "soft"),              # stride > patch
    "whole_map": ((2, 2, 9, 7), (9, 7), (1, 1), 0.0, "soft"),
    "pixels": ((1, 3, 6, 5), (1, 1), (1, 1), 0.0, "soft"),
    # PTL's patch and stride (16, 4): the sweep's rotated columns (patch_stats_kernels.cu)
    "ptl_like": ((1, 2, 44, 48), (16, 16), (4, 4), 0.0, "soft"),
    # 29 patch rows: tiles of equal heights (15 + 14), 16 patches wide
    "ptl_rows": ((1, 1, 128, 76), (16, 16), (4, 4), 0.0, "soft"),
    # the gather's blocks: W rounded up to warps (100 -> 128 threads, the last warp partly
    # past the row), and rows wider than a block (290 -> two blocks of 256)
    "row_100": ((1, 2, 7, 100), (4, 4), (3, 4), 0.0, "soft"),
    "row_290": ((1, 1, 5, 290), (3, 4), (2, 3), 0.0, "soft"),
}


def _patch_reference(inputs, patch, stride, cotangents):
    x, bg, w, b = inputs
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    outs = reference.patch_stats(xr, bg, wr, br, patch, stride, 1e-5, 0.5)
    torch.autograd.backward(outs[:3], cotangents)
    return outs, (xr.grad, wr.grad, br.grad)


def _cotangents(outs, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=g).to(dtype) for o in outs[:3]]


def _check_patch(emu, inputs, patch, stride, layout=None):
    x, bg, w, b = inputs
    dtype = x.dtype
    xk = emulated.strided_copy(x, layout) if layout else x
    got = emu.patch_stats(xk, bg, w, b, patch, stride)
    cots = _cotangents(got, dtype)
    want, want_g = _patch_reference(inputs, patch, stride, cots)
    for name, a, e in zip(("mu", "sigma", "content", "mass"), got, want):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, msg=f"emulated CUDA {name}")
    got_g = emu.patch_stats_backward(cots, xk, bg, w, patch, stride)
    for name, a, e in zip(("dx", "dweight", "dbias"), got_g, want_g):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, dtype, grad=True, msg=f"emulated CUDA {name}")
    valid = want[3] >= 0.5
    for o in got[:3]:  # invalid patches are exactly 0
        assert (o[~valid] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", ["odd", "ptl_like"])
def test_cuda_emulated_patch_stats_reads_strided_gradients(configured, case, dtype):
    """PTL's dmu and dsigma are the two halves of the attention's dV (B, K, 2C): the backward
    reads them in place (rows 2C apart; the gaps are NaN here, so a wrong row stride poisons the
    result) and gives the bits of contiguous copies."""
    shape, patch, stride, offset, kind = PATCH_CASES[case]
    x, bg, w, b = make_patch_inputs(*shape, patch, stride, dtype, offset=offset, bg_kind=kind)
    emu = configured()
    cots = _cotangents(emu.patch_stats(x, bg, w, b, patch, stride), dtype)
    C, K = x.shape[1], cots[0].shape[1]
    dv = torch.cat(cots[:2], -1)  # (B, K, 2C), as the attention's backward writes it
    halves = list(dv.split(C, -1))
    assert [emulated._grad_rows(h, dtype, K, C)[1] for h in halves] == [2 * C, 2 * C]
    got = emu.patch_stats_backward(halves + [cots[2]], x, bg, w, patch, stride)
    want = emu.patch_stats_backward(cots, x, bg, w, patch, stride)
    for name, a, e in zip(("dx", "dweight", "dbias"), got, want):
        assert torch.equal(a, e), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("case", PATCH_CASES)
def test_cuda_emulated_patch_stats(configured, case, dtype):
    shape, patch, stride, offset, kind = PATCH_CASES[case]
    inputs = make_patch_inputs(*shape, patch, stride, dtype, offset=offset, bg_kind=kind)
    _check_patch(configured(), inputs, patch, stride)


# The backward's gather by cells (windows of whole strides, kh and kw up to 8) and by pixels
GATHER_CASES = {  # name: (B, C, H, W), patch, stride, offset, bg kind, gather kernel
    # PTL's 16 / 4 with +100: the cell sums are centred as the per-pixel terms were
    "ptl_offset100": ((1, 2, 44, 48), (16, 16), (4, 4), 100.0, "soft", "cells_kern"),
    # kh 4 and kw 3 at stride 1 (cells of one row), three row blocks of 16
    "tall_cells": ((2, 1, 37, 21), (4, 6), (1, 2), 0.0, "soft", "cells_kern"),
    # blocks of 15 rows (5 cells), rows 39 and 40 past the last patch
    "stride_3": ((1, 2, 41, 30), (6, 3), (3, 3), 0.0, "binary", "cells_kern"),
    "pixels_whole": ((1, 1, 12, 11), (1, 1), (1, 1), 0.0, "soft", "cells_kern"),
    # two column blocks of 256 threads, the second mostly past the row
    "wide": ((1, 1, 9, 290), (4, 4), (2, 2), 0.0, "soft", "cells_kern"),
    "not_whole": ((1, 2, 23, 19), (5, 4), (2, 4), 0.0, "soft", "gather_kern"),  # 5 % 2
    "kh_5": ((1, 1, 20, 20), (5, 2), (1, 1), 0.0, "soft", "gather_kern"),
    "stride_17": ((1, 1, 40, 40), (17, 17), (17, 17), 0.0, "soft", "gather_kern"),  # > 16 rows
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("case", GATHER_CASES)
def test_cuda_emulated_patch_stats_gather_by_cells(configured, case, dtype):
    """Where every window is a whole number of strides a pixel's covering patches are its
    cell's, and the gather adds the cell's coefficients up once for its rows: against
    `reference`, and against the per-pixel gather (REGHARM_CUDA_PS_GATHER=pixels) within
    float32's rounding of the changed order of the sums."""
    shape, patch, stride, offset, kind, kernel = GATHER_CASES[case]
    if case == "wide" and dtype == torch.float64:
        kernel = "gather_kern"  # 256 threads' float64 columns would need 64 KB: by pixels
    inputs = make_patch_inputs(*shape, patch, stride, dtype, offset=offset, bg_kind=kind)
    emu = configured()
    _check_patch(emu, inputs, patch, stride)
    launches = emu.take_launches()
    gather = [k for k in launches if k in ("cells_kern", "gather_kern")]
    assert gather == [kernel], launches
    x, bg, w, b = inputs
    cots = _cotangents(emu.patch_stats(x, bg, w, b, patch, stride), dtype)
    cells = emu.patch_stats_backward(cots, x, bg, w, patch, stride)
    pixels_emu = configured(ps_gather="pixels")
    pixels = pixels_emu.patch_stats_backward(cots, x, bg, w, patch, stride)
    assert "gather_kern" in pixels_emu.take_launches()
    for name, a, e in zip(("dx", "dweight", "dbias"), cells, pixels):
        if name != "dx" or kernel == "gather_kern":  # the same kernels: the same bits
            assert torch.equal(a, e), name
        else:
            assert_close(a, e, dtype, grad=True, msg=f"cells against pixels, {name}")
    if dtype == torch.float32:  # as exact as the per-pixel terms (uncentred: 4x at +100)
        exact = make_patch_inputs(*shape, patch, stride, torch.float64, offset=offset,
                                  bg_kind=kind)
        want = _patch_reference(exact, patch, stride, [c.double() for c in cots])[1][0]
        err_cells, err_pixels = ((g[0].double() - want).abs().max() for g in (cells, pixels))
        assert err_cells <= 2 * err_pixels + 1e-7 * want.abs().max(), (err_cells, err_pixels)


def test_cuda_emulated_patch_stats_beyond_48kb(configured):
    """A 56x56 float64 window needs more than the default 48 KB: one-patch tiles, opt-in."""
    emu = configured(smem=RTX)
    shape8 = (1, 2, 60, 64, 56, 56, 4, 8)
    ok, need = emu.patch_fits(torch.float64, shape8)
    assert ok and need > 48 * 1024
    inputs = make_patch_inputs(*shape8[:4], (56, 56), (4, 8), torch.float64)
    _check_patch(emu, inputs, (56, 56), (4, 8))


def test_cuda_emulated_patch_stats_weights_left_in_global_memory(configured):
    """A 70x70 float64 window fits 99 KB (78 KB) but not with the weights' shared copy (39 KB
    more): the sweep reads them from global memory instead of refusing the patch."""
    emu = configured(smem=RTX)
    shape8 = (1, 2, 76, 76, 70, 70, 3, 3)
    ok, need = emu.patch_fits(torch.float64, shape8)
    assert ok and 70 * 70 * 16 < need < 70 * 70 * 24, need
    inputs = make_patch_inputs(*shape8[:4], (70, 70), (3, 3), torch.float64)
    _check_patch(emu, inputs, (70, 70), (3, 3))


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
@pytest.mark.parametrize("layout", ["channels_last", "pad"])
def test_cuda_emulated_patch_stats_layouts_and_schedules(configured, layout, order):
    inputs = make_patch_inputs(2, 3, 37, 50, (7, 5), (3, 2), torch.float32, offset=100.0)
    _check_patch(configured(order=order), inputs, (7, 5), (3, 2), layout)


def test_cuda_emulated_patch_stats_shared_memory_limits(configured):
    emu = configured(smem=RTX)
    # 80x80 float32 (test_cuda_native.py's big patch) needs one-patch tiles beyond 48 KB
    ok, need = emu.patch_fits(torch.float32, (1, 2, 90, 90, 80, 80, 5, 5))
    assert ok and 48 * 1024 < need <= RTX
    # a patch whose window alone exceeds the device: refused (the glue names the sizes)
    ok, need = emu.patch_fits(torch.float64, (1, 1, 130, 130, 128, 128, 1, 1))
    assert not ok and need > RTX
    # the paper's setting: float32 tiles of 15 x 16 patches (29 rows as 15 + 14), within the
    # 57 344 bytes that let four blocks share an H100 SM (16 x 16 took 59 648: three); float64
    # within 64 KB
    for dtype, lo, hi in ((torch.float32, 48 * 1024, 57344), (torch.float64, 0, 64 * 1024)):
        ok, need = emu.patch_fits(dtype, (4, 64, 128, 128, 16, 16, 4, 4))
        assert ok and lo < need <= hi, need


# ---- masked_attention -------------------------------------------------------------------------

ATTN_CASES = {  # name: kwargs of make_attention_inputs
    **EDGE_ATTN_CASES,
    "tiles": dict(B=2, L=150, N=70, D=24, E=40),  # several query/key tiles, split queries
    "ptl_like": dict(B=1, L=70, N=29, D=64, E=128, active=0.3, removed=0.2),
}


def _attn_reference(inputs, scale, cot):
    q, k, v, kb, qm = inputs
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    out = reference.masked_attention(qr, kr, vr, kb, qm, scale)
    out.backward(cot)
    s = scale * q.double() @ k.double().transpose(1, 2) + kb.double()[:, None, :]
    lse = torch.logsumexp(s, -1)
    if qm is not None:
        lse = torch.where(qm, lse, torch.full_like(lse, float("-inf")))
    return out, lse, (qr.grad, kr.grad, vr.grad)


def _check_attention(emu, inputs, scale=None, layout=None):
    q, k, v, kb, qm = inputs
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qk, kk, vk = (emulated.strided_copy(t, layout) if layout else t for t in (q, k, v))
    out, lse = emu.attention(qk, kk, vk, kb, qm, scale)
    g = torch.Generator().manual_seed(2)
    cot = torch.randn(out.shape, generator=g).to(dtype)
    want, want_lse, want_g = _attn_reference(inputs, scale, cot)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert_close(out, want, dtype, msg="emulated CUDA out")
    assert lse.dtype == torch.float32
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "lse must be -inf exactly where nothing is attended"
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], atol=1e-5, rtol=1e-5)
    if qm is not None:
        assert (out[~qm] == 0).all(), "inactive queries give exactly 0"
    grads = emu.attention_backward(cot, qk, kk, vk, kb, qm, out, lse, scale)
    for name, a, e in zip(("dq", "dk", "dv"), grads, want_g):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, dtype, grad=True, msg=f"emulated CUDA {name}")
    if qm is not None:
        assert (grads[0][~qm] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_cuda_emulated_masked_attention(configured, case, dtype):
    _check_attention(configured(), make_attention_inputs(**ATTN_CASES[case], dtype=dtype))


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
@pytest.mark.parametrize("layout", [None, "pad", "transposed"])
def test_cuda_emulated_attention_layouts_and_schedules(configured, layout, order):
    inputs = make_attention_inputs(B=2, L=150, N=70, D=24, E=40, dtype=torch.bfloat16)
    _check_attention(configured(order=order), inputs, layout=layout)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("order", ["reverse", "shuffled"])
def test_cuda_emulated_attention_key_tiles_and_schedules(configured, order, dtype):
    """Three tiles of kept keys (the test above keeps one tile's worth in the key order) where
    one warp runs ahead of the others: in the reverse schedule cp.async copies land when
    issued, so a key tile's copies that do not wait for every warp to finish the previous tile
    give wrong results, and in the others they land at the issuing thread's wait."""
    inputs = make_attention_inputs(B=2, L=100, N=150, D=24, E=40, removed=0.1, dtype=dtype)
    _check_attention(configured(order=order), inputs)


@pytest.mark.parametrize("tiles", [False, True], ids=["registers", "tiles"])
@pytest.mark.parametrize("order", ["reverse", "shuffled"])
def test_cuda_emulated_attention_one_block_per_key_tile(configured, order, tiles):
    """One multiprocessor: the key-tile kernel takes every query tile in one block (no split),
    so its loop reloads the query-side tiles while, in these schedules, one warp runs ahead of
    the others (a missing barrier before the reload gives wrong dK, dV)."""
    inputs = make_attention_inputs(B=2, L=150, N=70, D=24, E=40, dtype=torch.float16)
    _check_attention(configured(sms=1, order=order, tiles=tiles), inputs)


# ---- dQ: added up with atomics by the dK/dV kernel, or by its own kernel ----------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_cuda_emulated_attention_dq_other_path(configured, case, dtype):
    """The dQ path the glue does not take by default for this dtype (float32: its own kernel,
    as under torch.use_deterministic_algorithms; 16-bit: REGHARM_CUDA_DQ=atomic); the default
    one runs in test_cuda_emulated_masked_attention."""
    atomic = dtype != torch.float32
    emu = configured(dq_atomic=atomic)
    _check_attention(emu, make_attention_inputs(**ATTN_CASES[case], dtype=dtype))
    if not atomic:
        assert emu.take_atomic_count() == 0


@pytest.mark.parametrize("dtype,tf32x3,atomic", [
    (torch.float32, False, None), (torch.float32, True, None), (torch.float32, False, False),
    (torch.bfloat16, False, None), (torch.bfloat16, False, True)],
    ids=["fp32", "tf32x3", "fp32_kernel", "bf16", "bf16_atomic"])
def test_cuda_emulated_attention_dq_path_taken(configured, dtype, tf32x3, atomic):
    """Atomics add dQ exactly when asked, or by default for float32; at PTL's D and E with D
    padded (60 -> 64), rows beyond a tile's active ones and removed keys."""
    emu = configured(tf32x3=tf32x3, dq_atomic=atomic)
    inputs = make_attention_inputs(B=2, L=150, N=70, D=60, E=128, active=0.3, removed=0.2,
                                   dtype=dtype)
    _check_attention(emu, inputs)
    assert emu.take_register_products() > 0 or emu.take_tf32_mma_count() > 0
    want = dtype == torch.float32 if atomic is None else atomic
    assert (emu.take_atomic_count() > 0) == want


@pytest.mark.parametrize("tf32x3", [False, True], ids=["simt", "tf32x3"])
@pytest.mark.parametrize("D", [64, 62, 31])
def test_cuda_emulated_atomic_dq_vector_atomics(configured, tf32x3, D):
    """sm_90's vector atomics add a lane's neighbouring dQ columns at once: four with float32's
    CUDA-core (PairedLanes) outputs where D % 4 == 0, two with tf32x3's mma.sync layout where
    D is even; other rows are not aligned for them and add column by column."""
    emu = configured(tf32x3=tf32x3, dq_atomic=True)
    inputs = make_attention_inputs(B=2, L=150, N=70, D=D, E=32, active=0.3, removed=0.2,
                                   dtype=torch.float32)
    _check_attention(emu, inputs)
    total, vector = emu.take_atomic_count(), emu.take_vector_atomic_count()
    assert total > 0
    vectors = D % 2 == 0 if tf32x3 else D % 4 == 0
    assert vector == (total if vectors else 0), (vector, total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("order", ["reverse", "shuffled"])
def test_cuda_emulated_atomic_dq_with_warps_ahead(configured, order, dtype):
    """One multiprocessor, so one block runs every query tile of its keys: a warp that reads dS
    before every warp wrote it, or writes the next tile's dS while another still reads, gives
    wrong dQ (shared memory starts as NaN in the emulator)."""
    emu = configured(sms=1, order=order, dq_atomic=True)
    inputs = make_attention_inputs(B=2, L=150, N=70, D=24, E=40, dtype=dtype)
    _check_attention(emu, inputs)
    assert emu.take_atomic_count() > 0


# ---- which kernels run: registers (mma.sync, or float32 FMAs) where they fit, else tiles -----

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_cuda_emulated_attention_tile_kernels(configured, case, dtype):
    """REGHARM_CUDA_ATTENTION=tiles: the shared-memory kernels stay correct (the default takes
    the register kernels for these dtypes, tested above)."""
    emu = configured(tiles=True)
    _check_attention(emu, make_attention_inputs(**ATTN_CASES[case], dtype=dtype))
    assert emu.take_register_products() == 0


@pytest.mark.parametrize("dtype,D,E,kw,registers", [
    (torch.bfloat16, 64, 128, {}, "mma"),                  # PTL's sizes
    (torch.float16, 128, 128, {}, "mma"),                  # the largest the registers hold
    (torch.bfloat16, 130, 64, {}, None),                   # D > 128
    (torch.bfloat16, 64, 136, {}, None),                   # E > 128
    (torch.bfloat16, 64, 128, {"tiles": True}, None),      # asked for the tile kernels
    (torch.bfloat16, 64, 128, {"cc_major": 7}, None),      # no mma.sync m16n8k16 before sm_80
    (torch.float32, 64, 128, {}, "simt"),                  # float32 FMAs in registers
    (torch.float32, 64, 128, {"cc_major": 7}, "simt"),     # ... which need no mma.sync
    (torch.float32, 64, 128, {"tiles": True}, None),
    (torch.float32, 130, 64, {}, None),                    # D > 128
    (torch.float32, 128, 128, {"smem": RTX}, None),        # ~132 KB: not sm_86's 99 KB
    (torch.float32, 64, 128, {"tf32x3": True}, "mma"),     # float32 as 3xTF32: registers
    (torch.float32, 64, 128, {"tf32x3": True, "tiles": True}, None),
    (torch.float32, 64, 128, {"tf32x3": True, "cc_major": 7}, None),  # no mma.sync (the glue
                                                           # also drops tf32x3 before sm_80)
    (torch.float32, 128, 128, {"tf32x3": True}, "mma"),    # ~132 KB of shared memory fits sm_90
    (torch.float32, 128, 128, {"tf32x3": True, "smem": RTX}, None),  # not sm_86's 99 KB
], ids=["ptl", "largest", "wide_d", "wide_e", "asked_tiles", "sm70", "fp32", "fp32_sm70",
        "fp32_tiles", "fp32_wide_d", "fp32_99kb", "tf32x3", "tf32x3_tiles", "tf32x3_sm70",
        "tf32x3_largest", "tf32x3_99kb"])
def test_cuda_emulated_attention_kernel_choice(configured, dtype, D, E, kw, registers):
    """registers: "mma" (mma.sync), "simt" (float32 FMAs) or None (the tile kernels)."""
    emu = configured(**kw)
    inputs = make_attention_inputs(B=1, L=40, N=33, D=D, E=E, dtype=dtype, dead_batch=False)
    _check_attention(emu, inputs)
    mma, simt = emu.take_mma_sync_count(), emu.take_simt_product_count()
    assert (mma > 0, simt > 0) == (registers == "mma", registers == "simt"), (mma, simt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_emulated_register_kernels_largest_sizes(configured, dtype):
    """D, E padded to 128 (test_cuda_native.py's "d128"), 8 query and 5 key tiles, one warp
    running ahead of the others."""
    emu = configured(order="shuffled")
    _check_attention(emu, make_attention_inputs(B=2, L=500, N=300, D=100, E=120, active=0.4,
                                                removed=0.2, dtype=dtype))
    assert emu.take_register_products() > 0


def test_cuda_emulated_attention_without_mask_and_custom_scale(configured):
    inputs = list(make_attention_inputs(B=2, L=12, N=9, D=4, E=3))
    inputs[4] = None
    _check_attention(configured(), inputs, scale=1.0)


@pytest.mark.parametrize("dtype,tf32x3", [(torch.float32, False), (torch.float32, True),
                                          (torch.bfloat16, False)], ids=["fp32", "tf32x3", "bf16"])
@pytest.mark.parametrize("smem", [H100, A100], ids=["sm90", "sm80"])
def test_cuda_emulated_attention_largest_dims(configured, smem, dtype, tf32x3):
    """D = 256, E = 512 (E = 2C at C = 256): chunked value columns, smaller tiles, within the
    shared memory of an A100 or H100."""
    emu = configured(smem=smem, tf32x3=tf32x3)
    ok, need = emu.attention_fits(dtype, (1, 20, 18, 256, 512))
    assert ok, need
    inputs = make_attention_inputs(B=1, L=20, N=18, D=256, E=512, dtype=dtype, dead_batch=False)
    _check_attention(emu, inputs)


@pytest.mark.parametrize("dtype,D,E,tf32x3", [(torch.bfloat16, 256, 384, False),
                                              (torch.float32, 128, 256, False),
                                              (torch.float32, 128, 256, True)],
                         ids=["bf16", "fp32", "tf32x3"])
def test_cuda_emulated_attention_on_99kb_gpus(configured, dtype, D, E, tf32x3):
    """sm_86/sm_89 offer 99 KB per block: the backward's key-tile kernel then holds 16 keys with
    their full dV rows, which limits E (bf16 at D = 256: E = 512 needs ~104 KB)."""
    emu = configured(smem=RTX, tf32x3=tf32x3)
    ok, need = emu.attention_fits(dtype, (1, 20, 18, D, E))
    assert ok, need
    inputs = make_attention_inputs(B=1, L=20, N=18, D=D, E=E, dtype=dtype, dead_batch=False)
    _check_attention(emu, inputs)


def test_cuda_emulated_attention_odd_value_width(configured):
    # E = 200: value chunks of 128 and 72 columns (the last one partly padding)
    _check_attention(configured(), make_attention_inputs(B=1, L=40, N=33, D=40, E=200,
                                                         dtype=torch.float16, dead_batch=False))


def test_cuda_emulated_float64_gradients_are_exact(configured):
    """The float32 lse of the forward is recomputed in float64 by the backward."""
    inputs = make_attention_inputs(B=2, L=70, N=40, D=12, E=10, dtype=torch.float64)
    q, k, v, kb, qm = inputs
    emu = configured()
    out, lse = emu.attention(q, k, v, kb, qm, 0.3)
    cot = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = emu.attention_backward(cot, q, k, v, kb, qm, out, lse, 0.3)
    _, _, want = _attn_reference(inputs, 0.3, cot)
    for a, e in zip(grads, want):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


# ---- float32 on tensor cores (3xTF32, REGHARM_CUDA_FP32_MATH=tf32x3) ----------------------------

def _tf32(t: torch.Tensor) -> torch.Tensor:
    """t rounded to tf32 (10 mantissa bits), nearest, ties away from zero."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@pytest.mark.parametrize("case", ATTN_CASES)
def test_cuda_emulated_attention_tf32x3(configured, case):
    emu = configured(tf32x3=True)
    _check_attention(emu, make_attention_inputs(**ATTN_CASES[case], dtype=torch.float32))
    runs = emu.take_tf32_mma_count()
    assert runs > 0 or case == "none_active", "the float32 products did not take the tensor-core path"


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
@pytest.mark.parametrize("layout", [None, "pad", "transposed"])
def test_cuda_emulated_attention_tf32x3_layouts_and_schedules(configured, layout, order):
    # contiguous rows of 24 / 40 floats take 16-byte loads in this mode; "pad" rows cannot
    inputs = make_attention_inputs(B=2, L=150, N=70, D=24, E=40, dtype=torch.float32)
    _check_attention(configured(order=order, tf32x3=True), inputs, layout=layout)


def test_cuda_emulated_float32_stays_on_cuda_cores_by_default(configured):
    emu = configured()
    _check_attention(emu, make_attention_inputs(**ATTN_CASES["ptl_like"], dtype=torch.float32))
    assert emu.take_tf32_mma_count() == 0
    assert emu.take_mma_sync_count() == 0 and emu.take_simt_product_count() > 0


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
@pytest.mark.parametrize("layout", [None, "pad", "transposed"])
def test_cuda_emulated_attention_float32_layouts_and_schedules(configured, layout, order):
    """The CUDA-core register kernels: 16-byte tile loads on contiguous rows, scalar ones on
    "pad" rows, and warps running ahead of each other."""
    inputs = make_attention_inputs(B=2, L=150, N=70, D=24, E=40, dtype=torch.float32)
    emu = configured(order=order)
    _check_attention(emu, inputs, layout=layout)
    assert emu.take_simt_product_count() > 0


# ---- float32 on CUDA cores: the order of the lanes (simt_products.cuh) ------------------------

def _attention_fwd_bwd(emu, inputs):
    """out, lse, dq, dk, dv, and the forward's and the backward's shared-load models."""
    q, k, v, kb, qm = inputs
    scale = q.shape[-1] ** -0.5
    out, lse = emu.attention(q, k, v, kb, qm, scale)
    fwd = emu.take_shared_load_model()
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(q.dtype)
    grads = emu.attention_backward(cot, q, k, v, kb, qm, out, lse, scale)
    return (out, lse, *grads), (fwd, emu.take_shared_load_model())


@pytest.mark.parametrize("dq_atomic", [True, False], ids=["atomic_dq", "dq_kernel"])
def test_cuda_emulated_simt_lane_orders_give_the_same_bits(configured, dq_atomic):
    """PairedLanes only moves which lane computes an element: every sum keeps its terms and
    their order, so both orders give identical bits (and mma.sync's order stays right)."""
    inputs = make_attention_inputs(B=2, L=150, N=70, D=60, E=128, active=0.3, removed=0.2,
                                   dtype=torch.float32)
    _check_attention(configured(simt_lanes="mma", dq_atomic=dq_atomic), inputs)
    got = {lanes: _attention_fwd_bwd(configured(simt_lanes=lanes, dq_atomic=dq_atomic), inputs)[0]
           for lanes in ("paired", "mma")}
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got["paired"], got["mma"]):
        assert torch.equal(a, b), name


def test_cuda_emulated_simt_loads_pair_lanes(configured):
    """In the emulator's model of shared memory (emu_runtime.h: a 16-byte load costs a warp
    4 cycles, 2 where lanes n and n ^ 1 or n and n ^ 2 read the same address), every load of
    the PairedLanes kernels is paired, and mma.sync's order leaves the B loads (most of them)
    unpaired. At PTL's D and E the model's cycles halve, forward and backward alike."""
    inputs = make_attention_inputs(B=1, L=128, N=128, D=64, E=128, dtype=torch.float32)
    model = {lanes: _attention_fwd_bwd(configured(simt_lanes=lanes), inputs)[1]
             for lanes in ("paired", "mma")}
    for part in (0, 1):  # forward, backward
        paired, mma = model["paired"][part], model["mma"][part]
        assert paired["loads"] == mma["loads"] > 0
        assert paired["paired"] == paired["loads"]
        assert mma["paired"] < mma["loads"] / 4
        assert paired["cycles"] < 0.6 * mma["cycles"], (part, paired, mma)


# ---- float32 forward: each query tile's keys over two blocks (REGHARM_CUDA_FWD_SPLIT) ---------

SPLIT_CASES = {"tiles": ATTN_CASES["tiles"],                      # halves of 64 and 6 keys
               "mostly_removed": EDGE_ATTN_CASES["mostly_removed"],  # a half with no key left
               "ptl_like": dict(B=2, L=150, N=300, D=64, E=128, active=0.3, removed=0.2)}


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_cuda_emulated_forward_key_split(configured, case):
    """float32's register forward splits each query tile's keys over two blocks (the default):
    held to the reference, one flag published per query tile with an active query, and the same
    bits whichever block finishes first (blocks in reverse order: the other half writes first
    and the first one combines)."""
    inputs = make_attention_inputs(**SPLIT_CASES[case], dtype=torch.float32)
    q, k, v, kb, qm = inputs
    emu = configured()
    _check_attention(emu, inputs)
    tiles = sum((int(n) + 63) // 64 for n in qm.sum(1))
    assert emu.take_flag_count() == tiles > 0
    scale = q.shape[-1] ** -0.5
    first = configured().attention(q, k, v, kb, qm, scale)
    swapped = configured(reverse_blocks=True).attention(q, k, v, kb, qm, scale)
    for a, b in zip(first, swapped):
        assert torch.equal(a, b)
    emu = configured(fwd_split=False)
    _check_attention(emu, inputs)
    assert emu.take_flag_count() == 0


def test_cuda_emulated_forward_key_split_without_mask(configured):
    """Every query active (no mask, raster order): every query tile splits, including the
    image whose keys are all removed (both halves attend nothing)."""
    inputs = list(make_attention_inputs(B=2, L=100, N=150, D=16, E=24, dtype=torch.float32))
    inputs[4] = None
    emu = configured()
    _check_attention(emu, inputs)
    assert emu.take_flag_count() == 2 * 2  # two 64-row tiles per image


def test_cuda_emulated_forward_key_split_float32_only(configured):
    """16-bit outputs cannot hold a half's rows exactly: their forward never splits."""
    emu = configured()
    _check_attention(emu, make_attention_inputs(**SPLIT_CASES["ptl_like"], dtype=torch.bfloat16))
    assert emu.take_flag_count() == 0


# ---- the keys in compacted order, kept ones first (REGHARM_CUDA_KEY_ORDER) --------------------

def _key_tiles(key_bias, compacted):
    """Key tiles of 64 the register kernels visit per image: those with a kept key in raster
    order, or the kept keys' own tiles in compacted order."""
    kept = key_bias > float("-inf")
    if compacted:
        return [(int(n) + 63) // 64 for n in kept.sum(1)]
    return [int(sum(bool(row[i:i + 64].any()) for i in range(0, row.numel(), 64))) for row in kept]


@pytest.mark.parametrize("dtype,tf32x3,atomic", [
    (torch.float32, False, None), (torch.float32, True, None), (torch.float32, False, False),
    (torch.bfloat16, False, None), (torch.float16, False, True)],
    ids=["fp32", "tf32x3", "fp32_kernel", "bf16", "fp16_atomic"])
def test_cuda_emulated_key_order(configured, dtype, tf32x3, atomic):
    """With half the keys removed at random every raster key tile keeps a key, so only the key
    order lets the kernels skip: the forward's products fall by exactly the ratio of the tiles
    visited (a warp's products per tile do not depend on its keys), results stay held to the
    reference both ways, and removed keys get gradients of exactly 0 (the partial sums of
    positions past the kept keys are never written; the reduction writes their zeros)."""
    inputs = make_attention_inputs(B=3, L=100, N=300, D=24, E=40, active=0.4, removed=0.5,
                                   dtype=dtype)
    q, k, v, kb, qm = inputs
    kb[1, 70:] = float("-inf")  # an image whose kept keys fit one tile
    scale = q.shape[-1] ** -0.5
    qtiles = [(int(n) + 63) // 64 for n in qm.sum(1)]
    products = {}
    for compacted in (True, False):
        emu = configured(tf32x3=tf32x3, dq_atomic=atomic, key_order=compacted)
        emu.attention(q, k, v, kb, qm, scale)
        products[compacted] = emu.take_register_products() + emu.take_tf32_mma_count()
        _check_attention(emu, inputs)
        emu.take_register_products()
        emu.take_tf32_mma_count()
    visited = {c: sum(a * b for a, b in zip(qtiles, _key_tiles(kb, c))) for c in (True, False)}
    assert visited[True] < visited[False]
    assert products[True] * visited[False] == products[False] * visited[True], (products, visited)
    emu = configured(tf32x3=tf32x3, dq_atomic=atomic)
    out, lse = emu.attention(q, k, v, kb, qm, scale)
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    _, dk, dv = emu.attention_backward(cot, q, k, v, kb, qm, out, lse, scale)
    removed = kb == float("-inf")
    assert (dk[removed] == 0).all() and (dv[removed] == 0).all()
    assert (dv[~removed] != 0).any()


@pytest.mark.parametrize("removed", [0.0, 0.75], ids=["all_kept", "few_kept"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_emulated_key_order_splits_follow_kept_keys(configured, dtype, removed):
    """Under the key order the dK/dV kernel's query splits are as many as one wave holds for
    the key blocks that keep a key (every block and the reduction count them alike), within
    the half again that the workspace holds over the host's count. Four multiprocessors: float32
    (two blocks per SM) has room for 2 splits where the host counted 1 for 5 key blocks; with 2
    of them busy the kernel takes 2, with all 5 it takes 1 and the second split's blocks
    return (bfloat16, five per SM: room for 6, 4 counted; 6 and 4 taken)."""
    inputs = make_attention_inputs(B=1, L=200, N=320, D=24, E=40, active=0.6, removed=removed,
                                   dead_batch=False, dtype=dtype)
    _check_attention(configured(sms=4), inputs)
    _check_attention(configured(sms=4, order="shuffled", dq_atomic=dtype == torch.bfloat16),
                     inputs)


def test_cuda_emulated_key_order_keeps_nan_bias(configured):
    """A NaN key bias is not a removed key: the key order keeps it (the raster order visits
    its tile), so both orders give NaN in the same rows."""
    q, k, v, kb, qm = make_attention_inputs(B=1, L=70, N=200, D=16, E=16, active=0.5,
                                            removed=0.5, dtype=torch.float32)
    kb[0, 150] = float("nan")
    scale = q.shape[-1] ** -0.5
    nan_rows = {c: torch.isnan(configured(key_order=c).attention(q, k, v, kb, qm, scale)[0])
                for c in (True, False)}
    assert torch.equal(nan_rows[True], nan_rows[False]) and nan_rows[True].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_emulated_forward_copies_each_tile_unit_once(configured, dtype):
    """The register forward's tiles go through cp.async, one copy per 16 bytes of the rows and
    columns that hold data (padding is stored as zeros, not copied): per block with an active
    query, its Q rows and, over the tiles of kept keys, their K and V rows (float32: each of
    the two blocks of a query tile its half of the key tiles). Loads that went through
    registers again, or copied padding or a tile twice, change the count."""
    B, L, N, D, E = 2, 100, 150, 24, 40
    q, k, v, kb, qm = make_attention_inputs(B=B, L=L, N=N, D=D, E=E, active=0.8, removed=0.3,
                                            dead_batch=False, dtype=dtype)
    emu = configured()
    emu.attention(q, k, v, kb, qm, D ** -0.5)
    unit = 16 // q.element_size()
    halves = 2 if dtype == torch.float32 else 1  # float32's forward splits its key tiles
    expected = 0
    for b in range(B):
        active, kept = int(qm[b].sum()), int((kb[b] > float("-inf")).sum())
        for q0 in range(0, L, 64):
            if q0 < active:  # a block whose queries are all inactive loads nothing
                expected += halves * min(64, L - q0) * D // unit + kept * (D + E) // unit
    assert emu.take_async_copy_count() == expected


# ---- the 16-bit kernels' streamed tiles through two stages (REGHARM_CUDA_PIPELINE) -----------

def _half_kept_tiles(B=2, L=100, N=400, dtype=torch.bfloat16):
    """Inputs whose raster key tiles keep keys in their second half only (keys 40-63 of each
    64), one tile none: a vote that read only the first 32 keys of a tile would skip tiles that
    keep keys."""
    q, k, v, kb, qm = make_attention_inputs(B=B, L=L, N=N, D=24, E=40, active=0.5, removed=0.1,
                                            dead_batch=False, dtype=dtype)
    for t0 in range(0, N, 64):
        kb[:, t0:t0 + 40] = float("-inf")
    kb[:, 128:192] = float("-inf")
    return q, k, v, kb, qm


@pytest.mark.parametrize("key_order", [True, False], ids=["kept_first", "raster"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_emulated_pipeline(configured, dtype, key_order):
    """Two stages give the one-stage kernels' results bit for bit (the same products in the same
    order; one multiprocessor, so that the dK/dV kernel has one query split both ways: the
    emulator's occupancy counts shared memory only, which two stages take more of), and they do
    overlap: in each of the three kernels products run while the next tile's copies are in
    flight, and the forward copies each tile's bias once per block (4-byte cp.async), which
    one stage never does."""
    inputs = _half_kept_tiles(dtype=dtype)
    q, k, v, kb, qm = inputs
    scale = q.shape[-1] ** -0.5
    runs = {}
    for pipeline in (True, False):
        emu = configured(sms=1, key_order=key_order, pipeline=pipeline)
        out, lse = emu.attention(q, k, v, kb, qm, scale)
        copies4 = emu.take_async_copy4_count()
        cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
        grads = emu.attention_backward(cot, q, k, v, kb, qm, out, lse, scale)
        overlaps = emu.take_launch_overlaps()
        runs[pipeline] = (out, lse, *grads)
        kernels = [overlaps.get(name, 0) for name in ("rk.fwd", "rk.dq", "rk.dkdv")]
        if not pipeline:
            assert kernels == [0, 0, 0] and copies4 == 0
            continue
        assert all(n > 0 for n in kernels), overlaps
        kept = (kb > float("-inf")).sum(1)
        if key_order:  # the tiles hold the kept keys only
            want = sum(int(kept[b]) * ((int(qm[b].sum()) + 63) // 64) for b in range(q.shape[0]))
            assert copies4 == want
        _check_attention(emu, inputs)
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), runs[True], runs[False]):
        assert torch.equal(a, b), name


def test_cuda_emulated_pipeline_nan_rows(configured):
    """The two-stage dK/dV kernel copies lse and Δ as they are (one stage stores -inf and 0 for
    a row whose lse is not above -inf); NaN rows, as a NaN forward leaves them (lse and the
    output row), still attend nothing: Δ is 0 there and P is 0, the same bits, no NaN."""
    q, k, v, kb, qm = _half_kept_tiles()
    scale = q.shape[-1] ** -0.5
    grads = {}
    for pipeline in (True, False):
        emu = configured(sms=1, pipeline=pipeline)
        out, lse = emu.attention(q, k, v, kb, qm, scale)
        rows = torch.nonzero(qm[0])[:3, 0]
        lse[0, rows] = float("nan")
        out[0, rows] = float("nan")
        grads[pipeline] = emu.attention_backward(torch.ones_like(out), q, k, v, kb, qm, out, lse,
                                                 scale)
    for name, a, b in zip(("dq", "dk", "dv"), grads[True], grads[False]):
        assert torch.equal(a, b) and not torch.isnan(a).any(), name


def test_cuda_emulated_pipeline_where_it_fits(configured):
    """Each kernel takes two stages where they fit the device's shared memory: at D = E = 128
    in 100 KB (an sm_86's 99 KB and a little) the forward's (86.4 KB) and the dK/dV kernel's
    (73 KB) do and the dQ kernel's (103 KB) do not: its products never overlap copies there,
    and do on an H100, where all three take two stages."""
    inputs = make_attention_inputs(B=1, L=70, N=150, D=128, E=128, active=0.6, removed=0.1,
                                   dead_batch=False, dtype=torch.bfloat16)
    q, k, v, kb, qm = inputs
    overlaps = {}
    for smem in (100 * 1024, H100):
        emu = configured(smem=smem)
        out, lse = emu.attention(q, k, v, kb, qm, 128 ** -0.5)
        emu.attention_backward(torch.ones_like(out), q, k, v, kb, qm, out, lse, 128 ** -0.5)
        overlaps[smem] = emu.take_launch_overlaps()
        _check_attention(emu, inputs)
    assert overlaps[100 * 1024]["rk.fwd"] > 0 and overlaps[100 * 1024]["rk.dq"] == 0, overlaps
    assert overlaps[H100]["rk.fwd"] > 0 and overlaps[H100]["rk.dq"] > 0, overlaps


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
def test_cuda_emulated_pipeline_schedules(configured, order):
    """One warp running ahead of the others: in the reverse schedule copies land when issued,
    so a next tile issued before every warp is done with the stage it overwrites gives wrong
    results; in the shuffled one they land at the issuing thread's wait."""
    _check_attention(configured(order=order, key_order=False), _half_kept_tiles())
    _check_attention(configured(order=order), _half_kept_tiles(dtype=torch.float16))


def test_cuda_emulated_tf32x3_keeps_float32_accuracy(configured):
    """3xTF32 is as close to the float64 result as CUDA-core float32; one tf32 product would
    not be (the control below shows this bound tells them apart)."""
    q, k, v, kb, qm = make_attention_inputs(**ATTN_CASES["ptl_like"], dtype=torch.float32)
    scale = q.shape[-1] ** -0.5

    def exact(q_, k_, v_):
        return reference.masked_attention(q_.double(), k_.double(), v_.double(), kb.double(), qm,
                                          scale)

    want = exact(q, k, v)
    bound = dict(atol=2e-5, rtol=2e-5)
    for tf32x3 in (False, True):
        out, _ = configured(tf32x3=tf32x3).attention(q, k, v, kb, qm, scale)
        torch.testing.assert_close(out.double(), want, **bound, msg=f"tf32x3={tf32x3}")
    one_tf32 = exact(_tf32(q), _tf32(k), _tf32(v))  # what a single tf32 product would compute
    assert not torch.allclose(one_tf32, want, **bound)


# ---- masked_norm ------------------------------------------------------------------------------

NORM_EMU_CASES = {**NORM_CASES, "tiles": ((2, 40, 9, 11), 0.0, "soft"),  # ragged 32 x 32 tiles
                  # the backward's partial sums over 3 chunks of 256 positions, the last ragged
                  "chunks": ((2, 40, 23, 29), 100.0, "soft")}


def _check_norm(emu, x, w, seed=1, grad_mean=0.0):
    from regharm_ext.ops.norm_composite import composite
    y, mu, rstd = emu.masked_norm(x, w, 1e-5)
    xd = x.double().requires_grad_()
    y_ref = composite(xd, w.double(), 1e-5)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    grad = grad + grad_mean * torch.linspace(0, 2, y.shape[1], dtype=torch.float64)[:, None]
    (dx_ref,) = torch.autograd.grad(y_ref, xd, grad)
    dx = emu.masked_norm_backward(grad.to(x.dtype), x, w, mu, rstd)
    assert_close(y, y_ref, x.dtype, msg="y")
    assert_close(dx, dx_ref, x.dtype, grad=True, msg="dx")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
@pytest.mark.parametrize("case", NORM_EMU_CASES)
def test_cuda_emulated_masked_norm(configured, case, dtype):
    shape, offset, kind = NORM_EMU_CASES[case]
    x, w = make_norm_inputs(*shape, dtype=dtype, offset=offset, kind=kind)
    _check_norm(configured(), x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_emulated_masked_norm_backward_sums(configured, dtype):
    """A gradient with a mean that grows along the positions makes Σg and Σg·y most of dx
    (zero-mean noise leaves them within float32's tolerance at this size), and differently in
    every chunk of the partial sums: each must count."""
    shape, offset, kind = NORM_EMU_CASES["chunks"]
    x, w = make_norm_inputs(*shape, dtype=dtype, offset=offset, kind=kind)
    _check_norm(configured(), x, w, grad_mean=3.0)


@pytest.mark.parametrize("order", ["reverse", "shuffled"])
def test_cuda_emulated_masked_norm_schedules(configured, order):
    x, w = make_norm_inputs(2, 33, 6, 7, offset=100.0)
    _check_norm(configured(order=order), x, w)


# ---- PTL's blend (the CUDA branch of csrc/ptl_node.cpp) ---------------------------------------

BLEND_ULP = {torch.float32: 2.0 ** -22, torch.float64: 2.0 ** -50, torch.float16: 2.0 ** -9,
             torch.bfloat16: 2.0 ** -6}  # two units in the last place: FMA contraction may differ


def _blend_inputs(dtype, B=3, C=37, H=5, W=13, seed=0):
    """Odd sizes across the 32 x 32 tiles; weights below, at and above 0.5 (lerp's two
    formulas), and an image with weight 0 (no valid patch: it passes through)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g).to(dtype)
    av = torch.randn(B, H * W, 2 * C, generator=g).to(dtype)
    c_f = torch.randn(B, H * W, C, generator=g).to(dtype)
    w = torch.rand(B, H * W, generator=g)
    w[0, :3] = torch.tensor([0.0, 0.5, 1.0])
    w[-1] = 0.0
    return x, av, c_f, w.to(dtype)


def _close_ulps(got, want, dtype, what):
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got, want, rtol=BLEND_ULP[dtype], atol=BLEND_ULP[dtype] * scale,
                               msg=what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
def test_cuda_emulated_ptl_blend_matches_the_torch_ops(configured, dtype):
    """The blend kernels against the torch ops PTLNode runs (ptl_node.Blend, its backward and
    the node's last two additions), with the same roundings in between."""
    emu = configured()
    x, av, c_f, w = _blend_inputs(dtype)
    B, C, H, W = x.shape
    a, v = av.split(C, -1)
    t_fb = torch.addcmul(a, c_f, v).transpose(1, 2).view(B, C, H, W)
    want = torch.lerp(x, t_fb, w.view(B, 1, H, W))
    got = emu.ptl_blend_forward(x, av, c_f, w)
    _close_ulps(got, want, dtype, "blend forward")
    assert torch.equal(got[-1], x[-1]), "weight 0: x passes through"
    gen = torch.Generator().manual_seed(5)
    grads = {"contiguous": torch.randn(B, C, H, W, generator=gen).to(dtype),
             "channels_last": torch.randn(B, C, H, W, generator=gen).to(dtype).to(
                 memory_format=torch.channels_last),
             "expanded": torch.ones((), dtype=dtype).expand(B, C, H, W)}  # out.sum()'s gradient
    for kind, grad in grads.items():
        g_t = grad.flatten(2).transpose(1, 2)
        ga = g_t * w.view(B, H * W, 1)
        want_gav = torch.cat([ga, ga * c_f], -1)
        _close_ulps(emu.ptl_blend_backward(grad, w, c_f), want_gav, dtype, f"blend backward ({kind})")
        gx, gxp = (torch.randn(B, C, H, W, generator=gen).to(dtype) for _ in range(2))
        want_gx = (gx + gxp).addcmul_(grad, 1 - w.view(B, 1, H, W))
        _close_ulps(emu.ptl_grad_x(gx, gxp, grad, w), want_gx, dtype, f"grad x ({kind})")


def _fma(a, b, c):
    """float32 fma(a, b, c): the float32 product is exact in float64 (rounding the float64 sum
    once more could differ from one rounding in about 2^-29 of the cases)."""
    return (a.double() * b.double() + c.double()).float()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_emulated_ptl_blend_rounds_every_step_as_written(configured, dtype):
    """Bit for bit against the kernels' arithmetic spelt out: the roundings to the dtype between
    the steps and lerp's two formulas (a tolerance could not see either)."""
    emu = configured()
    x, av, c_f, w = _blend_inputs(dtype)
    B, C, H, W = x.shape
    f = lambda t: t.float()  # noqa: E731
    rd = lambda t: t.to(dtype).float()  # noqa: E731  (the value as the dtype holds it)
    a, v = (f(t).transpose(1, 2).reshape(B, C, H, W) for t in av.split(C, -1))
    t = rd(_fma(f(c_f).transpose(1, 2).reshape(B, C, H, W), v, a))
    s, wb = f(x), f(w).view(B, 1, H, W)
    d = t - s
    small = _fma(wb.expand_as(d), d, s)
    large = _fma(-d, (1 - wb).expand_as(d), t)
    want = torch.where(wb.abs() < 0.5, small, large).to(dtype)
    assert torch.equal(emu.ptl_blend_forward(x, av, c_f, w), want)
    gen = torch.Generator().manual_seed(7)
    grad = torch.randn(B, C, H, W, generator=gen).to(dtype)
    ga = rd(f(grad).flatten(2).transpose(1, 2) * f(w).view(B, H * W, 1))
    want_gav = torch.cat([ga, ga * f(c_f)], -1).to(dtype)
    assert torch.equal(emu.ptl_blend_backward(grad, w, c_f), want_gav)
    gx, gxp = (torch.randn(B, C, H, W, generator=gen).to(dtype) for _ in range(2))
    want_gx = _fma(f(grad), rd(1 - wb), rd(f(gx) + f(gxp))).to(dtype)
    assert torch.equal(emu.ptl_grad_x(gx, gxp, grad, w), want_gx)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=str)
def test_cuda_emulated_ptl_keys_and_mask_equal_the_torch_ops(configured, dtype):
    """The forward's small steps (ptl_node.attention_keys, blend_weight and 1 - m) bit for bit:
    masses at min_mass and a hair on either side of it as the dtype holds it, a patch the op
    found invalid (sigma 0) whose mass reads min_mass, an image without a valid patch, soft masks
    with zeros; sizes across several blocks per image."""
    emu = configured()
    g = torch.Generator().manual_seed(3)
    B, C, H, W, K = 3, 7, 30, 41, 1300
    # just above 0.298828125, which float16 and bfloat16 hold: both round min_mass down, and
    # torch compares in the tensor's dtype, so a mass of exactly that rounded value is valid
    min_mass = 0.298838125
    mass = torch.rand(B, K, generator=g).to(dtype)
    edge = torch.tensor(min_mass, dtype=dtype)
    mass[0, :3] = torch.stack([edge, torch.nextafter(edge, edge + 1), torch.nextafter(edge, edge - 1)])
    mass[1] = 0.1
    mass[1, -1] = 0.9  # one valid patch, the image's last: every block must see it
    mass[-1] = 0.1  # no valid patch in the last image
    mu = torch.randn(B, K, C, generator=g).to(dtype)
    sigma = (torch.rand(B, K, C, generator=g) + 0.01).to(dtype)
    # patch_stats' invalid patches: sigma exactly 0, whatever their mass rounded to
    sigma[mass < min_mass] = 0
    sigma[0, 3] = 0
    mass[0, 3] = edge   # invalid on the op's float32 mass, rounded up to min_mass
    m = torch.rand(B, 1, H, W, generator=g)
    m[m < 0.3] = 0.0
    m = m.to(dtype)
    key_bias, values, weight = emu.ptl_keys(mass, mu, sigma, m, min_mass)
    from regharm_ext.ptl_node import attention_keys, blend_weight
    valid, want_bias, want_active, want_values = attention_keys(m, mu, sigma, mass, min_mass)
    assert torch.equal(key_bias, want_bias) and key_bias.dtype == torch.float32
    assert torch.equal(values, want_values)
    assert torch.equal(weight, blend_weight(m, valid)) and (weight[-1] == 0).all()
    assert torch.equal(weight[1], m[1])
    assert bool(valid[0, 0]) and bool(valid[0, 1]) and not bool(valid[0, 2]) and not bool(valid[0, 3])
    if dtype in (torch.float16, torch.bfloat16):
        assert float(mass[0, 0]) < min_mass  # valid only as the dtype holds min_mass
    bg, active = emu.ptl_mask(m)
    assert torch.equal(bg, 1 - m) and torch.equal(active, want_active)


def test_cuda_emulated_attention_order_ranks_every_query(configured):
    """attn_order_kernel: active queries first, then the others, each in raster order, as a
    stable sort of ~mask gives them; several 32-query steps per warp, a partial last step, an
    image all active and one with none."""
    emu = configured()
    g = torch.Generator().manual_seed(11)
    for L in (1, 37, 1024, 5003):
        mask = torch.rand(4, L, generator=g) < 0.3
        mask[1] = True
        mask[2] = False
        order, count = emu.attention_order(mask)
        want = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices.to(torch.int32)
        assert torch.equal(order, want), L
        assert torch.equal(count, mask.sum(1).to(torch.int32)), L
