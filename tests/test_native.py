"""The `native` backend on CPU (csrc/cpu/*, regharm_ext/ops/native.py).

Against `reference` (forward and every gradient, fp32 and bf16), gradcheck in float64, opcheck of
the four ops, degenerate inputs, thread-count determinism, torch.compile of PTL + LTL, argument
errors, and the report when the extension is missing.
"""
import os
import subprocess
import sys

import pytest
import torch

from regharm_ext.backends import resolve
from regharm_ext.ops import masked_attention, native, patch_stats
from helpers import assert_close, check_compiled_matches_eager, make_attention_inputs, make_patch_inputs

REASON = native.unavailable(torch.device("cpu"))
needs_native = pytest.mark.skipif(REASON is not None, reason=f"native: {REASON}")
ops = torch.ops.regharm

PATCH_CASES = {  # name: make_patch_inputs kwargs
    "odd_soft": dict(B=2, C=3, H=37, W=50, patch=(7, 5), stride=(3, 2)),
    "offset100": dict(B=2, C=3, H=37, W=50, patch=(7, 5), stride=(3, 2), offset=100.0),
    "binary": dict(B=1, C=4, H=16, W=16, patch=(4, 4), stride=(4, 4), bg_kind="binary"),
    "no_background": dict(B=2, C=2, H=12, W=12, patch=(4, 4), stride=(2, 2), bg_kind="none"),
    "no_foreground": dict(B=2, C=2, H=12, W=12, patch=(4, 4), stride=(2, 2), bg_kind="all"),
    "wide_patch": dict(B=1, C=5, H=20, W=40, patch=(9, 17), stride=(4, 5), offset=3.0),
    # the CPU kernel sweeps channels in blocks of vectors: 41 = 32 + 8 + 1 (AVX2), 16 + 16 + 4 +
    # 4 + 1 (the baseline's 4 lanes)
    "channel_blocks": dict(B=2, C=41, H=21, W=19, patch=(5, 6), stride=(2, 3), offset=100.0),
    "channels_8": dict(B=2, C=8, H=24, W=24, patch=(8, 8), stride=(4, 4), bg_kind="binary"),
}


def _patch(backend, inputs, patch, stride, dtype=None):
    """Outputs and (x, weight, bias) gradients under fixed random cotangents; ``dtype`` recasts
    the inputs first (the bf16 oracle runs in fp32 on the same rounded values)."""
    x, bg, w, b = (t.detach().to(dtype or t.dtype).clone().requires_grad_(i != 1)
                   for i, t in enumerate(inputs))
    outs = patch_stats(x, bg, w, b, patch, stride, backend=backend)
    g = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs[:3])
    loss.backward()
    return outs, (x.grad, w.grad, b.grad)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PATCH_CASES)
def test_patch_stats_matches_reference(case, dtype):
    kw = dict(PATCH_CASES[case])
    inputs = make_patch_inputs(dtype=dtype, **kw)
    got, got_g = _patch("native", inputs, kw["patch"], kw["stride"])
    want, want_g = _patch("reference", inputs, kw["patch"], kw["stride"], dtype=torch.float32)
    for name, a, e in zip(("mu", "sigma", "content", "mass"), got, want):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, msg=f"native {name}")
    invalid = got[3].float() < 0.5
    for name, a in zip(("mu", "sigma", "content"), got[:3]):
        assert (a[invalid] == 0).all(), f"{name} of invalid patches must be exactly 0"
    for name, a, e in zip(("dx", "dweight", "dbias"), got_g, want_g):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, grad=True, msg=f"native {name}")


ATTN_CASES = {  # name: make_attention_inputs kwargs
    "odd": dict(B=2, L=37, N=23, D=5, E=6),
    "tiles": dict(B=2, L=101, N=150, D=12, E=24, active=0.6, removed=0.2),  # >1 block, >2 tiles
    "all_active": dict(B=2, L=19, N=40, D=16, E=32, active=1.0, removed=0.0, dead_batch=False),
    "none_active": dict(B=2, L=10, N=7, D=4, E=4, active=0.0),
    "mostly_removed": dict(B=3, L=33, N=65, D=8, E=16, removed=0.95),
}


