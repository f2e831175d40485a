"""The `native` backend's CUDA kernels (csrc/cuda) on a GPU against `reference`: odd shapes,
soft masks, patches without background, +100 offsets, clustered foregrounds (whole query tiles
skipped), the D = 256 / E = 512 extremes and the dense path beyond them, float32 (on CUDA cores
and, with REGHARM_CUDA_FP32_MATH=tf32x3, on tensor cores), float16 and bfloat16, non-contiguous
inputs, float64 gradcheck, opcheck of the four ops, determinism, and torch.compile(fullgraph=True)
of a small PTL + LTL module. Skipped without a GPU;
tests/test_cuda_emulated.py runs the same kernels on a CPU.
"""
import pytest
import torch

from helpers import (GPU_ATTN_CASES, PtlThenLtl, assert_close, check_compiled_matches_eager,
                     make_attention_inputs, make_patch_inputs, two_masks)
from regharm_ext.backends import unavailable_reason
from regharm_ext.ops import masked_attention, patch_stats

HAS_GPU = torch.cuda.is_available()
REASON = "needs a CUDA GPU" if not HAS_GPU else unavailable_reason("native", "cuda")
needs_native_cuda = pytest.mark.skipif(REASON is not None, reason=f"native CUDA: {REASON}")
pytestmark = pytest.mark.cuda
F32, F16, BF16, F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_native_cuda_kernels_are_built_where_there_is_a_gpu():
    # on a GPU machine a build without the CUDA kernels is a failure, not a reason to skip
    assert unavailable_reason("native", "cuda") is None, unavailable_reason("native", "cuda")


def _grads(outs, leaves, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, leaves)


def _both(fn, inputs, grad_idx, seed, layout=None):
    """Outputs and gradients of `native` (inputs passed through `layout`) and `reference`."""
    res = {}
    for backend in ("native", "reference"):
        leaves = [t.detach().clone().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
        args = [layout(t) if layout is not None and backend == "native" else t for t in leaves]
        outs = fn(backend, *args)
        outs = outs if isinstance(outs, tuple) else (outs,)
        res[backend] = outs, _grads(outs, [leaves[i] for i in grad_idx], seed)
    return res["native"], res["reference"]


def _noncontiguous(t):
    """The same values in a non-contiguous layout: channels last for 4-d, padded rows else."""
    if t.dim() == 4 and t.shape[1] > 1:
        return t.contiguous(memory_format=torch.channels_last)
    big = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
    big = big.index_copy(t.dim() - 1, torch.arange(t.shape[-1], device=t.device), t)
    return big[..., : t.shape[-1]]


# ---- patch_stats ------------------------------------------------------------------------------

PATCH_CASES = {  # (B, C, H, W), patch, stride, offset, bg kind
    "paper": ((2, 64, 128, 128), (16, 16), (4, 4), 0.0, "soft"),
    "odd": ((2, 3, 37, 50), (7, 5), (3, 2), 0.0, "soft"),
    "offset100": ((1, 20, 41, 33), (8, 6), (3, 4), 100.0, "soft"),
    "binary": ((1, 4, 16, 16), (4, 4), (4, 4), 0.0, "binary"),
    "no_background": ((2, 2, 12, 12), (4, 4), (2, 2), 0.0, "none"),
    "no_foreground": ((2, 2, 12, 12), (4, 4), (2, 2), 0.0, "all"),
    "gaps": ((1, 3, 23, 19), (3, 2), (5, 4), 0.0, "soft"),
    "big_patch": ((1, 2, 90, 90), (80, 80), (5, 5), 0.0, "soft"),  # beyond 48 KB of smem
}
PATCH_RUNS = [("paper", F32), ("paper", F16), ("paper", BF16), ("odd", F32), ("odd", F16),
              ("odd", BF16), ("odd", F64), ("offset100", F32), ("offset100", BF16),
              ("binary", F32), ("no_background", F32), ("no_foreground", BF16), ("gaps", F32),
              ("big_patch", F32)]


def _patch_fn(patch, stride):
    return lambda backend, x, bg, w, b: patch_stats(x, bg, w, b, patch, stride, backend=backend)


@needs_native_cuda
@pytest.mark.parametrize("case,dtype", PATCH_RUNS, ids=str)
def test_cuda_native_patch_stats(case, dtype):
    shape, patch, stride, offset, kind = PATCH_CASES[case]
    inputs = make_patch_inputs(*shape, patch, stride, dtype, offset=offset, bg_kind=kind,
                               device="cuda")
    (got, got_g), (want, want_g) = _both(_patch_fn(patch, stride), inputs, (0, 2, 3), seed=1)
    for name, a, e in zip(("mu", "sigma", "content", "mass"), got, want):
        assert a.dtype == dtype and a.is_cuda and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, msg=f"{case} {name}")
    invalid = want[3].float() < 0.5
    for name, a in zip(("mu", "sigma", "content"), got[:3]):
        assert (a[invalid] == 0).all(), f"{name} of invalid patches must be exactly 0"
    for name, a, e in zip(("dx", "dweight", "dbias"), got_g, want_g):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, dtype, grad=True, msg=f"{case} {name}")


