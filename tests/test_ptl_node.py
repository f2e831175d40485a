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


def _node(backend):
    """The node a kernel backend's PTL runs by default: native's is in C++ (csrc/ptl_node.cpp)."""
    return "FusedPTLNodeBackward" if backend == "native" else "PTLNodeBackward"


def _run(ptl, x, mask, grad, monkeypatch, node):
    """out and the gradients of x and the learning parameters, with ``REGHARM_PTL_NODE`` set to
    ``node`` ("1", "python" or "0"; True and False are "1" and "0")."""
    monkeypatch.setenv(ENV, {True: "1", False: "0"}.get(node, node))
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
    assert _node_name(ptl(xr, mask)) == _node(backend)
    assert _node_name(ptl(x, mask)) == _node(backend)  # the parameters still learn
    monkeypatch.setenv(ENV, "python")
    assert _node_name(ptl(xr, mask)) == "PTLNodeBackward"
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
                assert _node_name(out) == _node(backend)
                got = [out] + list(torch.autograd.grad(out, (ptl.weight, ptl.bias), grad))
                monkeypatch.setenv(ENV, "0")
                out = ptl(x, mask)
                want = [out] + list(torch.autograd.grad(out, (ptl.weight, ptl.bias), grad))
            else:
                name, got = _run(ptl, x, mask, grad, monkeypatch, node=True)
                assert name == _node(backend)
                _, want = _run(ptl, x, mask, grad, monkeypatch, node=False)
            assert torch.equal(got[0][-1], x[-1]), "an image without a valid patch passes through"
            assert torch.equal(got[0], want[0]), "the forward runs the same kernels"
            # the gradients too, but x's three terms are added in another order: a few roundings
            tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-6
            for i, (a, b) in enumerate(zip(got[1:], want[1:])):
                scale = float(b.abs().max())
                torch.testing.assert_close(a, b, rtol=tol, atol=tol * scale,
                                           msg=f"{dtype} patch {patch}: gradient {i}")


def test_fused_node_gives_the_python_nodes_bits(monkeypatch):
    """native's node in C++ runs PTLNode's ops in PTLNode's order: identical outputs and
    gradients, in every dtype, with and without x learning."""
    _skip("native")
    for dtype in _cases("native"):
        for offset, patch, stride, x_learns in ((0.0, (4, 3), (2, 3), True),
                                                (100.0, 0.3, 0.2, True),
                                                (0.0, (5, 4), (3, 2), False)):
            x, mask = _inputs(dtype)
            ptl = PTL(5, patch=patch, stride=stride, backend="native")
            ptl(x[:1], mask[:1])  # sizes a fractional patch's weights (float32 parameters)
            torch.nn.init.normal_(ptl.bias)
            x = x + offset
            grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
            results = {}
            for flag in ("1", "python"):
                monkeypatch.setenv(ENV, flag)
                xi = x.clone().requires_grad_(x_learns)
                out = ptl(xi, mask)
                results[flag] = (_node_name(out), [out] + list(torch.autograd.grad(
                    out, [t for t in (xi, ptl.weight, ptl.bias) if t.requires_grad], grad)))
            assert results["1"][0] == "FusedPTLNodeBackward"
            assert results["python"][0] == "PTLNodeBackward"
            got, want = results["1"][1], results["python"][1]
            assert len(got) == len(want) == 3 + x_learns
            for i, (a, b) in enumerate(zip(got, want)):
                assert a.dtype == b.dtype and torch.equal(a, b), f"{dtype} patch {patch}: result {i}"


def test_fused_node_leaves_dispatch_modes_every_op(monkeypatch):
    """A dispatch mode (the benchmarks' memory tracker, fake tensors) sees PTLNode's ops one by
    one, not one C++ op that hides its temporaries."""
    _skip("native")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Names(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    x, mask = _inputs()
    ptl = PTL(5, patch=(4, 3), stride=(2, 3), backend="native")
    with Names() as mode:
        out = ptl(x.clone().requires_grad_(), mask)
    assert _node_name(out) == "PTLNodeBackward"
    assert any("regharm.masked_attention" in n for n in mode.names)
    assert not any("ptl_forward" in n for n in mode.names)


def test_fused_node_ops_opcheck():
    """The two ops' schemas and fake kernels (their autograd is FusedPTLNode's, not the ops')."""
    _skip("native")
    from regharm_ext.ops import native

    x, mask = _inputs(B=2)
    mask = torch.nn.functional.interpolate(mask, size=x.shape[-2:], mode="area")
    w, b = torch.randn(12), torch.randn(1)
    args = (x, mask, w, b, 4, 3, 2, 3, 1e-5, 0.5, 5 ** -0.5)
    tests = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.regharm.ptl_forward.default, args, test_utils=tests)
    x_cl = x.contiguous(memory_format=torch.channels_last)  # the output keeps x's layout
    torch.library.opcheck(torch.ops.regharm.ptl_forward.default, (x_cl,) + args[1:], test_utils=tests)
    out, *saved = torch.ops.regharm.ptl_forward(*args)
    for need_x in (True, False):
        bargs = (torch.randn_like(x), x, mask, w, saved) + args[4:] + (need_x,)
        torch.library.opcheck(torch.ops.regharm.ptl_backward.default, bargs, test_utils=tests)
    gx, gw, gb = torch.ops.regharm.ptl_backward(*bargs)
    assert gx is None and gw.shape == w.shape and gb.shape == (1,)
    assert native.PTL_OPS is not None
    with pytest.raises(RuntimeError, match="saved tensors"):
        torch.ops.regharm.ptl_backward(torch.randn_like(x), x, mask, w, saved[:-1], *args[4:], True)


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
        assert _node_name(out) == _node("native")
        return out

    params = (ptl.weight.detach().clone(), ptl.bias.detach().clone())
    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_() for t in (x,) + params))


