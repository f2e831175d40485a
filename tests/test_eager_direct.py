"""The eager fast path of the compiled ops (regharm_ext/ops/_eager.py, ``Direct``): plain eager
calls skip the dispatcher's Python layers, and nothing else may tell the difference — same
values and gradients, a dispatch mode or a ``torch.device`` context still sees the ops, a
profiler still names them, double backward still goes through the ops' autograd key."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import make_attention_inputs, make_patch_inputs
from regharm_ext import PTL
from regharm_ext.backends import unavailable_reason
from regharm_ext.ops import _eager

BACKENDS = [b for b in ("native", "triton") if unavailable_reason(b, "cpu") is None]
pytestmark = pytest.mark.skipif(not BACKENDS, reason="neither native nor triton runs on CPU here")


class OpNames(TorchDispatchMode):
    """Records the ops it sees; being a mode, it also turns the fast path off."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.name())
        return func(*args, **(kwargs or {}))


def _ptl_step(backend, seed=0):
    torch.manual_seed(seed)
    layer = PTL(6, patch=4, stride=2, backend=backend)
    x = torch.randn(2, 6, 11, 13, requires_grad=True)
    mask = torch.zeros(2, 1, 11, 13)
    mask[:, :, 3:8, 4:10] = 1
    y = layer(x, mask)
    y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
    return y.detach(), x.grad, layer.weight.grad if getattr(layer, "weight", None) is not None else None


def _count_direct(monkeypatch):
    calls = []
    real = _eager.Direct._direct

    def spy(self, args):
        calls.append(self.name)
        return real(self, args)
    monkeypatch.setattr(_eager.Direct, "_direct", spy)
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_eager_takes_the_direct_path_for_all_six_calls(backend, monkeypatch):
    """PTL's six op calls on the Python node; on native's C++ node (its default) its two ops."""
    monkeypatch.setenv("REGHARM_PTL_NODE", "python")
    calls = _count_direct(monkeypatch)
    _ptl_step(backend)
    ns = "regharm" if backend == "native" else "regharm_triton"
    expected = {f"{ns}::{op}" for op in ("patch_stats", "masked_norm", "masked_attention")}
    expected |= {name + "_backward" for name in expected}
    assert set(calls) == expected and len(calls) == 6
    if backend == "native":
        monkeypatch.delenv("REGHARM_PTL_NODE")
        calls.clear()
        _ptl_step(backend)
        assert calls == ["regharm::ptl_forward", "regharm::ptl_backward"]


@pytest.mark.parametrize("node", ["1", "python"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_direct_and_dispatched_calls_agree_exactly(backend, node, monkeypatch):
    monkeypatch.setenv("REGHARM_PTL_NODE", node)
    calls = _count_direct(monkeypatch)
    fast = _ptl_step(backend)
    direct = 2 if backend == "native" and node == "1" else 6
    assert len(calls) == direct
    with OpNames() as mode:
        slow = _ptl_step(backend)
    assert len(calls) == direct, "a dispatch mode must turn the fast path off"
    ns = "regharm" if backend == "native" else "regharm_triton"
    assert f"{ns}::masked_attention_backward" in mode.names  # the mode saw our ops by name
    for a, b in zip(fast, slow):
        if a is not None:
            assert torch.equal(a, b)


def test_direct_ok_refuses_every_context_that_could_tell():
    x = torch.randn(3)
    with torch.no_grad():
        assert _eager.direct_ok((x, 1.0))
        assert _eager.direct_ok((torch.nn.Parameter(x),))
        with OpNames():
            assert not _eager.direct_ok((x,))
        with torch.device("cpu"):
            assert not _eager.direct_ok((x,))

        class Sub(torch.Tensor):
            pass
        assert not _eager.direct_ok((x.as_subclass(Sub),))
        seen = []
        torch.vmap(lambda t: seen.append(_eager.direct_ok((t,))) or t)(torch.randn(2, 3))
        assert seen == [False]
    assert not _eager.direct_ok((x,))  # grad mode on: a gradient may be recorded


@pytest.mark.parametrize("backend", BACKENDS)
def test_profiler_still_names_the_ops(backend):
    q, k, v, kb, qm = make_attention_inputs()
    q.requires_grad_()
    from regharm_ext.ops import masked_attention
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        masked_attention(q, k, v, kb, qm, backend=backend).sum().backward()
    names = {e.name for e in prof.events()}
    ns = "regharm" if backend == "native" else "regharm_triton"
    assert {f"{ns}::masked_attention", f"{ns}::masked_attention_backward"} <= names, sorted(names)


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_gives_the_same_gradient(backend):
    """With create_graph the backward is entered with grad mode on; once_differentiable runs the
    backward op without it (so it may take the direct path too) and marks the result, whose own
    backward then raises (tests/test_double_backward.py): the first derivative is unchanged."""
    x, bg, w, b = make_patch_inputs()
    x.requires_grad_()
    from regharm_ext.ops import patch_stats
    mu = patch_stats(x, bg, w, b, (7, 5), (3, 2), backend=backend)[0]
    (plain,) = torch.autograd.grad(mu.square().sum(), x, retain_graph=True)
    (graph,) = torch.autograd.grad(mu.square().sum(), x, create_graph=True)
    assert graph.requires_grad
    torch.testing.assert_close(graph.detach(), plain, rtol=0, atol=0)


def test_eager_body_launches_compiled_kernels_as_they_are():
    """Compiled (not interpreted) kernels: the op body that torch.compile traces launches through
    wrap_triton; the eager body launches the JIT function itself (no tracing wrapper). A child
    process, as TRITON_INTERPRET is fixed when a kernel is decorated."""
    import os
    import subprocess
    import sys
    pytest.importorskip("triton")
    code = """
from triton.runtime.jit import JITFunction
from regharm_ext.ops import _triton_util as tu

k = tu._probe
assert isinstance(k, JITFunction)
seen = []
tu.eager_body(lambda: seen.append(tu.launcher(k)))()
assert seen == [k], seen
if tu._wrap_triton is not None:
    assert tu.launcher(k) is not k  # outside: the traceable wrapper
print("ok")
"""
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