@needs_native_cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_native_patch_stats_noncontiguous(dtype):
    shape, patch, stride, offset, kind = PATCH_CASES["offset100"]
    inputs = make_patch_inputs(*shape, patch, stride, dtype, offset=offset, device="cuda")
    (got, got_g), (want, want_g) = _both(_patch_fn(patch, stride), inputs, (0, 2, 3), seed=1,
                                         layout=_noncontiguous)
    for a, e in zip(got + got_g, want + want_g):
        assert_close(a, e, dtype, grad=True)


@needs_native_cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_native_patch_stats_gather_paths_agree(dtype, monkeypatch):
    """REGHARM_CUDA_PS_GATHER: the backward's gather by cells (the default where windows are
    whole strides, PTL's 16 / 4 here, with +100) against the per-pixel gather of GPU run 2,
    both against `reference`; a bad value is an error that lists the choices."""
    patch, stride = (16, 16), (4, 4)
    inputs = make_patch_inputs(2, 8, 64, 72, patch, stride, dtype, offset=100.0, device="cuda")
    grads = {}
    for mode in ("auto", "pixels"):
        monkeypatch.setenv("REGHARM_CUDA_PS_GATHER", mode)
        (got, got_g), (want, want_g) = _both(_patch_fn(patch, stride), inputs, (0, 2, 3), seed=1)
        for name, a, e in zip(("dx", "dweight", "dbias"), got_g, want_g):
            assert_close(a, e, dtype, grad=True, msg=f"{mode} {name}")
        grads[mode] = got_g
    assert_close(grads["auto"][0], grads["pixels"][0], dtype, grad=True, msg="cells vs pixels")
    monkeypatch.setenv("REGHARM_CUDA_PS_GATHER", "fast")
    x, bg, w, b = inputs
    mu, sigma, content, mass = patch_stats(x, bg, w, b, patch, stride, backend="native")
    ones = torch.ones_like(mu)
    with pytest.raises(RuntimeError, match="REGHARM_CUDA_PS_GATHER must be 'auto'"):
        torch.ops.regharm.patch_stats_backward(ones, ones, ones, x, bg, w, mu, sigma, mass,
                                               *patch, *stride, 1e-5, 0.5)


# ---- masked_attention -------------------------------------------------------------------------

ATTN_CASES = {
    **GPU_ATTN_CASES,
    "mostly_removed": dict(B=3, L=133, N=165, D=8, E=16, removed=0.95),
    # the register kernels' largest sizes (D, E padded to 128), several key and query tiles
    "d128": dict(B=2, L=500, N=300, D=100, E=120, active=0.4, removed=0.2),
    # LTL at 320+ channels: beyond the tiled kernels (D <= 256, E <= 512), the dense path
    "beyond_tiles": dict(B=2, L=300, N=200, D=320, E=640, active=0.5, removed=0.2),
}
ATTN_RUNS = [("ptl", F32), ("ptl", F16), ("ptl", BF16), ("ltl", BF16), ("ltl", F32),
             ("wide", BF16), ("wide", F32), ("c128", F16), ("odd", F32), ("odd", BF16),
             ("odd", F64), ("none_active", F32), ("mostly_removed", BF16),
             ("beyond_tiles", BF16), ("beyond_tiles", F32), ("d128", F16), ("d128", BF16),
             ("none_active", BF16)]