def _attention(backend, inputs, dtype=None, no_mask=False):
    q, k, v = (t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in inputs[:3])
    out = masked_attention(q, k, v, inputs[3], None if no_mask else inputs[4], backend=backend)
    g = torch.Generator().manual_seed(2)
    (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
    return out, (q.grad, k.grad, v.grad)


@needs_native
def test_patch_stats_any_layout_of_x():
    """The CPU kernel reads x channels-last: an NCHW x (copied) or a strided view gives the same
    bits as a channels-last one, forward and backward. The backward op returns a contiguous grad x
    whatever x's layout, as its fake kernel says."""
    x, bg, w, b = make_patch_inputs(B=2, C=13, H=21, W=19, patch=(5, 6), stride=(2, 3))
    wide = torch.randn(2, 26, 21, 19)
    wide[:, ::2] = x
    views = {"contiguous": x, "channels_last": x.contiguous(memory_format=torch.channels_last),
             "strided": wide[:, ::2]}
    got = {name: _patch("native", (v, bg, w, b), (5, 6), (2, 3)) for name, v in views.items()}
    for name, (outs, grads) in got.items():
        for a, e in zip([*outs, *grads], [*got["contiguous"][0], *got["contiguous"][1]]):
            assert torch.equal(a, e), name
    args = (5, 6, 2, 3, 1e-5, 0.5)
    mu, sigma, content, mass = ops.patch_stats(views["channels_last"], bg, w, b, *args)
    gx = ops.patch_stats_backward(mu, sigma, content, views["channels_last"], bg, w, mu, sigma,
                                  mass, *args)[0]
    assert gx.is_contiguous()


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ATTN_CASES)
def test_masked_attention_matches_reference(case, dtype):
    inputs = make_attention_inputs(dtype=dtype, **ATTN_CASES[case])
    got, got_g = _attention("native", inputs)
    want, want_g = _attention("reference", inputs, dtype=torch.float32)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_close(got, want, dtype, msg="native out")
    key_bias, qm = inputs[3], inputs[4]
    dead = ~torch.isfinite(key_bias).any(1)
    assert (got[~qm] == 0).all() and (got[dead] == 0).all()
    for name, a, e in zip(("dq", "dk", "dv"), got_g, want_g):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        assert_close(a, e, dtype, grad=True, msg=f"native {name}")
    assert (got_g[0][~qm] == 0).all(), "inactive queries get no gradient"
    removed = ~torch.isfinite(key_bias)
    assert (got_g[1][removed] == 0).all() and (got_g[2][removed] == 0).all()


@needs_native
def test_masked_attention_without_query_mask():
    inputs = make_attention_inputs(B=2, L=40, N=70, D=8, E=8, dead_batch=True)
    got, got_g = _attention("native", inputs, no_mask=True)
    want, want_g = _attention("reference", inputs, no_mask=True)
    assert_close(got, want, torch.float32)
    for a, e in zip(got_g, want_g):
        assert_close(a, e, torch.float32, grad=True)


