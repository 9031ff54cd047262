"""Sample data, the dataset-folder reader and the refined-mask writer of the plugin."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from .. import masks as masklib
from ..data.folders import (
    ISIC_ID,
    FolderError,
    check_id,
    detect_layout,
    read_folder,
    write_isic_masks,
)
from ..data.lesion_set import LesionSet
from ..resources import SAMPLE_SET, sample_data_dir

SAMPLE_IMAGES = 12
WORKING_SIZE = 128  # the shipped model's size; ISIC images are resized to it on open


def layers(data: LesionSet, name: str) -> list[tuple]:
    """Images as one stack, coarse masks ready to refine, fine masks hidden for reference."""
    coarse = masklib.coarse_masks(data.masks)
    meta = {
        "ids": list(data.ids),
        "original_sizes": [list(s) for s in data.original_sizes],
        "labels": data.labels.tolist(),
        "source": data.source,
    }
    return [
        (data.images, {"name": name, "metadata": meta, "rgb": True}, "image"),
        (coarse, {"name": "coarse masks", "metadata": meta}, "labels"),
        (data.masks, {"name": "reference masks", "metadata": meta, "visible": False}, "labels"),
    ]


def sample_dermoscopy() -> list[tuple]:
    """A few synthetic training images with their coarse masks (the shortcut is in the band)."""
    data = read_folder(sample_data_dir() / SAMPLE_SET).split("train")
    return layers(data.select(np.arange(min(SAMPLE_IMAGES, len(data)))), "dermoscopy")


def get_reader(path):
    """A reader for a dataset folder this package knows, else None (napari tries others)."""
    path = path[0] if isinstance(path, list) else path
    try:
        detect_layout(path)
    except FolderError:
        return None
    return read_dataset


def read_dataset(path) -> list[tuple]:
    path = Path(path[0] if isinstance(path, list) else path)
    return layers(read_folder(path, image_size=WORKING_SIZE), path.name)


def write_masks(path: str, data, meta: dict) -> list[str]:
    """Refined masks at each image's original size: official ISIC ground-truth naming where the
    ids are ISIC ids, else <id>_segmentation.png. Existing files are never overwritten."""
    info = meta.get("metadata", {})
    masks = np.asarray(data)
    masks = masks[None] if masks.ndim == 2 else masks
    ids = info.get("ids") or [f"image_{i:04d}" for i in range(len(masks))]
    sizes = info.get("original_sizes") or [masks.shape[1:3]] * len(masks)
    if all(ISIC_ID.fullmatch(str(i)) for i in ids):
        return [str(p) for p in write_isic_masks(masks, ids, sizes, path)]
    folder = Path(path)
    targets = [
        folder / f"{check_id(i, f'cannot save masks to {folder}')}_segmentation.png" for i in ids
    ]
    existing = [str(t) for t in targets if t.exists()]
    if existing:
        raise FolderError(f"{existing[0]} already exists; save the masks to a new folder")
    folder.mkdir(parents=True, exist_ok=True)
    for mask, (height, width), target in zip(masks, sizes, targets, strict=True):
        image = Image.fromarray(np.asarray(mask, np.uint8))
        image.resize((int(width), int(height)), Image.Resampling.NEAREST).save(target)
    return [str(t) for t in targets]