def _attn_fn(kb, qm, scale=None):
    return lambda backend, q, k, v: masked_attention(q, k, v, kb, qm, scale, backend=backend)


def _check_attention(got, got_g, want, want_g, dtype, qm, kb, label):
    assert got[0].dtype == dtype and torch.isfinite(got[0]).all()
    assert_close(got[0], want[0], dtype, msg=f"{label} out")
    if qm is not None:
        assert (got[0][~qm] == 0).all(), "inactive queries give exactly 0"
        assert (got_g[0][~qm] == 0).all(), "inactive queries get no gradient"
    removed = ~torch.isfinite(kb)
    assert (got_g[1][removed] == 0).all() and (got_g[2][removed] == 0).all()
    for name, a, e in zip(("dq", "dk", "dv"), got_g, want_g):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, dtype, grad=True, msg=f"{label} {name}")


@needs_native_cuda
@pytest.mark.parametrize("case,dtype", ATTN_RUNS, ids=str)
def test_cuda_native_masked_attention(case, dtype):
    q, k, v, kb, qm = make_attention_inputs(**ATTN_CASES[case], dtype=dtype, device="cuda")
    (got, got_g), (want, want_g) = _both(_attn_fn(kb, qm), (q, k, v), (0, 1, 2), seed=2)
    _check_attention(got, got_g, want, want_g, dtype, qm, kb, case)


# D, E <= 128 take the register kernels by default (16-bit: mma.sync; float32: FMAs on CUDA
# cores); the shared-memory tile kernels stay available under REGHARM_CUDA_ATTENTION=tiles
TILE_RUNS = [("ptl", BF16), ("ptl", F16), ("ptl", F32), ("ltl", BF16), ("odd", BF16),
             ("odd", F32), ("mostly_removed", BF16)]


@needs_native_cuda
@pytest.mark.parametrize("case,dtype", TILE_RUNS, ids=str)
def test_cuda_native_masked_attention_tile_kernels(case, dtype, monkeypatch):
    monkeypatch.setenv("REGHARM_CUDA_ATTENTION", "tiles")
    q, k, v, kb, qm = make_attention_inputs(**ATTN_CASES[case], dtype=dtype, device="cuda")
    (got, got_g), (want, want_g) = _both(_attn_fn(kb, qm), (q, k, v), (0, 1, 2), seed=2)
    _check_attention(got, got_g, want, want_g, dtype, qm, kb, f"{case} tiles")


@needs_native_cuda
@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_cuda_native_register_and_tile_kernels_agree(dtype, monkeypatch):
    """Both kernel families on the same inputs at PTL's sizes: the same results up to the
    rounding of P to bfloat16, or float32's summation order (each is also held to the
    reference above)."""
    q, k, v, kb, qm = make_attention_inputs(**ATTN_CASES["ptl"], dtype=dtype, device="cuda")
    outs = {}
    for mode in ("auto", "tiles"):
        monkeypatch.setenv("REGHARM_CUDA_ATTENTION", mode)
        outs[mode] = _both(_attn_fn(kb, qm), (q, k, v), (0, 1, 2), seed=2)[0]
    (o1, g1), (o2, g2) = outs["auto"], outs["tiles"]
    assert_close(o1[0], o2[0], dtype, msg="out")
    for a, e in zip(g1, g2):
        assert_close(a, e, dtype, grad=True)