@needs_native
def test_gradcheck_float64():
    x, bg, w, b = make_patch_inputs(1, 2, 9, 11, (3, 4), (2, 3), torch.float64, offset=2.0)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    fn = lambda x, w, b: patch_stats(x, bg, w, b, (3, 4), (2, 3), backend="native")[:3]
    assert torch.autograd.gradcheck(fn, (x, w, b))

    q, k, v, kb, qm = make_attention_inputs(B=2, L=40, N=70, D=3, E=4, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    fn = lambda q, k, v: masked_attention(q, k, v, kb, qm, 0.7, backend="native")
    assert torch.autograd.gradcheck(fn, (q, k, v))


@needs_native
def test_opcheck_all_four_ops():
    x, bg, w, b = make_patch_inputs(2, 3, 13, 10, (4, 3), (3, 2))
    args = (4, 3, 3, 2, 1e-5, 0.5)
    grad_args = (x.requires_grad_(), bg, w.requires_grad_(), b.requires_grad_())
    torch.library.opcheck(ops.patch_stats.default, grad_args + args)
    mu, sigma, content, mass = ops.patch_stats(x.detach(), bg, w.detach(), b.detach(), *args)
    g = [torch.randn_like(mu) for _ in range(3)]
    torch.library.opcheck(ops.patch_stats_backward.default,
                          (*g, x.detach(), bg, w.detach(), mu, sigma, mass, *args))

    q, k, v, kb, qm = make_attention_inputs(B=2, L=37, N=70, D=5, E=6)
    for mask in (qm, None):
        torch.library.opcheck(ops.masked_attention.default,
                              (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), kb,
                               mask, 0.5))
    q, k, v = q.detach(), k.detach(), v.detach()
    out, lse = ops.masked_attention(q, k, v, kb, qm, 0.5)
    assert lse.dtype == torch.float32 and torch.isneginf(lse[~qm]).all()
    torch.library.opcheck(ops.masked_attention_backward.default,
                          (torch.randn_like(out), q, k, v, kb, qm, out, lse, 0.5))


def _finite_everywhere(outs, leaves):
    for o in outs:
        assert torch.isfinite(o).all()
    sum(o.float().sum() for o in outs).backward()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all()


@needs_native
@pytest.mark.parametrize("kind", ["constant_x", "mass_at_threshold", "patch_is_image",
                                  "stride_beyond_image", "large_values"])
def test_patch_stats_degenerate(kind):
    x = torch.randn(2, 3, 8, 8)
    bg = torch.ones(2, 1, 8, 8)
    patch, stride = (3, 3), (2, 2)
    if kind == "constant_x":
        x = torch.full_like(x, 4.0)  # sigma = sqrt(eps), content = bias
    elif kind == "mass_at_threshold":
        bg = torch.zeros_like(bg)
        bg[:, :, 0, 0] = 0.5  # exactly min_mass in the first patch, just below elsewhere
        bg[:, :, 7, 7] = 0.4999
    elif kind == "patch_is_image":
        patch = (8, 8)
    elif kind == "stride_beyond_image":
        patch, stride = (5, 2), (9, 20)
    else:
        x = x * 1e4
    x.requires_grad_()
    w = torch.randn(patch[0] * patch[1], requires_grad=True)
    b = torch.randn(1, requires_grad=True)
    outs = patch_stats(x, bg, w, b, patch, stride, backend="native")
    _finite_everywhere(outs[:3], (x, w, b))
    if kind == "constant_x":
        assert torch.allclose(outs[1], torch.full_like(outs[1], 1e-5 ** 0.5))
        assert torch.allclose(outs[2], b.detach().expand_as(outs[2]))


@needs_native
@pytest.mark.parametrize("kind", ["all_removed", "no_active", "single_key", "huge_scores",
                                  "very_negative_bias"])
def test_masked_attention_degenerate(kind):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, n, 4, generator=g) for n in (9, 11, 11))
    kb = torch.zeros(2, 11)
    qm = torch.ones(2, 9, dtype=torch.bool)
    if kind == "all_removed":
        kb.fill_(float("-inf"))
    elif kind == "no_active":
        qm.zero_()
    elif kind == "single_key":
        kb.fill_(float("-inf"))
        kb[:, 3] = 0.0
    elif kind == "huge_scores":
        q, k = q * 300, k * 300
    else:
        kb[:, :5] = -1e30
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = masked_attention(q, k, v, kb, qm, backend="native")
    _finite_everywhere([out], (q, k, v))
    if kind in ("all_removed", "no_active"):
        assert (out == 0).all() and (q.grad == 0).all() and (k.grad == 0).all()
    if kind == "single_key":
        assert torch.allclose(out, v.detach()[:, 3:4].expand_as(out))


