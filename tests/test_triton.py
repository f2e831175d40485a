"""Triton kernels in the interpreter (``TRITON_INTERPRET=1``, CPU tensors) against `reference`.

Forward and every gradient on tiny shapes: odd sizes, soft masks, images without background or
without an active query, +100 offsets, whole key tiles removed, several tiles per dimension;
float32, float16 (no bfloat16: the interpreter computes with numpy, which has none) and float64
gradcheck. tests/conftest.py sets TRITON_INTERPRET=1 on machines without a GPU before anything
imports triton; where the kernels were compiled instead (a GPU machine) this file skips, and the
CUDA tests live in tests/test_triton_cuda.py.
"""
import os

import pytest
import torch

from helpers import (EDGE_ATTN_CASES, EDGE_PATCH_CASES, assert_close, make_attention_inputs,
                     make_patch_inputs)
from regharm_ext import LTL, PTL
from regharm_ext.backends import unavailable_reason
from regharm_ext.ops import masked_attention, patch_stats

REASON = unavailable_reason("triton", "cpu")
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(REASON is not None, reason=f"triton on CPU: {REASON}")]

DTYPES = [torch.float32, torch.float16]


def _grads_of(outs, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs, allow_unused=True)


def _run_patch(backend, inputs, patch, stride):
    x, bg, w, b = (t.detach().clone().requires_grad_(i != 1) for i, t in enumerate(inputs))
    outs = patch_stats(x, bg, w, b, patch, stride, backend=backend)
    return outs, _grads_of(outs[:3], (x, w, b), seed=1)


PATCH_CASES = {  # name: (B, C, H, W), patch, stride, offset, bg kind
    **EDGE_PATCH_CASES,
    # stride > patch: pixels no patch covers get zero gradient
    "gaps": ((1, 3, 17, 15), (3, 2), (4, 3), 0.0, "soft"),
    "one_patch": ((2, 5, 6, 7), (6, 7), (1, 1), 0.0, "soft"),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PATCH_CASES)
def test_patch_stats_matches_reference(case, dtype):
    shape, patch, stride, offset, kind = PATCH_CASES[case]
    if dtype == torch.float16 and offset:
        pytest.skip("fp16 cannot hold 100 + noise accurately enough to compare with fp32 sums")
    inputs = make_patch_inputs(*shape, patch, stride, dtype, offset=offset, bg_kind=kind)
    got, got_g = _run_patch("triton", inputs, patch, stride)
    want, want_g = _run_patch("reference", inputs, patch, stride)
    for name, a, e in zip(("mu", "sigma", "content", "mass"), got, want):
        assert a.dtype == dtype and a.shape == e.shape and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, msg=f"triton {case} {name}")
    for name, a, e in zip(("dx", "dweight", "dbias"), got_g, want_g):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, grad=True, msg=f"triton {case} {name}")
    invalid = want[3] < 0.5
    for t in got[:3]:
        assert (t[invalid] == 0).all(), "invalid patches must give exactly 0"


