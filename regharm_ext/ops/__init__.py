"""The two ops of the SPEC and PTL's masked instance norm, dispatched to a backend (see
:mod:`regharm_ext.backends`)."""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from . import _checks
from .norm_composite import composite

__all__ = ["patch_stats", "masked_attention", "masked_norm"]


def patch_stats(
    x: torch.Tensor,
    bg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    patch_size,
    stride,
    eps: float = 1e-5,
    min_mass: float = 0.5,
    backend: Optional[str] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Background appearance (masked mean/std) and content of every patch (SPEC §2, Eq. 3).

    Args:
        x (Tensor[B, C, H, W]): features.
        bg (Tensor[B, 1, H, W]): background weights in [0, 1] (data: no gradient). Values are
            not read to check them (that would stall a GPU): outside [0, 1] the results are
            undefined (negative weights can give NaN).
        weight (Tensor[ph*pw]): the linear map from a normalized block to its content token.
        bias (Tensor[1]): its bias.
        patch_size, stride (int or (int, int)): patches without padding, row-major order
            ``n = i*Kw + j``, ``Kh = (H-ph)//sh + 1``, ``Kw = (W-pw)//sw + 1``.
        eps (float): added to the masked variance.
        min_mass (float): patches whose ``Σ bg`` is below this are invalid: their outputs are 0
            and carry no gradient.
        backend (str, optional): ``reference``, ``torch``, ``native``, ``triton``; None picks.

    Returns:
        mu, sigma, content (Tensor[B, K, C]) and mass (Tensor[B, K]), in x's dtype.
    """
    from ..backends import resolve

    ps, st = _checks.check_patch_stats(x, bg, weight, bias, patch_size, stride, eps, min_mass)
    impl = resolve(backend, x.device)
    # bg is data (SPEC §2): detached here, so that no backend lets a gradient reach it
    return impl.patch_stats(x, bg.detach(), weight, bias, ps, st, float(eps), float(min_mass))


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    query_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Foreground-to-background attention with a per-key additive bias (SPEC §3, Eq. 1, 4).

    ``out_l = Σ_n softmax_n(scale · q_l·k_n + key_bias_n) · v_n`` for active queries; inactive
    queries and rows whose keys are all removed (``key_bias = -inf``) give exactly 0.

    Args:
        q (Tensor[B, L, D]), k (Tensor[B, N, D]), v (Tensor[B, N, E]): one dtype.
        key_bias (Tensor[B, N]): additive bias, finite or ``-inf`` (removes the key); data: no
            gradient. NaN or ``+inf`` (not checked) give undefined results. Remove keys with
            ``-inf``, not ``-1e9``: the backward recomputes the probabilities from one float32
            log-sum-exp per row, whose last bits a score of that size takes (a row of scores
            near ±1e9 gets gradients N times too large; ±1e4 costs ~1e-4 of relative accuracy).
        query_mask (Tensor[B, L] bool, optional): active queries (data).
        scale (float, optional): any finite number; defaults to ``D ** -0.5``.
        backend (str, optional): see :func:`patch_stats`.

    Returns:
        out (Tensor[B, L, E]) in q's dtype.
    """
    from ..backends import resolve

    _checks.check_masked_attention(q, k, v, key_bias, query_mask)
    scale = q.shape[-1] ** -0.5 if scale is None else _checks.number(scale, "scale", positive=False)
    impl = resolve(backend, q.device)
    # key_bias is data (SPEC §3): detached, so that no backend lets a gradient reach it
    return impl.masked_attention(q, k, v, key_bias.detach(), query_mask, float(scale))


def masked_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5,
                backend: Optional[str] = None) -> torch.Tensor:
    """PTL's foreground content: x normalized per channel with the statistics of ``weight``,
    as tokens (SPEC §4 step 3; see :mod:`regharm_ext.ops.norm_composite`).

    Args:
        x (Tensor[B, C, H, W]): features.
        weight (Tensor[B, 1, H, W]): weights >= 0 of the statistics (the foreground mask). Data
            for the kernels; one that needs a gradient takes the composite of torch ops.
        eps (float): added to the weighted variance.
        backend (str, optional): see :func:`patch_stats`.

    Returns:
        y (Tensor[B, H*W, C]) in x's dtype, contiguous: ``(x - mu) / sqrt(var + eps)``.
    """
    from ..backends import resolve

    _checks.check_masked_norm(x, weight, eps)
    impl = resolve(backend, x.device)
    if weight.requires_grad or _composite_norm_asked():
        return composite(x, weight, float(eps))
    return impl.masked_norm(x, weight, float(eps))


def _composite_norm_asked() -> bool:
    """``REGHARM_MASKED_NORM=composite``: every backend runs the composite of torch ops instead of
    its kernels (eager calls; read on each call), so that a benchmark can time PTL both ways on
    one machine (benchmarks/gpu_bench.py's ``*_norm_composite`` rows)."""
    return (not torch.compiler.is_compiling()
            and os.environ.get("REGHARM_MASKED_NORM", "") == "composite")
