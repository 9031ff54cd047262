"""Sequential refinement: refine a few masks, unlearn, refine more later.

Each round starts from the model the previous round left accepted and unlearns the forget
set of every refinement made so far (the new images' and the earlier ones', so a later retain
set never trains on a pixel an earlier round forgot). `Rounds` keeps that model, the
refinements and the history of rounds (which images, operator, metrics, certificate) for the
export; `suggest` ranks the images still coarse with the current model (ranking.py).

What the chain certifies (docs/method.md, "Which image to refine next"): the certified
operators' guarantee holds from *any* starting model (their accountants bound two runs that
start anywhere in the projection ball), so the last round's model alone is
(eps, delta)-certified for every pixel outside its retain set, i.e. the union of all rounds'
forget sets, with the last round's (eps, delta): no sum over rounds. A model released by an
earlier round is certified only for the pixels forgotten up to that round.
"""

from __future__ import annotations

from collections.abc import Generator, Mapping
from dataclasses import dataclass, field

import numpy as np

from . import masks as masklib
from .model import Model
from .progress import Cancel, Progress
from .ranking import DEFAULT_METHOD, Ranking, rank_images
from .retain import band_width
from .unlearning import CertifiedOperator, Operator, UnlearnResult, unlearning_job


@dataclass
class Round:
    """One round of the history: what was refined, how it was unlearned, what came out."""

    index: int  # 1, 2, ...
    images: list[int]  # the images refined in this round
    refined: list[int]  # every image refined so far, this round's included
    operator: str
    settings: dict  # the operator's settings
    forget_pixels: int  # pixels of the cumulative forget set this round unlearned
    steps: int
    accepted: bool  # whether the round's model became the current one
    cancelled: bool
    collapsed: bool
    start_metrics: dict | None  # the probe on the round's starting model
    end_metrics: dict | None  # the probe on the round's result (None if cancelled)
    certificate: dict | None  # the certified operators' certificate of this round
    result: UnlearnResult | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        return {k: v for k, v in vars(self).items() if k != "result"}


class Rounds:
    """The state of a sequential refinement: current model, refinements, history."""

    def __init__(self, model: Model, images: np.ndarray, coarse: np.ndarray, probe=None):
        self.images, self.coarse = np.asarray(images), np.asarray(coarse)
        if self.coarse.ndim != 3 or self.images.shape[:3] != self.coarse.shape:
            raise ValueError(
                f"need (N, H, W, 3) images and (N, H, W) coarse masks of the same size, got "
                f"{self.images.shape} and {self.coarse.shape}"
            )
        self.start = model
        self.model = model  # the accepted model the next round starts from
        self.probe = probe
        self.refined: dict[int, np.ndarray] = {}
        self.history: list[Round] = []

    def suggest(self, method: str = DEFAULT_METHOD, **options) -> Ranking:
        """The images still coarse, ranked with the current model; the band width is read
        off the refinements made so far (retain.band_width) once there are any."""
        width = None
        if self.refined:
            width = band_width(self.coarse, self._split())
        return rank_images(
            self.model,
            self.images,
            self.coarse,
            exclude=self.refined,
            method=method,
            width=width,
            **options,
        )

    def run(
        self,
        refinements: Mapping[int, np.ndarray],
        operator: Operator,
        cancel: Cancel | None = None,
        accept: bool = True,
    ) -> Generator[Progress, None, Round]:
        """Add `refinements` (image index -> refined mask) and unlearn from the current model.

        The round's model becomes the current one when `accept` is true and the run was
        neither cancelled nor collapsed (the collapse guard kept the start). Refinements of a
        round that is not accepted stay recorded as not accepted and are withdrawn, so the next
        round does not count them as unlearned.
        """
        if not refinements:
            raise ValueError("a round needs at least one refined mask")
        again = sorted(set(refinements) & set(self.refined))
        if again:
            raise ValueError(
                f"images {again[:5]} were refined in an earlier round; a round adds new "
                "refinements (start a new Rounds to change an accepted one)"
            )
        checked = {
            int(i): masklib.check_refinement(self.coarse[int(i)], m, int(i))
            for i, m in refinements.items()
        }
        before = dict(self.refined)
        self.refined.update(checked)
        split = self._split()
        certificate = (
            operator.certificate(self.model).to_dict()
            if isinstance(operator, CertifiedOperator)
            else None
        )
        job = unlearning_job(
            operator, self.model, self.images, self.coarse, split, self.probe, cancel
        )
        try:
            result = yield from job
        except BaseException:
            self.refined = before
            raise
        taken = accept and not result.cancelled and result.model is not self.model
        end = None if result.cancelled else (self.probe(result.model) if self.probe else None)
        record = Round(
            index=len(self.history) + 1,
            images=sorted(checked),
            refined=sorted(self.refined),
            operator=operator.name,
            settings=_settings(operator),
            forget_pixels=split.forget_count,
            steps=result.steps,
            accepted=taken,
            cancelled=result.cancelled,
            collapsed=result.collapsed,
            start_metrics=result.start_metrics,
            end_metrics=end,
            certificate=certificate,
            result=result,
        )
        self.history.append(record)
        if taken:
            self.model = result.model
        else:
            self.refined = before
        return record

    def certificate(self) -> str:
        """What the chain of accepted rounds certifies, in one paragraph."""
        return chain_certificate(self.history)

    def to_dict(self) -> dict:
        """The history for an export: every round, and the chain's certificate."""
        return {
            "rounds": [r.to_dict() for r in self.history],
            "refined": sorted(self.refined),
            "certificate": self.certificate(),
        }

    def _split(self) -> masklib.PixelSplit:
        return masklib.split_pixels(self.coarse, self.refined)


def chain_certificate(history: list[Round]) -> str:
    """What a chain of rounds certifies, in one paragraph (its accepted rounds count)."""
    accepted = [r for r in history if r.accepted]
    if not accepted:
        return "no accepted round: the current model is the starting model"
    last = accepted[-1]
    images = f"images {last.refined} refined over {len(accepted)} accepted round(s)"
    if last.certificate is None:
        return (
            f"the current model comes from round {last.index} ({last.operator}), which is "
            f"not certified: no guarantee that it forgot the {last.forget_pixels} pixels "
            f"erased from the coarse masks of {images}"
        )
    eps, delta = last.certificate["epsilon"], last.certificate["delta"]
    return (
        f"the current model (round {last.index}, {last.operator}) is ({eps:g}, "
        f"{delta:.1e})-certified to have forgotten {last.certificate['forgets']} "
        f"({images}; {last.forget_pixels} pixels), whatever model the round started "
        "from: the earlier rounds add nothing to epsilon or delta. A model an earlier "
        "round released is certified only for what was forgotten up to that round."
    )


def _settings(operator: Operator) -> dict:
    return {k: v for k, v in vars(operator).items() if not k.startswith("_")}