def test_patch_stats_offset_keeps_sigma_accurate():
    """+100 offsets: sigma must match the unshifted input's (the variance is shift-invariant)."""
    shape, patch, stride = (1, 3, 20, 22), (5, 4), (3, 3)
    x, bg, w, b = make_patch_inputs(*shape, patch, stride, torch.float32)
    _, s0, c0, _ = patch_stats(x, bg, w, b, patch, stride, backend="triton")
    _, s1, c1, _ = patch_stats(x + 100, bg, w, b, patch, stride, backend="triton")
    torch.testing.assert_close(s1, s0, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(c1, c0, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("backend", ["triton", "native"])
def test_patch_stats_small_spread_far_from_the_shift(backend):
    """A patch of two soft background pixels of nearly equal value, its top-left pixel (the
    kernels' shift) far away: raw moments about the shift cancel to noise there, and the
    gradient's g_content·D/(Mσ³) amplifies any error in the mean (an H100 run found Triton's
    float32 gradient 9.9x the tolerance at the paper size; such patches were the cause)."""
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64)
    bg = torch.zeros(1, 1, 8, 8, dtype=torch.float64)
    bg[..., 4:, 4:] = 1.0                                   # an ordinary patch
    x[..., 0, 0] = 5.0                                      # the first patch's shift, foreground
    bg[..., 2, 1], bg[..., 3, 2] = 0.5, 0.4375              # its whole background (mass 0.94)
    x[..., 2, 1], x[..., 3, 2] = 0.3, 0.3 + 2e-4
    w = torch.randn(16, generator=g, dtype=torch.float64) / 4
    b = torch.zeros(1, dtype=torch.float64)
    cot = [torch.randn(1, 4, 2, generator=g, dtype=torch.float64) for _ in range(3)]

    def run(dtype, name):
        xx = x.to(dtype).clone().requires_grad_()
        outs = patch_stats(xx, bg.to(dtype), w.to(dtype), b.to(dtype), 4, 4, backend=name)[:3]
        torch.autograd.backward(outs, [c.to(dtype) for c in cot])
        return [o.detach() for o in outs], xx.grad

    want, want_dx = run(torch.float64, "reference")
    got, got_dx = run(torch.float32, backend)
    for name, a, e in zip(("mu", "sigma", "content"), got, want):
        assert_close(a, e, torch.float32, msg=f"{backend} {name}")
    assert_close(got_dx, want_dx, torch.float32, grad=True, msg=f"{backend} dx")


ATTN_CASES = {  # name: kwargs of make_attention_inputs
    **EDGE_ATTN_CASES,
    # several query and key tiles, D and E not powers of two
    "multi_tile": dict(B=2, L=150, N=140, D=20, E=40, active=0.3, removed=0.2),
}


def _run_attention(backend, inputs, scale=None):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in inputs[:3])
    out = masked_attention(q, k, v, inputs[3], inputs[4], scale, backend=backend)
    return out, _grads_of([out], (q, k, v), seed=2)


def _check_attention(inputs, dtype, scale=None):
    got, got_g = _run_attention("triton", inputs, scale)
    want, want_g = _run_attention("reference", inputs, scale)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_close(got, want, dtype, msg="triton out")
    for name, a, e in zip(("dq", "dk", "dv"), got_g, want_g):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, grad=True, msg=f"triton {name}")
    qm = inputs[4]
    if qm is not None:
        assert (got[~qm] == 0).all(), "inactive queries must give exactly 0"
        assert (got_g[0][~qm] == 0).all(), "inactive queries get no gradient"
    return got, got_g


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_masked_attention_matches_reference(case, dtype):
    _check_attention(make_attention_inputs(**ATTN_CASES[case], dtype=dtype), dtype)


def test_gpu_tile_sizes(monkeypatch):
    """The interpreter normally takes big tiles (fewer numpy steps); the GPU's smaller, uneven
    ones (e.g. 16 x 32 at D = 256, E = 512; 32 patches x 16 channels) must give the same."""
    from regharm_ext.ops import triton_attention, triton_patch_stats

    monkeypatch.setattr(triton_attention, "interpreting", lambda: False)
    monkeypatch.setattr(triton_patch_stats, "interpreting", lambda: False)
    assert triton_attention._blocks(256, 512, torch.float16)["fwd"][:2] == (16, 32)
    _check_attention(make_attention_inputs(B=2, L=40, N=50, D=200, E=300, active=0.4), torch.float32)
    _check_attention(make_attention_inputs(B=1, L=90, N=70, D=20, E=40, active=0.6,
                                           dtype=torch.float16), torch.float16)
    shape, patch, stride, offset, kind = PATCH_CASES["odd"]
    inputs = make_patch_inputs(1, 20, 30, 41, patch, stride, torch.float32, bg_kind=kind)
    got, got_g = _run_patch("triton", inputs, patch, stride)
    want, want_g = _run_patch("reference", inputs, patch, stride)
    for a, e in zip(got, want):
        assert_close(a, e, torch.float32)
    for a, e in zip(got_g, want_g):
        assert_close(a, e, torch.float32, grad=True)


def test_masked_attention_dead_image_and_removed_key_tiles():
    """A whole image without keys gives 0 and no gradient; removed tiles are skipped exactly."""
    q, k, v, kb, qm = make_attention_inputs(B=2, L=70, N=150, D=8, E=12, removed=0.0,
                                            dead_batch=True)
    kb[0, :64] = float("-inf")           # the first key tile (64 in the interpreter) is dead
    kb[0, 100:] = float("-inf")
    out, (dq, dk, dv) = _check_attention((q, k, v, kb, qm), torch.float32)
    assert (out[1] == 0).all() and (dq[1] == 0).all() and (dk[1] == 0).all()
    assert (dk[0, :64] == 0).all() and (dv[0, 100:] == 0).all()


