"""Coarse masks, the forget and retain sets of a refinement, and validation of refinements.

Correcting a coarse mask C to a refined mask F (F inside C) forgets the pixels
D_f = {C != 0 and F == 0} and keeps every other pixel (docs/method.md, "The unlearning
isomorphism").
Masks hold one lesion class per image: 0 background, 1 benign, 2 malignant.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

COARSE_METHODS = ("dilate", "bbox", "outline")
# Default coarse mask: the fine mask dilated by 8% of the shorter image side (10 px at 128 px),
# about the slack of a hurried outline. The generator puts spurious artefacts in this band.
# "outline" is a loose hand-drawn-like polygon around the lesion whose slack varies smoothly
# about the margin (see outline_mask).
DEFAULT_COARSE_METHOD = "dilate"
DEFAULT_COARSE_MARGIN = 0.08
ADDED_CHOICES = ("error", "clip", "keep")


class MaskError(ValueError):
    """A mask or refinement that cannot be used as given; the message says what to do."""


class AddedPixelsError(MaskError):
    """A refinement marks lesion pixels outside its coarse mask."""

    def __init__(self, image: int, count: int):
        self.image, self.count = image, count
        super().__init__(
            f"refined mask of image {image} adds {count} lesion pixel(s) outside its coarse mask; "
            "a refinement may only erase. Choose added='clip' to drop them (keeps the "
            "certificate) or added='keep' to treat them as new labels (outside the certificate)."
        )


@dataclass
class PixelSplit:
    """Forget and retain pixels of a batch, with the labels the retain pixels train on."""

    forget: np.ndarray  # (N, H, W) bool: coarse said lesion, refinement says background
    retain: np.ndarray  # (N, H, W) bool: every other pixel
    targets: np.ndarray  # (N, H, W) uint8: refined labels where refined, coarse elsewhere
    refined: np.ndarray  # (N,) bool: which images have a refined mask

    @property
    def forget_count(self) -> int:
        return int(self.forget.sum())


def radius_pixels(shape: tuple[int, ...], margin: float) -> int:
    """A margin given as a fraction of the shorter image side, in whole pixels."""
    if not 0 <= margin < 1:
        raise MaskError(f"margin must be a fraction of the image size in [0, 1), got {margin}")
    return round(margin * min(shape[-2:]))


def lesion_class(mask: np.ndarray, image: int = 0) -> int:
    """The single lesion class of one mask (0 if it has no lesion pixels)."""
    classes = np.unique(mask[mask != 0])
    if len(classes) > 1:
        raise MaskError(
            f"mask of image {image} holds several lesion classes {classes.tolist()}; "
            "the method assumes one lesion class per image: split the image or relabel it"
        )
    return int(classes[0]) if len(classes) else 0


def coarse_mask(
    fine: np.ndarray, method: str = DEFAULT_COARSE_METHOD, margin: float = DEFAULT_COARSE_MARGIN
) -> np.ndarray:
    """Coarse mask of one (H, W) fine mask: dilated by a radius, its bounding box plus margin,
    or a hand-drawn-like outline with about that margin of slack."""
    if method not in COARSE_METHODS:
        raise MaskError(f"unknown coarse method {method!r}; choose one of {COARSE_METHODS}")
    k = lesion_class(fine)
    lesion = fine != 0
    r = radius_pixels(fine.shape, margin)
    out = np.zeros(fine.shape, np.uint8)
    if k == 0:
        return out
    rows, cols = np.flatnonzero(lesion.any(1)), np.flatnonzero(lesion.any(0))
    # The lesion's box grown by r holds the whole result: dilating only there gives the same
    # mask several times faster on large images (the distance transform holds the GIL).
    box = (
        slice(max(rows[0] - r, 0), rows[-1] + r + 1),
        slice(max(cols[0] - r, 0), cols[-1] + r + 1),
    )
    if method == "outline":
        out[outline_mask(lesion, r)] = k
    elif method == "dilate":
        from skimage.morphology import isotropic_dilation  # imported here: the dock opens fast

        out[box][isotropic_dilation(lesion[box], r) if r else lesion[box]] = k
    else:
        out[box] = k
    return out


OUTLINE_VERTICES = 64
OUTLINE_SLACK = (0.4, 1.6)  # the outline's gap to the lesion, against the margin, low to high


def outline_mask(lesion: np.ndarray, r: int) -> np.ndarray:
    """A loose outline around `lesion` (bool), as a person draws one: a polygon whose gap to the
    lesion wanders smoothly between 0.4 and 1.6 times r (at least one pixel), and which holds
    every lesion pixel.

    Seeded by the mask itself, so every caller (training, evaluation, the generator) draws the
    same outline for the same lesion. The polygon is star-shaped about the lesion's centre:
    each vertex lies past the farthest lesion pixel in the sectors on either side of it, so
    the edges between vertices clear the lesion too.
    """
    from skimage.draw import polygon  # imported here: the dock opens fast

    digest = hashlib.blake2b(np.packbits(lesion).tobytes() + bytes(str(lesion.shape), "ascii"))
    rng = np.random.default_rng(int.from_bytes(digest.digest()[:8], "little"))
    points = np.argwhere(lesion).astype(float)
    centre = points.mean(0)
    offset = points - centre
    angle = np.arctan2(offset[:, 0], offset[:, 1])
    reach = np.hypot(offset[:, 0], offset[:, 1]) + 0.71  # to the pixel's far corner
    step = 2 * np.pi / OUTLINE_VERTICES
    sector = np.floor(np.mod(angle, 2 * np.pi) / step).astype(int) % OUTLINE_VERTICES
    farthest = np.zeros(OUTLINE_VERTICES)
    np.maximum.at(farthest, sector, reach)
    # Vertex k sits between sectors k - 1 and k; two more on each side smooth the hand's path.
    envelope = np.max([np.roll(farthest, shift) for shift in range(-2, 4)], axis=0)
    theta = np.arange(OUTLINE_VERTICES) * step
    wobble = sum(
        rng.uniform(0, 1) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3)
    )
    low, high = OUTLINE_SLACK
    wobble = (wobble - wobble.min()) / (np.ptp(wobble) + 1e-12)  # in [0, 1]
    gap = np.maximum(r * (low + (high - low) * wobble), 1.0)
    # A chord between vertices dips below them by at most radius * (1 - cos(step / 2)).
    radius = (envelope + gap) / np.cos(step / 2)
    rows = centre[0] + radius * np.sin(theta)
    cols = centre[1] + radius * np.cos(theta)
    out = np.zeros(lesion.shape, bool)
    out[polygon(rows, cols, shape=lesion.shape)] = True
    return out | lesion  # rasterising at the image edge may drop a lesion pixel; keep it


def coarse_masks(
    fine: np.ndarray, method: str = DEFAULT_COARSE_METHOD, margin: float = DEFAULT_COARSE_MARGIN
) -> np.ndarray:
    """Coarse masks of a (N, H, W) batch (or one (H, W) mask)."""
    fine = np.asarray(fine)
    if fine.ndim not in (2, 3):
        raise MaskError(
            f"masks must be one (H, W) mask or a (N, H, W) stack, got shape {fine.shape}; "
            "drop channel axes first (e.g. mask[..., 0])"
        )
    if fine.ndim == 2:
        return coarse_mask(fine, method, margin)
    return np.stack([coarse_mask(m, method, margin) for m in fine]) if len(fine) else fine.copy()


def check_refinement(
    coarse: np.ndarray, refined: np.ndarray, image: int = 0, added: str = "error"
) -> np.ndarray:
    """The refined mask if it is a valid refinement of `coarse`; clipped when added='clip'.

    Raises MaskError naming what is wrong: a shape mismatch, pixels added outside the coarse
    mask (unless clipped or kept), a changed lesion class, or an empty refinement.
    """
    if added not in ADDED_CHOICES:
        raise MaskError(f"added must be one of {ADDED_CHOICES}, got {added!r}")
    coarse, refined = np.asarray(coarse), np.asarray(refined)
    if refined.shape != coarse.shape:
        raise MaskError(
            f"refined mask of image {image} has shape {refined.shape} but its coarse mask has "
            f"shape {coarse.shape}; paint the refinement on a copy of the coarse mask"
        )
    if not np.issubdtype(refined.dtype, np.integer) and refined.dtype != bool:
        raise MaskError(
            f"refined mask of image {image} must hold integer labels, got {refined.dtype}"
        )
    k = lesion_class(coarse, image)
    if (refined != 0).any() and lesion_class(refined, image) != k:
        raise MaskError(
            f"refined mask of image {image} changes the lesion class from {k} to "
            f"{lesion_class(refined, image)}; a refinement only erases pixels: relabel the "
            "image's class instead"
        )
    outside = (refined != 0) & (coarse == 0)
    if outside.any():
        if added == "error":
            raise AddedPixelsError(image, int(outside.sum()))
        if added == "clip":
            refined = np.where(outside, 0, refined).astype(coarse.dtype)
    if k and not (refined != 0).any():
        raise MaskError(
            f"refined mask of image {image} erases the whole lesion; every image keeps its "
            "lesion: undo the last erase or leave this image unrefined"
        )
    return refined


def split_pixels(
    coarse: np.ndarray, refined: Mapping[int, np.ndarray], added: str = "error"
) -> PixelSplit:
    """Forget and retain sets of a batch of coarse masks and a few refined ones.

    `refined` maps image index to its refined mask. Images without one contribute only
    retain pixels with their coarse labels. Raises MaskError if nothing is forgotten.
    """
    coarse = np.asarray(coarse)
    if coarse.ndim != 3:
        raise MaskError(f"coarse masks must be a (N, H, W) stack, got shape {coarse.shape}")
    n = len(coarse)
    targets = coarse.astype(np.uint8, copy=True)
    is_refined = np.zeros(n, bool)
    for i, mask in refined.items():
        if not 0 <= i < n:
            raise MaskError(f"refined mask given for image {i}, but there are only {n} images")
        targets[i] = check_refinement(coarse[i], mask, i, added)
        is_refined[i] = True
    forget = (coarse != 0) & (targets == 0)
    if not forget.any():
        raise MaskError(
            "the refinements erase no pixel of the coarse masks, so there is nothing to "
            "unlearn: erase the pixels the coarse mask wrongly calls lesion"
        )
    return PixelSplit(forget=forget, retain=~forget, targets=targets, refined=is_refined)
