"""Supervised training of a model's scope on any mask set (coarse, refined, fine)."""

from __future__ import annotations

import warnings
from collections.abc import Generator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from . import distributed, metrics
from .model import SCOPE_MODULES, FrozenInputs, Model, to_device
from .progress import Cancel, Cancelled, Losses, Progress
from .retain import IGNORE


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30  # at most; early stopping may end sooner
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    cache_features: bool = True  # train the scope on cached frozen features
    # Validation: images held out of the training images (seeded) when no validation set is
    # given; 0 trains on all of them without validation.
    val_fraction: float = 0.15
    patience: int = 5  # epochs without a better validation Dice before training stops
    lr_patience: int = 2  # epochs without one before the learning rate halves
    # A best validation Dice below this means the fit failed: the model is kept but its
    # provenance says converged: false, and a warning says so.
    min_val_dice: float = 0.5
    # Weight of the soft Dice term beside cross-entropy. A lesion is about a tenth of the
    # image, and on cross-entropy alone a decoder on a weak frozen encoder settled on
    # predicting background (validation Dice 0.08 after 20 epochs at one model seed, 0.94
    # with the Dice term; benchmarks/BENCHMARKS.md, "Training that converges: validation, early
    # stopping, and a Dice term"). 0 trains on cross-entropy alone.
    dice_weight: float = 1.0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be at least 1, lr positive")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction must lie in [0, 1), got {self.val_fraction}")


def soft_dice_loss(
    logits: torch.Tensor, targets: torch.Tensor, pooled: bool = True
) -> torch.Tensor:
    """1 - soft Dice of each lesion class the batch's labels hold, pooled over the batch and
    averaged over those classes; pixels equal to IGNORE are left out (0 without lesions).
    pooled=False: this process's rows alone, no collective (e.g. on rank 0 alone)."""
    classes = logits.shape[1]
    valid = (targets != IGNORE).unsqueeze(1)
    probs = logits.softmax(1) * valid
    onehot = F.one_hot(targets.clamp(max=classes - 1), classes).permute(0, 3, 1, 2) * valid
    overlap = (probs * onehot).sum((0, 2, 3))[1:]
    sizes = (probs + onehot).sum((0, 2, 3))[1:]
    labelled = onehot.sum((0, 2, 3))[1:]
    # under torchrun: the sums over the whole batch, whichever rank holds its rows
    if pooled:
        overlap, sizes, labelled = distributed.global_sums(overlap, sizes, labelled)
    present = (labelled > 0).float()
    # the mean over the present classes, computed on the device without asking which they are
    return ((1 - (2 * overlap + 1) / (sizes + 1)) * present).sum() / present.sum().clamp(min=1)


def pixel_loss(
    model: Model, inputs, targets: torch.Tensor, dice_weight: float = 1.0
) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels of a batch, plus dice_weight times the
    soft Dice loss of its lesion classes."""
    with model.autocast(), distributed.pooled_batch_norms(model.net):
        logits = model.scoped_forward(inputs).float()
    loss = distributed.mean_cross_entropy(logits, targets, IGNORE)
    return loss + dice_weight * soft_dice_loss(logits, targets) if dice_weight else loss


class Divergence:
    """Watches a loss for NaN or infinity without making the host wait for the device at
    every step: the first non-finite step is kept on the device, and `check` (one wait)
    raises FloatingPointError naming it. Loops check when they read the device anyway."""

    def __init__(self, device: torch.device, what: str = "loss"):
        self.what = what
        self.first = torch.zeros((), dtype=torch.long, device=device)  # 0: none yet
        self.value = torch.zeros((), device=device)

    def watch(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        new = ~torch.isfinite(loss) & (self.first == 0)
        self.first = torch.where(new, step, self.first)
        self.value = torch.where(new, loss, self.value)

    def check(self) -> None:
        step = int(self.first)
        if step:
            raise FloatingPointError(
                f"the {self.what} became {float(self.value)} at step {step}; lower the learning "
                "rate or the number of steps and run again"
            )


def validation_split(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, val) indices of n images, about `fraction` of them held out; no
    validation images when that would leave fewer than one on either side."""
    n_val = round(n * fraction)
    order = np.random.default_rng([seed, n]).permutation(n)
    if n_val < 1 or n - n_val < 1:
        return np.arange(n), np.arange(0)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


@torch.no_grad()
def validation_scores(model: Model, inputs: FrozenInputs, targets: np.ndarray) -> dict:
    """Dice of the model's argmax on validation inputs, in eval mode: "val_dice" (lesion
    against background) and "val_class_dice" (the mean of the per-class Dice over the lesion
    classes the targets hold; a lesion called the wrong class scores 0 there)."""
    preds = []
    for start in range(0, len(targets), 32):
        batch = inputs[np.arange(start, min(start + 32, len(targets)))]
        model.net.eval()  # after the batch: computing uncached inputs sets train mode
        with model.autocast():
            preds.append(model.scoped_forward(batch).argmax(1).cpu().numpy())
    pred = np.concatenate(preds)
    dice = metrics.dice(pred, targets)
    by_class = [v for v in metrics.dice_by_class(pred, targets).values() if np.isfinite(v)]
    return {"val_dice": dice, "val_class_dice": float(np.mean(by_class)) if by_class else dice}