def _foreground_queries(B, h, w, device):
    """query_mask of a rectangular foreground (~20 %), as PTL/LTL make it: whole tiles of rows
    are inactive and must be skipped."""
    m = torch.zeros(B, h, w, dtype=torch.bool, device=device)
    m[:, h // 4: h // 4 + h * 9 // 20, w // 3: w // 3 + w * 9 // 20] = True
    return m.flatten(1)


@needs_native_cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_native_attention_clustered_foreground(dtype):
    B, h, w = 2, 48, 40
    q, k, v, kb, _ = make_attention_inputs(B=B, L=h * w, N=300, D=64, E=128, dtype=dtype,
                                           device="cuda", dead_batch=False)
    qm = _foreground_queries(B, h, w, "cuda")
    (got, got_g), (want, want_g) = _both(_attn_fn(kb, qm), (q, k, v), (0, 1, 2), seed=4)
    _check_attention(got, got_g, want, want_g, dtype, qm, kb, "clustered")


@needs_native_cuda
def test_cuda_native_attention_without_mask_and_custom_scale():
    q, k, v, kb, _ = make_attention_inputs(B=2, L=130, N=70, D=32, E=48, device="cuda")
    (got, got_g), (want, want_g) = _both(_attn_fn(kb, None, 0.3), (q, k, v), (0, 1, 2), seed=3)
    _check_attention(got, got_g, want, want_g, F32, None, kb, "no mask")


@needs_native_cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_native_attention_noncontiguous(dtype):
    q, k, v, kb, qm = make_attention_inputs(B=2, L=150, N=70, D=24, E=40, dtype=dtype,
                                            device="cuda")
    layouts = {"padded rows": _noncontiguous,
               "feature dim strided": lambda t: t.transpose(1, 2).contiguous().transpose(1, 2)}
    for label, layout in layouts.items():
        (got, got_g), (want, want_g) = _both(_attn_fn(kb.t().contiguous().t(), qm), (q, k, v),
                                             (0, 1, 2), seed=5, layout=layout)
        _check_attention(got, got_g, want, want_g, dtype, qm, kb, label)


@needs_native_cuda
def test_cuda_native_lse_and_dead_rows():
    q, k, v, kb, qm = make_attention_inputs(B=3, L=90, N=40, D=16, E=8, device="cuda")
    out, lse = torch.ops.regharm.masked_attention(q, k, v, kb, qm, 0.25)
    assert lse.dtype == torch.float32 and lse.shape == qm.shape
    s = 0.25 * q.double() @ k.double().transpose(1, 2) + kb.double()[:, None, :]
    want = torch.logsumexp(s, -1).masked_fill(~qm, float("-inf"))
    assert torch.equal(torch.isneginf(lse), torch.isneginf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(lse[finite].double(), want[finite], atol=1e-5, rtol=1e-5)
    assert (out[-1] == 0).all(), "the image whose keys are all removed gives 0"


# ---- float32 on tensor cores: REGHARM_CUDA_FP32_MATH=tf32x3 --------------------------------------

needs_tf32 = pytest.mark.skipif(HAS_GPU and torch.cuda.get_device_capability()[0] < 8,
                                reason="tf32 tensor cores need sm_80+")


@needs_native_cuda
@needs_tf32
@pytest.mark.parametrize("case", ["ptl", "ltl", "wide", "c128", "odd", "none_active"])
def test_cuda_native_attention_tf32x3(case, monkeypatch):
    monkeypatch.setenv("REGHARM_CUDA_FP32_MATH", "tf32x3")
    q, k, v, kb, qm = make_attention_inputs(**ATTN_CASES[case], dtype=F32, device="cuda")
    (got, got_g), (want, want_g) = _both(_attn_fn(kb, qm), (q, k, v), (0, 1, 2), seed=2)
    _check_attention(got, got_g, want, want_g, F32, qm, kb, f"{case} tf32x3")


@needs_native_cuda
@needs_tf32
def test_cuda_native_tf32x3_keeps_float32_accuracy(monkeypatch):
    """As close to the float64 result as CUDA-core float32; a single tf32 product is not (the
    same bound fails with torch's tf32 matmul, the control)."""
    q, k, v, kb, qm = make_attention_inputs(**ATTN_CASES["ptl"], dtype=F32, device="cuda")
    want = masked_attention(q.double(), k.double(), v.double(), kb.double(), qm,
                            backend="reference")
    bound = dict(atol=2e-5, rtol=2e-5)
    for mode in ("simt", "tf32x3"):
        monkeypatch.setenv("REGHARM_CUDA_FP32_MATH", mode)
        got = masked_attention(q, k, v, kb, qm, backend="native")
        torch.testing.assert_close(got.double(), want, **bound, msg=mode)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    one_tf32 = masked_attention(q, k, v, kb, qm, backend="reference")
    assert not torch.allclose(one_tf32.double(), want, **bound)


def _ptl_attention_under(monkeypatch, setting, modes, dtype):
    """({mode: (out, dq, dk, dv)}, inputs): `native` at PTL's sizes with the environment switch
    ``setting`` at each of ``modes``, every run held to the reference."""
    inputs = make_attention_inputs(**ATTN_CASES["ptl"], dtype=dtype, device="cuda")
    q, k, v, kb, qm = inputs
    runs = {}
    for mode in modes:
        monkeypatch.setenv(setting, mode)
        (got, got_g), (want, want_g) = _both(_attn_fn(kb, qm), (q, k, v), (0, 1, 2), seed=2)
        _check_attention(got, got_g, want, want_g, dtype, qm, kb, f"ptl {setting}={mode}")
        runs[mode] = (got[0], *got_g)
    return runs, inputs


@needs_native_cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_native_dq_paths_agree(dtype, monkeypatch):
    """REGHARM_CUDA_DQ: dQ added up with atomics by the dK/dV kernel (float32's default) or by
    its own kernel (16-bit's default, and under deterministic algorithms): both held to the
    reference at PTL's sizes, and to each other."""
    runs, _ = _ptl_attention_under(monkeypatch, "REGHARM_CUDA_DQ", ("atomic", "kernel"), dtype)
    for a, e in zip(runs["atomic"][1:], runs["kernel"][1:]):
        assert_close(a, e, dtype, grad=True)


@needs_native_cuda
def test_cuda_native_simt_lane_orders_agree(monkeypatch):
    """REGHARM_CUDA_SIMT_LANES: float32's CUDA-core kernels in PairedLanes order (the default)
    or mma.sync's compute every element as the same sum in the same order, on another lane: with
    dQ by its own kernel (no atomics), identical bits; both held to the reference at PTL's
    sizes."""
    monkeypatch.setenv("REGHARM_CUDA_DQ", "kernel")
    runs, _ = _ptl_attention_under(monkeypatch, "REGHARM_CUDA_SIMT_LANES", ("paired", "mma"), F32)
    for name, a, e in zip(("out", "dq", "dk", "dv"), runs["paired"], runs["mma"]):
        assert torch.equal(a, e), name


@needs_native_cuda
def test_cuda_native_forward_key_split(monkeypatch):
    """REGHARM_CUDA_FWD_SPLIT: float32's forward with each query tile's keys over two blocks
    (the default) or one: both held to the reference at PTL's sizes, and the split's result the
    same bits in every run, whichever of the two blocks finishes first."""
    _, (q, k, v, kb, qm) = _ptl_attention_under(monkeypatch, "REGHARM_CUDA_FWD_SPLIT",
                                                ("off", "auto"), F32)
    runs = [torch.ops.regharm.masked_attention(q, k, v, kb, qm, 0.125) for _ in range(8)]
    for out, lse in runs[1:]:
        assert torch.equal(out, runs[0][0]) and torch.equal(lse, runs[0][1])


@needs_native_cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_native_key_orders_agree(dtype, monkeypatch):
    """REGHARM_CUDA_KEY_ORDER: the register kernels over the kept keys first (the default) or
    over the keys in raster order: both held to the reference at PTL's sizes (10 % of the keys
    removed at random, so every raster tile keeps a key), and to each other; removed keys get
    gradients of exactly 0 either way."""
    monkeypatch.setenv("REGHARM_CUDA_DQ", "kernel")  # no atomics: the two differ by key order only
    runs, (_, _, _, kb, _) = _ptl_attention_under(monkeypatch, "REGHARM_CUDA_KEY_ORDER",
                                                  ("auto", "raster"), dtype)
    for a, e in zip(runs["auto"], runs["raster"]):
        assert_close(a, e, dtype, grad=True)
    removed = kb == float("-inf")
    for name, g in zip(("dk", "dv"), runs["auto"][2:]):
        assert (g[removed] == 0).all(), name


@needs_native_cuda
@pytest.mark.parametrize("dtype", [F16, BF16], ids=str)
def test_cuda_native_pipeline_gives_one_stages_bits(dtype, monkeypatch):
    """REGHARM_CUDA_PIPELINE: the 16-bit kernels with their streamed tiles through two stages
    (the default) or one compute the same products in the same order: with dQ by its own kernel
    (no atomics), identical out and dQ; dK and dV too where the dK/dV kernel's query splits
    (from its occupancy) are as many both ways; all held to the reference at PTL's sizes."""
    monkeypatch.setenv("REGHARM_CUDA_DQ", "kernel")
    runs, _ = _ptl_attention_under(monkeypatch, "REGHARM_CUDA_PIPELINE", ("auto", "off"), dtype)
    for name, a, e in zip(("out", "dq"), runs["auto"], runs["off"]):
        assert torch.equal(a, e), name
    for name, a, e in zip(("dk", "dv"), runs["auto"][2:], runs["off"][2:]):
        assert_close(a, e, dtype, grad=True, msg=name)


@needs_native_cuda
@pytest.mark.parametrize("setting,says", [("REGHARM_CUDA_FP32_MATH", "must be 'simt'"),
                                          ("REGHARM_CUDA_ATTENTION", "must be 'auto'"),
                                          ("REGHARM_CUDA_DQ", "must be 'auto'"),
                                          ("REGHARM_CUDA_SIMT_LANES", "must be 'paired'"),
                                          ("REGHARM_CUDA_FWD_SPLIT", "must be 'auto'"),
                                          ("REGHARM_CUDA_KEY_ORDER", "must be 'auto'"),
                                          ("REGHARM_CUDA_PIPELINE", "must be 'auto'")])
def test_cuda_native_attention_settings_are_checked(setting, says, monkeypatch):
    monkeypatch.setenv(setting, "fast")
    q, k, v, kb, qm = make_attention_inputs(B=1, L=8, N=8, D=4, E=4, device="cuda")
    with pytest.raises(RuntimeError, match=f"{setting} {says}"):
        torch.ops.regharm.masked_attention(q, k, v, kb, qm, 1.0)


# ---- float64, opcheck, determinism, errors ----------------------------------------------------

@needs_native_cuda
def test_cuda_native_gradcheck_float64():
    x, bg, w, b = make_patch_inputs(1, 2, 9, 11, (3, 4), (2, 3), F64, offset=2.0, device="cuda")
    fn = lambda x, w, b: patch_stats(x, bg, w, b, (3, 4), (2, 3), backend="native")[:3]
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, w, b)))
    q, k, v, kb, qm = make_attention_inputs(B=2, L=40, N=70, D=3, E=4, dtype=F64, device="cuda")
    fn = lambda q, k, v: masked_attention(q, k, v, kb, qm, 0.7, backend="native")
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v)))