@needs_native
def test_results_do_not_depend_on_thread_count():
    x, bg, w, b = make_patch_inputs(2, 4, 30, 31, (6, 5), (2, 3))
    q, k, v, kb, qm = make_attention_inputs(B=2, L=80, N=90, D=8, E=8)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 3):
            torch.set_num_threads(n)
            _, pg = _patch("native", (x, bg, w, b), (6, 5), (2, 3))
            out, ag = _attention("native", (q, k, v, kb, qm))
            results.append([*pg, out, *ag])
    finally:
        torch.set_num_threads(threads)
    for a, e in zip(*results):
        assert torch.equal(a, e)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_masked_attention_any_layout_of_inputs(dtype):
    """The CPU kernels read q, k, v, grad_out and out in place, whatever their strides: LTL's
    tokens (one transposed view of NCHW features as q, k and v), column slices of wider tensors
    and the contiguous copies give the same bits, forward and backward, and the results are
    contiguous (the fake kernels' layout). L = 55 leaves a partial chunk of the blocked gather."""
    B, C, H, W = 2, 21, 5, 11
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(B, C, H, W, generator=g).to(dtype)
    tokens = feats.flatten(2).transpose(1, 2)                     # (B, L, C), strides (., 1, L)
    L = H * W
    key_bias = torch.log1p(-torch.rand(B, L, generator=g).clamp(max=0.9))
    key_bias[:, :9] = float("-inf")
    qm = torch.rand(B, L, generator=g) > 0.4
    grad_wide = torch.randn(B, L, 2 * C, generator=g).to(dtype)
    grad = grad_wide[..., C:]                                     # a slice, as cat's backward gives
    ops = torch.ops.regharm
    dense = tokens.contiguous()
    out, lse = ops.masked_attention(dense, dense, dense, key_bias, qm, 0.25)
    want = ops.masked_attention_backward(grad.contiguous(), dense, dense, dense, key_bias, qm, out,
                                         lse, 0.25)
    assert not tokens.is_contiguous() and not grad.is_contiguous()
    got_out, got_lse = ops.masked_attention(tokens, tokens, tokens, key_bias, qm, 0.25)
    assert torch.equal(got_out, out) and torch.equal(got_lse, lse) and got_out.is_contiguous()
    out_t = torch.empty(B, C, L, dtype=dtype).transpose(1, 2).copy_(out)   # strided out too
    got = ops.masked_attention_backward(grad, tokens, tokens, tokens, key_bias, qm, out_t, lse,
                                        0.25)
    for name, a, e in zip(("dq", "dk", "dv"), got, want):
        assert a.is_contiguous(), name
        assert torch.equal(a, e), name
    assert want[0].abs().sum() > 0 and want[1].abs().sum() > 0


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_backward_in_one_sweep_per_image_gives_the_two_passes_bits(dtype):
    """With two images per thread the CPU backward sweeps each image once (P and dS per tile
    computed once for dQ, dK and dV); one image runs the two passes. Same sums in the same
    order: the same bits, image by image (several key tiles and query blocks, a dead image)."""
    q, k, v, kb, qm = make_attention_inputs(B=4, L=150, N=140, D=20, E=33, dtype=dtype, seed=3)
    ops = torch.ops.regharm
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        out, lse = ops.masked_attention(q, k, v, kb, qm, 0.3)
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(4), dtype=dtype)
        swept = ops.masked_attention_backward(g, q, k, v, kb, qm, out, lse, 0.3)
        for b in range(4):
            one = [t[b:b + 1] for t in (g, q, k, v, kb, qm, out, lse)]
            passes = ops.masked_attention_backward(*one, 0.3)
            for name, s, p in zip(("dq", "dk", "dv"), swept, passes):
                assert torch.equal(s[b:b + 1], p), f"image {b}: {name}"
    finally:
        torch.set_num_threads(threads)
    assert swept[0].abs().sum() > 0 and (swept[1][-1] == 0).all()   # work done; dead image: 0


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux") or
                    "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info(),
                    reason="torch does not run its CPU ops on OpenMP here")
