"""Occluders cut from real images, for training the visibility head and for testing it.

Two families with deliberately different looks, so that a test on one measures what a head
trained on the other learned about occlusion rather than about our drawing:

* training (:func:`soft_alpha`): soft-edged, irregular shapes rising from the bottom, top
  or a side of the image, full or partial width, filled with a patch of *another training
  image* (a person, background, an object at the border) — used by
  ``datasets.TrainTransform`` with torch's global generator;
* test (:func:`hard_alpha`): hard-edged rectangles and random convex polygons, filled from
  *test-split images of other identities* — used by ``converters.make_occluded``
  (``prepare.py --occlude``) with a numpy generator, deterministically.

Both return an alpha map ``(H, W)`` in [0, 1] (1 = hidden); the visibility of a pixel is
``1 - alpha``, so a stripe's visible fraction is exact, edges included.
"""
from __future__ import annotations

import math

import numpy as np
import torch

# anchor -> probability, for the training occluders; real occluders (desks, cars, bags, other
# people in front) mostly rise from the bottom.
TRAIN_ANCHORS = {"bottom": 0.45, "top": 0.2, "left": 0.175, "right": 0.175}


def _u(lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand(()))


def soft_alpha(h: int, w: int, *, max_depth: float = 0.55) -> torch.Tensor:
    """A random soft-edged occluder mask (H, W) float32 from torch's global generator.

    The shape is the region between an image edge and a wavy boundary (three random
    harmonics), tapered at its ends when it is narrower than the edge, with a 1-4 pixel
    feathered edge: no straight lines or sharp corners a head could learn to spot.
    """
    r = float(torch.rand(()))
    acc = 0.0
    for anchor, prob in TRAIN_ANCHORS.items():
        acc += prob
        if r < acc:
            break
    vertical = anchor in ("bottom", "top")
    length, across = (w, h) if vertical else (h, w)      # along the anchored edge / away from it
    depth = across * (_u(0.2, max_depth) if vertical else _u(0.25, 0.6))
    if float(torch.rand(())) < 0.5:                       # full edge
        span0, span1 = -0.1 * length, 1.1 * length
    else:
        size = length * _u(0.4, 0.9)
        span0 = _u(0, length - size)
        span1 = span0 + size
    t = torch.arange(length, dtype=torch.float32) + 0.5
    u = ((t - span0) / (span1 - span0)).clamp(0, 1)       # 0..1 along the occluder
    wave = sum(_u(0, 0.12) * torch.sin(2 * math.pi * k * u + _u(0, 2 * math.pi)) for k in (1, 2, 3))
    taper = torch.ones_like(u) if span1 - span0 > length else (4 * u * (1 - u)).clamp_min(0) ** 0.35
    boundary = depth * (1 + wave) * taper                 # (length,) distance from the edge
    dist = torch.arange(across, dtype=torch.float32) + 0.5
    soft = _u(1.0, 4.0)
    alpha = ((boundary[None, :] - dist[:, None]) / soft + 0.5).clamp(0, 1)   # (across, length)
    if anchor in ("bottom", "right"):
        alpha = alpha.flip(0)
    return alpha if vertical else alpha.t().contiguous()


def hard_alpha(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random hard-edged occluder mask (H, W) float32 from ``rng``: a rectangle or a convex
    polygon, anchored at the bottom (half the time), top or a side, hiding 20-60 % of the image.

    Shapes hiding less than 20 % are redrawn: a box pushed past the image border or a polygon
    sliver would otherwise hide a few pixels, or none, of a query counted as occluded."""
    for _ in range(100):
        alpha = _hard_shape(h, w, rng)
        if alpha.mean() >= 0.2:
            break
    return alpha


def _hard_shape(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One draw of :func:`hard_alpha`'s shape, whatever its size."""
    anchor = rng.choice(["bottom", "bottom", "top", "left", "right"])
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    if anchor in ("bottom", "top"):
        depth = h * rng.uniform(0.2, 0.5)
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * w) if rng.random() < 0.5 else (0.0, float(w))
        if x1 - x0 < 0.35 * w:
            x1 = min(float(w), x0 + 0.35 * w)
        y0, y1 = (h - depth, float(h)) if anchor == "bottom" else (0.0, depth)
    else:
        depth = w * rng.uniform(0.3, 0.6)
        span = h * rng.uniform(0.4, 1.0)
        y0 = rng.uniform(0, h - span)
        y1 = y0 + span
        x0, x1 = (0.0, depth) if anchor == "left" else (w - depth, float(w))
    if rng.random() < 0.5:
        return ((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)).astype(np.float32)
    # Convex polygon: random points on the box's sides, kept in angular order around its centre.
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    angles = np.sort(rng.uniform(0, 2 * np.pi, 6))
    px = cx + (x1 - x0) / 2 * np.cos(angles) * 1.3
    py = cy + (y1 - y0) / 2 * np.sin(angles) * 1.3
    inside = np.ones((h, w), bool)
    for i in range(len(angles)):
        ax, ay, bx, by = px[i], py[i], px[(i + 1) % len(px)], py[(i + 1) % len(py)]
        inside &= (bx - ax) * (yy - ay) - (by - ay) * (xx - ax) >= 0
    return (inside & (yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1)).astype(np.float32)


def source_box(h: int, w: int, u: list[float]) -> tuple[int, int, int, int]:
    """A crop (y0, x0, y1, x1) of a source image of size (h, w) holding 30-70 % of its height
    and 50-100 % of its width: part of a person, or background at the borders; ``u`` four
    uniform numbers in [0, 1)."""
    ch = max(2, int(h * (0.3 + 0.4 * u[0])))
    cw = max(2, int(w * (0.5 + 0.5 * u[1])))
    y0 = int((h - ch) * u[2])
    x0 = int((w - cw) * u[3])
    return y0, x0, y0 + ch, x0 + cw
