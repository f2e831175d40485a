"""Shared test helpers: per-dtype tolerances (in one place) and input builders."""
from __future__ import annotations

import torch

# (atol, rtol) per dtype, for comparing a backend with `reference` (which accumulates in fp32)
TOL = {
    torch.float64: (1e-9, 1e-7),
    torch.float32: (2e-4, 2e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (8e-2, 5e-2),
}
# gradients pass through one more reduction: a little looser
GRAD_TOL = {
    torch.float64: (1e-8, 1e-6),
    torch.float32: (1e-3, 1e-3),
    torch.float16: (5e-2, 5e-2),
    torch.bfloat16: (2e-1, 1e-1),
}


# The edge cases every backend's CPU tests run (each suite adds its own): odd sizes, soft masks,
# +100 offsets, no background, no foreground; all or no query active, almost every key removed.
EDGE_PATCH_CASES = {  # name: (B, C, H, W), patch, stride, offset, bg kind
    "odd": ((2, 3, 37, 50), (7, 5), (3, 2), 0.0, "soft"),
    "offset100": ((2, 3, 37, 50), (7, 5), (3, 2), 100.0, "soft"),
    "binary": ((1, 4, 16, 16), (4, 4), (4, 4), 0.0, "binary"),
    "no_background": ((2, 2, 12, 12), (4, 4), (2, 2), 0.0, "none"),
    "no_foreground": ((2, 2, 12, 12), (4, 4), (2, 2), 0.0, "all"),
}
EDGE_ATTN_CASES = {  # name: kwargs of make_attention_inputs
    "odd": dict(B=2, L=37, N=23, D=8, E=6),
    "all_active": dict(B=2, L=19, N=40, D=16, E=32, active=1.0, removed=0.0, dead_batch=False),
    "none_active": dict(B=2, L=10, N=7, D=4, E=4, active=0.0),
    "mostly_removed": dict(B=3, L=33, N=65, D=8, E=16, removed=0.95),
}
# The GPU suites' attention shapes: PTL and LTL at the paper's sizes, the largest D and E, odd
# sizes, no active query.
GPU_ATTN_CASES = {  # name: kwargs of make_attention_inputs
    "ptl": dict(B=2, L=2000, N=841, D=64, E=128, active=0.2, removed=0.1),
    "ltl": dict(B=2, L=1024, N=1024, D=64, E=64, active=0.3, removed=0.3),
    "wide": dict(B=1, L=300, N=200, D=256, E=512, active=0.5, removed=0.2),
    "c128": dict(B=1, L=257, N=130, D=128, E=256, active=0.5, removed=0.2),
    "odd": dict(B=3, L=37, N=23, D=3, E=6),
    "none_active": dict(B=2, L=100, N=50, D=16, E=16, active=0.0),
}


def assert_close(actual, expected, dtype, grad=False, msg=""):
    atol, rtol = (GRAD_TOL if grad else TOL)[dtype]
    # +100 offsets scale the values: tolerances are relative to the reference's magnitude
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    # compared in float64: float32's rounding (1.2e-7 relative) is coarser than float64's rtol
    torch.testing.assert_close(actual.detach().double(), expected.detach().double(),
                               atol=atol * scale, rtol=rtol, msg=lambda m: f"{msg}\n{m}")


def make_patch_inputs(B=2, C=3, H=37, W=50, patch=(7, 5), stride=(3, 2), dtype=torch.float32,
                      offset=0.0, bg_kind="soft", seed=0, device="cpu"):
    """x, bg, weight, bias with some patches fully foreground (no background).

    bg_kind: "soft" (random soft mask with a hard foreground rectangle), "none" (no background
    at all), "all" (no foreground), "binary".
    """
    g = torch.Generator().manual_seed(seed)
    ph, pw = patch
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) + offset
    if bg_kind == "none":
        bg = torch.zeros(B, 1, H, W, dtype=torch.float64)
    elif bg_kind == "all":
        bg = torch.ones(B, 1, H, W, dtype=torch.float64)
    else:
        bg = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64)
        if bg_kind == "binary":
            bg = (bg > 0.3).double()
        bg[:, :, : H // 2, : W // 2] = 0.0  # a foreground block: patches with no background
    weight = torch.randn(ph * pw, generator=g, dtype=torch.float64) / (ph * pw) ** 0.5
    bias = torch.randn(1, generator=g, dtype=torch.float64)
    return tuple(t.to(device=device, dtype=dtype) for t in (x, bg, weight, bias))


# masked_norm: name -> (B, C, H, W), offset, weight kind
NORM_CASES = {
    "soft": ((3, 5, 7, 9), 0.0, "soft"),         # image 1 without weight: mu = var = 0
    "offset100": ((2, 4, 11, 6), 100.0, "soft"),
    "binary": ((2, 3, 16, 16), 0.0, "binary"),
    "thin": ((2, 1, 1, 13), 0.0, "soft"),
    "wide_c": ((1, 70, 5, 3), 0.0, "binary"),     # more channels than one tile
    "splits": ((1, 3, 42, 50), 100.0, "soft"),    # the backward's sums over several splits
}


def make_norm_inputs(B=3, C=5, H=7, W=9, dtype=torch.float32, offset=0.0, kind="soft", seed=0,
                     device="cpu"):
    """x (Tensor[B, C, H, W]) and weight (Tensor[B, 1, H, W]); with B > 1, image 1 has no weight."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64) + offset
    w = torch.rand(B, 1, H, W, generator=g, dtype=torch.float64)
    if kind == "binary":
        w = (w > 0.6).double()
    if B > 1:
        w[1] = 0
    return x.to(device, dtype), w.to(device, dtype)


def make_attention_inputs(B=2, L=37, N=23, D=8, E=6, dtype=torch.float32, active=0.5,
                          removed=0.3, dead_batch=True, seed=0, device="cpu"):
    """q, k, v, key_bias, query_mask with removed keys, inactive queries and (optionally) one
    image whose keys are all removed."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, N, E, generator=g, dtype=torch.float64)
    key_bias = torch.randn(B, N, generator=g, dtype=torch.float64) * 0.5
    key_bias[torch.rand(B, N, generator=g) < removed] = float("-inf")
    if dead_batch and B > 1:
        key_bias[-1] = float("-inf")
    query_mask = torch.rand(B, L, generator=g) < active
    cast = lambda t: t.to(device=device, dtype=dtype)
    return cast(q), cast(k), cast(v), key_bias.to(device=device, dtype=torch.float32 if dtype != torch.float64 else dtype), query_mask.to(device)


class PtlThenLtl(torch.nn.Module):
    """PTL then LTL on one backend: the small module the torch.compile tests compile."""

    def __init__(self, channels, backend):
        super().__init__()
        from regharm_ext import LTL, PTL
        self.ptl = PTL(channels, patch=4, stride=2, backend=backend)
        self.ltl = LTL(channels, backend=backend)

    def forward(self, x, mask):
        return self.ltl(self.ptl(x, mask), mask)


def two_masks(H, device):
    """Masks (Tensor[2, 1, H, H]) of a hard rectangle and a soft (0.6) corner, H >= 16."""
    mask = torch.zeros(2, 1, H, H, device=device)
    mask[0, :, 5:15, 3:13] = 1
    mask[1, :, 12:, :10] = 0.6
    return mask


def check_compiled_matches_eager(backend, device, compile_backend="inductor", C=16, H=24, mask_size=None,
                                 channels_last=False, dynamic=None):
    """torch.compile(fullgraph=True, backend=compile_backend, dynamic=dynamic) of PtlThenLtl on
    ``backend`` gives eager's output and the gradients of the input and every parameter.
    ``mask_size`` other than H makes the layers resize the mask too; ``channels_last`` gives x
    that layout (the model's default on CPU)."""
    # every call compiles PtlThenLtl.forward again (backends, layouts, dynamic): one process's
    # tests would pass dynamo's recompile limit (8 per code object) without a fresh start
    torch._dynamo.reset()
    torch.manual_seed(0)
    mod = PtlThenLtl(C, backend).to(device)
    x = torch.randn(2, C, H, H, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mask = two_masks(mask_size or H, device)
    outs = {}
    # compiled first: a user may compile before any eager call (nothing imported or cached yet)
    compiled = torch.compile(mod, fullgraph=True, backend=compile_backend, dynamic=dynamic)
    for name, fn in (("compiled", compiled), ("eager", mod)):
        xi = x.clone().requires_grad_()
        out = fn(xi, mask)
        grads = torch.autograd.grad((out * out).sum(), [xi] + list(mod.parameters()))
        outs[name] = (out, grads)
    torch.testing.assert_close(outs["compiled"][0], outs["eager"][0], atol=1e-4, rtol=1e-4)
    for a, e in zip(outs["compiled"][1], outs["eager"][1]):
        torch.testing.assert_close(a, e, atol=1e-3, rtol=1e-3)
