"""The plugin's job, without Qt: unlearn a refined stack and compute the before/after views.

The widget runs `unlearn_stack` in a napari thread worker; tests run it with `drive`.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np

from . import metrics, saliency
from .certificate import Certificate
from .model import Model
from .progress import Cancel, Progress
from .refinement import Refinement
from .unlearning import Operator, UnlearnData, UnlearnResult


@dataclass
class Views:
    """What the viewer shows of one model on the stack."""

    predictions: np.ndarray  # (N, H, W) argmax classes
    saliency: np.ndarray  # (N, H, W) attribution of the malignant score
    s_global: dict  # metrics.s_global_report
    dice: float  # on the refined images, against their refined masks


@dataclass
class Outcome:
    result: UnlearnResult
    before: Views
    after: Views | None  # None when cancelled
    certificate: Certificate | None


def check_sizes(model: Model, images: np.ndarray) -> None:
    size = model.config.image_size
    if images.shape[1:3] != (size, size):
        raise ValueError(
            f"the images are {images.shape[1]} x {images.shape[2]} pixels but the model works "
            f"at {size} x {size}; open the data at {size} px or pick a model trained at "
            f"{images.shape[1]} px"
        )


def views(
    model: Model, images: np.ndarray, truth: np.ndarray, spurious: np.ndarray, refined: np.ndarray
) -> Views:
    """Predictions, saliency and S_global on the stack; Dice on the refined images only (the
    others' truth is still their coarse mask)."""
    probs = model.probabilities(images)
    return Views(
        predictions=probs.argmax(1).astype(np.uint8),
        saliency=saliency.saliency_maps(model, images),
        s_global=metrics.s_global_report(probs, spurious, truth, n_boot=200, n_perm=50),
        dice=metrics.dice(probs[refined], truth[refined]),
    )


def unlearn_stack(
    model: Model,
    images: np.ndarray,
    refinement: Refinement,
    operator: Operator,
    spurious: np.ndarray | None = None,
    added: str = "error",
    cancel: Cancel | None = None,
) -> Generator[Progress, None, Outcome]:
    """Unlearn the forget set of `refinement` from `model`; never changes `model`.

    S for S_global is the painted artefact map `spurious` if given, else the forget set;
    the refined masks are the truth. The probe (curves, collapse check) is the refined images.
    """
    check_sizes(model, images)
    split = refinement.split(added)
    truth = split.targets
    s_map = refinement.forget.copy() if spurious is None else np.asarray(spurious, bool)
    edited = np.flatnonzero(split.refined)

    def probe(m: Model) -> dict:
        probs = m.probabilities(images[edited])
        return {
            "dice": metrics.dice(probs, truth[edited]),
            "s_global": metrics.s_global(probs, s_map[edited], truth[edited]),
        }

    certificate = operator.certificate(model) if hasattr(operator, "certificate") else None
    before = views(model, images, truth, s_map, edited)
    data = UnlearnData(images, refinement.coarse, split, probe)
    result = yield from operator.run(model, data, cancel)
    after = None if result.cancelled else views(result.model, images, truth, s_map, edited)
    return Outcome(result, before, after, certificate)