def test_masked_attention_without_mask_custom_scale():
    inputs = list(make_attention_inputs(B=2, L=21, N=9, D=5, E=3))
    inputs[4] = None
    _check_attention(inputs, torch.float32, scale=1.0)


def test_key_bias_dtype_may_differ():
    """key_bias is read in its own dtype (LTL passes float32 with half-precision tokens; the
    fp16 cases above do that): float64 and float16 biases give the float32 bias's result."""
    q, k, v, kb, qm = make_attention_inputs(B=1, L=20, N=18, D=8, E=8, dtype=torch.float16)
    kb = kb.half().float()               # exactly representable in every dtype below
    want = masked_attention(q, k, v, kb, qm, backend="triton")
    for dt in (torch.float64, torch.float16):
        got = masked_attention(q, k, v, kb.to(dt), qm, backend="triton")
        assert torch.equal(got, want), dt


def test_float64_min_mass_is_not_rounded_to_float32():
    """A mass of exactly 0.1 is valid under min_mass 0.1 in float64; float32(0.1) is larger, so a
    kernel that took min_mass as a float32 launch argument dropped the patch and its gradient."""
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    bg = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    bg[..., 1, 2] = 0.1                      # the only background of the one 4x4 patch
    w, b = torch.full((16,), 0.25, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    res = {}
    for name in ("reference", "triton"):
        xx = x.clone().requires_grad_()
        mu, sigma, content, mass = patch_stats(xx, bg, w, b, 4, 4, min_mass=0.1, backend=name)
        (mu.sum() + sigma.sum()).backward()
        res[name] = (mu.detach(), sigma.detach(), xx.grad)
    assert float(res["reference"][1].abs().min()) > 0   # valid: sigma = sqrt(eps) > 0
    for got, want in zip(res["triton"], res["reference"]):
        assert_close(got, want, torch.float64)


def test_attention_wider_than_an_h100_block_is_refused_with_the_reason(monkeypatch):
    """The compiled kernels' shared memory at sm_90 (Triton 3.6's compiler) bounds D + E; past
    it the op says so before any launch, instead of Triton's out-of-resources error mid-step."""
    from regharm_ext.backends import BackendUnavailable
    from regharm_ext.ops import triton_attention as ta
    monkeypatch.setattr(ta, "interpreting", lambda: False)   # the limits of compiled kernels
    f32, bf16 = torch.float32, torch.bfloat16
    assert ta.too_wide(512, 512, f32, backward=True) is None          # LTL at width 2
    assert ta.too_wide(300, 600, f32, backward=True) is not None      # 512 + 1024
    assert ta.too_wide(1024, 2048, f32, backward=False) is None
    assert ta.too_wide(2048, 2048, bf16, backward=True) is None
    assert ta.too_wide(2048, 2049, bf16, backward=True) is not None
    assert ta.too_wide(4096, 4096, torch.float64, backward=True) is None   # gradcheck sizes only
    q = torch.zeros(1, 4, 1024, requires_grad=True)
    kb = torch.zeros(1, 4)
    with pytest.raises(BackendUnavailable, match=r"D=1024, E=1024 in float32 .* sum to 1024 in "
                                                  r"float32.*backend='native'"):
        masked_attention(q, q, q, kb, None, backend="triton")
    # PTL's one node runs the attention's Functions directly: refused there too, at the forward
    ptl = PTL(512, 2, 2, backend="triton")   # E = 2C: 512 + 1024 with a backward
    x = torch.randn(1, 512, 4, 4, requires_grad=True)
    m = torch.zeros(1, 1, 4, 4)
    m[..., :2, :] = 1
    with pytest.raises(BackendUnavailable, match=r"D=512, E=1024 in float32"):
        ptl(x, m)


def test_batches_past_a_cuda_grid_axis_are_refused_with_the_reason():
    from regharm_ext.backends import BackendUnavailable
    from regharm_ext.ops import masked_norm
    B = 65536
    x = torch.zeros(B, 1, 1, 1)
    q, kb = torch.zeros(B, 1, 1), torch.zeros(B, 1)
    calls = {"masked_attention": lambda: masked_attention(q, q, q, kb, backend="triton"),
             "patch_stats": lambda: patch_stats(x, x, torch.ones(1), torch.zeros(1), 1, 1, backend="triton"),
             "masked_norm": lambda: masked_norm(x, x, backend="triton")}
    for op, call in calls.items():
        with pytest.raises(BackendUnavailable, match=f"{op} takes at most 65535 images per call .* B=65536"):
            call()


def test_compiling_interpreted_kernels_names_the_reason():
    """torch.compile's fake tensors have no data for the interpreter: fullgraph names why (rather
    than a fake-tensor error from inside Triton), and a plain compile runs the op eagerly."""
    from regharm_ext.backends import preload
    preload("triton")
    q, kb = torch.randn(2, 7, 5), torch.zeros(2, 7)
    f = lambda q: masked_attention(q, q, q, kb, None, backend="triton")   # noqa: E731
    torch._dynamo.reset()
    with pytest.raises(Exception, match="torch.compile needs the compiled kernels"):
        torch.compile(f, fullgraph=True, backend="eager")(q)
    torch._dynamo.reset()
    got = torch.compile(f, backend="eager")(q)
    assert_close(got, masked_attention(q, q, q, kb, None, backend="reference"), torch.float32)


def test_gradcheck_float64():
    """float64 runs in float64 in the kernels (broadcast products instead of tl.dot)."""
    x, bg, w, b = make_patch_inputs(1, 2, 9, 8, (3, 4), (2, 3), torch.float64)
    fn = lambda x, w, b: patch_stats(x, bg, w, b, (3, 4), (2, 3), backend="triton")[:3]
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, w, b)), fast_mode=True)
    q, k, v, kb, qm = make_attention_inputs(B=2, L=7, N=6, D=3, E=2, dtype=torch.float64)
    fn = lambda q, k, v: masked_attention(q, k, v, kb, qm, backend="triton")
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v)), fast_mode=True)


