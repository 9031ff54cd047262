"""Supervised training of a model's scope on any mask set (coarse, refined, fine)."""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .model import FrozenInputs, Model
from .progress import Cancel, Cancelled, Progress
from .retain import IGNORE


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-3
    seed: int = 0
    cache_features: bool = True  # train the scope on cached frozen features


def pixel_loss(model: Model, inputs, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the labelled pixels of a batch."""
    with model.autocast():
        logits = model.scoped_forward(inputs)
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE)


def check_finite(loss: torch.Tensor, step: int, what: str = "loss") -> None:
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"the {what} became {loss.item()} at step {step}; lower the learning rate or the "
            "number of steps and run again"
        )


def train(
    model: Model,
    images: np.ndarray,
    targets: np.ndarray,
    config: TrainConfig | None = None,
    cancel: Cancel | None = None,
) -> Generator[Progress, None, Model]:
    """Train `model`'s scope in place with Adam on uint8 images and (N, H, W) class targets.

    Yields a Progress event per step and returns the model. Raises Cancelled when `cancel`
    is set. Targets equal to IGNORE carry no label.
    """
    config = config or TrainConfig()
    if targets.shape != images.shape[:3]:
        raise ValueError(f"targets {targets.shape} do not match images {images.shape[:3]}")
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    inputs = FrozenInputs(model, images, cache=config.cache_features)
    y = torch.as_tensor(targets, device=model.device).long()
    optimiser = torch.optim.Adam(model.scoped_parameters(), lr=config.lr)
    n, batch = len(images), config.batch_size
    total = config.epochs * -(-n // batch)
    step = 0
    for _ in range(config.epochs):
        order = rng.permutation(n)
        for start in range(0, n, batch):
            if cancel:
                raise Cancelled("training cancelled")
            index = order[start : start + batch]
            model.train_mode()
            loss = pixel_loss(model, inputs[index], y[torch.as_tensor(index, device=model.device)])
            step += 1
            check_finite(loss, step)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            yield Progress(step, total, "train", {"loss": loss.item()})
    model.net.eval()
    return model
