"""The in-memory record every reader and the generator return: images, fine masks, labels."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

# Bissoto et al.'s artefact catalogue, in the column order of their annotation CSV.
# Artefact masks are stored as a bit field: bit i set means ARTEFACTS[i] covers the pixel.
ARTEFACTS = ("dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches")

BACKGROUND, BENIGN, MALIGNANT = 0, 1, 2
CLASS_NAMES = ("background", "benign", "malignant")
# test_balanced: a test split whose artefacts are independent of the label (synthetic data).
SPLITS = ("train", "val", "test", "test_balanced")


def artefact_bit(name: str) -> int:
    """The bit of artefact `name` in an artefact bit-field mask."""
    if name not in ARTEFACTS:
        raise ValueError(f"unknown artefact {name!r}; known artefacts: {', '.join(ARTEFACTS)}")
    return 1 << ARTEFACTS.index(name)


@dataclass
class LesionSet:
    """Dermoscopy images at one working size with their fine masks and labels.

    masks hold one lesion class per image (0 background, 1 benign, 2 malignant);
    labels are 0 (benign) or 1 (malignant). `artefacts` is a per-pixel bit field
    (see ARTEFACTS) where pixel annotations exist (synthetic data), else None;
    `flags` holds per-image artefact flags where known.
    """

    ids: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    masks: np.ndarray  # (N, H, W) uint8
    labels: np.ndarray  # (N,) int64
    splits: np.ndarray  # (N,) str
    flags: dict[str, np.ndarray] = field(default_factory=dict)  # name -> (N,) bool
    artefacts: np.ndarray | None = None  # (N, H, W) uint8 bit field
    original_sizes: list[tuple[int, int]] = field(default_factory=list)  # (H, W) on disk
    source: str = ""
    spurious: tuple[str, ...] = ()  # artefacts planted to correlate with the label

    def __post_init__(self) -> None:
        n, size = len(self.ids), self.images.shape[1:3]
        wanted = {"images": (n, *size, 3), "masks": (n, *size), "labels": (n,), "splits": (n,)}
        if self.artefacts is not None:
            wanted["artefacts"] = (n, *size)
        for name, shape in wanted.items():
            if getattr(self, name).shape != shape:
                raise ValueError(
                    f"{name} has shape {getattr(self, name).shape}, expected {shape} for {n} images"
                )
        if not self.original_sizes:
            self.original_sizes = [tuple(size)] * n

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.images.shape[1:3])

    def select(self, index) -> LesionSet:
        """The images picked by a boolean mask or integer index array, in that order."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)
        return replace(
            self,
            ids=[self.ids[i] for i in index],
            images=self.images[index],
            masks=self.masks[index],
            labels=self.labels[index],
            splits=self.splits[index],
            flags={k: v[index] for k, v in self.flags.items()},
            artefacts=None if self.artefacts is None else self.artefacts[index],
            original_sizes=[self.original_sizes[i] for i in index],
        )

    def split(self, name: str) -> LesionSet:
        """The images of one split (one of SPLITS)."""
        return self.select(self.splits == name)

    def artefact_mask(self, names=None) -> np.ndarray:
        """(N, H, W) bool: pixels covered by any of `names` (default: the spurious artefacts)."""
        if self.artefacts is None:
            raise ValueError(
                f"this {self.source or 'data'} set has no per-pixel artefact annotation; "
                "paint an artefact layer or use the forget set as the spurious map"
            )
        names = self.spurious if names is None else names
        bits = sum(artefact_bit(n) for n in names)
        return (self.artefacts & bits) != 0
