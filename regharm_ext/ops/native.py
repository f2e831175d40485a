"""The `native` backend: our compiled ops ``torch.ops.regharm.*`` from ``regharm_ext._C``.

C++ kernels run CPU tensors (csrc/cpu), CUDA kernels GPU tensors (csrc/cuda, when the extension
was built with them). This module registers, in the pytorch/extension-cpp style, fake kernels for
the eight ops (shapes for ``torch.compile``) and autograd for the three forward ops, whose backward
is itself an op; PTL's two ops (``ptl_forward``/``ptl_backward``) get theirs from
:class:`regharm_ext.ptl_node.FusedPTLNode`. Importing it never fails: when ``_C`` is missing,
:func:`unavailable` says why.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ._checks import no_gpu_reason
from ._eager import Direct, eager_grad, register_autograd
from .norm_composite import op_autograd

try:
    from regharm_ext import _C  # noqa: F401  (loading it registers the ops and their kernels)

    _IMPORT_ERROR: Optional[BaseException] = None
except (ImportError, OSError, RuntimeError) as exc:  # not built, or built for another torch
    _IMPORT_ERROR = exc

_OPS = ("patch_stats", "patch_stats_backward", "masked_attention", "masked_attention_backward",
        "masked_norm", "masked_norm_backward", "ptl_forward", "ptl_backward")
_KEYS = {"cpu": "CPU", "cuda": "CUDA"}
_REASONS = {}  # device type -> reason (or None); the answer cannot change within a process


def _reason(device_type: str) -> Optional[str]:
    if _IMPORT_ERROR is not None:
        return (f"the compiled extension regharm_ext._C is not importable ({_IMPORT_ERROR}); "
                f"build it with `pip install --no-build-isolation .` (or `-e .`) from the "
                f"repository root")
    key = _KEYS.get(device_type)
    if key is None:
        return f"native runs CPU and CUDA tensors only, got {device_type} tensors"
    missing = [op for op in _OPS
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"regharm::{op}", key)]
    if missing and key == "CUDA":
        return ("regharm_ext._C was built without CUDA kernels; rebuild it where nvcc and a GPU "
                "are visible (or with FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0): "
                "`pip install --no-build-isolation .`")
    if missing:
        return (f"regharm_ext._C has no {key} kernel for {', '.join(missing)}; rebuild it with "
                f"`pip install --no-build-isolation .`")
    return no_gpu_reason() if key == "CUDA" else None


def unavailable(device: torch.device) -> Optional[str]:
    """None when ``torch.ops.regharm`` can run on ``device``, otherwise the reason."""
    kind = torch.device(device).type
    if kind not in _REASONS:
        _REASONS[kind] = _reason(kind)
    return _REASONS[kind]


# answered at import, so that torch.compile finds plain values when it traces the backend switch
for _type in _KEYS:
    unavailable(torch.device(_type))


def patch_stats(x, bg, weight, bias, patch_size: Tuple[int, int], stride: Tuple[int, int],
                eps: float, min_mass: float):
    """See :func:`regharm_ext.ops.patch_stats`; arguments are already checked.

    Returns mu, sigma, content (Tensor[B, K, C]) and mass (Tensor[B, K]), in x's dtype.
    """
    (ph, pw), (sh, sw) = patch_size, stride
    args = (x, bg, weight, bias, ph, pw, sh, sw, eps, min_mass)
    if eager_grad(x, weight, bias):
        return _PatchStats.apply(*args)
    return torch.ops.regharm.patch_stats(*args)


def masked_attention(q, k, v, key_bias, query_mask: Optional[torch.Tensor], scale: float):
    """See :func:`regharm_ext.ops.masked_attention`; arguments are already checked.

    Returns out (Tensor[B, L, E]) in q's dtype (the op's log-sum-exp is kept for the backward).
    """
    args = (q, k, v, key_bias, query_mask, scale)
    if eager_grad(q, k, v):
        return _MaskedAttention.apply(*args)[0]
    return torch.ops.regharm.masked_attention(*args)[0]


def masked_norm(x, weight, eps: float):
    """See :func:`regharm_ext.ops.masked_norm`; arguments are already checked.

    Returns y (Tensor[B, H*W, C]) in x's dtype (mu and rstd are kept for the backward).
    """
    if eager_grad(x):
        return _MaskedNorm.apply(x, weight, eps)[0]
    return torch.ops.regharm.masked_norm(x, weight, eps)[0]


def _register() -> None:
    lib = "regharm::"

    @torch.library.register_fake(lib + "patch_stats")
    def _(x, bg, weight, bias, ph, pw, sh, sw, eps, min_mass):
        B, C, H, W = x.shape
        K = ((H - ph) // sh + 1) * ((W - pw) // sw + 1)
        return (x.new_empty(B, K, C), x.new_empty(B, K, C), x.new_empty(B, K, C),
                x.new_empty(B, K))

    @torch.library.register_fake(lib + "patch_stats_backward")
    def _(grad_mu, grad_sigma, grad_content, x, bg, weight, mu, sigma, mass, ph, pw, sh, sw, eps,
          min_mass):
        # the CPU and CUDA kernels return contiguous tensors, whatever the inputs' strides
        return x.new_empty(x.shape), weight.new_empty(weight.shape), grad_content.new_empty(1)

    @torch.library.register_fake(lib + "masked_attention")
    def _(q, k, v, key_bias, query_mask, scale):
        B, L, _ = q.shape
        return q.new_empty(B, L, v.shape[-1]), q.new_empty(B, L, dtype=torch.float32)

    @torch.library.register_fake(lib + "masked_attention_backward")
    def _(grad_out, q, k, v, key_bias, query_mask, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    # below the autograd key where nothing can tell (_eager.Direct): the C++ kernel, no Python
    _patch_stats_backward = Direct(torch.ops.regharm.patch_stats_backward)
    _masked_attention_backward = Direct(torch.ops.regharm.masked_attention_backward)

    def patch_setup(ctx, inputs, output):
        x, bg, weight, bias, ph, pw, sh, sw, eps, min_mass = inputs
        mu, sigma, _, mass = output
        ctx.save_for_backward(x, bg, weight, mu, sigma, mass)
        ctx.args = (ph, pw, sh, sw, eps, min_mass)
        ctx.bias_dtype = bias.dtype

    def patch_backward(ctx, grad_mu, grad_sigma, grad_content, _grad_mass):
        # mass depends on bg only (data): its gradient is dropped
        x, bg, weight, mu, sigma, mass = ctx.saved_tensors
        grads = [g if g is not None else torch.zeros_like(mu)
                 for g in (grad_mu, grad_sigma, grad_content)]
        gx, gw, gb = _patch_stats_backward(*grads, x, bg, weight, mu, sigma, mass, *ctx.args)
        return gx, None, gw, gb.to(ctx.bias_dtype), None, None, None, None, None, None

    # the backend's own eager calls use the Functions: the same setup and backward, without
    # the wrapper's cost
    global _PatchStats, _MaskedAttention
    _PatchStats = register_autograd(lib + "patch_stats", patch_backward, patch_setup)

    def attn_setup(ctx, inputs, output):
        q, k, v, key_bias, query_mask, scale = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, key_bias, query_mask, out, lse)
        ctx.scale = scale

    def attn_backward(ctx, grad_out, _grad_lse):
        # lse is an internal output (the public op returns out only): its gradient is dropped
        q, k, v, key_bias, query_mask, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = _masked_attention_backward(
            grad_out, q, k, v, key_bias, query_mask, out, lse, ctx.scale)
        return dq, dk, dv, None, None, None

    _MaskedAttention = register_autograd(lib + "masked_attention", attn_backward, attn_setup)

    @torch.library.register_fake(lib + "masked_norm")
    def _(x, weight, eps):
        B, C, H, W = x.shape
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        return x.new_empty(B, H * W, C), x.new_empty(B, C, dtype=acc), x.new_empty(B, C, dtype=acc)

    @torch.library.register_fake(lib + "masked_norm_backward")
    def _(grad, x, weight, mu, rstd):
        return x.new_empty(x.shape)

    global _MaskedNorm, PTL_STEPS, PTL_OPS
    setup, backward = op_autograd(Direct(torch.ops.regharm.masked_norm_backward))
    _MaskedNorm = register_autograd(lib + "masked_norm", backward, setup)
    PTL_STEPS = (_PatchStats, _MaskedNorm, _MaskedAttention)

    # PTL's node in C++ (csrc/ptl_node.cpp); its autograd is FusedPTLNode's, in ptl_node.py
    @torch.library.register_fake(lib + "ptl_forward")
    def _(x, m, weight, bias, ph, pw, sh, sw, eps, min_mass, scale):
        B, C, H, W = x.shape
        K, L = ((H - ph) // sh + 1) * ((W - pw) // sw + 1), H * W
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        stats = [x.new_empty(B, K, C) for _ in range(2)]
        # the output in x's layout (channels_last in, channels_last out), as lerp and the CUDA
        # blend's empty_like(x) give it
        return [torch.empty_like(x), m.new_empty(B, 1, H, W), *stats, x.new_empty(B, K),
                x.new_empty(B, L, C), x.new_empty(B, C, dtype=acc), x.new_empty(B, C, dtype=acc),
                x.new_empty(B, K, C), x.new_empty(B, K, 2 * C),
                x.new_empty(B, K, dtype=torch.float32), x.new_empty(B, L, dtype=torch.bool),
                x.new_empty(B, L, 2 * C), x.new_empty(B, L, dtype=torch.float32),
                m.new_empty(B, 1, H, W)]

    @torch.library.register_fake(lib + "ptl_backward")
    def _(grad, x, m, weight, saved, ph, pw, sh, sw, eps, min_mass, scale, need_x):
        return (x.new_empty(x.shape) if need_x else None, weight.new_empty(weight.shape),
                x.new_empty(1))

    PTL_OPS = (Direct(torch.ops.regharm.ptl_forward), Direct(torch.ops.regharm.ptl_backward))


# the ops' eager Functions, run by PTL's single autograd node (regharm_ext/ptl_node.py), and
# that node's forward and backward as two ops
PTL_STEPS = PTL_OPS = None


if _IMPORT_ERROR is None:
    _register()
