"""PTL's blend, and PTL's forward and backward as one autograd node for the kernel backends.

On a GPU, PTL's fwd+bwd is host-bound (benchmarks/PERF_NOTES.md, item 15): per call the
autograd engine ran four of our nodes (patch_stats, masked_norm, masked_attention, the blend),
added x's three gradients and c_f's two between them, and each op checked its arguments again.
:class:`PTLNode` runs the same four Functions as :class:`~regharm_ext.ops._eager.Step`s of one
node with the layer's glue between them: the same kernels and saved tensors, one node, and the
gradients added in place in a fixed order. It applies to eager calls that record a backward on
the `native` and `triton` backends (:func:`node_steps`).

On `native`, :class:`FusedPTLNode` goes further (item 18): the same steps in C++, one op each
way (``regharm::ptl_forward`` / ``ptl_backward``, csrc/ptl_node.cpp), so the host runs one
Python call where PTLNode ran ~40 (:func:`node_ops`). Where a dispatch or function mode is on
(memory trackers, fake tensors) PTLNode runs instead, so such a mode still sees every op.

``REGHARM_PTL_NODE`` (read on every call, so that the benchmarks time the layer every way in
one process): ``0`` the op-by-op graph, ``python`` PTLNode on every kernel backend, otherwise
the fastest node the backend has.
"""
from __future__ import annotations

import os
from itertools import islice
from typing import Optional, Tuple

import torch
from torch.autograd.function import once_differentiable

from .backends import resolve
from .ops import _composite_norm_asked
from .ops._eager import _PLAIN, Step
from .ops.norm_composite import as_dtype

ENV = "REGHARM_PTL_NODE"


def attention_keys(m: torch.Tensor, mu, sigma, mass, min_mass: float):
    """(valid (Tensor[B, K] bool), key_bias (Tensor[B, K], float32: 0 or -inf), query_mask
    (Tensor[B, HW] bool), values [mu | sigma] (Tensor[B, K, 2C])) of SPEC §4 step 4.

    patch_stats decides validity on its float32 mass, then rounds the mass to x's dtype: in
    float16, 1.99951 (invalid under min_mass 2) comes back as 2.0. Its invalid patches also have
    sigma exactly 0, and valid ones sigma >= sqrt(eps) > 0, so sigma keeps the op's decision."""
    valid = (mass >= min_mass) & (sigma[..., 0] > 0)
    key_bias = torch.where(valid, 0.0, float("-inf"))  # float32: one launch, no fill first
    return valid, key_bias, (m > 0).flatten(1), torch.cat([mu, sigma], -1)