@needs_native_cuda
@pytest.mark.parametrize("dtype", [F32, BF16], ids=str)
def test_cuda_native_opcheck_all_four_ops(dtype):
    ops = torch.ops.regharm
    x, bg, w, b = make_patch_inputs(2, 3, 13, 10, (4, 3), (3, 2), dtype, device="cuda")
    args = (4, 3, 3, 2, 1e-5, 0.5)
    torch.library.opcheck(ops.patch_stats.default,
                          (x.requires_grad_(), bg, w.requires_grad_(), b.requires_grad_()) + args)
    mu, sigma, content, mass = ops.patch_stats(x.detach(), bg, w.detach(), b.detach(), *args)
    g = [torch.randn_like(mu) for _ in range(3)]
    torch.library.opcheck(ops.patch_stats_backward.default,
                          (*g, x.detach(), bg, w.detach(), mu, sigma, mass, *args))
    q, k, v, kb, qm = make_attention_inputs(B=2, L=37, N=70, D=5, E=6, dtype=dtype, device="cuda")
    for mask in (qm, None):
        torch.library.opcheck(ops.masked_attention.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), kb,
                               mask, 0.5))
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = ops.masked_attention(q, k, v, kb, qm, 0.5)
    torch.library.opcheck(ops.masked_attention_backward.default,
                          (torch.randn_like(out), q, k, v, kb, qm, out, lse, 0.5))