def test_extension_runs_its_loops_on_torchs_openmp():
    """at::parallel_for compiled without -fopenmp runs on the calling thread alone (every CPU
    kernel here did, whatever torch.set_num_threads said); with it, on torch's own libgomp."""
    import shutil

    import regharm_ext._C as ext
    with open(ext.__file__, "rb") as fh:
        assert b"GOMP_parallel" in fh.read(), f"{ext.__file__} was built without OpenMP"
    with open("/proc/self/maps") as fh:
        gomps = {ln.split()[-1] for ln in fh if "libgomp" in ln}
    assert len(gomps) == 1, f"two OpenMP runtimes in one process: {sorted(gomps)}"
    readelf = shutil.which("readelf")
    if readelf is not None:   # a shared runtime, not a private static copy
        dyn = subprocess.run([readelf, "-d", ext.__file__], capture_output=True, text=True).stdout
        assert "[libgomp" in dyn, f"{ext.__file__} does not need a shared libgomp:\n{dyn}"


def _compile_matches_eager(compile_backend):
    # x at 12², masks at 24²: the layers resize the mask inside the compiled graph too
    check_compiled_matches_eager("native", "cpu", compile_backend, C=8, H=12, mask_size=24)


@needs_native
def test_torch_compile_fullgraph_ptl_ltl():
    # aot_eager traces with the fake kernels and the registered autograd, like inductor does,
    # without minutes of C++ code generation
    _compile_matches_eager("aot_eager")


@needs_native
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("REGHARM_SLOW_TESTS") != "1",
                    reason="inductor compiles C++ for minutes on CPU; set REGHARM_SLOW_TESTS=1")
def test_torch_compile_inductor_ptl_ltl():
    _compile_matches_eager("inductor")


@needs_native
def test_native_is_the_default_on_cpu(monkeypatch):
    monkeypatch.delenv("REGHARM_BACKEND", raising=False)
    assert resolve(None, torch.device("cpu")) is native


@needs_native
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="an ELF check: Linux only")
def test_extension_uses_the_shared_libstdcxx():
    """_C must run on the process's libstdc++, not a static copy of its own: a copy's iostreams
    have no locale, so messages with numbers in them crash or come out cut short (seen with the
    GPU image's compiler wrapper; setup.py names the shared library to the linker)."""
    import shutil

    import regharm_ext._C as ext
    readelf = shutil.which("readelf")
    if readelf is None:
        pytest.skip("readelf (binutils) is not installed")
    dyn = subprocess.run([readelf, "-d", ext.__file__], capture_output=True, text=True).stdout
    assert "[libstdc++.so.6]" in dyn, f"{ext.__file__} does not need libstdc++.so.6:\n{dyn}"
    syms = subprocess.run([readelf, "-W", "--dyn-syms", ext.__file__], capture_output=True,
                          text=True).stdout
    own = [ln for ln in syms.splitlines() if "_ZNSt7codecvt" in ln and " UND " not in ln]
    assert not own, f"{ext.__file__} defines libstdc++'s own symbols: {own[:3]}"


@needs_native
def test_kernel_argument_errors_name_the_argument():
    x, bg, w, b = make_patch_inputs(1, 2, 10, 10, (3, 3), (1, 1))
    with pytest.raises(RuntimeError, match="bg must have shape"):
        ops.patch_stats(x, bg[:, :, :5], w, b, 3, 3, 1, 1, 1e-5, 0.5)
    with pytest.raises(RuntimeError, match="weight must have shape"):
        ops.patch_stats(x, bg, w[:4], b, 3, 3, 1, 1, 1e-5, 0.5)
    with pytest.raises(RuntimeError, match="larger than the feature map"):
        ops.patch_stats(x, bg, torch.zeros(121), b, 11, 11, 1, 1, 1e-5, 0.5)
    q, k, v, kb, qm = make_attention_inputs()
    with pytest.raises(RuntimeError, match="k must have shape"):
        ops.masked_attention(q, k[..., :3], v, kb, qm, 1.0)
    with pytest.raises(RuntimeError, match="query_mask must be bool"):
        ops.masked_attention(q, k, v, kb, qm.float(), 1.0)
    with pytest.raises(RuntimeError, match="share a dtype"):
        ops.masked_attention(q, k.double(), v, kb, qm, 1.0)


