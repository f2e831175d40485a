"""masked_norm (PTL's foreground content, regharm_ext/ops/norm_composite.py) on the kernel
backends against the composite of torch ops computed in float64: forward and gradient per dtype,
odd shapes, +100 offsets, an image without weight, strided x; gradcheck, opcheck, bad input.
Runs every backend this machine can run (on CPU: `native`'s C++ kernel and `triton` in the
interpreter; with a GPU, the CUDA kernels and compiled Triton kernels too)."""
import pytest
import torch

from regharm_ext.backends import unavailable_reason
from regharm_ext.ops import masked_norm
from regharm_ext.ops.norm_composite import composite
from helpers import NORM_CASES, assert_close, make_norm_inputs

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
RUNS = [(b, d) for d in DEVICES for b in ("native", "triton")]


def _skip(backend, device):
    reason = unavailable_reason(backend, device)
    if reason:
        pytest.skip(f"{backend} on {device}: {reason}")


def _expected(x, w, eps, grad):
    """y and dx of the composite in float64 (the truth every dtype is held to)."""
    xd = x.detach().double().requires_grad_()
    y = composite(xd, w.double(), eps)
    (dx,) = torch.autograd.grad(y, xd, grad.double())
    return y, dx


@pytest.mark.parametrize("backend, device", RUNS)
@pytest.mark.parametrize("case", sorted(NORM_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_masked_norm_matches_the_composite(backend, device, case, dtype):
    _skip(backend, device)
    shape, offset, kind = NORM_CASES[case]
    x, w = make_norm_inputs(*shape, dtype=dtype, offset=offset, kind=kind, device=device)
    x.requires_grad_()
    y = masked_norm(x, w, 1e-5, backend=backend)
    assert y.shape == (shape[0], shape[2] * shape[3], shape[1]) and y.dtype == dtype
    assert y.is_contiguous()
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    (dx,) = torch.autograd.grad(y, x, grad.to(device, dtype))
    y_ref, dx_ref = _expected(x, w, 1e-5, grad.to(device))
    assert_close(y, y_ref, dtype, msg=f"{backend} {case} y")
    assert_close(dx, dx_ref, dtype, grad=True, msg=f"{backend} {case} dx")
    if shape[0] > 1:  # no weight: mu = var = 0, y = x / sqrt(eps)
        assert torch.isfinite(y[1]).all() and torch.isfinite(dx[1]).all()


@pytest.mark.parametrize("backend, device", RUNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_masked_norm_backward_counts_every_split(backend, device, dtype):
    """A gradient whose mean grows along the positions makes Σg and Σg·y most of dx, and
    differently in each split of the positions that the kernels sum separately (zero-mean noise
    leaves them within float32's tolerance at this size)."""
    _skip(backend, device)
    shape, offset, kind = NORM_CASES["splits"]
    x, w = make_norm_inputs(*shape, dtype=dtype, offset=offset, kind=kind, device=device)
    x.requires_grad_()
    y = masked_norm(x, w, 1e-5, backend=backend)
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    grad = grad + 3.0 * torch.linspace(0, 2, y.shape[1], dtype=torch.float64)[:, None]
    (dx,) = torch.autograd.grad(y, x, grad.to(device, dtype))
    _, dx_ref = _expected(x, w, 1e-5, grad.to(device))
    assert_close(dx, dx_ref, dtype, grad=True, msg=f"{backend} dx")


@pytest.mark.parametrize("backend, device", RUNS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_masked_norm_with_a_subnormal_weight_stays_finite(backend, device, dtype, layout):
    """Σ weight = 1e-40 (float32) or 1e-310 (float64): 1 / Σ overflows to inf and inf times a
    zero weight is NaN; like the composite's clamp_min(tiny), the kernels count it as tiny."""
    _skip(backend, device)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=dtype).to(device, memory_format=layout)
    w = torch.zeros(2, 1, 4, 5, dtype=dtype, device=device)
    w[0, 0, 1, 2] = 1e-40 if dtype == torch.float32 else 1e-310
    w[1] = 0.5
    x.requires_grad_()
    y = masked_norm(x, w, 1e-5, backend=backend)
    grad = torch.randn(y.shape, generator=g, dtype=dtype).to(device)
    (dx,) = torch.autograd.grad(y, x, grad)
    assert torch.isfinite(y).all() and torch.isfinite(dx).all()
    xd = x.detach().clone().requires_grad_()
    y_ref = composite(xd, w, 1e-5)   # in the same dtype: float64 would not see a subnormal
    (dx_ref,) = torch.autograd.grad(y_ref, xd, grad)
    assert_close(y, y_ref, dtype, msg=f"{backend} y")
    assert_close(dx, dx_ref, dtype, grad=True, msg=f"{backend} dx")


@pytest.mark.parametrize("backend, device", RUNS)
def test_masked_norm_reads_strided_x(backend, device):
    _skip(backend, device)
    x, w = make_norm_inputs(2, 6, 8, 10, device=device)
    xt = x.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
    torch.testing.assert_close(masked_norm(xt, w, backend=backend), masked_norm(x, w, backend=backend))


@pytest.mark.parametrize("backend, device", RUNS)
def test_masked_norm_gradcheck_float64(backend, device):
    _skip(backend, device)
    x, w = make_norm_inputs(2, 3, 5, 4, dtype=torch.float64, device=device)
    assert torch.autograd.gradcheck(lambda t: masked_norm(t, w, backend=backend),
                                    (x.requires_grad_(),))


@pytest.mark.parametrize("device", DEVICES)
def test_masked_norm_opcheck(device):
    _skip("native", device)
    x, w = make_norm_inputs(2, 3, 5, 4, device=device)
    ops = torch.ops.regharm
    torch.library.opcheck(ops.masked_norm.default, (x.requires_grad_(), w, 1e-5))
    y, mu, rstd = ops.masked_norm(x, w, 1e-5)
    torch.library.opcheck(ops.masked_norm_backward.default, (torch.randn_like(y), x.detach(), w, mu, rstd))


def test_masked_norm_learned_weight_takes_the_composite():
    """A weight that needs a gradient gets one (the kernels treat weight as data)."""
    x, w = make_norm_inputs(2, 3, 5, 4, dtype=torch.float64)
    w.requires_grad_()
    y = masked_norm(x, w, backend="native" if not unavailable_reason("native", "cpu") else "torch")
    (gw,) = torch.autograd.grad(y.square().sum(), w)
    assert gw.abs().sum() > 0


def test_masked_norm_bad_input_names_the_argument():
    x, w = make_norm_inputs(2, 3, 5, 4)
    with pytest.raises(ValueError, match=r"weight must have shape \(B, 1, H, W\) = \(2, 1, 5, 4\)"):
        masked_norm(x, w[:, :, :4])
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, H, W\)"):
        masked_norm(x[0], w)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        masked_norm(x, w > 0)
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        masked_norm(x, w, 0.0)


def test_environment_switch_runs_the_composite(monkeypatch):
    """REGHARM_MASKED_NORM=composite (the benchmarks' before/after rows) bypasses the kernels."""
    backend = "native" if not unavailable_reason("native", "cpu") else "torch"
    x, w = make_norm_inputs(2, 3, 5, 4)
    x.requires_grad_()
    monkeypatch.setenv("REGHARM_MASKED_NORM", "composite")
    assert type(masked_norm(x, w, backend=backend).grad_fn).__name__ == "CompositeNormBackward"
    monkeypatch.delenv("REGHARM_MASKED_NORM")
    if backend == "native":
        assert "CompositeNorm" not in type(masked_norm(x, w, backend=backend).grad_fn).__name__


@pytest.mark.parametrize("case", sorted(NORM_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_native_cpu_reads_channels_last_x(case, dtype):
    """The CPU kernel reads a channels-last x in place (the model's CPU layout): against the
    float64 composite like NCHW x, the same values as NCHW x, and dx contiguous as the fake says."""
    _skip("native", "cpu")
    shape, offset, kind = NORM_CASES[case]
    x, w = make_norm_inputs(*shape, dtype=dtype, offset=offset, kind=kind)
    grad = torch.randn(shape[0], shape[2] * shape[3], shape[1],
                       generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        xl = x.contiguous(memory_format=layout).requires_grad_()
        y = masked_norm(xl, w, 1e-5, backend="native")
        (dx,) = torch.autograd.grad(y, xl, grad.to(dtype))
        outs[layout] = (y, dx)
    y, dx = outs[torch.channels_last]
    y_ref, dx_ref = _expected(x, w, 1e-5, grad)
    assert_close(y, y_ref, dtype, msg=f"{case} y")
    assert_close(dx, dx_ref, dtype, grad=True, msg=f"{case} dx")
    for got, want in zip(outs[torch.channels_last], outs[torch.contiguous_format]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    ops = torch.ops.regharm
    xl = x.contiguous(memory_format=torch.channels_last)
    y, mu, rstd = ops.masked_norm(xl, w, 1e-5)
    assert ops.masked_norm_backward(torch.randn_like(y), xl, w, mu, rstd).is_contiguous()


def test_native_cpu_channels_last_gradcheck_and_opcheck():
    _skip("native", "cpu")
    x, w = make_norm_inputs(2, 19, 5, 4, dtype=torch.float64)   # a full block of 16 and a tail
    xl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: masked_norm(t, w, backend="native"), (xl,))
    ops = torch.ops.regharm
    xf = xl.detach().float()
    torch.library.opcheck(ops.masked_norm.default, (xf.clone().requires_grad_(), w.float(), 1e-5))
    y, mu, rstd = ops.masked_norm(xf, w.float(), 1e-5)
    torch.library.opcheck(ops.masked_norm_backward.default, (torch.randn_like(y), xf, w.float(), mu, rstd))
