"""The context term: the project's addition to the paper's method (docs/method.md, "The
context term").

A refined image's forget pixels are known wrong evidence: its coarse mask called them lesion
and the clinician erased them. Unlearning their labels removes the pixel shortcut (the model
stops painting those pixels as lesion), but the lesion's own pixels still see them in their
receptive field and can keep reading them as evidence for the lesion's class: the context
shortcut. Each refined image has a counterfactual with its forget pixels inpainted with skin
(`evaluation.inpaint_band`, the fill band reliance measures with), made once per run, its
frozen features cached with the other inputs. Two terms use it:

- "blind": the refined images' retain loss (cross-entropy on their corrected masks) is also
  taken on their counterfactuals, so the labels are learnt from images without the evidence;
- "consistent": the prediction on a refined image is pulled towards the prediction on its
  counterfactual (per-pixel KL divergence from the counterfactual's softmax, held fixed), so
  the erased pixels stop moving the output at all.

"blind+consistent" adds both. The terms read only retain data (the refined images and their
corrected masks; the inpainted pixels get the skin around them, not their coarse labels).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed
from ..evaluation import inpaint_band
from ..model import FrozenInputs, Model
from ..retain import IGNORE

CONTEXT_TERMS = ("off", "blind", "consistent", "blind+consistent")


def counterfactuals(images: np.ndarray, forget: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Copies of the refined images with their forget pixels inpainted from the skin around
    lesion and forget pixels together (the lesion, targets' nonzero labels, stays as it is)."""
    lesion = (targets != 0) & (targets != IGNORE)
    return inpaint_band(images, forget, lesion)


def consistency_loss(logits: torch.Tensor, target_logits: torch.Tensor) -> torch.Tensor:
    """Mean over pixels of KL(softmax(target_logits) || softmax(logits)), the target held
    fixed: 0 when the two predictions agree. Under torchrun the mean is over the pixels of
    every rank's part of the batch (distributed.global_sums)."""
    target = target_logits.detach().log_softmax(1)
    kl = F.kl_div(logits.log_softmax(1), target, log_target=True, reduction="none").sum(1)
    total, count = distributed.global_sums(kl.sum(), kl.new_tensor(float(kl.numel())))
    return total / count


class ContextTerm:
    """The counterfactuals of a run's refined images and the loss terms they give.

    `images`, `forget` and `targets` hold the refined images (those with forget pixels) in the
    order of the loop's forget rows; `add` takes the batch's positions in that order.
    """

    def __init__(
        self,
        mode: str,
        weight: float,
        model: Model,
        images: np.ndarray,
        forget: np.ndarray,
        targets: np.ndarray,
        cache: bool = True,
    ):
        if mode not in CONTEXT_TERMS or mode == "off":
            raise ValueError(f"context must be one of {CONTEXT_TERMS[1:]}, got {mode!r}")
        self.mode, self.weight = mode, weight
        self.inputs = FrozenInputs(model, counterfactuals(images, forget, targets), cache=cache)
        self.targets = torch.as_tensor(targets, device=model.device).long()

    def add(
        self, terms: dict, model: Model, rows: np.ndarray, logits: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """`terms` with the context term added to "total" and reported as "context";
        `logits` are the model's on the original images at `rows`."""
        # batch norm in train mode pools its statistics across ranks here too (distributed)
        with model.autocast(), distributed.pooled_batch_norms(model.net):
            cf_logits = model.scoped_forward(self.inputs[rows]).float()
        term = logits.new_zeros(())
        if "blind" in self.mode:
            at = torch.as_tensor(rows, device=model.device)
            term = term + distributed.mean_cross_entropy(cf_logits, self.targets[at], IGNORE)
        if "consistent" in self.mode:
            term = term + consistency_loss(logits, cf_logits)
        return {**terms, "total": terms["total"] + self.weight * term, "context": term.detach()}
