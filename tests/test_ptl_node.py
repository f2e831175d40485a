"""PTL as one autograd node on the kernel backends (regharm_ext/ptl_node.py): where it is taken,
that it gives the unfused layer's outputs and gradients, and that it keeps autograd's guarantees
(in-place checks, saved-tensor hooks, no second derivative)."""
import pytest
import torch
import torch.utils.checkpoint

from regharm_ext import PTL
from regharm_ext.backends import unavailable_reason
from regharm_ext.ptl_node import ENV

KERNEL_BACKENDS = ["native", "triton"]


def _skip(backend):
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)


def _inputs(dtype=torch.float32, B=3, C=5, H=15, W=13, seed=0):
    """x and a mask with a hard foreground, a soft one and (last image) no background at all,
    so that one image has no valid patch and passes through."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g).to(dtype)
    mask = torch.zeros(B, 1, H, W)
    mask[0, :, 3:9, 2:8] = 1.0
    mask[1, :, 5:12, 4:11] = torch.rand(7, 7, generator=g) * 0.5 + 0.5
    mask[-1] = 1.0
    return x, mask.to(dtype)


def _node_name(out):
    return type(out.grad_fn).__name__ if out.grad_fn is not None else None


def _run(ptl, x, mask, grad, monkeypatch, node: bool):
    monkeypatch.setenv(ENV, "1" if node else "0")
    xi = x.clone().requires_grad_()
    out = ptl(xi, mask)
    params = [p for p in (ptl.weight, ptl.bias) if p.requires_grad]
    grads = torch.autograd.grad(out, [xi] + params, grad)
    return _node_name(out), [out] + list(grads)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ptl_runs_as_one_node_only_where_it_applies(backend, monkeypatch):
    _skip(backend)
    x, mask = _inputs()
    ptl = PTL(5, patch=(4, 3), stride=(2, 3), backend=backend)
    xr = x.clone().requires_grad_()
    assert _node_name(ptl(xr, mask)) == "PTLNodeBackward"
    assert _node_name(ptl(x, mask)) == "PTLNodeBackward"  # the parameters still learn
    monkeypatch.setenv(ENV, "0")
    assert _node_name(ptl(xr, mask)) == "BlendBackward"
    monkeypatch.delenv(ENV)
    monkeypatch.setenv("REGHARM_MASKED_NORM", "composite")  # the benchmarks' before/after rows
    assert _node_name(ptl(xr, mask)) == "BlendBackward"
    monkeypatch.delenv("REGHARM_MASKED_NORM")
    assert _node_name(ptl(xr, mask.clone().requires_grad_())) .startswith("LerpBackward")  # a learnt mask
    with torch.no_grad():
        assert ptl(xr, mask).grad_fn is None
    for other in ("reference", "torch"):
        assert _node_name(PTL(5, patch=(4, 3), stride=(2, 3), backend=other)(xr, mask)) == "BlendBackward"


def _cases(backend):
    dtypes = [torch.float32, torch.float64]
    if backend == "native":  # the interpreter has no bfloat16 arithmetic
        dtypes.append(torch.bfloat16)
    return dtypes


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ptl_node_gives_the_unfused_outputs_and_gradients(backend, monkeypatch):
    """Odd sizes, a soft foreground, an image without a valid patch, +100 offsets, fractional
    patch sizes (weights sized on the first call), and the parameters alone learning."""
    _skip(backend)
    for dtype in _cases(backend):
        for offset, patch, stride, x_learns in ((0.0, (4, 3), (2, 3), True),
                                                (100.0, 0.3, 0.2, True),
                                                (0.0, (5, 4), (3, 2), False)):
            x, mask = _inputs(dtype)
            x = x + offset
            ptl = PTL(5, patch=patch, stride=stride, backend=backend)
            ptl(x[:1], mask[:1])  # sizes a fractional patch's weights
            ptl = ptl.to(dtype)
            torch.nn.init.normal_(ptl.bias)
            grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
            if not x_learns:
                monkeypatch.setenv(ENV, "1")
                out = ptl(x, mask)
                assert _node_name(out) == "PTLNodeBackward"
                got = [out] + list(torch.autograd.grad(out, (ptl.weight, ptl.bias), grad))
                monkeypatch.setenv(ENV, "0")
                out = ptl(x, mask)
                want = [out] + list(torch.autograd.grad(out, (ptl.weight, ptl.bias), grad))
            else:
                name, got = _run(ptl, x, mask, grad, monkeypatch, node=True)
                assert name == "PTLNodeBackward"
                _, want = _run(ptl, x, mask, grad, monkeypatch, node=False)
            assert torch.equal(got[0][-1], x[-1]), "an image without a valid patch passes through"
            assert torch.equal(got[0], want[0]), "the forward runs the same kernels"
            # the gradients too, but x's three terms are added in another order: a few roundings
            tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-6
            for i, (a, b) in enumerate(zip(got[1:], want[1:])):
                scale = float(b.abs().max())
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale,
                                           msg=f"{dtype} patch {patch}: gradient {i}")


def test_ptl_node_gradcheck_float64():
    _skip("native")
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 8, 7, generator=g, dtype=torch.float64)
    m = torch.zeros(2, 1, 8, 7, dtype=torch.float64)
    m[0, :, 1:4, 2:6] = 1.0
    m[1, :, 3:7, 0:3] = torch.rand(4, 3, generator=g, dtype=torch.float64)  # soft
    ptl = PTL(3, patch=4, stride=2, backend="native").double()

    def fn(t, weight, bias):
        out = torch.func.functional_call(ptl, {"weight": weight, "bias": bias}, (t, m))
        assert _node_name(out) == "PTLNodeBackward"
        return out

    params = (ptl.weight.detach().clone(), ptl.bias.detach().clone())
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x,) + params))


def test_ptl_node_keeps_autograd_guarantees():
    _skip("native")
    x, mask = _inputs()
    ptl = PTL(5, patch=(4, 3), stride=(2, 3), backend="native")
    # x modified in place after the forward: the backward would use the new values
    xr = x.clone().requires_grad_()
    xi = xr * 1.0
    out = ptl(xi, mask)
    xi.add_(1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    # every tensor the node keeps goes through saved-tensor hooks (offloading, checkpointing)
    packed = []

    def pack(t):
        packed.append(t)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = ptl(xr, mask)
    assert _node_name(out) == "PTLNodeBackward" and len(packed) >= 10
    (gx,) = torch.autograd.grad(out, xr, torch.ones_like(out))
    (want,) = torch.autograd.grad(ptl(xr, mask), xr, torch.ones_like(out))
    torch.testing.assert_close(gx, want)
    # retain_graph: the node gives its saved tensors back to its steps on every backward
    out = ptl(xr, mask)
    first = torch.autograd.grad(out, xr, torch.ones_like(out), retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(out, xr, torch.ones_like(out))[0], first, rtol=0, atol=0)
    # activation checkpointing (saved-tensor hooks underneath) recomputes the node: same gradient
    out = torch.utils.checkpoint.checkpoint(ptl, xr, mask, use_reentrant=False)
    (gc,) = torch.autograd.grad(out, xr, torch.ones_like(out))
    torch.testing.assert_close(gc, want)
    # no second derivative: a second backward raises instead of returning zeros
    (g,) = torch.autograd.grad((ptl(xr, mask) ** 3).sum(), xr, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        g.sum().backward()


def test_ptl_node_peaks_lower_than_the_unfused_layer(monkeypatch):
    """The node keeps every saved tensor to the end of its backward, and its output gradient
    (a real tensor in training, as here), where the unfused graph freed each op's share after
    its backward; it adds the blend's terms of dx and dC_f late instead, and so peaks at least
    one x-size lower. Measured with the benchmarks' CPU tracker of tensor storages."""
    _skip("native")
    from test_bench_report import benchlib

    x, mask = _inputs(B=2, C=16, H=48, W=40)
    x.requires_grad_()
    ptl = PTL(16, patch=8, stride=4, backend="native")
    grad = torch.randn(x.shape)
    peaks = {}
    for flag in ("1", "0"):
        monkeypatch.setenv(ENV, flag)

        def fwd_bwd():
            ptl(x, mask).backward(grad.clone())
            x.grad = None

        peaks[flag] = benchlib.peak_memory(fwd_bwd, torch.device("cpu"))
    assert peaks["1"] <= peaks["0"] - x.numel() * x.element_size(), peaks