@pytest.mark.parametrize("L, block", [(29, None), (150, 16)])  # one step; many, ragged last
def test_compaction_puts_active_queries_first(L, block):
    from regharm_ext.ops.triton_attention import _compact

    qm = torch.rand(4, L, generator=torch.Generator().manual_seed(0)) < 0.4
    qm[1] = False
    qm[3] = True
    idx, count = _compact(qm, block)
    for b in range(4):
        active = torch.nonzero(qm[b]).flatten().tolist()
        assert count[b] == len(active)
        assert idx[b].tolist() == active + torch.nonzero(~qm[b]).flatten().tolist()


def test_orders_put_kept_keys_first():
    """One launch orders the queries (active first) and the keys (kept first: key_bias not
    -inf; a NaN bias is kept, as the kernels' tile skipping keeps it), each group in order."""
    from regharm_ext.ops.triton_attention import _orders

    g = torch.Generator().manual_seed(0)
    qm = torch.rand(3, 40, generator=g) < 0.4
    kb = torch.randn(3, 150, generator=g)
    kb[torch.rand(3, 150, generator=g) < 0.5] = float("-inf")
    kb[1] = float("-inf")
    kb[2, 7] = float("nan")
    for mask in (qm, None):
        idx, cnt = _orders(mask, kb, True, 40, block=32)
        assert idx.shape == (3, 190) and cnt.shape == (3, 2)
        for b in range(3):
            kept = ~(kb[b] == float("-inf"))
            assert cnt[b, 1] == int(kept.sum())
            assert idx[b, 40:].tolist() == (torch.nonzero(kept).flatten().tolist()
                                             + torch.nonzero(~kept).flatten().tolist())
            if mask is not None:
                assert cnt[b, 0] == int(qm[b].sum())
                assert idx[b, :40].tolist() == (torch.nonzero(qm[b]).flatten().tolist()
                                                + torch.nonzero(~qm[b]).flatten().tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_key_orders_agree(dtype, monkeypatch):
    """REGHARM_TRITON_KEY_ORDER: the kernels over the kept keys first (the default where there
    is more than one key tile) or in raster order, both held to the reference; removed keys get
    exactly zero gradients."""
    inputs = make_attention_inputs(B=3, L=70, N=200, D=12, E=20, active=0.5, removed=0.5,
                                   dtype=dtype)
    runs = {}
    for mode in ("auto", "raster"):
        monkeypatch.setenv("REGHARM_TRITON_KEY_ORDER", mode)
        runs[mode] = _check_attention(inputs, dtype)
    removed = inputs[3] == float("-inf")
    _, (_, dk, dv) = runs["auto"]
    assert (dk[removed] == 0).all() and (dv[removed] == 0).all()
    monkeypatch.setenv("REGHARM_TRITON_KEY_ORDER", "fast")
    with pytest.raises(ValueError, match="REGHARM_TRITON_KEY_ORDER must be 'auto'"):
        _run_attention("triton", inputs)


@pytest.mark.parametrize("layer", ["ptl", "ltl"])
def test_layers_on_triton_match_reference(layer):
    torch.manual_seed(0)
    C, H, W = 8, 20, 18
    mod = PTL(C, patch=5, stride=3) if layer == "ptl" else LTL(C)
    x = torch.randn(2, C, H, W)
    mask = torch.zeros(2, 1, H, W)
    mask[0, :, 4:12, 3:11] = 1.0
    mask[1, :, 10:, :9] = 0.7          # soft foreground
    results = {}
    for backend in ("reference", "triton"):
        mod.backend = backend
        xi = x.clone().requires_grad_()
        out = mod(xi, mask)
        grads = torch.autograd.grad((out * torch.cos(out)).sum(), [xi] + list(mod.parameters()))
        results[backend] = (out, grads)
    assert_close(results["triton"][0], results["reference"][0], torch.float32)
    for a, e in zip(results["triton"][1], results["reference"][1]):
        assert_close(a, e, torch.float32, grad=True)


def test_unavailable_explains_devices():
    from regharm_ext.ops import triton_backend

    assert triton_backend.unavailable(torch.device("cpu")) is None
    reason = triton_backend.unavailable(torch.device("cuda"))
    assert reason is not None and "TRITON_INTERPRET" in reason
    assert "mps" in triton_backend.unavailable(torch.device("mps"))
    assert os.environ.get("TRITON_INTERPRET") == "1"


def test_launch_integer_helpers_match_triton():
    """The launchers' plain-Python cdiv and next_pow2 (Triton's are slow ConstexprFunctions) give
    Triton's grid sizes and block widths."""
    import triton

    from regharm_ext.ops._triton_util import cdiv, next_pow2
    for n in range(1, 4100):
        assert next_pow2(n) == triton.next_power_of_2(n), n
    for a in range(0, 300):
        for b in (1, 2, 3, 16, 31, 64, 128):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


def test_bfloat16_attention_is_refused_where_the_interpreter_gets_it_wrong():
    """bfloat16 tl.dot is wrong in some interpreters (Triton 3.9's: ~1e10 off); there the
    attention, and PTL/LTL on it, refuse bfloat16 with the reason instead of returning garbage;
    where the probe passes, bfloat16 matches the reference."""
    from regharm_ext.backends import BackendUnavailable
    from regharm_ext.ops._triton_util import BF16_DOT_PROBLEM
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, n, d, generator=g) for n, d in ((5, 4), (3, 4), (3, 2)))
    bias = torch.zeros(1, 3)
    args = [t.bfloat16() for t in (q, k, v)] + [bias]
    m = torch.zeros(1, 1, 8, 8)
    m[..., 2:5, 2:6] = 1
    x = torch.randn(1, 4, 8, 8, generator=g).bfloat16().requires_grad_()
    if BF16_DOT_PROBLEM is None:
        assert_close(masked_attention(*args, backend="triton"),
                     masked_attention(q, k, v, bias, backend="reference"), torch.bfloat16)
        return
    assert "bfloat16 tl.dot" in BF16_DOT_PROBLEM
    for call in (lambda: masked_attention(*args, backend="triton"),
                 lambda: PTL(4, 3, 2, backend="triton").bfloat16()(x, m),
                 lambda: LTL(4, backend="triton").bfloat16()(x, m)):
        with pytest.raises(BackendUnavailable, match="interpreter gets bfloat16 tl.dot wrong"):
            call()
