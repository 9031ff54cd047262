"""Erase and relearn: reset the trainable scope, then learn it again on the retain set.

Descent from the coarse model (NegGrad-Seg, fine-tuning) cleans the pixels but leaves the
class decision where the coarse decoder had it (docs/method.md, "Erase and relearn"). Erasing
the scope and relearning it on the refined and certain pixels removes what it learned from the
forget set. With a fresh initialisation the released scope is a function of the retain set, the
frozen blocks and the seed alone: exact unlearning of the scope when the frozen blocks never
saw the coarse labels (`exactness`). It is not a differential-privacy certificate and makes no
claim about the frozen blocks.

The relearning is training: Adam at training's learning rate on cross-entropy plus training's
soft Dice term, stopped by a validation probe on a seeded share of the unrefined retain images
held out of it (their retain loss, the uncertain band ignored); the best weights measured are
released. The scope's batch norms normalise with statistics estimated on the retain images at
the erased start and fixed, as the certified operators' recovery does: relearnt on batch
statistics, as training learns, the class decision kept more of the artefact, though the
runs varied less (benchmarks/BENCHMARKS.md, "What made model clipping's erase better: fixed
batch-norm statistics").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import brentq
from torch.optim.swa_utils import get_ema_multi_avg_fn

from ..data.lesion_set import BENIGN, MALIGNANT
from ..model import FrozenInputs, Model, frozen_provenance
from ..retain import FORGETS
from ..settings import OperatorSettings
from .certified import (
    estimate_batch_statistics,
    initial_parameters,
    rescale_to_initial_norms,
    reset_batch_statistics,
)
from .recovery import Relearning, ValidationProbe

# How the scope starts: "fresh" a new initialisation (seeded; exact unlearning), "noise" a
# seeded Gaussian draw given a fresh initialisation's scale (the start the certified
# operators' recovery gets from their noise, without the coarse remainder; exact too),
# "rescaled" the coarse weights given that scale (the certified start when their noise is
# negligible), "kept" the coarse weights as they are (fine-tuning with the same schedule: the
# ablation's control).
STARTS = ("fresh", "noise", "rescaled", "kept")
# The scope's batch-norm statistics: "reestimated" reset, learnt from batch statistics while
# relearning and re-estimated on the retain images for the release; "fixed" estimated on the
# retain images at the start and normalised with throughout, as the certified recovery does;
# "kept" the coarse model's, normalising with them throughout (do they carry the shortcut?).
STATISTICS = ("reestimated", "fixed", "kept")
# A step's batches: "paired" half from the refined images, half from the others (the loop's,
# which the forget term of the other operators needs), "pooled" both drawn from all retain
# images alike, as training draws them, so the few refined images do not set the class mix.
BATCHES = ("paired", "pooled")


@dataclass
class Exactness:
    """What erase-and-relearn guarantees: the released scope does not depend on the forgotten
    pixels, when the frozen blocks never saw the coarse labels."""

    scope: str
    forgets: str
    frozen: list[str]
    frozen_saw_coarse_labels: bool | None  # None: the provenance does not say

    @property
    def holds(self) -> bool:
        return self.frozen_saw_coarse_labels is False

    def to_dict(self) -> dict:
        return {
            "kind": "exact unlearning of the scope (no noise; not a privacy certificate)",
            "scope": self.scope,
            "forgets": self.forgets,
            "epsilon": 0.0 if self.holds else None,
            "condition": "the frozen blocks never saw the coarse labels",
            "frozen": self.frozen,
            "frozen_saw_coarse_labels": self.frozen_saw_coarse_labels,
            "holds": self.holds,
            "summary": self.summary(),
        }

    def summary(self) -> str:
        if self.holds:
            return (
                f"Exact unlearning of the {self.scope} scope: it was re-initialised and relearnt "
                f"from the retain set alone, so it does not depend on {self.forgets} (eps = 0 "
                "for the scope; no noise and no privacy certificate)."
            )
        why = (
            "saw the coarse labels"
            if self.frozen_saw_coarse_labels
            else "have no provenance saying they never saw the coarse labels"
        )
        return (
            f"Not exact: the {self.scope} scope was re-initialised and relearnt from the retain "
            f"set, but the frozen blocks ({', '.join(self.frozen) or 'none'}) {why}, and the "
            "relearning runs on their features, so the release may still depend on the "
            "forgotten pixels."
        )


@dataclass
class Relearn(Relearning):
    """Erase the scope (`start`), then relearn it on the retain set (see the module doc)."""

    steps: int = OperatorSettings.relearn_steps  # at most: the validation probe stops it sooner
    lr: float = 1e-3  # training's: from a fresh start this is training, not a nudge
    dice_weight: float = 1.0  # training's soft Dice term beside cross-entropy
    start: str = "fresh"
    statistics: str = "fixed"
    batches: str = "paired"
    # Decay of an exponential moving average of the scope's weights, which the validation
    # probe measures and the run releases; 0: the weights as they are.
    average: float = 0.0
    # Shift the malignant logit of the release so that the held-out images' predicted lesion
    # pixels are malignant in the share their labels are (the training split's class mix).
    calibrate: bool = False

    name = "relearn"

    def __post_init__(self):
        super().__post_init__()
        if (
            self.start not in STARTS
            or self.statistics not in STATISTICS
            or self.batches not in BATCHES
        ):
            raise ValueError(
                f"start must be one of {STARTS}, statistics one of {STATISTICS} and batches "
                f"one of {BATCHES}, got {self.start!r}, {self.statistics!r} and "
                f"{self.batches!r}"
            )
        if not self.dice_weight >= 0:
            raise ValueError(f"dice_weight must be at least 0, got {self.dice_weight}")
        if not 0 <= self.average < 1:
            raise ValueError(f"average must lie in [0, 1), got {self.average}")
        if not isinstance(self.calibrate, bool):
            raise ValueError(f"calibrate must be true or false, got {self.calibrate!r}")
        self._average: list[torch.Tensor] | None = None

    def loss(self, retain_ce: torch.Tensor, forget_ce: torch.Tensor) -> dict[str, torch.Tensor]:
        # The retain loss alone; the forget pixels are not read.
        return {"total": retain_ce, "retain": retain_ce.detach()}

    def batch_rows(self, rng, refined, others):
        if self.batches == "paired":
            return super().batch_rows(rng, refined, others)
        pool = np.union1d(refined, others)
        return rng.choice(pool, self.batch_size), rng.choice(pool, self.batch_size)

    def prepare(self, model: Model, inputs: FrozenInputs, retain_rows: np.ndarray) -> None:
        if self.start == "fresh":
            fresh_scope_(model, self.seed)
        elif self.start == "noise":
            noise_scope_(model, self.seed)
        elif self.start == "rescaled":
            rescale_to_initial_norms(model)
        if self.statistics == "reestimated":
            reset_batch_statistics(model)
        elif self.statistics == "fixed":
            estimate_batch_statistics(model, inputs, retain_rows, self.batch_size)
        self._average = None
        if self.average:
            self._average = [p.detach().clone() for p in model.scoped_parameters()]

    @torch.no_grad()
    def after_step(self, model: Model, step: int, rng: np.random.Generator) -> None:
        if self._average is not None:
            params = [p.detach() for p in model.scoped_parameters()]
            get_ema_multi_avg_fn(self.average)(self._average, params, step)

    def measure(self, model: Model, step: int) -> None:
        if self._average is None:
            return super().measure(model, step)
        trained = _swap_parameters(model, self._average)
        super().measure(model, step)
        _swap_parameters(model, trained)

    def batch_statistics_in(self, phase: str) -> bool:
        return self.statistics == "reestimated" or self.batch_statistics

    def dice_weight_in(self, phase: str) -> float:
        return self.dice_weight

    def release(self, model: Model, inputs: FrozenInputs, retain_rows: np.ndarray) -> dict | None:
        probe = self._probe
        if self._average is not None and (probe is None or probe.best_state is None):
            _swap_parameters(model, self._average)  # nothing measured: the average itself
        # the released weights' own statistics, not the running averages of the relearning
        if self.statistics == "reestimated":
            estimate_batch_statistics(model, inputs, retain_rows, self.batch_size)
        if not self.calibrate:
            return None
        return {"class_calibration": calibrate_classes_(model, probe)}

    def exactness(self, model: Model) -> Exactness:
        """What a run from `model` guarantees."""
        scope = self.scope or model.config.scope
        frozen, saw = frozen_provenance(model, scope)
        if self.start in ("rescaled", "kept") or self.statistics == "kept":
            saw = True  # the release keeps something of the coarse scope
        return Exactness(scope, FORGETS[self.retain_images], frozen, saw)


@torch.no_grad()
def fresh_scope_(model: Model, seed: int) -> None:
    """Replace the scope's parameters with a new initialisation of the same architecture,
    seeded by `seed` (and the same on every rank under torchrun)."""
    reference = initial_parameters(model, seed)
    for name, p in model.scoped_named_parameters().items():
        p.copy_(reference[name].detach().to(p.device, p.dtype))


@torch.no_grad()
def noise_scope_(model: Model, seed: int) -> None:
    """Replace the scope's parameters with standard Gaussian draws seeded by `seed` (on the
    host: the same on every rank), then give them a fresh initialisation's scale."""
    draw = torch.Generator().manual_seed(seed)
    for p in model.scoped_parameters():
        p.copy_(torch.randn(p.shape, generator=draw).to(p.device, p.dtype))
    rescale_to_initial_norms(model)


