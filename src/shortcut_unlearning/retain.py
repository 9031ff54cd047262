"""Named retain sets: which pixels unlearning keeps training on, and with which labels.

- "refined": only the refined images, with their corrected masks. Few images, often of one
  class: on the plugin's sample a short run turned every lesion malignant.
- "refined+certain" (the default): the refined images, plus every other image's pixels that
  its coarse mask is surely right about: the core (the coarse mask eroded by the band width)
  keeps its lesion class, everything outside stays background, and the uncertain band between
  them is left out. Left out means forgotten too: the certificate counts those band pixels
  with the forget set.
- "all": the refined images plus every other image's whole coarse mask, band included. The
  band still labels the artefacts as lesion, so this keeps teaching the shortcut.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt
from skimage.morphology import isotropic_erosion

from .masks import DEFAULT_COARSE_MARGIN, PixelSplit, radius_pixels

IGNORE = 255  # target value of pixels that carry no label
RETAIN_SETS = ("refined+certain", "refined", "all")
# The pixels each retain set trains on (and a certified operator's recovery with it).
RETAINS = {
    "refined+certain": "the refined images' corrected masks and the other images' certain "
    "pixels, their uncertain band left out",
    "refined": "the refined images' corrected masks",
    "all": "the refined images' corrected masks and the other images' whole coarse masks",
}
FORGETS = {
    "refined": "the pixels erased from the refined coarse masks",
    "refined+certain": "the pixels erased from the refined coarse masks, and the uncertain "
    "band of every other coarse mask (left out of the retain set)",
    "all": "the pixels erased from the refined coarse masks (the other coarse masks are kept "
    "whole, band included)",
}


@dataclass
class RetainSet:
    name: str
    targets: np.ndarray  # (N, H, W) uint8 training labels, IGNORE where a pixel is not retained
    refined: np.ndarray  # indices of the refined images (their corrected masks)
    others: np.ndarray  # indices of the other images with retained pixels
    band_width: int  # pixels of the uncertain band left out ("refined+certain"), else 0
    left_out: int  # pixels of unrefined images left out (forgotten with the forget set)


def band_width(coarse: np.ndarray, split: PixelSplit) -> int:
    """How deep the refinements cut into the coarse masks: the 95th percentile of the forget
    pixels' distance to the outside of their coarse mask (at least 1 pixel). With no forget
    pixel to learn from, the default coarse margin."""
    depths = [
        distance_transform_edt(coarse[i] != 0)[split.forget[i]]
        for i in np.flatnonzero(split.forget.any(axis=(1, 2)))
    ]
    depths = np.concatenate(depths) if depths else np.zeros(0)
    if not depths.size:
        return max(1, radius_pixels(coarse.shape, DEFAULT_COARSE_MARGIN))
    return max(1, int(np.ceil(np.percentile(depths, 95))))


def certain_targets(coarse: np.ndarray, width: int) -> np.ndarray:
    """Labels of the pixels a coarse mask is surely right about: its core (eroded by `width`)
    keeps the lesion class, its outside is background, the band between is IGNORE."""
    out = np.where(coarse != 0, IGNORE, 0).astype(np.uint8)
    for i, mask in enumerate(coarse):
        core = isotropic_erosion(mask != 0, width) if width else mask != 0
        out[i][core] = mask[core]
    return out


def retain_set(split: PixelSplit, coarse: np.ndarray, name: str = RETAIN_SETS[0]) -> RetainSet:
    """The retain set `name` of a refinement (see the module docstring)."""
    if name not in RETAIN_SETS:
        raise ValueError(f"retain set must be one of {RETAIN_SETS}, got {name!r}")
    refined = np.flatnonzero(split.refined)
    others = np.flatnonzero(~split.refined) if name != "refined" else np.zeros(0, int)
    targets = split.targets.copy()
    unused = np.flatnonzero(~split.refined) if name == "refined" else np.zeros(0, int)
    targets[unused] = IGNORE
    width = 0
    if name == "refined+certain" and len(others):
        width = band_width(coarse, split)
        targets[others] = certain_targets(coarse[others], width)
    left_out = int((targets[others] == IGNORE).sum()) if len(others) else 0
    return RetainSet(name, targets, refined, others, width, left_out)
