"""How the plugin draws a run and an edit, in numbers only (no Qt, no napari): the saliency
colour scale, the width of outlines and the eraser's size.

Saliency is shown in percent of a robust top, the 99th percentile of a map, so that one
bright pixel cannot set the scale. Per image (the default), each map has its own top: every
image's map is visible (one scale for a whole ISIC folder left an image whose top was a tenth
of the stack's blank), and each half shows where its model's evidence lies, as a share of its
strongest. Shared, one top for every map: images, and before and after, compare in strength.
"""

from __future__ import annotations

import numpy as np

from .masks import DEFAULT_COARSE_MARGIN, radius_pixels

SALIENCY_PERCENTILE = 99.0
# The colour bar's caption, in words: what 100 on it means.
SALIENCY_WORDS = {
    True: "share of the malignant evidence,\n% of the strongest in each half",
    False: "share of the malignant evidence,\n% of the strongest in all images",
}


def saliency_tops(maps: np.ndarray) -> np.ndarray:
    """The robust top of each (H, W) map of a (N, H, W) stack: its 99th percentile."""
    maps = np.asarray(maps)
    if not len(maps):
        return np.zeros(0)
    return np.percentile(maps.reshape(len(maps), -1), SALIENCY_PERCENTILE, axis=1)


def saliency_scales(
    before_tops: np.ndarray, after_tops: np.ndarray, per_image: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """The top of the colour scale for each before and each after map, from their robust tops
    (nan where an image was not measured): per image, each map's own; shared, the largest of
    them all for every map."""
    before, after = np.asarray(before_tops, float), np.asarray(after_tops, float)
    tops = np.fmax(before, after)
    if per_image or not np.isfinite(tops).any():
        return before, after
    shared = np.full_like(tops, np.nanmax(tops))
    return shared, shared


def as_percent(maps: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """(N, H, W) maps in percent of their image's `scale` (N,), float32; zero where the scale
    is not a positive number (an image not measured, or a map with no evidence)."""
    scale = np.asarray(scale, float)
    usable = np.isfinite(scale) & (scale > 0)
    factor = np.where(usable, 100.0 / np.where(usable, scale, 1.0), 0.0).astype(np.float32)
    return np.asarray(maps, np.float32) * factor[:, None, None]


def outline_width(shape: tuple[int, ...]) -> int:
    """Outline thickness in image pixels: about one two-hundredth of the image's width, so an
    outline stays at least two screen pixels wide when the before and after halves of a
    1,024-pixel image share a canvas about 900 pixels wide (one image pixel was half a
    screen pixel there, and the outlines broke up)."""
    return max(1, round(shape[-1] / 200))


def eraser_size(shape: tuple[int, ...]) -> int:
    """The eraser's diameter in image pixels: half the default coarse margin
    (masks.DEFAULT_COARSE_MARGIN), so a stroke along the middle of a band that wide erases
    inside the band only. napari's fixed 10 pixels spans a whole band of the sample's
    128-pixel images and is a dot on a 1,024-pixel one."""
    return max(1, radius_pixels(shape, DEFAULT_COARSE_MARGIN) // 2)
