"""The `torch` backend: memory-light PyTorch composites of the ops, autograd by PyTorch.

- ``patch_stats`` never builds the blocks: every output is a window sum (``Σbg``, ``Σbg·x``,
  ``Σbg·x²``, ``Σweight·bg``, ``Σweight·bg·x``), taken by strided pooling / convolution over
  ``x`` shifted by its per-channel mean (so ``+100`` offsets do not cancel catastrophically in
  ``Σbg·x² - mass·mu²``). Raw moments still lose float32 accuracy at patches whose background is
  a few pixels of nearly one value (their gradient divides by sigma³), and on a GPU cuDNN runs
  the convolutions in TF32 unless ``torch.backends.cudnn.allow_tf32`` is off: an H100 run found
  the float32 gradient of x 18× the tests' tolerance at the paper's setting. The ``native`` and
  ``triton`` kernels centre on each patch's mean.
- ``masked_attention`` gathers the active queries and live keys of each image (padded to the
  batch's largest counts) and runs ``F.scaled_dot_product_attention`` on them with the key bias
  as an additive mask, in the layout its fused kernels take (flash / memory-efficient attention:
  the L x N scores are never materialized). Those kernels have no second derivative: a
  ``create_graph=True`` backward through this op raises (as through the kernel backends'); the
  ``reference`` backend has one.
- ``masked_norm`` is the composite of :mod:`regharm_ext.ops.norm_composite`.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .norm_composite import acc_dtype as _acc_dtype, composite


def unavailable(device: torch.device):
    """Runs wherever PyTorch runs."""
    return None


def patch_stats(x, bg, weight, bias, patch_size: Tuple[int, int], stride: Tuple[int, int],
                eps: float, min_mass: float):
    """See :func:`regharm_ext.ops.patch_stats`; arguments are already checked."""
    B, C, H, W = x.shape
    ph, pw = patch_size
    dt = _acc_dtype(x)
    xa, bga = x.to(dt), bg.to(dt)
    xs = xa - xa.mean((2, 3), keepdim=True).detach()            # shift: variance is invariant
    area = float(ph * pw)

    def wsum(t):  # window sums over every patch: (B, c, Kh, Kw)
        return F.avg_pool2d(t, patch_size, stride=stride) * area

    bx = bga * xs
    mass = wsum(bga)                                              # (B, 1, Kh, Kw)
    s1 = wsum(bx)
    s2 = wsum(bx * xs)
    kern = weight.to(dt).view(1, 1, ph, pw)
    ws = F.conv2d(bga, kern, stride=stride)                       # Σ weight·bg     (B, 1, Kh, Kw)
    wx = F.conv2d(bx.reshape(B * C, 1, H, W), kern, stride=stride)
    wx = wx.view(B, C, *wx.shape[-2:])                            # Σ weight·bg·x   (B, C, Kh, Kw)

    valid = mass >= min_mass
    safe = torch.where(valid, mass, torch.ones_like(mass))
    mu_s = s1 / safe
    var = (s2 / safe - mu_s * mu_s).clamp_min(0)
    sigma = torch.sqrt(var + eps)
    # Σ_u weight·bg·(x - mu) / sigma  =  (Σ weight·bg·x - mu · Σ weight·bg) / sigma
    content = bias.to(dt) + (wx - mu_s * ws) / sigma
    mu = mu_s + (xa - xs).mean((2, 3), keepdim=True)               # undo the shift
    zero = torch.zeros((), dtype=dt, device=x.device)
    outs = [torch.where(valid, t, zero).flatten(2).transpose(1, 2).to(x.dtype)
            for t in (mu, sigma, content)]
    return outs[0], outs[1], outs[2], mass.flatten(1).to(x.dtype)


def _first(flags: torch.Tensor, n: int) -> torch.Tensor:
    """Per row of ``flags`` (Tensor[B, L] bool), the indices of its true entries in order, padded
    with false ones to ``n`` (a stable sort): what the gathers of queries and keys take."""
    return torch.sort((~flags).to(torch.uint8), dim=1, stable=True).indices[:, :n]


def _attend(q, k, v, key_bias, scale, gather_keys: bool = True):
    """SDPA of q (B, L, D) over k (B, N, D), v (B, N, E) with the additive key bias.

    SDPA gets (B, 1, ·, ·) views, the layout its fused kernels (flash attention on CPUs, memory-
    efficient attention on GPUs) take with an additive mask: 3-d inputs fall back to its math
    kernel, which materializes the L x N scores (SPEC §3 asks for none). q and k, or v, get zero
    columns up to one width (CPU flash attention needs D = E; zero columns add nothing to q·k).
    With ``gather_keys`` only each image's live keys are attended to (padded to the batch's
    largest count with removed ones), as the kernel backends skip removed keys."""
    live = torch.isfinite(key_bias)
    dead = ~live.any(-1)                                          # (B,)
    if gather_keys and k.shape[0] and k.shape[1]:
        order = _first(live, max(int(live.sum(1).max()), 1))
        k = torch.gather(k, 1, order[..., None].expand(-1, -1, k.shape[-1]))
        v = torch.gather(v, 1, order[..., None].expand(-1, -1, v.shape[-1]))
        key_bias = torch.gather(key_bias, 1, order)
    # SDPA returns NaN for a row whose keys are all -inf; such rows are whole images here (the
    # bias is per image), so they get a harmless 0 bias and are zeroed afterwards.
    bias = torch.where(dead[:, None], torch.zeros_like(key_bias), key_bias).to(q.dtype)
    D, E = q.shape[-1], v.shape[-1]
    if D < E:
        q, k = F.pad(q, (0, E - D)), F.pad(k, (0, E - D))
    elif E < D:
        v = F.pad(v, (0, D - E))
    out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                         attn_mask=bias[:, None, None, :], scale=scale)[:, 0, :, :E]
    # autocast runs SDPA in its low-precision dtype; the op promises q's dtype (like the other
    # backends), and the scatter into a q-dtype buffer below needs it
    out = out.to(q.dtype)
    return torch.where(dead[:, None, None], torch.zeros_like(out), out)


def _holds_values(t: torch.Tensor) -> bool:
    """Whether ``t``'s values can be read: meta tensors have none, and tensor subclasses (the
    FakeTensor of shape propagation, export) may not; they take the path that needs no values."""
    return not t.is_meta and type(t) is torch.Tensor


def masked_attention(q, k, v, key_bias, query_mask: Optional[torch.Tensor], scale: float):
    """See :func:`regharm_ext.ops.masked_attention`; arguments are already checked."""
    if query_mask is None:
        return _attend(q, k, v, key_bias, scale, gather_keys=_holds_values(key_bias)
                       and not torch.compiler.is_compiling())
    counts = query_mask.sum(1)
    if torch.compiler.is_compiling() or not _holds_values(counts):
        # a compiled graph (or a meta / fake tensor) cannot size a tensor by the number of
        # active queries or live keys (data): every query and key is computed and the inactive
        # queries zeroed, as the gathers would leave them
        out = _attend(q, k, v, key_bias, scale, gather_keys=False)
        return torch.where(query_mask[..., None], out, torch.zeros_like(out))
    B, L, _ = q.shape
    lmax = int(counts.max()) if B else 0
    out = q.new_zeros(B, L, v.shape[-1])
    if lmax == 0:
        return out + 0 * (q.sum() + k.sum() + v.sum())             # keep the graph connected
    order = _first(query_mask, lmax)
    qa = torch.gather(q, 1, order[..., None].expand(-1, -1, q.shape[-1]))
    oa = _attend(qa, k, v, key_bias, scale)
    keep = torch.gather(query_mask, 1, order)[..., None]
    oa = torch.where(keep, oa, torch.zeros_like(oa))
    return out.scatter(1, order[..., None].expand(-1, -1, oa.shape[-1]), oa)


masked_norm = composite  # see regharm_ext.ops.masked_norm: the composite of torch ops
