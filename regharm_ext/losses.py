"""The training loss of the paper: foreground-normalized MSE (Eq. 8, after iDIH [23])."""
from __future__ import annotations

import torch

from .image_args import check_images, check_mask


def fmse_loss(output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, a_min: float = 100.0) -> torch.Tensor:
    """Eq. 8, per image, then the mean over the batch::

        L_b = Σ_{h,w,c} (O_bchw - H_bchw)² / max(A_min, Σ_{h,w} M_bhw)

    The squared error is summed over every pixel and channel (background included: the residual
    and base outputs copy the background, so it contributes ~0) and divided by the foreground
    area in pixels, floored at ``a_min`` so that tiny foregrounds do not blow the loss up.

    Args:
        output, target (Tensor[B, 3, H, W]): images in [0, 1].
        mask (Tensor[B, 1, H, W]): foreground weights in [0, 1].
        a_min (float): the area floor A_min (100 in the paper).

    Returns:
        Scalar tensor (float32, or float64 when output or target is float64).
    """
    mask = check_mask(mask, check_images(("output", output), ("target", target)))
    dt = torch.float64 if torch.float64 in (output.dtype, target.dtype) else torch.float32
    err = ((output.to(dt) - target.to(dt)) ** 2).flatten(1).sum(1)
    area = mask.to(dt).flatten(1).sum(1).clamp_min(a_min)
    return (err / area).mean()