def _cuda_skip(backend):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    reason = unavailable_reason(backend, torch.device("cuda"))
    if reason:
        pytest.skip(reason)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_ptl_node_on_cuda_gives_the_unfused_results_and_memory(backend, dtype, monkeypatch):
    """On the GPU the same: outputs equal, gradients up to the order of x's three terms, and the
    peak of live tensor storages no higher (the output gradient is a real tensor, as in training;
    counted by the benchmarks' tracker: the caching allocator's statistics count whole cached
    blocks, up to 1 MB more than a tensor asks for, which would drown a difference of one x)."""
    _cuda_skip(backend)
    from test_bench_report import benchlib

    x, mask = _inputs(dtype, B=2, C=32, H=64, W=56)
    x, mask = x.cuda(), mask.cuda()
    ptl = PTL(32, patch=8, stride=4, backend=backend).cuda().to(dtype)
    grad = torch.randn(x.shape, device="cuda").to(dtype)
    results, peaks = {}, {}
    for flag in ("1", "0"):
        name, results[flag] = _run(ptl, x, mask, grad, monkeypatch, node=flag == "1")
        assert name == ("PTLNodeBackward" if flag == "1" else "BlendBackward")
        with benchlib.TensorMemoryTracker() as tracker:
            _run(ptl, x, mask, grad, monkeypatch, node=flag == "1")
        peaks[flag] = tracker.peak
    got, want = results["1"], results["0"]
    assert torch.equal(got[0], want[0])
    tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
    for i, (a, b) in enumerate(zip(got[1:], want[1:])):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()), msg=f"gradient {i}")
    assert peaks["1"] <= peaks["0"], peaks
