"""Sample data, the dataset-folder reader and the refined-mask writer of the plugin.

The reader opens a folder at the working resolution (data.working): each image at its own size,
shrunk only when its longer side exceeds SHORTCUT_UNLEARNING_WORKING_SIZE pixels (default 1024;
"original" never shrinks), letterboxed on one canvas. Large folders open lazily as dask arrays
(SHORTCUT_UNLEARNING_LAZY: auto by size, 1 always, 0 never), and decoded images are cached in the
user cache folder (SHORTCUT_UNLEARNING_CACHE moves it or turns it off).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import masks as masklib
from ..data.folders import FolderError, detect_layout, read_folder
from ..data.folders import write_masks as write_folder_masks
from ..data.working import lazy_from_env, open_working, working_size_from_env
from ..resources import SAMPLE_SET, sample_data_dir

SAMPLE_IMAGES = 12


def layers(images, coarse, fine, meta: dict, name: str) -> list[tuple]:
    """Images as one stack, coarse masks ready to refine, fine masks hidden for reference; every
    layer carries the metadata (ids, original_sizes, labels, extents, source)."""
    return [
        (images, {"name": name, "metadata": dict(meta), "rgb": True}, "image"),
        (coarse, {"name": "coarse masks", "metadata": dict(meta)}, "labels"),
        (fine, {"name": "reference masks", "metadata": dict(meta), "visible": False}, "labels"),
    ]


def sample_dermoscopy() -> list[tuple]:
    """A few synthetic training images with their coarse masks (the shortcut is in the band)."""
    data = read_folder(sample_data_dir() / SAMPLE_SET).split("train")
    data = data.select(np.arange(min(SAMPLE_IMAGES, len(data))))
    meta = {
        "ids": list(data.ids),
        "original_sizes": [list(s) for s in data.original_sizes],
        "labels": data.labels.tolist(),
        "extents": [list(data.image_size)] * len(data),
        "source": data.source,
    }
    return layers(data.images, masklib.coarse_masks(data.masks), data.masks, meta, "dermoscopy")


def get_reader(path):
    """A reader for a dataset folder this package knows, else None (napari tries others)."""
    path = path[0] if isinstance(path, list) else path
    try:
        detect_layout(path)
    except FolderError:
        return None
    return read_dataset


def read_dataset(
    path,
    working_size: int | str | None = "env",
    lazy: bool | str | None = "env",
    labels=None,
):
    """The folder's images, coarse and reference masks at the working resolution (the
    environment's choice unless given: see the module). `labels`: the labels CSVs to use
    (default: the folder's own *.csv)."""
    path = Path(path[0] if isinstance(path, list) else path)
    longest = working_size_from_env() if working_size == "env" else working_size
    lazy = lazy_from_env() if lazy == "env" else lazy
    opened = open_working(path, longest, labels=labels, lazy=lazy)
    return layers(opened.images, opened.coarse, opened.fine, opened.metadata(), path.name)


def write_masks(path: str, data, meta: dict) -> list[str]:
    """Refined masks at each image's original size: official ISIC ground-truth naming where the
    ids are ISIC ids, else <id>_segmentation.png. Existing files are never overwritten."""
    info = meta.get("metadata", {})
    masks = np.asarray(data)
    masks = masks[None] if masks.ndim == 2 else masks
    ids = info.get("ids") or [f"image_{i:04d}" for i in range(len(masks))]
    extents = info.get("extents")
    sizes = info.get("original_sizes") or extents or [masks.shape[1:3]] * len(masks)
    return [str(p) for p in write_folder_masks(masks, ids, sizes, path, extents)]
