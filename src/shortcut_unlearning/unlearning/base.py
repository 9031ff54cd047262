"""The loop every unlearning operator shares.

An operator is a dataclass of its settings with a `loss` (and optional hooks). `run` works on
a copy of the model, yields a Progress event per step and returns an UnlearnResult. The model
it started from is never changed: a cancelled run returns it as it was, and a failed run
raises with it untouched. Under torchrun each process computes its part of every batch
(distributed.py): the same steps as one process, up to floating point.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F

from .. import distributed, evaluation
from ..masks import PixelSplit
from ..model import FrozenInputs, Model, to_device
from ..progress import Cancel, Losses, Progress
from ..retain import IGNORE, RETAIN_SETS, retain_set
from ..schemas import Scope
from ..settings import OperatorSettings
from ..training import Divergence, soft_dice_loss
from .context import CONTEXT_TERMS, ContextTerm

_TORCH = tuple(int(part) for part in torch.__version__.split(".")[:2])


@dataclass
class UnlearnData:
    """Training images with their coarse masks and the forget/retain split of a refinement."""

    images: np.ndarray  # (N, H, W, 3) uint8
    coarse: np.ndarray  # (N, H, W) coarse masks the model was trained on
    split: PixelSplit  # forget pixels, corrected targets, which images are refined
    probe: Callable[[Model], dict] | None = None  # e.g. S_global on held-out images

    def __post_init__(self):
        if (
            self.coarse.shape != self.images.shape[:3]
            or self.split.forget.shape != self.coarse.shape
        ):
            raise ValueError(
                f"images {self.images.shape[:3]}, coarse masks {self.coarse.shape} and forget "
                f"set {self.split.forget.shape} must describe the same (N, H, W) pixels"
            )


@dataclass
class UnlearnResult:
    model: Model  # the unlearned model; the starting model if cancelled or collapsed
    cancelled: bool = False
    collapsed: bool = False  # the run's model fell below the probe floor or went non-finite
    steps: int = 0
    history: list[Progress] = field(default_factory=list)
    start_metrics: dict | None = None  # the probe on the starting model
    rejected: Model | None = None  # the collapsed model, kept for inspection
    # Why the run ended where it did, when an operator decides it (should_stop), e.g. the
    # certified operators' recovery: its steps, best step and validation probe.
    stopping: dict | None = None


def unlearning_job(
    operator: Operator,
    model: Model,
    images: np.ndarray,
    coarse: np.ndarray,
    split: PixelSplit,
    probe: evaluation.EvalSet | Callable[[Model], dict] | None = None,
    cancel: Cancel | None = None,
) -> Generator[Progress, None, UnlearnResult]:
    """`operator` unlearning a refinement's forget set from `model`, as a job (progress.drive
    runs it; a worker yields from it). The run is watched by the one probe (evaluation.probe)
    on the held-out images `probe`, or by `probe` itself when it is a function."""
    if isinstance(probe, evaluation.EvalSet):
        probe = partial(evaluation.probe, evalset=probe)
    return operator.run(model, UnlearnData(images, coarse, split, probe), cancel)


@dataclass
class Operator:
    """Settings shared by all operators; subclasses add their own and define `loss`."""

    steps: int = OperatorSettings.steps
    # Adam, like training: plain SGD at NegGrad+'s lr 0.01 diverged on our Adam-trained
    # U-Nets within a few steps (benchmarks/BENCHMARKS.md, "Why unlearning uses Adam at lr
    # 1e-4"). 1e-4 is a tenth of training's.
    lr: float = 1e-4
    momentum: float = 0.9  # SGD only
    optimiser_name: str = "adam"  # or "sgd"
    batch_size: int = 8
    seed: int = 0
    # The retain set (see retain.py): "refined+certain" adds the pixels of every other image
    # that its coarse mask is surely right about, so both classes stay in the retain data.
    retain_images: str = RETAIN_SETS[0]
    scope: Scope | None = None  # None: keep the model's scope
    probe_every: int = 10
    cache_features: bool = True
    # Collapse (evaluation.collapsed): the probe's Dice falls below this share of the starting
    # model's, or a tensor is not finite. A collapsed model never replaces the starting one
    # unless accept_collapse is set.
    collapse_ratio: float = evaluation.COLLAPSE_RATIO
    accept_collapse: bool = False
    # Batch-norm layers normalise with the starting model's statistics: batches drawn from a
    # few refined images are too small and too alike to re-estimate them.
    batch_statistics: bool = False
    # The context term (context.py): the refined images' retain loss also on copies with their
    # forget pixels inpainted ("blind"), and/or their predictions held to those copies'
    # ("consistent"), weighted by context_weight. "off" is the paper's method.
    context: str = OperatorSettings.context
    context_weight: float = 1.0

    name = "operator"

    def __post_init__(self):
        if self.retain_images not in RETAIN_SETS:
            raise ValueError(f"retain_images must be one of {RETAIN_SETS}")
        if self.optimiser_name not in ("adam", "sgd"):
            raise ValueError(f"optimiser_name must be 'adam' or 'sgd', got {self.optimiser_name!r}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("steps and batch_size must be at least 1 and lr positive")
        if self.context not in CONTEXT_TERMS or not self.context_weight >= 0:
            raise ValueError(
                f"context must be one of {CONTEXT_TERMS} and context_weight at least 0, got "
                f"{self.context!r} and {self.context_weight}"
            )

    # -- what operators define --------------------------------------------------------------
    def loss(self, retain_ce: torch.Tensor, forget_ce: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms from the batch's mean retain CE and per-pixel forget CE; key 'total'."""
        raise NotImplementedError

    def prepare(self, model: Model, inputs: FrozenInputs, retain_rows: np.ndarray) -> None:
        """Called once on the working copy before the first step, with the inputs of the
        retain images it trains on."""

    def on_gradients(self, model: Model, step: int) -> None:
        """Called between backward and the optimiser step (e.g. gradient clipping)."""

    def after_step(self, model: Model, step: int, rng: np.random.Generator) -> None:
        """Called after each optimiser step (e.g. projection, noise)."""

    def phase_end(
        self, model: Model, phase: str, inputs: FrozenInputs, retain_rows: np.ndarray
    ) -> None:
        """Called after a phase's last step with the retain images' inputs (e.g. to
        re-estimate batch-norm statistics)."""

    def hold_out(
        self, inputs: FrozenInputs, targets: torch.Tensor, train_rows: np.ndarray
    ) -> np.ndarray:
        """Called once before the first step with the cached inputs, the retain targets and
        the rows of the unrefined retain images; returns the rows to train on (an operator
        may keep some back to validate on)."""
        return train_rows

    def release(self, model: Model, inputs: FrozenInputs, retain_rows: np.ndarray) -> dict | None:
        """Called once on the weights the run releases (after a stop or the last step); what
        it returns is added to the stop record."""
        return None

    def should_stop(self, model: Model, step: int) -> dict | None:
        """Called after each step: a record of why the run ends here (key 'reason'), or None.
        An operator that stops may first load the weights it releases."""
        return None

    def batch_rows(
        self, rng: np.random.Generator, refined: np.ndarray, others: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """A step's two batches: one from the refined images (the forget term's), one from
        the other retain images (None when there are none)."""
        first = rng.choice(refined, self.batch_size)
        return first, rng.choice(others, self.batch_size) if len(others) else None

    def noise_generator(self) -> np.random.Generator:
        """The generator after_step draws noise from (on the host: the same on every device)."""
        return np.random.default_rng(self.seed)

    def phase(self, step: int) -> str:
        return self.name

    def batch_statistics_in(self, phase: str) -> bool:
        """Whether the scope's batch norms normalise with batch statistics in `phase`."""
        return self.batch_statistics

    def dice_weight_in(self, phase: str) -> float:
        """Weight of the retain batch's soft Dice loss beside its cross-entropy in `phase`."""
        return 0.0

    def optimiser(self, model: Model, phase: str) -> torch.optim.Optimizer:
        """The optimiser of a phase; a new one is made whenever the phase changes."""
        if self.optimiser_name == "adam":
            return torch.optim.Adam(model.scoped_parameters(), lr=self.lr)
        return torch.optim.SGD(model.scoped_parameters(), lr=self.lr, momentum=self.momentum)

    # -- the shared loop --------------------------------------------------------------------
    def run(
        self, model: Model, data: UnlearnData, cancel: Cancel | None = None
    ) -> Generator[Progress, None, UnlearnResult]:
        work = model.copy()
        if self.scope:
            work.set_scope(self.scope)
        try:
            return (yield from self._loop(model, work, data, cancel))
        finally:
            if model.device.type == "cuda":
                torch.cuda.empty_cache()  # the feature cache is gone with the loop

    def _loop(self, start: Model, work: Model, data: UnlearnData, cancel):
        split = data.split
        if not split.forget[split.refined].any():
            raise ValueError("the forget set is empty: refine at least one mask first")
        retained = retain_set(split, data.coarse, self.retain_images)
        # The first batch of each step is drawn from every refined image, erased pixels or
        # not: which images hold forget pixels must not decide the batches.
        refined = retained.refined
        used = np.union1d(refined, retained.others)  # only these images are cached
        forget_rows, other_rows = (
            np.searchsorted(used, refined),
            np.searchsorted(used, retained.others),
        )
        inputs = FrozenInputs(work, data.images[used], cache=self.cache_features)
        context = None  # the refined images' inpainted copies, made once (context.py)
        if self.context != "off":
            refined_images = (data.images[refined], split.forget[refined])
            context = ContextTerm(
                self.context,
                self.context_weight,
                work,
                *refined_images,
                retained.targets[refined],
                self.cache_features,
            )
        device = work.device
        targets = torch.as_tensor(retained.targets[used], device=device).long()
        other_rows = self.hold_out(inputs, targets, other_rows)
        retain_rows = np.union1d(forget_rows, other_rows)  # without the held-out images
        coarse = torch.as_tensor(data.coarse[used], device=device).long()
        forget = torch.as_tensor(split.forget[used], device=device)
        forget_pixels = split.forget[used].sum(axis=(1, 2))  # on the host: no device count
        divergence = Divergence(device, f"{self.name} loss")
        rng = np.random.default_rng(self.seed)
        noise_rng = self.noise_generator()
        # the probe runs on rank 0 and its metrics are broadcast (distributed.from_main)
        probe = data.probe
        start_metrics = distributed.from_main(lambda: probe(start)) if probe else None
        self.prepare(work, inputs, retain_rows)
        history: list[Progress] = []
        previous_phase = None
        for step in range(1, self.steps + 1):
            if cancel:
                return UnlearnResult(model=start, cancelled=True, steps=step - 1, history=history)
            phase = self.phase(step)
            if phase != previous_phase:  # a new phase gets a new optimiser
                optimiser = self.optimiser(work, phase)
                previous_phase = phase
            work.train_mode(self.batch_statistics_in(phase))
            # every rank draws the same rows and computes its part of them (distributed)
            drawn, others = self.batch_rows(rng, forget_rows, other_rows)
            rows = distributed.shard(drawn)
            logits = self._logits(work, inputs, rows)
            refined_rows = rows  # this rank's refined rows (the context term's)
            at = to_device(rows, device)
            forget_ce = _masked(
                F.cross_entropy(logits, coarse[at], reduction="none"),
                forget[at],
                int(forget_pixels[rows].sum()),
            )
            forget_ce = distributed.gather_shares(
                forget_ce, [int(forget_pixels[part].sum()) for part in distributed.shards(drawn)]
            )
            retain_targets = targets[at]
            if others is not None:  # the refined images' batch, and one of the others
                rows = distributed.shard(others)
                at = to_device(rows, device)
                logits = torch.cat([logits, self._logits(work, inputs, rows)])
                retain_targets = torch.cat([retain_targets, targets[at]])
            retain_ce = distributed.mean_cross_entropy(logits, retain_targets, IGNORE)
            terms = self.loss(retain_ce, forget_ce)
            dice_weight = self.dice_weight_in(phase)
            if dice_weight:  # as in training (training.pixel_loss)
                dice = soft_dice_loss(logits, retain_targets)
                terms = {**terms, "total": terms["total"] + dice_weight * dice, "dice_loss": dice}
            if context is not None:
                cf_rows = np.searchsorted(forget_rows, refined_rows)
                terms = context.add(terms, work, cf_rows, logits[: len(refined_rows)])
            divergence.watch(terms["total"], step)
            optimiser.zero_grad(set_to_none=True)
            terms["total"].backward()
            distributed.all_reduce_gradients(work.scoped_parameters())  # before clipping
            self.on_gradients(work, step)
            optimiser.step()
            self.after_step(work, step, noise_rng)
            if step == self.steps or self.phase(step + 1) != phase:
                self.phase_end(work, phase, inputs, retain_rows)
            stopping = self.should_stop(work, step)
            if stopping or step == self.steps:
                released = self.release(work, inputs, retain_rows)
                if released:
                    stopping = {**(stopping or {}), **released}
            metrics = None
            # the host reads the device; the run's last step is probed, also an early stop
            if step % self.probe_every == 0 or step == self.steps or stopping:
                divergence.check()
                metrics = distributed.from_main(lambda: probe(work)) if probe else None
            history.append(Progress(step, self.steps, phase, Losses(terms), metrics))
            yield history[-1]
            if stopping:
                break
        work.net.eval()
        result = UnlearnResult(
            model=work,
            steps=len(history),
            history=history,
            start_metrics=start_metrics,
            stopping=stopping,
        )
        if self.collapsed(work, start_metrics, history[-1].metrics):
            result.collapsed = True
            if not self.accept_collapse:
                result.model, result.rejected = start, work
        return result

    def collapsed(self, model: Model, before: dict | None, after: dict | None) -> bool:
        """The project's one definition (evaluation.collapsed): non-finite tensors, or the
        probe's Dice fallen below collapse_ratio of the start's. AUROC changes are results."""
        return evaluation.collapsed(before, after, model, self.collapse_ratio)

    @staticmethod
    def _logits(model: Model, inputs: FrozenInputs, rows: np.ndarray) -> torch.Tensor:
        with model.autocast(), distributed.pooled_batch_norms(model.net):
            return model.scoped_forward(inputs[rows]).float()


def _masked(values: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """values[mask], in the same order, when the host already knows the mask's `count`: the
    device is not asked for it, so the step does not wait."""
    # nonzero_static runs on the CPU, and on CUDA from torch 2.6; elsewhere (Apple's mps)
    # the plain mask, which waits for the device
    if not (mask.device.type == "cpu" or (mask.device.type == "cuda" and _TORCH >= (2, 6))):
        return values[mask]
    index = torch.nonzero_static(mask.flatten(), size=count).squeeze(1)
    return values.flatten()[index]
