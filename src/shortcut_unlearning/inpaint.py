"""Filling pixels from the surrounding skin (numpy and scikit-image only: no torch), for the
counterfactual tests and band reliance."""

from __future__ import annotations

import numpy as np
from skimage.restoration import inpaint_biharmonic


def inpaint_background(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Copies of uint8 (N, H, W, 3) images with masked pixels filled from the surrounding skin.

    Biharmonic inpainting; unmasked pixels are copied exactly and the input is left as it is.
    """
    images, masks = np.asarray(images), np.asarray(masks, dtype=bool)
    if images.dtype != np.uint8 or masks.shape != images.shape[:3]:
        raise ValueError(
            f"need uint8 (N, H, W, 3) images and (N, H, W) masks, got {images.dtype} "
            f"{images.shape} and {masks.shape}"
        )
    out = images.copy()
    for i, mask in enumerate(masks):
        if not mask.any():
            continue
        if mask.all():
            raise ValueError(f"mask {i} covers the whole image: no surroundings to fill from")
        filled = inpaint_biharmonic(images[i].astype(np.float64) / 255, mask, channel_axis=-1)
        filled = np.clip(np.round(filled * 255), 0, 255).astype(np.uint8)
        out[i][mask] = filled[mask]  # only masked pixels change, bit for bit
    return out
