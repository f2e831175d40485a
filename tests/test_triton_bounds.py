"""Every Triton kernel's loads and stores stay inside its tensors (tests/triton_bounds.py), with
the interpreter's tile sizes and with the GPU's (the launches stay interpreted; only the tile
choice changes), on the edge cases: odd sizes, no active query, whole key tiles removed, an
image with every key removed, D and E not powers of two, one query tile past the active count,
and the shape at which an H100 run reported an illegal address in the Triton attention."""
import pytest
import torch

from helpers import EDGE_ATTN_CASES, EDGE_PATCH_CASES, NORM_CASES, make_attention_inputs, \
    make_norm_inputs, make_patch_inputs
from regharm_ext.backends import unavailable_reason
from regharm_ext.ops import masked_attention, masked_norm, patch_stats
from triton_bounds import checked_launches, unsupported

REASON = unavailable_reason("triton", "cpu") or unsupported()
pytestmark = [pytest.mark.triton,
              pytest.mark.skipif(REASON is not None, reason=f"triton on CPU: {REASON}")]

ATTN = {**EDGE_ATTN_CASES, "h100_throw_check": dict(B=2, L=70, N=40, D=16, E=32),
        "wide": dict(B=1, L=150, N=70, D=64, E=128)}


def test_the_checker_sees_an_access_past_a_tensor():
    import triton
    import triton.language as tl

    @triton.jit
    def one_too_far(X, Y, N, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        tl.store(Y + o, tl.load(X + o, mask=o < N + 1))

    x, y = torch.arange(8.0), torch.empty(16)
    with checked_launches() as bad:
        one_too_far[(1,)](x, y, 8, BLOCK=16)
    assert bad == [("one_too_far", "load", 1)]


@pytest.mark.parametrize("tiles", ["interpreter", "gpu"])
def test_kernels_stay_inside_their_tensors(tiles, monkeypatch):
    if tiles == "gpu":
        import regharm_ext.ops.triton_attention as ta
        import regharm_ext.ops.triton_masked_norm as tn
        import regharm_ext.ops.triton_patch_stats as tp
        for module in (ta, tn, tp):
            monkeypatch.setattr(module, "interpreting", lambda: False)
    with checked_launches() as bad:
        for name, case in ATTN.items():
            for dtype in (torch.float32, torch.float64):
                q, k, v, kb, qm = make_attention_inputs(**case, dtype=dtype)
                for mask in (qm, None):
                    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                    masked_attention(*leaves, kb, mask, backend="triton").sum().backward()
        for name, (shape, patch, stride, offset, kind) in EDGE_PATCH_CASES.items():
            x, bg, w, b = make_patch_inputs(*shape, patch, stride, offset=offset, bg_kind=kind)
            leaves = [t.clone().requires_grad_() for t in (x, w, b)]
            outs = patch_stats(leaves[0], bg, leaves[1], leaves[2], patch, stride, backend="triton")
            sum(o.sum() for o in outs[:3]).backward()
        for name, (shape, offset, kind) in NORM_CASES.items():
            x, w = make_norm_inputs(*shape, offset=offset, kind=kind)
            masked_norm(x.requires_grad_(), w, backend="triton").sum().backward()
    assert not bad, bad
