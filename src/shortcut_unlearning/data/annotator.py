"""Refinements as a person makes them, for data that do not flatter the method.

An exact refinement is the fine mask. A person erasing a coarse mask's wrong pixels leaves the
lesion's border a few pixels off (`jitter`) and misses part of the artefacts (`missed`). Both
stay inside the coarse mask, so each is still a refinement (docs/method.md, "The unlearning
isomorphism"): the forget set shifts or shrinks, and no longer holds every
artefact pixel.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.ndimage import distance_transform_edt

from .. import masks as masklib
from .synthetic import smooth_field


@dataclass(frozen=True)
class Annotator:
    """How the simulated person refines: exact by default."""

    jitter: int = 0  # pixels the lesion's border may move in or out, smoothly along it
    missed: float = 0.0  # share of the artefact pixels in the forget set left as lesion
    seed: int = 0

    def __post_init__(self):
        if self.jitter < 0:
            raise ValueError(f"refine_jitter must be 0 or more pixels, got {self.jitter}")
        if not 0 <= self.missed <= 1:
            raise ValueError(f"refine_missed must be a share in [0, 1], got {self.missed}")

    @property
    def exact(self) -> bool:
        return self.jitter == 0 and self.missed == 0

    def refine(
        self, fine: np.ndarray, coarse: np.ndarray, artefacts: np.ndarray | None, key: int
    ) -> np.ndarray:
        """The refined mask of one image: its fine mask with the border jittered and clipped to
        the coarse mask, then a share `missed` of the artefact pixels (bool map `artefacts`)
        that would be forgotten put back as lesion, in patches. `key` (the image's index)
        seeds the image's draws."""
        k = masklib.lesion_class(coarse)
        if self.exact or k == 0:
            return fine
        rng = np.random.default_rng([self.seed, key])
        lesion = fine != 0
        if self.jitter:
            moved = _jittered(lesion, self.jitter, rng) & (coarse != 0)
            lesion = moved if moved.any() else lesion  # a tiny lesion keeps its exact border
        if self.missed:
            if artefacts is None:
                raise ValueError(
                    "refine_missed leaves artefact pixels as lesion and needs per-pixel artefact "
                    "maps (synthetic data); set it to 0 for this data"
                )
            lesion |= _patches_of(artefacts & (coarse != 0) & ~lesion, self.missed, rng)
        return (lesion * k).astype(fine.dtype)


def _jittered(lesion: np.ndarray, jitter: int, rng) -> np.ndarray:
    """The lesion with its border moved in or out by up to `jitter` pixels, smoothly."""
    # Signed distance to the border, which lies half a pixel outside the outermost lesion
    # pixels: positive inside, negative outside.
    inside, outside = distance_transform_edt(lesion), distance_transform_edt(~lesion)
    signed = np.where(lesion, inside - 0.5, 0.5 - outside)
    return signed + jitter * smooth_field(lesion.shape, max(2.0, 2.0 * jitter), rng) > 0


def _patches_of(candidates: np.ndarray, share: float, rng) -> np.ndarray:
    """round(share x count) of the candidate pixels, the highest of a smooth random field:
    whole patches, as a person misses part of a mark rather than scattered pixels."""
    count = round(share * candidates.sum())
    score = smooth_field(candidates.shape, 2.0, rng)[candidates]
    chosen = np.zeros(len(score), bool)
    chosen[np.argsort(-score, kind="stable")[:count]] = True
    out = np.zeros(candidates.shape, bool)
    out[candidates] = chosen
    return out
