"""Which image to refine next: unrefined images ranked by the shortcut refining them removes.

A refinement forgets the part of an image's coarse mask that is not lesion, and the shortcut
lives there: artefacts in the dilation band that the coarse mask calls lesion. The ranking
reads only what the clinician has given, the images and their coarse masks, and the current
model: never fine masks, labels or artefact maps. Each image's *band* is its coarse mask
minus the core eroded by the band width (`retain.certain_targets`), the pixels a refinement
may erase. Scores (higher: refine sooner; docs/method.md says which one measured best):

- "band-mass": the mean malignant probability the model puts on the band.
- "band-lesion": the mean lesion probability (either class) the model puts on the band.
- "band-reliance": how much the image's malignancy score (metrics.image_scores) falls when
  the band is painted over with skin (saliency.inpaint_background): the counterfactual test
  of docs/method.md, "Saliency", on the band, per image.
- "band-saliency": the share of the malignant score's saliency (saliency.saliency_maps) that
  falls on the band.
- "disagreement": the share of band pixels whose predicted class is not the coarse mask's.
- "s-global": how much the image adds to S_global computed with the bands as the spurious
  map S and the coarse cores as the labels Y (docs/method.md, "Global Spurious Mutual
  Information, S_global"), left out one image at a time.

`alternate` (the default) interleaves the coarse masks' lesion classes (benign, malignant)
down the order, so the refinements cover both classes. The default, band-mass with the
classes in turn, measured best on the synthetic benchmark (benchmarks/BENCHMARKS.md, "Which
image to refine next: ranked against random order"); without the turns band-mass picks only
malignant masks and leaves the benign class's shortcut.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from . import metrics, saliency
from .data.lesion_set import MALIGNANT
from .masks import DEFAULT_COARSE_MARGIN, lesion_class, radius_pixels
from .retain import IGNORE, certain_targets

METHODS = (
    "band-mass",
    "band-lesion",
    "band-reliance",
    "band-saliency",
    "disagreement",
    "s-global",
)
DEFAULT_METHOD = "band-mass"


@dataclass
class Ranking:
    """Unrefined images, best first, with each one's score and band."""

    order: np.ndarray  # indices of the ranked images, best first (excluded ones left out)
    scores: np.ndarray  # (N,) float score of every image; nan where excluded
    method: str
    bands: np.ndarray  # (N, H, W) bool: coarse mask minus its core
    width: int  # the band width in pixels
    band_malignant: np.ndarray  # (N,) mean malignant probability on the band
    classes: np.ndarray  # (N,) lesion class of each coarse mask (1 benign, 2 malignant)
    alternate: bool = False  # whether the classes take turns down the order

    def __len__(self) -> int:
        return len(self.order)

    def top(self, k: int) -> np.ndarray:
        """The first k images of the order (fewer if fewer are ranked)."""
        return self.order[: max(int(k), 0)]

    @property
    def next(self) -> int | None:
        """The image to refine next; None when every image is refined or excluded."""
        return int(self.order[0]) if len(self.order) else None

    def rank(self, i: int) -> int:
        """1-based place of image i in the order; ValueError if it is not ranked."""
        places = np.flatnonzero(self.order == i)
        if not len(places):
            raise ValueError(f"image {i} is not ranked (refined already, or excluded)")
        return int(places[0]) + 1

    def band(self, i: int) -> np.ndarray:
        """(H, W) bool: the band of image i, the pixels its refinement may erase."""
        return self.bands[i]

    def why(self, i: int) -> str:
        """One sentence on why image i ranks where it does."""
        place = f"ranked {self.rank(i)} of {len(self)}"
        if self.alternate:
            k = self.classes[i]
            among = int(np.sum(self.classes[self.order[: self.rank(i)]] == k))
            name = {1: "benign", 2: "malignant"}.get(int(k), f"class {k}")
            place += f" ({_ordinal(among)} of the {name} masks; the classes take turns)"
        score, mass = self.scores[i], self.band_malignant[i]
        reason = {
            "band-mass": f"{mass:.0%} of its band is predicted malignant (mean probability)",
            "band-lesion": f"{score:.0%} of its band is predicted lesion (mean probability)",
            "band-reliance": f"painting its band over with skin lowers its malignancy score by "
            f"{score:.3f}",
            "band-saliency": f"{score:.0%} of the saliency of its malignant score lies in its band",
            "disagreement": f"the model disagrees with its coarse mask on {score:.0%} of its band",
            "s-global": f"its band adds {score:.2e} nats per pixel to S_global with the band as "
            "the spurious map",
        }[self.method]
        return f"{place}: {reason}"


def bands(coarse: np.ndarray, width: int) -> np.ndarray:
    """(N, H, W) bool: each coarse mask minus its core eroded by `width` pixels."""
    return certain_targets(np.asarray(coarse), width) == IGNORE


