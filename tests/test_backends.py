"""Every CPU backend against `reference`: forward and every gradient, on the SPEC's hard cases.

Triton has its own file (it needs the interpreter); CUDA tests live in *_cuda*.py files.
"""
import contextlib
import os
import subprocess
import sys

import pytest
import torch

import regharm_ext
from regharm_ext.backends import BackendUnavailable, unavailable_reason
from regharm_ext.layers import masked_instance_norm
from regharm_ext.ops import masked_attention, patch_stats
from helpers import (EDGE_ATTN_CASES, EDGE_PATCH_CASES, assert_close, check_compiled_matches_eager,
                     make_attention_inputs, make_patch_inputs)

FAST = [pytest.param(n, marks=pytest.mark.skipif(unavailable_reason(n, "cpu") is not None,
                                                  reason=f"{n}: {unavailable_reason(n, 'cpu')}"))
        for n in ("torch", "native")]
DTYPES = [torch.float32, torch.bfloat16]

PATCH_CASES = EDGE_PATCH_CASES


def _run_patch(backend, inputs, patch, stride):
    x, bg, w, b = (t.detach().clone().requires_grad_(i != 1) for i, t in enumerate(inputs))
    outs = patch_stats(x, bg, w, b, patch, stride, backend=backend)
    # random cotangents so every output and every gradient path is exercised
    g = torch.Generator().manual_seed(1)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs[:3])
    loss.backward()
    return outs, (x.grad, w.grad, b.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PATCH_CASES)
@pytest.mark.parametrize("backend", FAST)
def test_patch_stats_matches_reference(backend, case, dtype):
    shape, patch, stride, offset, kind = PATCH_CASES[case]
    inputs = make_patch_inputs(*shape, patch, stride, dtype, offset=offset, bg_kind=kind)
    got, got_g = _run_patch(backend, inputs, patch, stride)
    want, want_g = _run_patch("reference", inputs, patch, stride)
    for name, a, e in zip(("mu", "sigma", "content", "mass"), got, want):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert_close(a, e, dtype, msg=f"{backend} {name}")
    for name, a, e in zip(("dx", "dweight", "dbias"), got_g, want_g):
        assert torch.isfinite(a).all()
        assert_close(a, e, dtype, grad=True, msg=f"{backend} {name}")


ATTN_CASES = EDGE_ATTN_CASES


def _run_attention(backend, inputs, scale=None):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in inputs[:3])
    out = masked_attention(q, k, v, inputs[3], inputs[4], scale, backend=backend)
    g = torch.Generator().manual_seed(2)
    (out.float() * torch.randn(out.shape, generator=g)).sum().backward()
    return out, (q.grad, k.grad, v.grad)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ATTN_CASES)
@pytest.mark.parametrize("backend", FAST)
def test_masked_attention_matches_reference(backend, case, dtype):
    inputs = make_attention_inputs(**ATTN_CASES[case], dtype=dtype)
    got, got_g = _run_attention(backend, inputs)
    want, want_g = _run_attention("reference", inputs)
    assert got.dtype == dtype and torch.isfinite(got).all()
    assert_close(got, want, dtype, msg=f"{backend} out")
    qm = inputs[4]
    assert (got[~qm] == 0).all(), "inactive queries must give exactly 0"
    for name, a, e in zip(("dq", "dk", "dv"), got_g, want_g):
        assert torch.isfinite(a).all()
        assert_close(a, e, dtype, grad=True, msg=f"{backend} {name}")
    assert (got_g[0][~qm] == 0).all()


def test_attention_without_query_mask_and_custom_scale():
    inputs = list(make_attention_inputs(B=2, L=12, N=9, D=4, E=3))
    inputs[4] = None
    want, _ = _run_attention("reference", inputs, scale=1.0)
    for backend in ("torch", "native"):
        if unavailable_reason(backend, "cpu") is None:
            got, _ = _run_attention(backend, inputs, scale=1.0)
            assert_close(got, want, torch.float32, msg=backend)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_gradcheck_float64(backend):
    x, bg, w, b = make_patch_inputs(1, 2, 9, 8, (3, 4), (2, 3), torch.float64)
    fn = lambda x, w, b: patch_stats(x, bg, w, b, (3, 4), (2, 3), backend=backend)[:3]
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, w, b)))
    q, k, v, kb, qm = make_attention_inputs(B=2, L=7, N=6, D=3, E=2, dtype=torch.float64)
    fn = lambda q, k, v: masked_attention(q, k, v, kb, qm, backend=backend)
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v)))


