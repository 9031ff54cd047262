"""The relearning every operator that erases its scope ends in: training on the retain set,
stopped by a validation probe on retain images held out of it, the best weights released
(erase and relearn, and the certified operators' recovery)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..model import FrozenInputs, Model
from ..retain import IGNORE
from ..training import _scope_state, soft_dice_loss
from .base import Operator


class ValidationProbe:
    """The recovery's stopping rule: the retain loss (cross-entropy plus soft Dice, the
    uncertain band ignored) of retain images held out of training, measured every few steps;
    it remembers the best weights and counts the measurements since they were found."""

    def __init__(self, inputs: FrozenInputs, targets: torch.Tensor, rows: np.ndarray):
        self.inputs, self.targets, self.rows = inputs, targets, rows
        self.best, self.best_step, self.stale = math.inf, 0, 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.curve: list[tuple[int, float]] = []

    @torch.no_grad()
    def logits(self, model: Model) -> tuple[torch.Tensor, torch.Tensor]:
        """The held-out images' logits (float) and retain targets."""
        model.net.eval()  # the loop sets the mode again before its next step
        parts = []
        for start in range(0, len(self.rows), 32):
            with model.autocast():
                parts.append(model.scoped_forward(self.inputs[self.rows[start : start + 32]]))
        logits = torch.cat(parts).float()
        return logits, self.targets[torch.as_tensor(self.rows, device=logits.device)]

    def loss(self, model: Model) -> float:
        logits, targets = self.logits(model)
        ce = F.cross_entropy(logits, targets, ignore_index=IGNORE)
        # rank 0 alone measures (measure): no collective in here
        return float(ce + soft_dice_loss(logits, targets, pooled=False))

    def measure(self, model: Model, step: int, min_gain: float = 1e-3) -> None:
        """Measure at `step`; keep the weights when the loss fell by more than min_gain
        (relative) below the best so far."""
        loss = distributed.from_main(lambda: self.loss(model))  # every rank stops together
        self.curve.append((step, loss))
        if loss < self.best * (1 - min_gain) or self.best_state is None:
            self.best, self.best_step, self.stale = loss, step, 0
            self.best_state = _scope_state(model)
        else:
            self.stale += 1

    def restore(self, model: Model) -> None:
        if self.best_state is not None:
            model.net.load_state_dict(self.best_state, strict=False)


@dataclass
class Relearning(Operator):
    """An operator whose last phase is training on the retain set, stopped on held-out images.

    Steps from `relearn_from()` on are the relearning; a seeded `validation_share` of the
    unrefined retain images is held out of it and its retain loss measured every
    `validate_every` steps; the run stops once it has not improved `patience` times, and the
    best weights measured are released."""

    validation_share: float = 0.15  # of the unrefined retain images, seeded by `seed`
    validate_every: int = 25
    patience: int = 4

    finished = "relearning reached its maximum steps"

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.validation_share < 1:
            raise ValueError(f"validation_share must lie in [0, 1), got {self.validation_share}")
        if self.validate_every < 1 or self.patience < 1:
            raise ValueError("validate_every and patience must be at least 1")
        self._probe: ValidationProbe | None = None

    def relearn_from(self) -> int:
        """The steps taken before the relearning starts."""
        return 0

    def hold_out(self, inputs, targets, train_rows: np.ndarray) -> np.ndarray:
        """Keep a seeded share of the unrefined retain images back for the validation probe
        (none without a relearning: nothing would be stopped)."""
        relearning = self.steps > self.relearn_from()
        count = round(self.validation_share * len(train_rows)) if relearning else 0
        if count < 1 or count >= len(train_rows):
            self._probe = ValidationProbe(inputs, targets, np.zeros(0, int))
            return train_rows
        held = np.random.default_rng([self.seed, len(train_rows)]).permutation(train_rows)[:count]
        self._probe = ValidationProbe(inputs, targets, np.sort(held))
        return np.setdiff1d(train_rows, held)

    def measure(self, model: Model, step: int) -> None:
        """The validation probe's measurement at `step` (of the weights it would release)."""
        assert self._probe is not None
        self._probe.measure(model, step)

    def should_stop(self, model: Model, step: int) -> dict | None:
        start, probe = self.relearn_from(), self._probe
        if step < start or probe is None:
            return None
        last = step == self.steps
        since = step - start  # relearning steps taken
        if len(probe.rows) and (since % self.validate_every == 0 or last):
            self.measure(model, step)
        if last:
            reason = self.finished if since else "no recovery"
        elif since and probe.stale >= self.patience:
            reason = "the validation probe stopped improving"
        else:
            return None
        probe.restore(model)
        return {
            "reason": reason,
            "steps": step,
            "noisy_steps": start,
            "recovery_steps": since,
            "max_recovery_steps": self.steps - start,
            "best_step": probe.best_step if probe.best_state is not None else step,
            "validation_images": len(probe.rows),
            "validation_loss": probe.best if probe.best_state is not None else None,
            "validation_curve": [[s, v] for s, v in probe.curve],
        }
