"""Triton kernels compiled for a CUDA GPU against `reference`: larger shapes (several tiles, the
block-size extremes D = 256 and E = 512), float32/float16/bfloat16, float64 gradcheck, memory
that does not grow with the number of patches, and torch.compile(fullgraph=True) of a small
PTL + LTL module. Skipped without a GPU (the interpreter tests are tests/test_triton.py)."""
import pytest
import torch

from helpers import (GPU_ATTN_CASES, assert_close, check_compiled_matches_eager,
                     make_attention_inputs, make_patch_inputs)
from regharm_ext.backends import unavailable_reason
from regharm_ext.ops import masked_attention, patch_stats

if not torch.cuda.is_available():
    REASON = "needs a CUDA GPU"
else:
    REASON = unavailable_reason("triton", "cuda")
pytestmark = [pytest.mark.cuda, pytest.mark.triton,
              pytest.mark.skipif(REASON is not None, reason=str(REASON))]

def _grads(outs, inputs, seed):
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g).to(o.device)).sum() for o in outs)
    return torch.autograd.grad(loss, inputs)


def _both(fn, inputs, grad_idx, seed):
    res = {}
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_(i in grad_idx) for i, t in enumerate(inputs)]
        outs = fn(backend, *leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        res[backend] = outs, _grads(outs, [leaves[i] for i in grad_idx], seed)
    return res["triton"], res["reference"]


PATCH_CASES = {  # (B, C, H, W), patch, stride, offset
    "paper": ((2, 64, 128, 128), (16, 16), (4, 4), 0.0),
    "odd": ((2, 3, 37, 50), (7, 5), (3, 2), 0.0),
    "offset100": ((1, 20, 41, 33), (8, 6), (3, 4), 100.0),
}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# every kernel variant compiles once (~1 s each on the GPU machine): dtypes where they matter
PATCH_RUNS = [("paper", F32), ("paper", F16), ("paper", BF16), ("odd", F32), ("odd", BF16),
              ("offset100", F32)]


@pytest.mark.parametrize("case,dtype", PATCH_RUNS, ids=lambda v: str(v))
def test_patch_stats_cuda(case, dtype):
    shape, patch, stride, offset = PATCH_CASES[case]
    inputs = make_patch_inputs(*shape, patch, stride, dtype, offset=offset, device="cuda")
    fn = lambda backend, x, bg, w, b: patch_stats(x, bg, w, b, patch, stride, backend=backend)
    (got, got_g), (want, want_g) = _both(fn, inputs, (0, 2, 3), seed=1)
    for name, a, e in zip(("mu", "sigma", "content", "mass"), got, want):
        assert a.dtype == dtype and torch.isfinite(a).all()
        assert_close(a, e, dtype, msg=f"{case} {name}")
    for name, a, e in zip(("dx", "dweight", "dbias"), got_g, want_g):
        assert torch.isfinite(a).all()
        assert_close(a, e, dtype, grad=True, msg=f"{case} {name}")


ATTN_CASES = GPU_ATTN_CASES


ATTN_RUNS = [("ptl", F32), ("ptl", F16), ("ptl", BF16), ("ltl", BF16), ("ltl", F32),
             ("wide", BF16), ("wide", F32), ("c128", F16), ("odd", F32), ("odd", BF16),
             ("none_active", F32)]


@pytest.mark.parametrize("case,dtype", ATTN_RUNS, ids=lambda v: str(v))
def test_masked_attention_cuda(case, dtype):
    q, k, v, kb, qm = make_attention_inputs(**ATTN_CASES[case], dtype=dtype, device="cuda")
    fn = lambda backend, q, k, v: masked_attention(q, k, v, kb, qm, backend=backend)
    (got, got_g), (want, want_g) = _both(fn, (q, k, v), (0, 1, 2), seed=2)
    assert got[0].dtype == dtype and torch.isfinite(got[0]).all()
    assert_close(got[0], want[0], dtype, msg=f"{case} out")
    assert (got[0][~qm] == 0).all()
    for name, a, e in zip(("dq", "dk", "dv"), got_g, want_g):
        assert torch.isfinite(a).all(), name
        assert_close(a, e, dtype, grad=True, msg=f"{case} {name}")


def test_masked_attention_no_mask_cuda():
    q, k, v, kb, _ = make_attention_inputs(B=2, L=130, N=70, D=32, E=48, device="cuda")
    fn = lambda backend, q, k, v: masked_attention(q, k, v, kb, None, 0.3, backend=backend)
    (got, got_g), (want, want_g) = _both(fn, (q, k, v), (0, 1, 2), seed=3)
    assert_close(got[0], want[0], torch.float32)
    for a, e in zip(got_g, want_g):
        assert_close(a, e, torch.float32, grad=True)


def test_float32_follows_torch_tf32_flag(monkeypatch):
    """TF32 tensor cores for float32 only when PyTorch's matmul flag allows them."""
    q, k, v, kb, qm = make_attention_inputs(B=2, L=300, N=200, D=64, E=128, device="cuda")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    exact = masked_attention(q, k, v, kb, qm, backend="triton")
    # the reference's own matmuls follow the flag too: computed before TF32 is allowed
    want = masked_attention(q, k, v, kb, qm, backend="reference")
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    fast = masked_attention(q, k, v, kb, qm, backend="triton")
    torch.testing.assert_close(fast, want, atol=1e-2, rtol=1e-2)
    assert_close(exact, want, torch.float32)


def test_gradcheck_float64_cuda():
    x, bg, w, b = make_patch_inputs(1, 2, 9, 8, (3, 4), (2, 3), torch.float64, device="cuda")
    fn = lambda x, w, b: patch_stats(x, bg, w, b, (3, 4), (2, 3), backend="triton")[:3]
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x, w, b)))
    q, k, v, kb, qm = make_attention_inputs(B=2, L=20, N=18, D=3, E=2, dtype=torch.float64,
                                            device="cuda")
    fn = lambda q, k, v: masked_attention(q, k, v, kb, qm, backend="triton")
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (q, k, v)))


def test_patch_stats_memory_does_not_grow_with_patches():
    """Stride 1 at 128² gives K = 12769 patches of 16x16: the blocks would be 3.3 GB; the
    kernels' extra memory is a few outputs of (B, K, C) float32."""
    B, C, H = 1, 64, 128
    x, bg, w, b = make_patch_inputs(B, C, H, H, (16, 16), (1, 1), device="cuda")
    x.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    outs = patch_stats(x, bg, w.requires_grad_(), b.requires_grad_(), 16, 1, backend="triton")
    sum(o.sum() for o in outs[:3]).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    K = (H - 15) ** 2
    assert extra < 12 * B * K * C * 4 + 4 * x.numel() * 4, extra / 2**20


def test_compiled_module_matches_eager():
    check_compiled_matches_eager("triton", "cuda")
