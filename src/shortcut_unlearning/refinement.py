"""A stack of coarse masks and the clinician's refinements of them (the plugin's state).

Qt-free: the napari widget only shows what this holds. Refined masks start as a copy of the
coarse ones; erasing pixels makes the forget set (coarse and not refined). Edits are autosaved
atomically as a .npz of plain arrays (never a pickle) and restored on reopen.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from . import masks as masklib


class Refinement:
    """Coarse masks (N, H, W) and their refined copies, edited in place by the viewer."""

    def __init__(self, coarse: np.ndarray, refined: np.ndarray | None = None):
        coarse = np.asarray(coarse)
        if coarse.ndim == 2:
            coarse = coarse[None]
        if coarse.ndim != 3:
            raise masklib.MaskError(f"coarse masks must be (N, H, W), got shape {coarse.shape}")
        self.coarse = coarse.astype(np.uint8, copy=False)
        if refined is None:
            refined = self.coarse.copy()
        if np.shape(refined) != self.coarse.shape:
            raise masklib.MaskError(
                f"refined masks have shape {np.shape(refined)} but the coarse masks have shape "
                f"{self.coarse.shape}; refine a copy of the coarse layer"
            )
        self.refined = refined  # shared with the viewer's Labels layer: never replaced
        self.forget = (self.coarse != 0) & (self.refined == 0)

    @property
    def key(self) -> str:
        """Identifies the coarse stack, so an autosave finds its way back to it."""
        digest = hashlib.sha256(np.ascontiguousarray(self.coarse).tobytes())
        digest.update(str(self.coarse.shape).encode())
        return digest.hexdigest()[:16]

    def update(self, index: int | None = None) -> np.ndarray:
        """Recompute the forget set after an edit (of image `index`, or all); returns it."""
        if index is None:
            np.logical_and(self.coarse != 0, self.refined == 0, out=self.forget)
        else:
            np.logical_and(
                self.coarse[index] != 0, self.refined[index] == 0, out=self.forget[index]
            )
        return self.forget

    def added(self) -> np.ndarray:
        """Pixels a refinement marks as lesion outside the coarse mask."""
        return (self.refined != 0) & (self.coarse == 0)

    def edited(self) -> np.ndarray:
        """(N,) bool: images whose refined mask differs from the coarse one."""
        return (self.refined != self.coarse).any(axis=(1, 2))

    def stats(self) -> dict:
        coarse_pixels = int((self.coarse != 0).sum())
        forget = int(self.forget.sum())
        return {
            "images": len(self.coarse),
            "refined_images": int(self.edited().sum()),
            "forget_pixels": forget,
            "forget_share": forget / coarse_pixels if coarse_pixels else 0.0,
            "added_pixels": int(self.added().sum()),
        }

    def problems(self) -> list[str]:
        """What check_refinement says of each edited image; empty when all are valid."""
        found = []
        for i in np.flatnonzero(self.edited()):
            try:
                masklib.check_refinement(self.coarse[i], self.refined[i], int(i))
            except masklib.MaskError as error:
                found.append(str(error))
        return found

    def clip_added(self) -> int:
        """Erase the pixels painted outside the coarse masks; returns how many."""
        added = self.added()
        self.refined[added] = 0
        self.update()
        return int(added.sum())

    def split(self, added: str = "error") -> masklib.PixelSplit:
        """Forget and retain sets of the edited images (see masks.split_pixels)."""
        edited = np.flatnonzero(self.edited())
        return masklib.split_pixels(self.coarse, {int(i): self.refined[i] for i in edited}, added)

    # -- autosave ---------------------------------------------------------------------------
    def autosave(self, folder: Path | str) -> Path:
        """Write the refined masks to folder/<key>.npz, atomically (no half-written file)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{self.key}.npz"
        handle, temporary = tempfile.mkstemp(dir=folder, suffix=".npz.tmp")
        with os.fdopen(handle, "wb") as file:
            np.savez_compressed(
                file, coarse_shape=np.array(self.coarse.shape), refined=self.refined
            )
        os.replace(temporary, target)
        return target

    def restore(self, folder: Path | str) -> bool:
        """Load the autosaved refinement of this stack into `refined` (in place), if any."""
        target = Path(folder) / f"{self.key}.npz"
        if not target.is_file():
            return False
        with np.load(target, allow_pickle=False) as saved:
            refined = saved["refined"]
        if refined.shape != self.coarse.shape:
            return False
        self.refined[...] = refined
        self.update()
        return True
