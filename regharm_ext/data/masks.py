"""Object-like random masks: ellipses, polygons, smooth star-shaped outlines and noise blobs.

Every shape is a level set of a field ``f`` over the image, and the threshold is the field's
``1 - area`` quantile, so the foreground covers exactly the drawn fraction of the image whatever
the shape (ties aside). Star-shaped outlines use ``f(p) = R(theta) / |p - c|``: its level sets are
the outline ``R`` scaled about the centre ``c``, hence one connected object.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

KINDS = ("ellipse", "polygon", "star", "blob")


def _polar(size: int, center):
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = ys - center[0] * size, xs - center[1] * size
    return np.arctan2(dy, dx), np.sqrt(dx * dx + dy * dy) + 1e-3


def _ellipse_radius(theta, rng):
    aspect = rng.uniform(0.35, 1.0)
    phi = rng.uniform(0, np.pi)
    c, s = np.cos(theta - phi), np.sin(theta - phi)
    return 1.0 / np.sqrt(c * c + (s / aspect) ** 2)


def _polygon_radius(theta, rng):
    """Distance from the centre to a random star-shaped polygon along each ray."""
    n = int(rng.integers(3, 10))
    ang = np.sort((np.arange(n) + rng.uniform(-0.35, 0.35, n)) * 2 * np.pi / n + rng.uniform(0, 2 * np.pi))
    rad = rng.uniform(0.45, 1.0, n)
    verts = np.stack([rad * np.cos(ang), rad * np.sin(ang)], -1)
    t = np.mod(theta - ang[0], 2 * np.pi)
    rel = np.mod(ang - ang[0], 2 * np.pi)
    idx = np.clip(np.searchsorted(rel, t, side="right") - 1, 0, n - 1)
    p0, p1 = verts[idx], verts[(idx + 1) % n]
    # ray u(theta) meets the edge p0-p1 where r * (n . u) = n . p0, n the edge normal
    nrm = np.stack([p1[..., 1] - p0[..., 1], p0[..., 0] - p1[..., 0]], -1)
    d = (nrm * p0).sum(-1)
    nu = nrm[..., 0] * np.cos(theta) + nrm[..., 1] * np.sin(theta)
    return np.abs(d) / np.maximum(np.abs(nu), 1e-6)


def _star_radius(theta, rng):
    r = np.zeros_like(theta)
    for k in range(1, 6):
        r += rng.normal(0, 0.35 / k) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return np.exp(r)


def _blob_field(size, center, rng):
    """Smooth noise under a Gaussian envelope: organic, occasionally a few nearby pieces."""
    g = int(rng.integers(4, 8))
    noise = rng.normal(0, 1, (g, g)).astype(np.float32)
    lo, hi = float(noise.min()), float(noise.max())
    u8 = Image.fromarray(((noise - lo) / (hi - lo + 1e-6) * 255).astype(np.uint8))
    smooth = np.asarray(u8.resize((size, size), Image.BICUBIC), dtype=np.float32) / 255.0
    _, dist = _polar(size, center)
    return smooth - 1.5 * (dist / size / rng.uniform(0.2, 0.35)) ** 2


def random_mask(rng: np.random.Generator, size: int, area=(0.05, 0.40), kind=None) -> np.ndarray:
    """Binary object mask (float32 array [size, size], 1 = foreground) covering ``area`` (range)."""
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    frac = rng.uniform(*area)
    center = rng.uniform(0.3, 0.7, 2)
    if kind == "blob":
        field = _blob_field(size, center, rng)
    else:
        theta, dist = _polar(size, center)
        radius = {"ellipse": _ellipse_radius, "polygon": _polygon_radius, "star": _star_radius}[kind]
        field = radius(theta, rng) / dist
    thr = np.quantile(field, 1.0 - frac)
    return (field >= thr).astype(np.float32)