def inactive_content_zeroed(c_f: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """C_f (Tensor[B, HW, C]) with 0 at the positions outside the foreground, in float16 only.
    C_f is normalized by the foreground's statistics at every position: a background value 207
    away from a near-constant foreground channel exceeds float16's 65504 (rstd reaches 316),
    and the blend's 0 · inf there is NaN where the output must be x itself. Those positions are
    neither attention queries nor blended, so 0 changes nothing else; their gradient is 0
    either way (dQ and dA vanish there)."""
    if c_f.dtype != torch.float16:
        return c_f   # float32 and bfloat16 reach 1e38: no pass over C_f for them
    return c_f.masked_fill(~query_mask.unsqueeze(-1), 0)


def blend_weight(m: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The blend's weight: m, or 0 for an image without a valid patch (nothing to match, so the
    input passes through unchanged: the attention gives 0 there and lerp with weight 0 returns
    x exactly)."""
    return torch.where(valid.any(1).view(-1, 1, 1, 1), m, 0.0)


class Blend(torch.autograd.Function):
    """PTL's output ``lerp(x, T_fb, m)``, ``T_fb = C_f * V + A`` (SPEC §4 step 6), with the
    backward written out: autograd of the three ops it replaces ran nine full-size kernels
    (addcmul's own backward scales by its unit value twice, split's backward concatenates) where
    four do (benchmarks/glue_traffic.py). PTL's fwd+bwd is host- and glue-bound on a GPU."""

    @staticmethod
    def forward(ctx, x, av, c_f, m):
        B, C, H, W = x.shape
        a, v = av.split(C, dim=-1)
        t_fb = torch.addcmul(a, c_f, v).transpose(1, 2).view(B, C, H, W)
        ctx.save_for_backward(c_f, v, m)
        return torch.lerp(x, t_fb, m)

    @staticmethod
    @once_differentiable  # out= writes: a second backward raises rather than going wrong
    def backward(ctx, grad):
        c_f, v, m = ctx.saved_tensors
        B, C, H, W = grad.shape
        gx = torch.addcmul(grad, grad, m, value=-1) if ctx.needs_input_grad[0] else None
        gav = gcf = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # dA = m·g, in the attention's (B, HW, C) layout; dV = dA·C_f, dC_f = dA·V
            g_t, m_t = grad.flatten(2).transpose(1, 2), m.view(B, H * W, 1)
            if torch.compiler.is_compiling():  # dynamo takes no strided out=; the compiler fuses
                ga = g_t * m_t
                gav = torch.cat([ga, ga * c_f], -1)
            else:  # written in place: no concatenation pass
                gav = torch.empty(B, H * W, 2 * C, dtype=v.dtype, device=v.device)
                ga = torch.mul(g_t, m_t, out=gav[..., :C])
                torch.mul(ga, c_f, out=gav[..., C:])
            gcf = ga * v if ctx.needs_input_grad[2] else None
        return gx, gav, gcf, None


def node_steps(backend, x, mask, weight, bias) -> Optional[Tuple]:
    """The backend's (patch_stats, masked_norm, masked_attention) Functions where PTL's call runs
    as one node, else None: an eager call that records a backward (not compiling, no functorch
    transform), a mask that is data, the masked norm on its kernels, and a kernel backend."""
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad)):
        return None
    if (mask.requires_grad or torch.compiler.is_compiling()
            or torch._C._are_functorch_transforms_active()):
        return None
    if os.environ.get(ENV, "1") == "0" or _composite_norm_asked():
        return None
    return getattr(resolve(backend, x.device), "PTL_STEPS", None)


def node_ops(backend, *tensors) -> Optional[Tuple]:
    """The backend's (ptl_forward, ptl_backward) ops where :class:`FusedPTLNode` may run a call
    that :func:`node_steps` put on one node: plain tensors and no dispatch or function mode
    (a mode would see one op where PTLNode shows it every kernel and temporary)."""
    if (os.environ.get(ENV, "1") == "python" or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()
            or any(type(t) not in _PLAIN for t in tensors)):
        return None
    return getattr(resolve(backend, tensors[0].device), "PTL_OPS", None)


def _node_grads(ctx, gx, gw, gb):
    """A PTL node's backward result: x's gradient, the parameters' in their own dtypes (the
    kernels took them in x's), None for the rest."""
    need = ctx.needs_input_grad
    w_dtype, b_dtype = ctx.param_dtypes
    return (gx, as_dtype(gw, w_dtype) if need[1] else None,
            as_dtype(gb, b_dtype) if need[2] else None, None, None, None, None, None, None)


