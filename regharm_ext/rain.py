"""RainNet's region-aware normalization (RAIN, Ling et al. CVPR 2021), the "AdaIN" row of Table 2.

The comparison point for PTL: the foreground takes the *global* background appearance (masked
mean and std over the whole background) instead of the appearance of matched patches.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import resize_mask


def _masked_stats(x: torch.Tensor, w: torch.Tensor, eps: float):
    """Weighted mean and std per channel: x (Tensor[B, C, H, W]), w (Tensor[B, 1, H, W]) ->
    (Tensor[B, C, 1, 1], Tensor[B, C, 1, 1], mass Tensor[B, 1, 1, 1])."""
    mass = w.sum((2, 3), keepdim=True)
    safe = mass.clamp_min(1e-6)
    mu = (w * x).sum((2, 3), keepdim=True) / safe
    var = (w * (x - mu) ** 2).sum((2, 3), keepdim=True) / safe
    return mu, torch.sqrt(var + eps), mass


class RAIN(nn.Module):
    """Foreground features re-normalized to the background's masked mean/std.

    ``x' = (1 - m) * x + m * (((x - mu_f) / sigma_f * sigma_b + mu_b) * (1 + gamma) + beta)``
    with ``mu_f, sigma_f`` over the foreground (weights ``m``), ``mu_b, sigma_b`` over the
    background (weights ``1 - m``), and a learned per-channel ``gamma, beta`` (initialized at 0,
    as in RainNet, so the layer starts as the plain statistics transfer). An image with no
    foreground or no background passes through unchanged.

    Shapes: x (Tensor[B, C, H, W]), mask (Tensor[B, 1, H', W']) in [0, 1] -> (Tensor[B, C, H, W]).
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.channels, self.eps = channels, eps
        self.gamma = nn.Parameter(torch.zeros(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"RAIN({self.channels}) expects x of shape (B, {self.channels}, H, W), "
                             f"got {tuple(x.shape)}")
        m = resize_mask(mask, tuple(x.shape[-2:]), x.shape[0]).to(x.dtype)
        xf = x.float()
        mu_f, sd_f, mass_f = _masked_stats(xf, m.float(), self.eps)
        mu_b, sd_b, mass_b = _masked_stats(xf, 1 - m.float(), self.eps)
        moved = (xf - mu_f) / sd_f * sd_b + mu_b
        moved = moved * (1 + self.gamma.view(1, -1, 1, 1)) + self.beta.view(1, -1, 1, 1)
        # blended in float32: moved may exceed float16's range outside the foreground, where
        # 0 * inf would be NaN instead of x
        mf = m.float()
        out = ((1 - mf) * xf + mf * moved).to(x.dtype)
        has_both = ((mass_f > 0) & (mass_b > 0)).view(-1, 1, 1, 1)
        return torch.where(has_both, out, x)
