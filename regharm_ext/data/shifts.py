"""Appearance shifts of the kinds iHarmony4's composites hold, applied to a whole float image.

iHarmony4 makes its composites by editing the foreground of a real photo: colour transfer from
another photo (HCOCO), Lightroom-style edits of exposure, white balance, saturation, tone
(HAdobe5k, HFlickr), or the same scene at another time of day (Hday2night). Each function here
takes ``img`` (float32 array [H, W, 3] in [0, 1]), the foreground ``mask`` ([H, W], weights) and
a ``numpy`` generator, and returns the shifted image (the caller pastes it inside the mask).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import numpy as np

from .color import lab_to_rgb, linear_to_srgb, luminance, rgb_to_lab, srgb_to_linear


def _signed(rng, lo, hi):
    """A magnitude in [lo, hi] with a random sign: shifts never degenerate to the identity."""
    return float(rng.uniform(lo, hi) * rng.choice([-1.0, 1.0]))


def _weighted_stats(x: np.ndarray, w: np.ndarray):
    w = w[..., None] if w.ndim == x.ndim - 1 else w
    m = max(float(w.sum()), 1e-6)
    mu = (w * x).sum((0, 1)) / m
    sd = np.sqrt((w * (x - mu) ** 2).sum((0, 1)) / m + 1e-6)
    return mu, sd


def transfer_stats(img, mask, ref, ref_weight, rng):
    """Colour statistics of a reference (another photo, or another region of this one) given to
    the foreground: Lab mean/std transfer (Reinhard-like) or per-channel RGB histogram matching."""
    strength = rng.uniform(0.4, 0.9)
    if rng.random() < 0.6:
        lab, ref_lab = rgb_to_lab(img), rgb_to_lab(ref)
        mu, sd = _weighted_stats(lab, mask)
        rmu, rsd = _weighted_stats(ref_lab, ref_weight)
        # a grey foreground (tiny a/b spread) would otherwise be blown up into noise
        out = (lab - mu) * np.clip(rsd / sd, 0.5, 2.0) + rmu
        return np.clip((1 - strength) * img + strength * lab_to_rgb(out), 0, 1)
    out = np.empty_like(img)
    fg, rw = mask > 0.5, ref_weight > 0.5
    if not fg.any() or not rw.any():
        return img
    q = np.linspace(0, 1, 65)
    for c in range(3):
        src_q = np.quantile(img[..., c][fg], q)
        ref_q = np.quantile(ref[..., c][rw], q)
        out[..., c] = np.interp(img[..., c], src_q, ref_q)
    return np.clip((1 - strength) * img + strength * out, 0, 1)


def exposure(img, mask, rng):
    return linear_to_srgb(srgb_to_linear(img) * 2.0 ** _signed(rng, 0.4, 1.6))


def gamma(img, mask, rng):
    return np.clip(img, 0, 1) ** np.exp(_signed(rng, 0.2, 0.7))


def white_balance(img, mask, rng):
    """Colour temperature (red-blue) and tint (green-magenta) gains on linear light."""
    t, g = _signed(rng, 0.1, 0.45), rng.uniform(-0.2, 0.2)
    gains = np.array([1 + t, 1 + g, 1 - t], dtype=np.float32)
    gains /= float(gains @ np.array([0.2126, 0.7152, 0.0722]))
    return linear_to_srgb(srgb_to_linear(img) * gains)


def saturation(img, mask, rng):
    s = float(np.exp(_signed(rng, 0.35, 1.0)))
    y = luminance(img)
    return np.clip(y + s * (img - y), 0, 1)


def hue(img, mask, rng):
    """Rotation of the chroma plane of YIQ."""
    a = np.deg2rad(_signed(rng, 10, 50))
    to_yiq = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], np.float32)
    rot = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]], np.float32)
    m = np.linalg.inv(to_yiq) @ rot @ to_yiq
    return np.clip(img @ m.T.astype(np.float32), 0, 1)


def contrast(img, mask, rng):
    c = float(np.exp(_signed(rng, 0.25, 0.6)))
    mu, _ = _weighted_stats(luminance(img), mask)
    return np.clip(mu + c * (img - mu), 0, 1)


def tone_curve(img, mask, rng):
    """A random monotone curve through 6 control points, shared or per channel."""
    xs = np.linspace(0, 1, 6)
    per_channel = rng.random() < 0.4
    out = np.empty_like(img)
    ys = None
    for c in range(3):
        if ys is None or per_channel:
            ys = np.sort(np.clip(xs + rng.normal(0, 0.12, 6), 0, 1))
            ys[0], ys[-1] = min(ys[0], rng.uniform(0, 0.15)), max(ys[-1], rng.uniform(0.85, 1))
        out[..., c] = np.interp(img[..., c], xs, ys)
    return out


def relight(img, mask, rng):
    """Day<->night-like relighting: dark, blue, flat and desaturated, or warm low sun, or the
    reverse (a night-looking foreground brightened towards daylight)."""
    lin = srgb_to_linear(img)
    mode = int(rng.integers(3))
    if mode == 0:  # night
        lin = lin * 2.0 ** rng.uniform(-3.0, -1.3) * np.array([0.75, 0.9, 1.25], np.float32)
        out = linear_to_srgb(lin)
        y = luminance(out)
        return np.clip(y + rng.uniform(0.4, 0.8) * (out - y), 0, 1)
    if mode == 1:  # golden hour
        lin = lin * 2.0 ** rng.uniform(-0.5, 0.5) * np.array([1.3, 1.0, 0.65], np.float32)
        return linear_to_srgb(lin)
    # daylight from a dim scene: strong lift, cooler, more contrast
    out = linear_to_srgb(lin * 2.0 ** rng.uniform(1.0, 2.2) * np.array([0.95, 1.0, 1.1], np.float32))
    mu, _ = _weighted_stats(luminance(out), mask)
    return np.clip(mu + rng.uniform(1.1, 1.4) * (out - mu), 0, 1)


PHOTOMETRIC: Dict[str, Callable] = {
    "exposure": exposure, "gamma": gamma, "white_balance": white_balance, "saturation": saturation,
    "hue": hue, "contrast": contrast, "tone_curve": tone_curve, "relight": relight,
}


def random_shift(img: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                 reference: Optional[Callable[[], np.ndarray]] = None) -> np.ndarray:
    """One composite's foreground appearance: a colour transfer or a chain of 1-3 edits.

    ``reference()`` returns another photo (float [H, W, 3]) of the same split for colour transfer;
    without it, or in a third of the transfers, the reference is the background of ``img`` itself
    re-weighted to a random region (a different part of the scene, not the foreground's surround).
    """
    r = rng.random()
    if r < 0.35:
        if reference is not None and rng.random() < 0.7:
            ref = reference()
            ref_w = np.ones(ref.shape[:2], np.float32)
        else:
            ref = img
            h, w = mask.shape
            ys, xs = np.mgrid[0:h, 0:w]
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            blob = np.exp(-(((ys - cy) / (0.3 * h)) ** 2 + ((xs - cx) / (0.3 * w)) ** 2))
            ref_w = (blob * (1 - mask)).astype(np.float32)
        out = transfer_stats(img, mask, ref, ref_w, rng)
        if rng.random() < 0.3:
            out = PHOTOMETRIC[rng.choice(["exposure", "white_balance", "saturation"])](out, mask, rng)
        return out
    names = list(PHOTOMETRIC)
    probs = np.array([3, 2, 3, 2, 1, 2, 2, 1.5], np.float64)
    chain = rng.choice(names, size=int(rng.choice([1, 2, 3], p=[0.45, 0.4, 0.15])), replace=False,
                       p=probs / probs.sum())
    out = img
    for name in chain:
        out = PHOTOMETRIC[name](out, mask, rng)
    return out