@needs_native_cuda
@pytest.mark.parametrize("dtype", [BF16, F32], ids=str)
def test_cuda_native_is_deterministic(dtype):
    """No atomics: two runs give the same bits. bfloat16 by default; float32's default adds dQ
    with atomics, so it is deterministic under torch.use_deterministic_algorithms (which the
    dQ kernel then serves)."""
    x, bg, w, b = make_patch_inputs(2, 16, 64, 64, (16, 16), (4, 4), device="cuda")
    q, k, v, kb, qm = make_attention_inputs(B=2, L=700, N=841, D=64, E=128, dtype=dtype,
                                            device="cuda")
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    # warn_only: the reference that _both also runs may use ops without a deterministic kernel
    torch.use_deterministic_algorithms(dtype == F32, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            (pg, pgg), _ = _both(_patch_fn((16, 16), (4, 4)), (x, bg, w, b), (0, 2, 3), seed=1)
            (ag, agg), _ = _both(_attn_fn(kb, qm), (q, k, v), (0, 1, 2), seed=2)
            runs.append([*pg, *pgg, *ag, *agg])
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
    for a, e in zip(*runs):
        assert torch.equal(a, e)


@needs_native_cuda
def test_cuda_native_argument_errors_name_the_argument():
    ops = torch.ops.regharm
    x, bg, w, b = make_patch_inputs(1, 2, 10, 10, (3, 3), (1, 1), device="cuda")
    with pytest.raises(RuntimeError, match="bg must have shape"):
        ops.patch_stats(x, bg[:, :, :5], w, b, 3, 3, 1, 1, 1e-5, 0.5)
    with pytest.raises(RuntimeError, match="weight must be on"):
        ops.patch_stats(x, bg, w.cpu(), b, 3, 3, 1, 1, 1e-5, 0.5)
    q, k, v, kb, qm = make_attention_inputs(B=1, L=8, N=8, D=4, E=4, device="cuda")
    with pytest.raises(RuntimeError, match="query_mask must be bool"):
        ops.masked_attention(q, k, v, kb, qm.float(), 1.0)


# ---- layers -----------------------------------------------------------------------------------

@needs_native_cuda
def test_cuda_native_compiled_module_matches_eager():
    check_compiled_matches_eager("native", "cuda")


@needs_native_cuda
def test_cuda_native_layers_match_torch_backend():
    torch.manual_seed(1)
    C, H = 32, 32
    x = torch.randn(2, C, H, H, device="cuda")
    mask = two_masks(H, "cuda")
    results = {}
    for backend in ("native", "torch"):
        torch.manual_seed(2)
        mod = PtlThenLtl(C, backend).cuda()
        xi = x.clone().requires_grad_()
        out = mod(xi, mask)
        results[backend] = (out, *torch.autograd.grad(out.square().sum(), [xi, mod.ptl.weight]))
    for a, e in zip(results["native"], results["torch"]):
        assert_close(a, e, F32, grad=True)


@needs_native_cuda
def test_degenerate_shapes_match_the_cpu_kernels():
    """An empty map's statistics (the kernels skip it; the glue fills them) and a refused
    channel-less x, as the CPU kernels give them (tests/test_native.py)."""
    x, w = torch.randn(2, 3, 0, 5, device="cuda"), torch.rand(2, 1, 0, 5, device="cuda")
    _, mu, rstd = torch.ops.regharm.masked_norm(x, w, 1e-5)
    assert torch.equal(mu.cpu(), torch.zeros(2, 3))
    torch.testing.assert_close(rstd.cpu(), torch.full((2, 3), 1e-5 ** -0.5))
    x0, bg = torch.randn(2, 0, 6, 6, device="cuda"), torch.rand(2, 1, 6, 6, device="cuda")
    with pytest.raises(RuntimeError, match="x must have at least one channel"):
        torch.ops.regharm.patch_stats(x0, bg, torch.randn(4, device="cuda"), torch.randn(1, device="cuda"),
                                      2, 2, 2, 2, 1e-5, 0.5)