@torch.no_grad()
def _swap_parameters(model: Model, values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Give the scope's parameters `values`; returns the ones they had."""
    params = model.scoped_parameters()
    before = [p.detach().clone() for p in params]
    for p, v in zip(params, values, strict=True):
        p.copy_(v)
    return before


@torch.no_grad()
def calibrate_classes_(model: Model, probe: ValidationProbe | None) -> dict:
    """Add to the head's malignant bias the shift that makes the share of the held-out
    images' predicted lesion pixels called malignant equal to their retain targets' share
    (the training split's class mix); what was done, as a record."""
    if probe is None or not len(probe.rows):
        return {"shift": 0.0, "note": "no image was held out: not calibrated"}
    logits, targets = probe.logits(model)
    lesion = (targets == BENIGN) | (targets == MALIGNANT)
    if not lesion.any():
        return {"shift": 0.0, "note": "the held-out images have no lesion pixel: not calibrated"}
    target = float((targets == MALIGNANT).sum() / lesion.sum())

    def share(shift: float) -> float:
        moved = logits.clone()
        moved[:, MALIGNANT] += shift
        pred = moved.argmax(dim=1)
        called = int((pred != 0).sum())
        return float((pred == MALIGNANT).sum()) / called if called else 0.0

    before = share(0.0)
    low, high = -_SHIFT_RANGE, _SHIFT_RANGE
    if not share(low) < target < share(high):
        return {
            "shift": 0.0,
            "target_share": target,
            "share_before": before,
            "note": "no shift in range reaches the target share: not calibrated",
        }
    shift = float(brentq(lambda d: share(d) - target, low, high, xtol=1e-3))
    head = [m for m in model.net.segmentation_head.modules() if isinstance(m, torch.nn.Conv2d)]
    bias = head[-1].bias
    if bias is None:
        raise ValueError("the segmentation head's last convolution has no bias to calibrate")
    bias[MALIGNANT] += shift
    return {
        "shift": shift,
        "target_share": target,
        "share_before": before,
        "share_after": share(shift),
        "images": len(probe.rows),
    }


# The largest shift of the malignant logit the calibration tries, either way.
_SHIFT_RANGE = 20.0