def default_width(coarse: np.ndarray) -> int:
    """The default coarse margin in pixels: the band width when no refinement says better
    (pass retain.band_width(coarse, split) once some masks are refined)."""
    return max(1, radius_pixels(np.shape(coarse), DEFAULT_COARSE_MARGIN))


def rank_images(
    model,
    images: np.ndarray,
    coarse: np.ndarray,
    exclude: Iterable[int] = (),
    method: str = DEFAULT_METHOD,
    width: int | None = None,
    alternate: bool = True,
) -> Ranking:
    """Rank the images not in `exclude` (e.g. those refined already) by `method`.

    images: uint8 (N, H, W, 3) at the model's size; coarse: (N, H, W) coarse masks, one
    lesion class per image; width: band width in pixels (default: `default_width`).
    """
    if method not in METHODS:
        raise ValueError(f"ranking method must be one of {METHODS}, got {method!r}")
    images, coarse = np.asarray(images), np.asarray(coarse)
    if coarse.ndim != 3 or images.shape[:3] != coarse.shape or images.shape[-1:] != (3,):
        raise ValueError(
            f"need (N, H, W, 3) images and (N, H, W) coarse masks of the same size, got "
            f"{images.shape} and {coarse.shape}"
        )
    n = len(images)
    excluded = np.zeros(n, bool)
    for i in exclude:
        if not 0 <= int(i) < n:
            raise ValueError(f"exclude names image {i}, but there are only {n} images")
        excluded[int(i)] = True
    width = default_width(coarse) if width is None else int(width)
    if width < 1:
        raise ValueError(f"the band width must be at least 1 pixel, got {width}")
    band = bands(coarse, width)
    classes = np.array([lesion_class(m, i) for i, m in enumerate(coarse)])
    candidates = np.flatnonzero(~excluded)
    scores, mass = np.full(n, np.nan), np.full(n, np.nan)
    if len(candidates):
        at = candidates
        probs = model.probabilities(images[at])
        scores[at] = _SCORES[method](model, images[at], coarse[at], band[at], probs)
        mass[at] = _band_mean(probs[:, MALIGNANT], band[at])
    # Images without a band (no lesion, or a mask thinner than the band) have nothing to erase.
    ranked = candidates[band[candidates].any(axis=(1, 2))]
    order = ranked[np.argsort(-np.nan_to_num(scores[ranked], nan=-np.inf), kind="stable")]
    if alternate:
        order = _alternate(order, classes)
    return Ranking(order, scores, method, band, width, mass, classes, alternate)


def _band_mean(values: np.ndarray, band: np.ndarray) -> np.ndarray:
    """(M,) mean of each (H, W) map over its band; 0 where the band is empty."""
    count = band.sum(axis=(1, 2))
    return np.divide(
        (values * band).sum(axis=(1, 2)), count, out=np.zeros(len(band)), where=count > 0
    )


# Each score takes the candidates' images, coarse masks, bands and predicted probabilities.


def _band_mass(model, images, coarse, band, probs):
    return _band_mean(probs[:, MALIGNANT], band)


def _band_lesion(model, images, coarse, band, probs):
    return _band_mean(1 - probs[:, 0], band)


def _band_reliance(model, images, coarse, band, probs):
    inpainted = saliency.inpaint_background(images, band)
    return metrics.image_scores(probs) - metrics.image_scores(model.probabilities(inpainted))


def _band_saliency(model, images, coarse, band, probs):
    return saliency.saliency_share(saliency.saliency_maps(model, images), band)


def _disagreement(model, images, coarse, band, probs):
    return _band_mean(probs.argmax(axis=1) != coarse, band)


def _s_global(model, images, coarse, band, probs):
    """S_global of all candidates minus S_global of all candidates but this one."""
    core = np.where(band, 0, coarse)
    # Per-image (S, Y) tables; leaving an image out subtracts its table from the pooled one.
    *_, tables = metrics._prepared(probs, band, core, (1, 2), False, 1)
    pooled, pixels, per_image = tables.sum(axis=0), band.size, band[0].size
    full = metrics._per_class(pooled, pixels).max()
    return np.array(
        [full - metrics._per_class(pooled - t, pixels - per_image).max() for t in tables]
    )


_SCORES = {
    "band-mass": _band_mass,
    "band-lesion": _band_lesion,
    "band-reliance": _band_reliance,
    "band-saliency": _band_saliency,
    "disagreement": _disagreement,
    "s-global": _s_global,
}


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _alternate(order: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """The order with the lesion classes taken in turn, each class keeping its own order."""
    queues = {k: [i for i in order if classes[i] == k] for k in np.unique(classes[order])}
    first = [classes[order[0]]] if len(order) else []
    turn = first + [k for k in queues if k not in first]
    out = []
    while any(queues.values()):
        for k in turn:
            if queues[k]:
                out.append(queues[k].pop(0))
    return np.array(out, dtype=int)