def test_backends_lists_every_backend_with_reason():
    listing = regharm_ext.backends("cpu")
    assert set(listing) == {"reference", "torch", "native", "triton"}
    assert listing["reference"] == listing["torch"] == "available"
    for name, status in listing.items():
        assert status == "available" or len(status) > 10, (name, status)


def test_env_override_and_unknown_backend(monkeypatch):
    q, k, v, kb, qm = make_attention_inputs(B=1, L=4, N=3, D=2, E=2)
    monkeypatch.setenv("REGHARM_BACKEND", "reference")
    masked_attention(q, k, v, kb, qm)
    monkeypatch.setenv("REGHARM_BACKEND", "nonsense")
    with pytest.raises(BackendUnavailable, match="REGHARM_BACKEND='nonsense'"):
        masked_attention(q, k, v, kb, qm)
    monkeypatch.delenv("REGHARM_BACKEND")
    with pytest.raises(BackendUnavailable, match="unknown backend"):
        masked_attention(q, k, v, kb, qm, backend="cudnn")


def _fresh_python(code):
    """Runs ``code`` in a new interpreter (which modules are imported is per process), with the
    default backend choice of a CPU machine."""
    env = {k: v for k, v in os.environ.items() if k != "REGHARM_BACKEND"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_layers_import_their_backend_before_torch_compile_traces():
    """Dynamo cannot trace an import: a layer built with backend="triton" imports it when it is
    built, so that a model compiled before any eager call compiles with fullgraph=True; the
    default choice on a CPU machine imports no Triton."""
    out = _fresh_python(
        "import sys; from regharm_ext import LTL, PTL\n"
        "m = 'regharm_ext.ops.triton_backend'\n"
        "PTL(8); LTL(8); print(m in sys.modules)\n"
        "PTL(8, backend='triton'); print(m in sys.modules)\n")
    assert out.split() == ["False", "True"]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_torch_compile_fullgraph_ptl_ltl(backend):
    """The pure-PyTorch backends compile with fullgraph=True too (the fallback where the
    extension is not built); `torch` gathers the active queries only when not compiled."""
    check_compiled_matches_eager(backend, "cpu", "aot_eager", C=8, H=12, mask_size=24)


@pytest.mark.parametrize("backend", ["torch", "reference", "native"])
def test_torch_compile_channels_last_and_dynamic(backend):
    """channels_last x (the model's CPU layout) and dynamic=True (eps, min_mass and the scale
    traced as symbols) compile with fullgraph=True too, and agree with eager."""
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")
    check_compiled_matches_eager(backend, "cpu", "aot_eager", C=8, H=12, channels_last=True)
    check_compiled_matches_eager(backend, "cpu", "aot_eager", C=8, H=12, dynamic=True)


def test_masked_instance_norm_compiles_on_channels_last():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 6, 5).contiguous(memory_format=torch.channels_last)
    w = torch.rand(2, 1, 6, 5)
    grads = []
    for fn in (torch.compile(masked_instance_norm, fullgraph=True, backend="aot_eager"),
               masked_instance_norm):
        xi = x.clone().requires_grad_()
        grads.append(torch.autograd.grad((fn(xi, w) ** 2).sum(), xi)[0])
    assert_close(grads[0], grads[1], torch.float32, grad=True)


def test_backend_first_needed_inside_compile_says_what_to_do():
    """An op whose backend module is not imported yet, first called inside torch.compile, fails
    with the fix in words instead of dynamo's 'importlib is skipped'; eager calls still import."""
    out = _fresh_python(
        "import sys, torch\n"
        "from regharm_ext.ops import patch_stats\n"
        "del sys.modules['regharm_ext.ops.reference']\n"
        "f = lambda x, bg, w, b: patch_stats(x, bg, w, b, 4, 2, backend='reference')[0]\n"
        "args = (torch.randn(1, 2, 8, 8), torch.ones(1, 1, 8, 8), torch.ones(16), torch.zeros(1))\n"
        "try:\n"
        "    torch.compile(f, fullgraph=True, backend='eager')(*args)\n"
        "except Exception as e:\n"
        "    print('preload' in str(e) and 'inside torch.compile' in str(e))\n"
        "print(f(*args).shape == (1, 9, 2))\n")
    assert out.split() == ["True", "True"]


