"""A second backward (``create_graph=True``) through the ops: the kernel backends' backward ops
have no derivative of their own, and the dispatcher's fallback would return zeros with only a
warning (seen for native masked_attention). They, the composite masked norm and PTL's blend
raise instead; the reference backend's patch_stats and masked_attention, plain autograd, keep
their second derivative."""
import pytest
import torch

from helpers import make_attention_inputs, make_norm_inputs, make_patch_inputs
from regharm_ext import PTL
from regharm_ext.backends import unavailable_reason
from regharm_ext.ops import masked_attention, masked_norm, patch_stats

TWICE = "differentiate twice"


def _second_grad(fn, leaf):
    (g,) = torch.autograd.grad((fn(leaf) ** 3).sum(), leaf, create_graph=True)
    g.sum().backward()  # (autograd.grad would stop earlier: the refusal cuts the graph)
    return leaf.grad


def _skip(backend):
    reason = unavailable_reason(backend, torch.device("cpu"))
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_kernel_backends_refuse_a_second_backward(backend):
    _skip(backend)
    q, k, v, kb, qm = make_attention_inputs(B=2, L=9, N=7, D=4, E=3)
    x, bg, w, b = make_patch_inputs(1, 2, 9, 8, (3, 4), (2, 3))
    xn, wn = make_norm_inputs(2, 3, 5, 6)
    cases = {
        "masked_attention": (lambda t: masked_attention(t, k, v, kb, qm, backend=backend), q),
        "patch_stats": (lambda t: patch_stats(t, bg, w, b, (3, 4), (2, 3), backend=backend)[2], x),
        "masked_norm": (lambda t: masked_norm(t, wn, backend=backend), xn),
    }
    for name, (fn, leaf) in cases.items():
        with pytest.raises(RuntimeError, match=TWICE):
            _second_grad(fn, leaf.clone().requires_grad_())


def test_composite_norm_and_ptl_blend_refuse_a_second_backward():
    xn, wn = make_norm_inputs(2, 3, 5, 6)
    with pytest.raises(RuntimeError, match=TWICE):
        _second_grad(lambda t: masked_norm(t, wn, backend="reference"), xn.clone().requires_grad_())
    ptl = PTL(4, patch=3, stride=2, backend="reference")
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:5, 2:6] = 1.0
    with pytest.raises(RuntimeError, match=TWICE):
        _second_grad(lambda t: ptl(t, mask), torch.randn(1, 4, 8, 8, requires_grad=True))


def test_reference_ops_keep_their_second_derivative():
    q, k, v, kb, qm = make_attention_inputs(B=2, L=5, N=4, D=3, E=2, dtype=torch.float64)
    assert torch.autograd.gradgradcheck(
        lambda t: masked_attention(t, k, v, kb, qm, backend="reference"), (q.requires_grad_(),))
    x, bg, w, b = make_patch_inputs(1, 1, 6, 5, (3, 2), (2, 1), torch.float64)
    assert torch.autograd.gradgradcheck(
        lambda t: patch_stats(t, bg, w, b, (3, 2), (2, 1), backend="reference")[1],
        (x.requires_grad_(),))
