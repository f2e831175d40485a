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


def assert_close(actual, expected, dtype, grad=False, msg=""):
    atol, rtol = (GRAD_TOL if grad else TOL)[dtype]
    # +100 offsets scale the values: tolerances are relative to the reference's magnitude
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().float(), expected.detach().float(),
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