@pytest.mark.parametrize("flag", ["1", "python"])
def test_ptl_node_keeps_autograd_guarantees(flag, monkeypatch):
    _skip("native")
    monkeypatch.setenv(ENV, flag)
    node = "PTLNodeBackward" if flag == "python" else _node("native")
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
    assert _node_name(out) == node and len(packed) >= 10
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
        assert name == (_node(backend) if flag == "1" else "BlendBackward")
        with benchlib.TensorMemoryTracker() as tracker:
            _run(ptl, x, mask, grad, monkeypatch, node=flag == "1")
        peaks[flag] = tracker.peak
    got, want = results["1"], results["0"]
    assert torch.equal(got[0], want[0])
    tol = 1.6e-2 if dtype == torch.bfloat16 else 1e-5
    for i, (a, b) in enumerate(zip(got[1:], want[1:])):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * float(b.abs().max()), msg=f"gradient {i}")
    assert peaks["1"] <= peaks["0"], peaks


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_node_on_cuda_gives_the_python_nodes_bits_and_memory(dtype, monkeypatch):
    """native's C++ node on the GPU. With the blend's torch ops (REGHARM_CUDA_PTL_GLUE=aten):
    PTLNode's bits. With its kernels (the default): the same roundings in the same order, so
    at most FMA contraction apart (two units in the last place), an image without a valid patch
    passing through exactly, and no more of the allocator's peak (the caching allocator counts
    whole blocks: 1 MiB of slack for the order in which two small blocks are reused)."""
    _cuda_skip("native")
    x, mask = _inputs(dtype, B=2, C=32, H=64, W=56)
    x, mask = x.cuda(), mask.cuda()
    ptl = PTL(32, patch=8, stride=4, backend="native").cuda()
    grad = torch.randn(x.shape, device="cuda").to(dtype)
    results, peaks = {}, {}
    for run in ("kernels", "python", "aten", "kernels"):  # the first call warms the cache
        monkeypatch.setenv("REGHARM_CUDA_PTL_GLUE", "aten" if run == "aten" else "kernels")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        name, results[run] = _run(ptl, x, mask, grad, monkeypatch,
                                  node="python" if run == "python" else "1")
        torch.cuda.synchronize()
        peaks[run] = torch.cuda.max_memory_allocated() - base
        assert name == ("PTLNodeBackward" if run == "python" else "FusedPTLNodeBackward")
    for i, (a, b) in enumerate(zip(results["aten"], results["python"])):
        assert torch.equal(a, b), f"result {i} with the blend's torch ops"
    ulp = 2.0 ** -22 if dtype == torch.float32 else 2.0 ** -6
    for i, (a, b) in enumerate(zip(results["kernels"], results["python"])):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=ulp, atol=ulp * scale, msg=f"result {i}")
    assert torch.equal(results["kernels"][0][-1], x[-1])
    assert peaks["kernels"] <= peaks["python"] + 2 ** 20, peaks


@pytest.mark.cuda
def test_fused_node_on_cuda_refuses_a_bad_glue_setting(monkeypatch):
    _cuda_skip("native")
    x, mask = _inputs(B=2, C=8, H=16, W=16)
    ptl = PTL(8, patch=4, stride=2, backend="native").cuda()
    monkeypatch.setenv("REGHARM_CUDA_PTL_GLUE", "fast")
    with pytest.raises(RuntimeError, match="REGHARM_CUDA_PTL_GLUE must be 'kernels'"):
        ptl(x.cuda().requires_grad_(), mask.cuda())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_fused_node_takes_channels_last_x(device, monkeypatch):
    """x in channels-last layout (a conv net's output may be) gives the contiguous x's results:
    bit for bit on CPU; on CUDA within FMA contraction, as that layout takes the blend's torch
    ops instead of its kernels (which read x as dense)."""
    if device == "cuda":
        _cuda_skip("native")
    else:
        _skip("native")
    x, mask = _inputs(B=2, C=6, H=15, W=13)
    x, mask = x.to(device), mask.to(device)
    ptl = PTL(6, patch=(4, 3), stride=(2, 3), backend="native").to(device)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(2)).to(device)
    results = []
    for xin in (x, x.to(memory_format=torch.channels_last)):
        name, got = _run(ptl, xin, mask, grad, monkeypatch, node="1")
        assert name == "FusedPTLNodeBackward"
        results.append(got)
    for i, (a, b) in enumerate(zip(*results)):
        if device == "cpu":
            assert torch.equal(a, b), f"result {i}"
        else:
            torch.testing.assert_close(a, b, rtol=2.0 ** -22, atol=2.0 ** -22 * float(b.abs().max()))
