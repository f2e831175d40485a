"""Evaluation metrics of the iDIH protocol (Sofiiuk et al., the paper's [23]; SPEC §6).

Per image, with ``P`` the prediction and ``T`` the target on the 0-255 scale
(``P = clamp(255 · pred, 0, 255)``, ``T = 255 · target``), ``err = P - T``, ``m`` the (soft) mask,
``H·W`` pixels and 3 channels:

- ``MSE  = Σ err² / (3·H·W)``
- ``fMSE = Σ m·err² / (3·Σ m + ε)``                 (Σ m over pixels, ε = 1e-6)
- ``PSNR = 10·log10(peak² / (MSE + ε))``,  ``peak = max(T)`` of that image ("target", iDIH's
  choice) or 255.

Subset figures are means of the per-image values; "All" is the mean over all images.
"""
from __future__ import annotations

import numbers
from collections import OrderedDict
from typing import Dict, Iterable, Union

import torch

from .image_args import check_images, check_mask

EPS = 1e-6
Peak = Union[str, float]


def image_metrics(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                  peak: Peak = "target") -> Dict[str, torch.Tensor]:
    """Per-image MSE, fMSE and PSNR.

    Args:
        pred, target (Tensor[B, 3, H, W]): images in [0, 1] (pred is clamped, target is not).
        mask (Tensor[B, 1, H, W]): foreground weights in [0, 1].
        peak: "target" (each target's own maximum, iDIH) or a number (e.g. 255).

    Returns: {"mse", "fmse", "psnr"}, each Tensor[B] float64.
    """
    m = check_mask(mask, check_images(("pred", pred), ("target", target))).double()
    if not (peak == "target" or (isinstance(peak, numbers.Real) and not isinstance(peak, bool)
                                 and peak > 0)):
        raise ValueError(f'peak must be "target" (each target\'s maximum) or a number > 0 such as '
                         f'255, got {peak!r}')
    p = (pred.double() * 255.0).clamp(0.0, 255.0)
    t = target.double() * 255.0
    se = (p - t) ** 2
    mse = se.mean((1, 2, 3))
    fmse = (se * m).sum((1, 2, 3)) / (3.0 * m.sum((1, 2, 3)) + EPS)
    if peak == "target":
        pk = t.amax((1, 2, 3))
    else:
        pk = torch.full_like(mse, float(peak))
    psnr = 10.0 * torch.log10(pk ** 2 / (mse + EPS))
    return {"mse": mse, "fmse": fmse, "psnr": psnr}


class MetricTable:
    """Accumulates per-image metrics by subset; :meth:`summary` gives the means and "All"."""

    def __init__(self):
        self._sums: "OrderedDict[str, Dict[str, float]]" = OrderedDict()

    def add(self, subsets: Iterable[str], values: Dict[str, torch.Tensor]) -> None:
        """One batch: ``subsets[i]`` names image i's subset, ``values`` is
        :func:`image_metrics`' result for the batch (one value per image)."""
        if isinstance(subsets, str):
            raise TypeError(f"subsets must be one name per image (a list), got the string {subsets!r}")
        subsets = list(subsets)
        sizes = {k: len(values[k]) for k in ("mse", "fmse", "psnr")}
        if set(sizes.values()) != {len(subsets)}:
            raise ValueError(f"{len(subsets)} subset name(s) for metrics of sizes {sizes}: give one "
                             f"name per image")
        if "All" in subsets:
            raise ValueError('"All" is the total of the table; name the subset otherwise')
        for i, s in enumerate(subsets):
            acc = self._sums.setdefault(s, {"n": 0, "mse": 0.0, "fmse": 0.0, "psnr": 0.0})
            acc["n"] += 1
            for k in ("mse", "fmse", "psnr"):
                acc[k] += float(values[k][i])

    def summary(self) -> Dict[str, Dict[str, float]]:
        """{subset: {"n", "mse", "fmse", "psnr"}, ..., "All": {...}} (means over images)."""
        out, total = {}, {"n": 0, "mse": 0.0, "fmse": 0.0, "psnr": 0.0}
        for s, acc in self._sums.items():
            n = acc["n"]
            out[s] = {"n": n, **{k: acc[k] / n for k in ("mse", "fmse", "psnr")}}
            total["n"] += n
            for k in ("mse", "fmse", "psnr"):
                total[k] += acc[k]
        n = total["n"]
        out["All"] = {"n": n, **{k: (total[k] / n if n else float("nan")) for k in ("mse", "fmse", "psnr")}}
        return out
