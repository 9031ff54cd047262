"""A stack of coarse masks and the clinician's refinements of them (the plugin's state).

Qt-free: the napari widget only shows what this holds. Refined masks start as a copy of the
coarse ones; erasing pixels makes the forget set (coarse and not refined). Edits are autosaved
as plain .npy arrays (never a pickle), one file per edited image written atomically after
each edit, and restored on reopen; a damaged autosave is kept aside, never deleted and never
fatal.
"""

from __future__ import annotations

import functools
import hashlib
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from . import masks as masklib
from .files import make_folder, write_npy


def _label_stack(array, what: str) -> np.ndarray:
    """An (N, H, W) integer label stack, or a MaskError saying what is wrong."""
    array = np.asarray(array)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise masklib.MaskError(f"{what} must be (N, H, W) label images, got shape {array.shape}")
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
        raise masklib.MaskError(f"{what} must hold integer labels, got {array.dtype}")
    return array


class Refinement:
    """Coarse masks (N, H, W) and their refined copies, edited in place by the viewer.

    `refined` is the very array the viewer's Labels layer edits; its dtype is kept, so a label
    above 255 stays what it is (and is reported as a changed class) instead of wrapping.
    """

    def __init__(self, coarse, refined=None):
        coarse = _label_stack(coarse, "coarse masks")
        if coarse.size and (coarse.min() < 0 or coarse.max() > 255):
            raise masklib.MaskError(
                f"coarse masks hold labels {int(coarse.min())}..{int(coarse.max())}; expected "
                "0 (background), 1 (benign) and 2 (malignant)"
            )
        self.coarse = coarse.astype(np.uint8, copy=False)
        self.forget = np.zeros(self.coarse.shape, bool)
        self._synced: dict[int, np.ndarray] = {}  # image -> refined mask as last synced
        self.set_refined(self.coarse.copy() if refined is None else refined)

    def set_refined(self, refined) -> None:
        """Adopt `refined` (the viewer replaced its layer's data) and recompute the forget set."""
        if np.shape(refined) != self.coarse.shape:
            raise masklib.MaskError(
                f"refined masks have shape {np.shape(refined)} but the coarse masks have shape "
                f"{self.coarse.shape}; refine a copy of the coarse layer"
            )
        self.refined = _label_stack(refined, "refined masks")
        self.update()

    @functools.cached_property
    def key(self) -> str:
        """Identifies the coarse stack, so an autosave finds its way back to it (hashed once:
        the coarse masks never change)."""
        digest = hashlib.sha256(np.ascontiguousarray(self.coarse).tobytes())
        digest.update(str(self.coarse.shape).encode())
        return digest.hexdigest()[:16]

    def update(self, planes: Iterable[int] | None = None) -> np.ndarray:
        """Recompute the forget set after an edit (of the images `planes`, or all)."""
        if planes is None:
            np.logical_and(self.coarse != 0, self.refined == 0, out=self.forget)
        for i in planes or ():
            np.logical_and(self.coarse[i] != 0, self.refined[i] == 0, out=self.forget[i])
        return self.forget

    def sync(self, planes: Iterable[int] | None = None, folder: Path | str | None = None):
        """After edits that may have touched `planes` (None: any image): find the images whose
        refined mask changed since the last sync, recompute their forget set and autosave them
        to `folder`. Returns those images. Comparing with the last synced content catches
        every kind of edit, undo and redo included, whatever the editor reports."""
        changed = []
        for i in range(len(self.coarse)) if planes is None else sorted(set(planes)):
            if not np.array_equal(self.refined[i], self._synced.get(i, self.coarse[i])):
                changed.append(int(i))
        self.update(changed)
        if folder is not None and changed:
            self.autosave(folder, changed)
        for i in changed:
            self._synced[i] = self.refined[i].copy()
        return changed

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

    def snapshot(self) -> Refinement:
        """A frozen copy for a background job: painting during a run cannot race with it."""
        return Refinement(self.coarse, self.refined.copy())

    # -- autosave ---------------------------------------------------------------------------
    def autosave(self, folder: Path | str, planes: Iterable[int] | None = None) -> Path:
        """Write the refined masks of `planes` (default: every edited image) to
        folder/<key>/<i>.npy, each file atomically: one edit costs one image, not the stack."""
        root = make_folder(Path(folder) / self.key)
        for i in np.flatnonzero(self.edited()) if planes is None else planes:
            write_npy(root / f"{int(i)}.npy", self.refined[int(i)])  # renamed into place
        return root

    def restore(self, folder: Path | str) -> str | None:
        """Take up the autosaved refinement of this stack (before a layer shows it).

        Returns a sentence for the user, or None when there is no autosave. A damaged file is
        renamed to <name>.damaged-<n> and that image starts again from its coarse mask.
        """
        folder = Path(folder)
        planes, damaged = {}, []
        legacy = folder / f"{self.key}.npz"  # one file per stack, as earlier versions wrote
        files = sorted((folder / self.key).glob("*.npy"))
        for file in ([legacy] if legacy.is_file() else []) + files:
            try:
                planes.update(self._read_autosave(file))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
                aside = _free_name(file, "damaged")
                os.replace(file, aside)
                damaged.append(f"{file.name} ({error}; kept aside as {aside.name})")
        if not planes and not damaged:
            return None
        dtype = np.result_type(self.coarse.dtype, *(p.dtype for p in planes.values()))
        refined = self.coarse.astype(dtype)  # labels above 255 keep their value
        for i, plane in planes.items():
            refined[i] = plane
        self.set_refined(refined)
        self._synced = {i: refined[i].copy() for i in planes}  # on disk already
        note = f"Restored your autosaved refinements ({self.stats()['refined_images']} images)."
        if damaged:
            note += " Could not read " + "; ".join(damaged) + ": those images start again."
        return note

    def _read_autosave(self, file: Path) -> dict[int, np.ndarray]:
        """{image: refined mask} from one autosave file; ValueError when it does not fit. The
        schema of an autosave: <image index>.npy holding one integer (H, W) plane of the
        stack (earlier versions: <key>.npz holding the (N, H, W) stack as "refined"), checked
        from the file's header before any pixel is read."""
        shape = self.coarse.shape
        if file.suffix == ".npz":
            with zipfile.ZipFile(file) as archive, archive.open("refined.npy") as member:
                return dict(enumerate(_checked_array(member, shape)))
        if not file.stem.isdigit() or int(file.stem) >= shape[0]:
            raise ValueError(f"no image {file.stem} in a stack of {shape[0]}")
        with open(file, "rb") as handle:
            return {int(file.stem): _checked_array(handle, shape[1:])}


def _checked_array(handle, shape: tuple[int, ...]) -> np.ndarray:
    """The integer array of `shape` in an open .npy file; ValueError naming what the header
    says otherwise, before anything is allocated (a header may claim terabytes)."""
    fmt = np.lib.format
    version = fmt.read_magic(handle)
    readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f"it is a .npy file of version {version}, not 1.0 or 2.0")
    found, _, dtype = readers[version](handle)
    if tuple(found) != tuple(shape) or not np.issubdtype(dtype, np.integer):
        raise ValueError(f"it holds {dtype} {tuple(found)}, not a {tuple(shape)} integer mask")
    handle.seek(0)
    return fmt.read_array(handle, allow_pickle=False)


def _free_name(path: Path, tag: str) -> Path:
    """path.<tag>-<n>, the first n not taken."""
    n = 1
    while (candidate := path.with_name(f"{path.name}.{tag}-{n}")).exists():
        n += 1
    return candidate
