"""Images as the clinician edits them, and the model's square input.

The viewer shows one (N, H, W, 3) canvas at a working resolution that keeps each image's aspect:
image i fills the top-left (h_i, w_i) of the canvas (its *extent*) and the rest is padding.
The model works at its own square size. Every conversion between the two goes through here, so
the clinician erases at full detail while the model sees what it was trained on (the content
squeezed to size x size, as the dataset readers do).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

BILINEAR, NEAREST = Image.Resampling.BILINEAR, Image.Resampling.NEAREST


def fit_extent(height: int, width: int, longest: int | None) -> tuple[int, int]:
    """(h, w) of an image scaled so its longer side is `longest` (None: unchanged)."""
    if longest is None:
        return height, width
    scale = longest / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def working_extent(height: int, width: int, longest: int | None) -> tuple[int, int]:
    """(h, w) at which the clinician edits an image: its own size, shrunk (aspect kept) only
    when its longer side exceeds `longest` (None: always its own size). Never enlarged."""
    if longest is None or max(height, width) <= longest:
        return int(height), int(width)
    return fit_extent(height, width, longest)


def canvas_shape(extents: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """(H, W) of the smallest canvas that holds every extent at its top left."""
    return max(h for h, _ in extents), max(w for _, w in extents)


def resize(pixels: np.ndarray, hw: tuple[int, int], resample) -> np.ndarray:
    """Pixels at (h, w): bilinear (antialiased when shrinking) for images, NEAREST for labels."""
    if pixels.shape[:2] == tuple(hw):
        return np.asarray(pixels)
    mode_safe = pixels.astype(np.float32) if pixels.dtype.kind == "f" else pixels
    return np.asarray(Image.fromarray(mode_safe).resize((hw[1], hw[0]), resample))


def letterbox(arrays: Sequence[np.ndarray], longest: int | None = None, labels: bool = False):
    """One canvas from images (or label maps) of differing sizes, each at the top left.

    Returns (canvas, extents). `longest` scales every image so its longer side has that many
    pixels; None keeps their own sizes.
    """
    extents = [fit_extent(*a.shape[:2], longest) for a in arrays]
    height, width = canvas_shape(extents)
    first = np.asarray(arrays[0])
    canvas = np.zeros((len(arrays), height, width, *first.shape[2:]), first.dtype)
    for i, (array, (h, w)) in enumerate(zip(arrays, extents, strict=True)):
        canvas[i, :h, :w] = resize(np.asarray(array), (h, w), NEAREST if labels else BILINEAR)
    return canvas, extents


class ImageStack:
    """A canvas of images with each image's extent; converts to and from the model's size."""

    def __init__(self, images, extents: Sequence[tuple[int, int]] | None = None):
        self.images = images
        n, height, width = images.shape[:3]
        self.extents = [(int(h), int(w)) for h, w in extents] if extents else [(height, width)] * n
        if len(self.extents) != n or any(
            not (0 < h <= height and 0 < w <= width) for h, w in self.extents
        ):
            raise ValueError(
                f"need one (height, width) extent inside the {height} x {width} canvas per "
                f"image ({n}), got {list(self.extents)[:3]}..."
            )

    def __len__(self) -> int:
        return len(self.extents)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def _same(self, size: int) -> bool:
        return self.shape == (size, size) and all(e == (size, size) for e in self.extents)

    def to_model(self, size: int, index=None) -> np.ndarray:
        """uint8 (n, size, size, 3): each image's content squeezed to the model's size."""
        index = range(len(self)) if index is None else index
        if self._same(size):
            return np.asarray(self.images[np.asarray(list(index), int)])
        return np.stack(
            [resize(self._content(self.images, i), (size, size), BILINEAR) for i in index]
        )

    def masks_to_model(self, masks, size: int, index=None) -> np.ndarray:
        """(n, size, size) label maps (nearest), so a refinement stays inside its coarse mask."""
        index = range(len(self)) if index is None else index
        if self._same(size):
            return np.asarray(masks)[np.asarray(list(index), int)]
        return np.stack([resize(self._content(masks, i), (size, size), NEAREST) for i in index])

    def from_model(self, maps: np.ndarray, index=None, labels: bool = False) -> np.ndarray:
        """(n, H, W) canvas maps from (n, size, size) model-size maps; padding is 0."""
        index = list(range(len(self)) if index is None else index)
        maps = np.asarray(maps)
        if self._same(maps.shape[1]) and maps.shape[1] == maps.shape[2]:
            return maps
        out = np.zeros((len(index), *self.shape), maps.dtype)
        for row, i in enumerate(index):
            h, w = self.extents[i]
            out[row, :h, :w] = resize(maps[row], (h, w), NEAREST if labels else BILINEAR)
        return out

    def _content(self, arrays, i: int) -> np.ndarray:
        h, w = self.extents[i]
        return np.asarray(arrays[i][:h, :w])