def train(
    model: Model,
    images: np.ndarray,
    targets: np.ndarray,
    config: TrainConfig | None = None,
    cancel: Cancel | None = None,
    val: tuple[np.ndarray, np.ndarray] | None = None,
) -> Generator[Progress, None, Model]:
    """Train `model`'s scope in place with Adam on uint8 images and (N, H, W) class targets.

    Validation: `val` (images, targets), or else a seeded `config.val_fraction` of the given
    images held out. After each epoch the validation scores are measured (the event of the
    epoch's last step carries them as metrics, see validation_scores); the learning rate
    halves after `lr_patience` epochs without a better class-aware Dice, training stops after
    `patience`, and the best epoch's weights are kept. The model's provenance gets a
    "training" record (best epoch, validation Dice, converged); a best epoch whose lesion
    Dice is under `min_val_dice` warns that the fit failed.

    Yields a Progress event per step (its losses stay on the device until read) and returns
    the model. Raises Cancelled when `cancel` is set, FloatingPointError at the end of an
    epoch in which the loss stopped being finite. Targets equal to IGNORE carry no label.
    Under torchrun each process computes its part of every batch (distributed.py): the same
    steps as one process, up to floating point.
    """
    config = config or TrainConfig()
    if targets.shape != images.shape[:3]:
        raise ValueError(f"targets {targets.shape} do not match images {images.shape[:3]}")
    if val is None:
        fit, held = validation_split(len(images), config.val_fraction, config.seed)
        val = (images[held], targets[held]) if len(held) else None
        images, targets = images[fit], targets[fit]
        source = "held out of the training images"
    else:
        if val[1].shape != val[0].shape[:3] or val[0].shape[1:] != images.shape[1:]:
            raise ValueError("validation images and targets must match the training ones")
        val, source = (val if len(val[0]) else None), "validation split"
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    inputs = FrozenInputs(model, images, cache=config.cache_features)
    # validation runs on rank 0 alone and its scores are broadcast (distributed.from_main)
    validates = val and distributed.is_main()
    val_inputs = FrozenInputs(model, val[0], cache=config.cache_features) if validates else None
    y = torch.as_tensor(targets, device=model.device).long()
    optimiser = torch.optim.Adam(model.scoped_parameters(), lr=config.lr)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, mode="max", factor=0.5, patience=config.lr_patience
    )
    n, batch = len(images), config.batch_size
    per_epoch = -(-n // batch)
    total = config.epochs * per_epoch
    step, best, best_epoch, best_state, stale = 0, {}, 0, None, 0
    epoch, divergence = 0, Divergence(model.device)
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            if cancel:
                raise Cancelled("training cancelled")
            index = distributed.shard(order[start : start + batch])  # this rank's rows
            model.train_mode()
            loss = pixel_loss(
                model, inputs[index], y[to_device(index, model.device)], config.dice_weight
            )
            step += 1
            divergence.watch(loss, step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            distributed.all_reduce_gradients(model.scoped_parameters())
            optimiser.step()
            scores = None
            if start + batch >= n:  # the epoch's last step: check, then validate
                divergence.check()
                if val:
                    scores = distributed.from_main(
                        lambda: validation_scores(model, val_inputs, val[1])
                    )
            yield Progress(step, total, "train", Losses({"loss": loss}), scores)
        if not val:
            continue
        # Select on class-aware Dice: an epoch that finds the lesions but calls them all one
        # class is not the best fit.
        schedule.step(scores["val_class_dice"])
        if scores["val_class_dice"] > best.get("val_class_dice", -1.0) + 1e-4:
            best, best_epoch, stale = scores, epoch, 0
            best_state = _scope_state(model)
        else:
            stale += 1
            if stale >= config.patience:
                break
    if best_state is not None:
        model.net.load_state_dict(best_state, strict=False)
    model.net.eval()
    _record(model, config, epoch, best_epoch, best, val, source)
    return model


def _scope_state(model: Model) -> dict[str, torch.Tensor]:
    """Copies of the scope's tensors (parameters and buffers): what training can change."""
    scoped = SCOPE_MODULES[model.config.scope]
    return {
        k: v.detach().clone()
        for k, v in model.net.state_dict().items()
        if k.split(".")[0] in scoped
    }


def _record(model: Model, config: TrainConfig, epochs_run, best_epoch, best, val, source):
    """Write the training record into the model's provenance; warn about a failed fit."""
    val_dice = best.get("val_dice")
    converged = None if val_dice is None else bool(val_dice >= config.min_val_dice)
    record = {
        "epochs": config.epochs,
        "epochs_run": epochs_run,
        "best_epoch": best_epoch if val else epochs_run,
        "val_dice": val_dice,
        "val_class_dice": best.get("val_class_dice"),
        "val_images": len(val[1]) if val else 0,
        "val_source": source if val else None,
        "stopped_early": bool(val) and epochs_run < config.epochs,
        "min_val_dice": config.min_val_dice,
        "converged": converged,
    }
    model.config = replace(model.config, provenance={**model.config.provenance, "training": record})
    if converged is False:
        warnings.warn(
            f"training did not converge: the best validation Dice was {val_dice:.3f} "
            f"(epoch {best_epoch} of {epochs_run}), under the floor {config.min_val_dice}; "
            "train longer, with another learning rate or seed, or check the masks",
            stacklevel=3,
        )