class PTLNode(torch.autograd.Function):
    """PTL (SPEC §4) from x, the patch parameters and the resized mask m, as :class:`PTL`'s
    unfused path computes it, and the backward of its four Functions in reverse order. x's
    gradient through the blend, ``g·(1 - m)``, is added last and C_f's after the attention's
    backward: the unfused graph freed the output gradient after the blend's backward, which a
    node cannot (its arguments live to its end), and deferring those terms keeps the
    attention's backward, the peak of PTL's memory, no larger than unfused."""

    @staticmethod
    def forward(ctx, x, weight, bias, m, steps, geometry, eps, min_mass, scale):
        (ph, pw), (sh, sw) = geometry
        ps, norm, attn = (Step(fn) for fn in steps)
        blend = Step(Blend, (False, True, False, False))  # dx and dC_f of the blend: backward
        stats = ps.forward(x, 1 - m, as_dtype(weight, x.dtype), as_dtype(bias, x.dtype), ph, pw,
                           sh, sw, eps, min_mass)
        mu, sigma, content, mass = (as_dtype(t, x.dtype) for t in stats)  # Triton's are float32
        c_f = norm.forward(x, m, eps)[0]                                    # (B, HW, C)
        valid, key_bias, query_mask, values = attention_keys(m, mu, sigma, mass, min_mass)
        c_f = inactive_content_zeroed(c_f, query_mask)
        attended = attn.forward(c_f, content, values, key_bias, query_mask, scale)
        out = blend.forward(x, attended[0], c_f, blend_weight(m, valid))
        ctx.steps = (ps, norm, attn, blend)
        ctx.counts = [len(s.saved) for s in ctx.steps]
        ctx.save_for_backward(*(t for s in ctx.steps for t in s.saved))
        for s in ctx.steps:
            s.release()
        ctx.stat_dtypes = [t.dtype for t in stats[:3]]
        ctx.attn_outputs = len(attended)
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return out

    @staticmethod
    @once_differentiable  # the ops' backwards have no derivative of their own
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        for s, n in zip(ctx.steps, ctx.counts):
            s.restore(islice(saved, n))
        ps, norm, attn, blend = ctx.steps
        gav = blend.backward(grad)[1]  # [dA | dV] = [m·g | m·g·C_f]
        dq, dk, dv = attn.backward(gav, *[None] * (ctx.attn_outputs - 1))[:3]
        C = grad.shape[1]
        # c_f feeds the attention and the blend (dC_f = dA·V there): added into dq in one pass,
        # and after the attention's backward, so that it does not hold another x-size tensor
        _, v, m = blend.saved  # Blend keeps (C_f, V, m)
        gcf = dq.addcmul_(gav[..., :C], v)
        del gav, dq
        gx = norm.backward(gcf, None, None)[0] if ctx.needs_input_grad[0] else None
        del gcf
        g_mu, g_sigma = dv.split(C, -1)  # values = [mu | sigma]
        grads = [as_dtype(g, dt) for g, dt in zip((g_mu, g_sigma, dk), ctx.stat_dtypes)]
        gxp, _, gw, gb = ps.backward(*grads, None)[:4]
        if gx is not None:
            gx += gxp
            del gxp
            gx.addcmul_(grad, 1 - m)  # the blend's (1 - m)·g
        for s in ctx.steps:
            s.release()
        return _node_grads(ctx, gx, gw, gb)


class FusedPTLNode(torch.autograd.Function):
    """:class:`PTLNode`'s forward and backward as one op each (``ops``: the backend's
    ``PTL_OPS``), which run the same ops in the same order in C++: identical outputs and
    gradients on CPU, within FMA contraction on CUDA where the blend runs as kernels
    (tests/test_ptl_node.py). The saved tensors still go through ``save_for_backward``
    (version checks, saved-tensor hooks)."""

    @staticmethod
    def forward(ctx, x, weight, bias, m, ops, geometry, eps, min_mass, scale):
        (ph, pw), (sh, sw) = geometry
        forward_op, ctx.backward_op = ops
        w = as_dtype(weight, x.dtype)
        out, *saved = forward_op(x, m, w, as_dtype(bias, x.dtype), ph, pw, sh, sw, eps, min_mass,
                                 scale)
        ctx.save_for_backward(x, m, w, *saved)
        ctx.args = (ph, pw, sh, sw, eps, min_mass, scale)
        ctx.param_dtypes = (weight.dtype, bias.dtype)
        return out

    @staticmethod
    @once_differentiable  # the ops' backwards have no derivative of their own
    def backward(ctx, grad):
        x, m, w, *saved = ctx.saved_tensors
        gx, gw, gb = ctx.backward_op(grad, x, m, w, saved, *ctx.args, ctx.needs_input_grad[0])
        return _node_grads(ctx, gx, gw, gb)