@pytest.mark.skipif(REASON is None and
                    torch._C._dispatch_has_kernel_for_dispatch_key("regharm::patch_stats", "CUDA"),
                    reason="this build has CUDA kernels")
def test_cuda_reason_without_cuda_kernels():
    reason = native.unavailable(torch.device("cuda"))
    assert reason is not None and "pip install --no-build-isolation" in reason


def test_missing_extension_is_reported_not_raised():
    code = r"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "regharm_ext._C":
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, Block())
import torch, regharm_ext
from regharm_ext.ops import native, patch_stats
reason = native.unavailable(torch.device("cpu"))
assert "blocked by the test" in reason and "pip install --no-build-isolation" in reason, reason
assert regharm_ext.backends("cpu")["native"] == reason
x, bg = torch.randn(1, 2, 6, 6), torch.ones(1, 1, 6, 6)
patch_stats(x, bg, torch.randn(4), torch.zeros(1), 2, 2)  # falls back to another backend
try:
    patch_stats(x, bg, torch.randn(4), torch.zeros(1), 2, 2, backend="native")
except regharm_ext.BackendUnavailable as exc:
    assert "blocked by the test" in str(exc)
else:
    raise AssertionError("backend='native' must raise without the extension")
print("ok")
"""
    env = dict(os.environ, REGHARM_BACKEND="")
    env.pop("REGHARM_BACKEND")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr


@needs_native
def test_float16_matches_reference():
    dtype = torch.float16
    kw = dict(PATCH_CASES["odd_soft"])
    inputs = make_patch_inputs(dtype=dtype, **kw)
    (got, got_g) = _patch("native", inputs, kw["patch"], kw["stride"])
    (want, want_g) = _patch("reference", inputs, kw["patch"], kw["stride"], dtype=torch.float32)
    inputs = make_attention_inputs(dtype=dtype, **ATTN_CASES["tiles"])
    (out, out_g), (ref, ref_g) = _attention("native", inputs), _attention("reference", inputs,
                                                                           torch.float32)
    for a, e in zip([*got, out], [*want, ref]):
        assert a.dtype == dtype
        assert_close(a, e, dtype)
    for a, e in zip([*got_g, *out_g], [*want_g, *ref_g]):
        assert a.dtype == dtype
        assert_close(a, e, dtype, grad=True)


@needs_native
def test_baseline_isa_copy_matches_reference():
    # the kernels are compiled for the baseline ISA and for AVX2+FMA; this CPU runs one of them,
    # REGHARM_CPU_BASELINE=1 makes a fresh process run the baseline one
    tests = os.path.dirname(os.path.abspath(__file__))
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         os.path.join(tests, "test_native.py"),
         "-k", "matches_reference and float32 and (odd or tiles or offset100 or channel)"],
        capture_output=True, text=True, env=dict(os.environ, REGHARM_CPU_BASELINE="1"), cwd=tests)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]


@needs_native
def test_degenerate_shapes_get_defined_outputs_or_a_refusal():
    """No channel: refused by the op itself as by the Python checks (the CUDA kernels sum the
    patch mass with channel 0, so it would be left unwritten); an empty map: the statistics of no
    weight (mu 0, rstd eps^-1/2), which the CUDA glue fills as the CPU kernel computes them."""
    x, bg = torch.randn(2, 0, 6, 6), torch.rand(2, 1, 6, 6)
    with pytest.raises(RuntimeError, match="x must have at least one channel"):
        torch.ops.regharm.patch_stats(x, bg, torch.randn(4), torch.randn(1), 2, 2, 2, 2, 1e-5, 0.5)
    _, mu, rstd = torch.ops.regharm.masked_norm(torch.randn(2, 3, 0, 5), torch.rand(2, 1, 0, 5), 1e-5)
    assert torch.equal(mu, torch.zeros(2, 3))
    torch.testing.assert_close(rstd, torch.full((2, 3), 1e-5 ** -0.5))
