"""The `reference` backend: the equations of SPEC §2–§3 transcribed as plainly as possible.

It materializes every block (``unfold``) and the full ``L x N`` score matrix, so it is slow and
memory-hungry by design: it is the oracle the fast backends are tested against. Autograd comes
from PyTorch. Computation runs in float32 (float64 when x / q is float64), results take the input
dtype.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .norm_composite import composite


def unavailable(device: torch.device):
    """Runs wherever PyTorch runs."""
    return None


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.double() if t.dtype == torch.float64 else t.float()


def patch_stats(
    x: torch.Tensor,
    bg: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    patch_size: Tuple[int, int],
    stride: Tuple[int, int],
    eps: float,
    min_mass: float,
):
    """See :func:`regharm_ext.ops.patch_stats`; arguments are already checked."""
    B, C, H, W = x.shape
    ph, pw = patch_size
    K = ((H - ph) // stride[0] + 1) * ((W - pw) // stride[1] + 1)    # explicit: B may be 0
    # every backend computes in x's precision, whatever float dtype bg/weight/bias come in
    xa = _acc(x)
    bga, wa, ba = (t.to(xa.dtype) for t in (bg, weight, bias))
    # blocks: (B, C, P, K) and (B, 1, P, K), P = ph*pw in row-major order, K patches row-major
    xb = F.unfold(xa, patch_size, stride=stride).view(B, C, ph * pw, K)
    pb = F.unfold(bga, patch_size, stride=stride).view(B, 1, ph * pw, K)

    mass = pb.sum(2)                                                  # (B, 1, K)
    valid = mass >= min_mass
    safe_mass = torch.where(valid, mass, torch.ones_like(mass))
    mu = (pb * xb).sum(2) / safe_mass                                 # (B, C, K)
    centred = xb - mu.unsqueeze(2)
    sigma = torch.sqrt((pb * centred**2).sum(2) / safe_mass + eps)    # (B, C, K)
    normed = pb * centred / sigma.unsqueeze(2)                        # (B, C, P, K)
    content = ba + torch.einsum("p,bcpk->bck", wa, normed)

    zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
    mu, sigma, content = (torch.where(valid, t, zero) for t in (mu, sigma, content))
    out = [t.transpose(1, 2).to(x.dtype) for t in (mu, sigma, content)]
    return out[0], out[1], out[2], mass[:, 0].to(x.dtype)


def masked_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor,
    query_mask: Optional[torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """See :func:`regharm_ext.ops.masked_attention`; arguments are already checked."""
    qa, ka, va = _acc(q), _acc(k), _acc(v)
    kb = key_bias.to(qa.dtype)  # the bias may come in another float dtype than q
    scores = scale * qa @ ka.transpose(1, 2) + kb[:, None, :]        # (B, L, N)
    # the max is only a shift: detaching it leaves the softmax and its gradient unchanged, and a
    # row with every key removed (max = -inf) is shifted by 0 instead of producing inf - inf
    if scores.shape[-1] == 0:  # no keys at all (N = 0): like all removed, the rows give 0
        row_max = scores.new_zeros(*scores.shape[:-1], 1)
    else:
        row_max = scores.amax(-1, keepdim=True).detach()
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(scores - row_max)
    denom = e.sum(-1, keepdim=True)
    probs = e / torch.where(denom > 0, denom, torch.ones_like(denom))
    out = probs @ va
    if query_mask is not None:
        out = out * query_mask[..., None].to(out.dtype)
    return out.to(q.dtype)


masked_norm = composite  # see regharm_ext.ops.masked_norm: the composite of torch ops
