"""Which images of a Labels stack an edit touched, read from napari's edit history (no Qt).

napari 0.9 reports edits as history atoms: the brush, fill and polygon tools store a masked
atom whose `slice_key` is a tuple of slices; `data_setitem` stores (indices, old, new) with a
numpy multi-index. (Undo and redo send no paint event, only a refresh: the widget then checks
the images edited so far.) Anything not understood here means "check every image".
"""

from __future__ import annotations

import numpy as np


def index_planes(index, n: int) -> set[int] | None:
    """The plane numbers one index of the first axis selects (int, slice or array)."""
    if isinstance(index, slice):
        return set(range(*index.indices(n)))
    if isinstance(index, int | np.integer):
        return {int(index) % n} if -n <= index < n else set()
    try:
        values = np.asarray(index).ravel()
    except (TypeError, ValueError):
        return None
    if values.dtype.kind not in "iu":
        return None
    return {int(v) % n for v in np.unique(values) if -n <= v < n}


def atom_planes(atom, n: int) -> set[int] | None:
    """The planes one history atom changed, or None if its form is unknown."""
    key = getattr(atom, "slice_key", None)  # a masked paint atom
    if key is None and isinstance(atom, tuple | list) and len(atom) == 3:
        key = atom[0]  # (indices, old values, new values)
    if not isinstance(key, tuple | list) or len(key) < 3:
        return None
    return index_planes(key[0], n)


def edited_planes(atoms, n: int) -> set[int] | None:
    """The planes a history item (a list of atoms) changed; None: recompute all."""
    if not isinstance(atoms, list | tuple):
        return None
    planes: set[int] = set()
    for atom in atoms:
        found = atom_planes(atom, n)
        if found is None:
            return None
        planes |= found
    return planes