BAD_PATCH = [
    (dict(x=torch.zeros(3, 8, 8)), ValueError, r"x must have shape \(B, C, H, W\)"),
    (dict(bg=torch.zeros(2, 1, 8, 7)), ValueError, r"bg must have shape"),
    (dict(bg=torch.zeros(1, 1, 8, 8)), ValueError, r"bg must have shape"),
    (dict(patch_size=9), ValueError, r"patch_size \(9, 9\) is larger than the feature map \(8, 8\)"),
    (dict(x=torch.zeros(2, 3, 8, 8, dtype=torch.int64)), TypeError, r"x must be a floating-point"),
    (dict(weight=torch.zeros(5)), ValueError, r"weight must have shape"),
    (dict(stride=(1, 0)), ValueError, r"stride must be >= 1"),
    (dict(patch_size="4"), TypeError, r"patch_size must be an int"),
    (dict(min_mass=0.0), ValueError, r"min_mass must be a finite number > 0"),
]


@pytest.mark.parametrize("bad,exc,match", BAD_PATCH)
def test_patch_stats_rejects_bad_arguments(bad, exc, match):
    args = dict(x=torch.zeros(2, 3, 8, 8), bg=torch.ones(2, 1, 8, 8), weight=torch.zeros(16),
                bias=torch.zeros(1), patch_size=4, stride=2, min_mass=0.5)
    args.update(bad)
    with pytest.raises(exc, match=match):
        patch_stats(**args)


BAD_ATTN = [
    (dict(q=torch.zeros(4, 3)), ValueError, r"q must have shape \(B, L, D\)"),
    (dict(k=torch.zeros(2, 5, 4)), ValueError, r"k must have shape"),
    (dict(k=torch.zeros(3, 5, 3)), ValueError, r"k must have shape"),
    (dict(v=torch.zeros(2, 6, 2)), ValueError, r"v must have shape"),
    (dict(key_bias=torch.zeros(2, 4)), ValueError, r"key_bias must have shape \(B, N\) = \(2, 5\)"),
    (dict(query_mask=torch.ones(2, 4)), TypeError, r"query_mask must be a bool tensor"),
    (dict(query_mask=torch.ones(2, 3, dtype=torch.bool)), ValueError, r"query_mask must have shape"),
    (dict(q=torch.zeros(2, 4, 3, dtype=torch.int32)), TypeError, r"q must be a floating-point"),
    (dict(v=torch.zeros(2, 5, 2, dtype=torch.float64)), TypeError, r"share a dtype"),
]


@pytest.mark.parametrize("bad,exc,match", BAD_ATTN)
def test_masked_attention_rejects_bad_arguments(bad, exc, match):
    args = dict(q=torch.zeros(2, 4, 3), k=torch.zeros(2, 5, 3), v=torch.zeros(2, 5, 2),
                key_bias=torch.zeros(2, 5), query_mask=None)
    args.update(bad)
    with pytest.raises(exc, match=match):
        masked_attention(**args)


@pytest.mark.parametrize("backend", ["reference"] + FAST)
def test_key_bias_dtype_may_differ_from_q(backend):
    q, k, v, kb, qm = make_attention_inputs(B=2, L=9, N=7, D=4, E=3, dtype=torch.float16)
    want = masked_attention(q.float(), k.float(), v.float(), kb.float(), qm, backend="reference")
    got = masked_attention(q, k, v, kb.double(), qm, backend=backend)
    assert got.dtype == torch.float16
    assert_close(got, want, torch.float16, msg=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_torch_backend_attention_never_takes_sdpas_math_kernel(dtype):
    """SPEC §3: the L x N scores are never materialized. With SDPA's math kernel (the one that
    materializes them) switched off, the `torch` backend still runs LTL's (E = D), PTL's
    (E = 2D) and an E < D attention, forward and backward, and matches `reference`; removed keys
    and inactive queries included (3-d inputs used to fall back to the math kernel)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    for D, E in ((8, 8), (8, 16), (16, 8)):
        inputs = make_attention_inputs(B=3, L=37, N=23, D=D, E=E, dtype=dtype, removed=0.4)
        q, k, v, kb, qm = inputs
        got = []
        for backend in ("torch", "reference"):
            leaves = [t.clone().requires_grad_() for t in (q, k, v)]
            fused = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
            with sdpa_kernel(fused) if backend == "torch" else contextlib.nullcontext():
                out = masked_attention(*leaves, kb, qm, backend=backend)
                (out * torch.arange(out.numel()).view_as(out).sin().to(dtype)).sum().backward()
            got.append([out.detach()] + [t.grad for t in leaves])
        for name, a, e in zip(("out", "dq", "dk", "dv"), *got):
            assert_close(a, e, dtype, grad=name != "out", msg=f"D={D} E={E} {name}")
