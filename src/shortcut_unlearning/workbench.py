"""The plugin's state and decisions, without Qt: the clinician's workbench.

A Workbench holds the stack being refined (images at the working resolution, coarse masks and
their refinement), the model history (the loaded checkpoint, then every accepted run), the
unlearning parameters, and the run on display. The napari widget lays out controls and calls
these methods; tests drive them without a viewer.

A run is planned on the UI thread (`plan`: validates the refinement and the parameters and
snapshots them, so painting during the run cannot race with it) and executed in a worker
(`execute`: a generator of Progress events, as every long job in the project). torch is
imported only when a model is needed, and the evaluator (scikit-learn) only when a run measures,
so the widget opens at once.
"""

from __future__ import annotations

import contextlib
import site
import sysconfig
import threading
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from . import masks as masklib
from .files import write_json
from .progress import Cancel, Progress
from .refinement import Refinement
from .resources import PACKAGE_DIR, SAMPLE_MODEL, sample_data_dir
from .settings import OperatorSettings
from .stack import ImageStack

if TYPE_CHECKING:  # torch and the evaluator load when a model is needed, not with the dock
    from .certificate import Certificate
    from .evaluation import Evaluation
    from .model import Model
    from .rounds import Round
    from .unlearning import Operator, UnlearnResult
    from .unlearning.relearn import Exactness

MEASURE_BEFORE, MEASURE_AFTER = "measuring the starting model", "measuring the unlearned model"
MEASURED = 64  # images measured before and after a run: the refined ones, then a sample


@dataclass
class Views:
    """What the viewer shows of one model on the stack (working resolution)."""

    predictions: np.ndarray  # (N, H, W) uint8 predicted classes
    saliency: np.ndarray  # (N, H, W) float32 attribution of the malignant score
    saliency_tops: np.ndarray  # (N,) each map's robust top (display.saliency_tops); nan: not
    # measured
    scores: np.ndarray  # (N,) malignancy score per image (mean malignant probability); nan:
    # not measured
    lesion_scores: np.ndarray  # (N,) lesion malignancy score (pooled over the predicted lesion)
    metrics: Evaluation  # on the measured images
    refined: dict[str, float]  # evaluation.probe on the refined images
    measured: list[int]  # the images measured: the refined ones, then a sample

    def to_json(self) -> dict:
        """metrics.json's section of this model state."""
        extra = {"dice_refined": self.refined["dice"], "measured_images": self.measured}
        return self.metrics.to_json() | {"refined": self.refined} | extra


@dataclass(frozen=True)
class Preview:
    """What the chosen method will do, before a run: plain words, then the numbers."""

    plain: str  # for a certified method two sentences: what is guaranteed, what to expect
    details: str = ""  # the numbers behind them (the full certificate)


@dataclass
class Suggestion:
    """Unrefined images, best to refine first; why each ranks where it does; their bands."""

    order: list[int]
    why: dict[int, str]
    bands: np.ndarray  # (N, H, W) bool at the working resolution: what a refinement may erase

    def next(self, edited: np.ndarray) -> int | None:
        """The best-ranked image not refined since the ranking was made."""
        return next((i for i in self.order if not edited[i]), None)


@dataclass
class Plan:
    """A validated run, snapshotted on the UI thread."""

    parameters: OperatorSettings
    operator: Operator
    refinement: Refinement  # a frozen copy of the clinician's masks
    spurious: np.ndarray | None  # painted S map, or None: the forget set


@dataclass
class RunRecord:
    """One finished run: what the dock shows until it is accepted or reverted."""

    number: int
    plan: Plan
    start_name: str
    result: UnlearnResult
    before: Views
    after: Views | None  # None when cancelled
    certificate: Certificate | None
    seconds: float
    refined_index: np.ndarray  # images the run refined
    accepted: bool = False
    exactness: Exactness | None = None  # erase and relearn's record

    @property
    def method(self) -> str:
        return self.plan.parameters.method

    @property
    def measured_after(self) -> Views:
        """`after`, which a cancelled run lacks."""
        if self.after is None:
            raise ValueError(f"run {self.number} was cancelled: nothing was measured after it")
        return self.after

    @property
    def usable(self) -> bool:
        """Finished and not collapsed: may become the current model."""
        return not (self.result.cancelled or self.result.collapsed)

    @property
    def model(self):
        """The model the shown numbers describe (the rejected one after a collapse)."""
        return self.result.rejected or self.result.model

    @cached_property
    def verdict(self):
        """What the run did to the class decision's reliance on the erased pixels
        (verdict.judge); None for a cancelled run."""
        from .verdict import judge

        return None if self.after is None else judge(self.before.metrics, self.after.metrics)

    def summary(self, method: str) -> str:
        """The dock's plain words on this run: the verdict, then what the run guarantees."""
        lines = [f"Run {self.number} ({method}):", *self.verdict.lines()]
        if self.result.collapsed:
            lines.append("COLLAPSED: the unlearned model stopped segmenting; it is not used.")
        if self.exactness is not None:
            lines.append(self.exactness.summary())
        if self.certificate is not None:
            c = self.certificate
            lines.append(
                f"Certified forgetting over the {c.scope} scope (epsilon {c.epsilon:g}, delta "
                f"{c.delta:.0e}); the full certificate is under Details."
            )
        else:
            from .certificate import NOT_ISSUED  # a run has loaded torch and scipy by now
            from .unlearning import CERTIFIED

            if self.method in CERTIFIED:
                lines.append(NOT_ISSUED)
        return "\n".join(lines)

    def details(self) -> str:
        """The numbers behind the summary, with their intervals and chance levels."""
        before, after = self.before.metrics, self.measured_after.metrics
        rb, ra = self.before.refined, self.measured_after.refined
        lines = self.verdict.details()
        lines.append(
            f"Dice on the refined images {rb['dice']:.2f} -> {ra['dice']:.2f} (benign "
            f"{_num(rb['dice_benign'])} -> {_num(ra['dice_benign'])}, malignant "
            f"{_num(rb['dice_malignant'])} -> {_num(ra['dice_malignant'])})."
        )
        lines.append(
            f"Predicted lesion pixels called malignant: {_share(before.malignant_share)} -> "
            f"{_share(after.malignant_share)}."
        )
        cb, ca = before.auroc_ci, after.auroc_ci
        if cb and ca and np.isfinite(ca["value"]):
            lines.append(
                f"AUROC on these images {cb['value']:.2f} [{cb['ci_low']:.2f}, "
                f"{cb['ci_high']:.2f}] -> {ca['value']:.2f} [{ca['ci_low']:.2f}, "
                f"{ca['ci_high']:.2f}] (chance 0.50)."
            )
        if self.certificate is not None:
            lines.append(self.certificate.summary())
        return "\n".join(lines)


Ending = Literal["finished", "collapsed", "cancelled", "failed"]


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended and what the user is told. Whatever the ending, the model from before
    the run stays current: only Accept changes it."""

    status: Ending
    message: str = ""  # "" for a run that finished and works
    record: RunRecord | None = None  # None when the run failed

    @classmethod
    def of(cls, record: RunRecord) -> RunOutcome:
        result = record.result
        if result.cancelled:
            kept = f"Cancelled after {result.steps} steps; the previous model is kept."
            return cls("cancelled", kept, record)
        if result.collapsed:
            return cls(
                "collapsed",
                "The unlearned model collapsed (it stopped segmenting); the previous model is "
                "kept and Accept is off. Try the last-layer scope or a larger epsilon.",
                record,
            )
        return cls("finished", "", record)

    @classmethod
    def failed(cls, error: BaseException) -> RunOutcome:
        """A run that raised: what went wrong, and what to do where the user can act."""
        name = type(error).__name__
        if "OutOfMemory" in name:
            message = (
                "The GPU ran out of memory; the previous model is kept. Free GPU memory, refine "
                "fewer images or pick the cpu device."
            )
        elif isinstance(error, ValueError | FloatingPointError | FileNotFoundError):
            message = f"{error} (the previous model is kept)"
        else:
            message = f"Unlearning failed ({name}: {error}); the previous model is kept."
        return cls("failed", message)


def new_folder(base: Path, name: str) -> Path:
    """A folder made for this call: `name`, or `name-2`, `name-3`... when it exists (two exports
    within one second), so nothing is ever overwritten."""
    base.mkdir(parents=True, exist_ok=True)
    out, n = base / name, 1
    while True:
        try:
            out.mkdir()
            return out
        except FileExistsError:
            n += 1
            out = base / f"{name}-{n}"


class Workbench:
    """Refinement, model history and runs of the napari plugin."""

    def __init__(
        self, model_path: str | Path | None = None, parameters: OperatorSettings | None = None
    ):
        self.parameters = parameters or OperatorSettings()
        self.model_path = Path(model_path) if model_path else sample_data_dir() / SAMPLE_MODEL
        self.models: list[tuple[str, Model]] = []  # accepted models, the current one last
        self._loading = threading.Lock()  # the widget loads in a thread, runs in another
        self.shown: RunRecord | None = None
        self.runs = 0
        self.history: list[Round] = []  # every finished run, in order
        self.stack: ImageStack | None = None
        self._inputs: dict[int, np.ndarray] = {}
        self.refinement: Refinement | None = None
        self.meta: dict = {}

    # -- the stack ----------------------------------------------------------------------------
    def open(self, images, coarse, meta: dict | None = None, autosave: Path | None = None):
        """Start refining `coarse` over `images`; returns a note on the autosave, if any."""
        stack = ImageStack(images, (meta or {}).get("extents"))
        refinement = Refinement(coarse)
        if refinement.coarse.shape != (len(stack), *stack.shape):
            raise masklib.MaskError(
                f"the coarse masks are {refinement.coarse.shape} but the images are "
                f"{(len(stack), *stack.shape)} (N, H, W); pick the masks of these images"
            )
        note = refinement.restore(autosave) if autosave else None
        self.stack, self.refinement, self.meta = stack, refinement, dict(meta or {})
        self._inputs = {}
        self.shown = None
        return note

    def opened(self) -> tuple[ImageStack, Refinement]:
        """The stack and its refinement; MaskError before `open`."""
        if self.stack is None or self.refinement is None:
            raise masklib.MaskError(
                "press Refine and erase what the coarse masks wrongly call lesion"
            )
        return self.stack, self.refinement

    @property
    def labels(self) -> np.ndarray | None:
        labels = self.meta.get("labels")
        return None if labels is None else np.asarray(labels, int)

    # -- the model ----------------------------------------------------------------------------
    def set_model_path(self, path: str | Path) -> None:
        """Start over from another checkpoint (the history of accepted runs is dropped)."""
        with self._loading:
            if Path(path) != self.model_path:
                self.model_path, self.models, self.shown = Path(path), [], None

    def current_model(self):
        """The current model, loading the checkpoint on first use (on the caller's thread;
        one load at a time, and a load for a path chosen meanwhile is not kept)."""
        from .model import Model, resolve_device

        device = resolve_device(self.parameters.device)
        with self._loading:
            if not self.models:
                model = Model.load(self.model_path, device)
                self.models = [(f"{self.model_path.stem} (loaded)", model)]
            model = self.models[-1][1]
            if model.device != device:
                model.to(device)
            return model

    @property
    def loaded(self) -> bool:
        return bool(self.models)

    def status(self) -> str:
        """Which model is current, and what the dock shows: always on screen."""
        if not self.models:
            return f"Current model: {self.model_path.name} (not loaded yet)"
        text = f"Current model: {self.models[-1][0]}"
        if self.shown is not None and not self.shown.accepted:
            text += f". Shown: run {self.shown.number}, not accepted"
        return text

    # -- parameters ---------------------------------------------------------------------------
    def operator(self, parameters: dict | None = None) -> Operator:
        """The operator the parameters name, with `parameters` changed for this call."""
        return replace(self.parameters, **(parameters or {})).operator()

    def preview(self) -> Preview:
        """What the chosen operator will do: the certificate and its warnings, before a run."""
        from .certificate import guarantee
        from .model import encoder_origin
        from .unlearning.certified import CertifiedOperator, collapse_warning
        from .unlearning.relearn import Relearn

        try:
            operator = self.operator()
        except ValueError as error:
            return Preview(str(error))
        if isinstance(operator, Relearn):
            steps = f"At most {operator.steps} relearning steps, stopped on held-out images."
            if not self.loaded:
                return Preview(steps)
            model = self.current_model()
            plain = f"{steps}\n{encoder_origin(model.config)}"
            return Preview(plain, operator.exactness(model).summary())
        if not isinstance(operator, CertifiedOperator):
            encoder = f"\n{encoder_origin(self.current_model().config)}" if self.loaded else ""
            return Preview(f"{operator.steps} steps; not certified (no formal guarantee).{encoder}")
        if not self.loaded:  # what to expect needs the model's size
            first = guarantee(operator.epsilon, operator.delta, operator.scope)
            return Preview(
                f"{first} What to expect shows once the model is loaded.", operator.expectation()
            )
        certificate = operator.certificate(self.current_model())
        warning = collapse_warning(certificate)
        details = certificate.summary() + (f"\nWARNING: {warning}" if warning else "")
        return Preview(certificate.plain(), details)

    # -- which image next ---------------------------------------------------------------------
    def suggest(self) -> Suggestion:
        """The unrefined images ranked by the shortcut refining them would remove, from the
        current model and the coarse masks only (ranking.rank_images; worker thread)."""
        from .ranking import rank_images
        from .retain import band_width

        stack, refinement = self.opened()
        model = self.current_model()
        size = model.config.image_size
        if size not in self._inputs:
            self._inputs = {size: stack.to_model(size)}
        coarse = stack.masks_to_model(refinement.coarse, size)
        edited = np.flatnonzero(refinement.edited())
        width = None
        if len(edited):  # the refinements so far say how deep the band is
            refined = stack.masks_to_model(refinement.refined, size)
            split = masklib.split_pixels(coarse, {int(i): refined[i] for i in edited}, "clip")
            width = band_width(coarse, split)
        ranking = rank_images(model, self._inputs[size], coarse, exclude=edited, width=width)
        bands = stack.from_model(ranking.bands.astype(np.uint8), labels=True)
        why = {int(i): ranking.why(int(i)) for i in ranking.order}
        return Suggestion([int(i) for i in ranking.order], why, bands.astype(bool))

    # -- a run --------------------------------------------------------------------------------
    def plan(self, spurious: np.ndarray | None = None) -> Plan:
        """Validate and snapshot a run (UI thread); raises with a message for the user."""
        _, refinement = self.opened()
        snapshot = refinement.snapshot()
        snapshot.split()  # an empty or invalid refinement fails here, not in the worker
        if spurious is not None:
            spurious = np.asarray(spurious) != 0
            if spurious.shape != snapshot.coarse.shape:
                raise masklib.MaskError(
                    f"the artefact layer is {spurious.shape} but the masks are "
                    f"{snapshot.coarse.shape}; paint artefacts on a layer of the images' shape"
                )
        return Plan(self.parameters, self.operator(), snapshot, spurious)

    def execute(
        self, plan: Plan, cancel: Cancel | None = None
    ) -> Generator[Progress, None, RunRecord]:
        """Unlearn the plan's forget set from the current model (worker thread). On the CPU
        PyTorch leaves a core to the viewer's event loop; on CUDA the memory the run cached is
        given back afterwards."""
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))
        try:
            return (yield from self._execute(plan, cancel))
        finally:
            torch.set_num_threads(threads)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _execute(self, plan: Plan, cancel: Cancel | None):
        from .unlearning import CertifiedOperator, Relearn, unlearning_job
        from .unlearning.certified import issued

        clock = time.perf_counter()
        stack, _ = self.opened()
        operator, steps = plan.operator, plan.operator.steps
        yield Progress(0, steps, "loading the model")
        model = self.current_model()
        start_name = self.models[-1][0]
        size = model.config.image_size
        if size not in self._inputs:  # the stack at the model's size, made once per stack
            self._inputs = {size: stack.to_model(size)}
        images = self._inputs[size]
        coarse = stack.masks_to_model(plan.refinement.coarse, size)
        refined = stack.masks_to_model(plan.refinement.refined, size)
        edited = np.flatnonzero(plan.refinement.edited())
        split = masklib.split_pixels(coarse, {int(i): refined[i] for i in edited})
        s_map = (
            split.forget
            if plan.spurious is None
            else stack.masks_to_model(plan.spurious.astype(np.uint8), size).astype(bool)
        )
        measure = _Measure(stack, images, split, s_map, self.labels, plan.parameters.seed)
        certificate = (
            operator.certificate(model) if isinstance(operator, CertifiedOperator) else None
        )
        exactness = operator.exactness(model) if isinstance(operator, Relearn) else None
        yield Progress(0, steps, MEASURE_BEFORE)
        before = measure.views(model)
        if cancel:
            result = _cancelled(model)
        else:
            job = unlearning_job(operator, model, images, coarse, split, measure.refined, cancel)
            result = yield from job
        after = None
        if not result.cancelled:
            yield Progress(steps, steps, MEASURE_AFTER)
            after = measure.views(result.rejected or result.model, start=before.metrics)
        self.runs += 1
        return RunRecord(
            number=self.runs,
            plan=plan,
            start_name=start_name,
            result=result,
            before=before,
            after=after,
            certificate=issued(certificate, result) if certificate else None,
            seconds=time.perf_counter() - clock,
            refined_index=edited,
            exactness=exactness,
        )

    def show(self, record: RunRecord | None) -> None:
        """Put a finished run on display; a cancelled run, or None, shows nothing. The run on
        display is replaced: an unaccepted one is dropped, the current model stays. Every
        finished run joins the history of rounds."""
        self.shown = record if record is not None and record.after is not None else None
        if self.shown is not None:
            self.history.append(self._round(self.shown))

    def _round(self, record: RunRecord):
        """The run as a round of sequential refinement (rounds.Round)."""
        from .rounds import Round

        before = {i for r in self.history if r.accepted for i in r.refined}
        refined = [int(i) for i in record.refined_index]
        certificate = record.certificate
        return Round(
            index=record.number,
            images=[i for i in refined if i not in before],
            refined=refined,
            operator=record.method,
            settings=asdict(record.plan.operator),
            forget_pixels=int(record.plan.refinement.forget.sum()),
            steps=record.result.steps,
            accepted=False,
            cancelled=record.result.cancelled,
            collapsed=record.result.collapsed,
            start_metrics=record.result.start_metrics,
            end_metrics=record.result.history[-1].metrics if record.result.history else None,
            certificate={**certificate.to_dict(), "summary": certificate.summary()}
            if certificate
            else None,
        )

    def accept(self) -> None:
        record = self.shown
        if record is None or record.accepted or not record.usable:
            raise ValueError("there is no finished, working run to accept")
        self.models.append((f"run {record.number} ({record.method}), accepted", record.model))
        record.accepted = True
        self._round_of(record).accepted = True

    def revert(self) -> None:
        """Go back to the model from before the run on display; the run leaves the screen."""
        if self.shown is not None and self.shown.accepted:
            self.models.pop()
            self._round_of(self.shown).accepted = False
        self.shown = None

    def _round_of(self, record: RunRecord):
        return next(r for r in self.history if r.index == record.number)

    # -- export -------------------------------------------------------------------------------
    def export(self, folder: str | Path) -> Path:
        """Write the run on display: its model, the masks it used, metrics.json (the schema of
        `run`) and a before/after picture, into a new folder inside `folder`."""
        record = self.shown
        if record is None:
            raise ValueError("no run is shown: run Unlearn first (Revert and Cancel clear it)")
        stack, _ = self.opened()
        base = Path(folder).expanduser().resolve()
        refuse_package_folder(base)
        out = new_folder(base, f"run-{time.strftime('%Y%m%d-%H%M%S')}-{record.number}")
        record.model.save(out / "model")
        from .data.folders import write_masks

        write_masks(
            record.plan.refinement.refined,
            [self._id(i) for i in range(len(stack))],
            self.meta.get("original_sizes") or stack.extents,
            out / "refined_masks",
            extents=stack.extents,
        )
        write_json(out / "metrics.json", self.report(record), default=_plain)
        self._picture(record, out / "before_after.png")
        return out

    def report(self, record: RunRecord) -> dict:
        """metrics.json of a run, in the schema `shortcut-unlearning run` writes, with the
        history of rounds (every run of this session) and what their chain certifies."""
        from .experiment import unlearning_report
        from .rounds import chain_certificate

        result = record.result
        sections = unlearning_report(
            record.plan.operator, record.certificate, result, record.exactness
        )
        sections["unlearning"] |= {"accepted": record.accepted, "start_model": record.start_name}
        return {
            "coarse": record.before.to_json(),
            "unlearned": record.measured_after.to_json() | {"collapsed": result.collapsed},
            "verdict": record.verdict.to_dict(),
            "config": asdict(record.plan.parameters),
            "seed": record.plan.parameters.seed,
            "device": str(record.model.device),
            **sections,
            "refined_ids": [self._id(i) for i in record.refined_index],
            "forget_pixels": int(record.plan.refinement.forget.sum()),
            "n_train": len(self.opened()[0]),
            # The plugin measures on the images being refined (a sample of them when many).
            "n_test": len(record.before.measured),
            "timings": {"run_s": record.seconds},
            "rounds": {
                "rounds": [r.to_dict() for r in self.history],
                "certificate": chain_certificate(self.history),
            },
        }

    def _id(self, index: int) -> str:
        ids = self.meta.get("ids")
        return str(ids[index]) if ids else f"image_{index:04d}"

    def _picture(self, record: RunRecord, out: Path) -> None:
        from .figures import saliency_grid

        picks = record.refined_index[:6]
        before, after = record.before.lesion_scores, record.measured_after.lesion_scores
        scores = zip(before[picks], after[picks], strict=True)
        captions = [
            f"{self._id(i)}\nlesion malignancy {_num(a)} -> {_num(b)}"
            for i, (a, b) in zip(picks, scores, strict=True)
        ]
        saliency_grid(
            np.asarray(self.opened()[0].images[picks]),
            record.before.saliency[picks],
            record.measured_after.saliency[picks],
            captions,
            out,
            title=f"Saliency of the malignant score, before and after run {record.number}",
        )


class _Measure:
    """Predictions, saliency and numbers of one model on the stack (worker thread), from the
    project's one evaluator: the record `run` writes per model state (S_global, AUROC where
    labels exist, scores, band reliance on the erased pixels), plus class-aware Dice on the
    refined images, whose refined masks are the only truth the plugin has.

    A big stack is measured on the refined images and a seeded sample of the others, at most
    MEASURED images in all; the others' planes stay empty and their scores nan."""

    def __init__(self, stack, images, split, s_map, labels, seed: int = 0):
        from .evaluation import EvalSet

        self.stack = stack
        refined = np.flatnonzero(split.refined)
        others = np.flatnonzero(~split.refined)
        spare = max(0, MEASURED - len(refined))
        others = np.random.default_rng(seed).permutation(others)[:spare]
        self.index = np.union1d(refined, others)
        at = self.index
        labels = None if labels is None else labels[at]
        self.measured = EvalSet(
            images[at], split.targets[at], labels, s_map[at], band=split.forget[at]
        )
        self.refined = self.measured.select(np.searchsorted(at, refined))

    def views(self, model, start: Evaluation | None = None) -> Views:
        from . import display, evaluation, saliency

        record = evaluation.evaluate(model, self.measured, seed=0, start=start, n_boot=200)
        refined = evaluation.probe(model, self.refined)
        images = self.measured.images
        predictions = model.probabilities(images).argmax(1).astype(np.uint8)
        maps = saliency.saliency_maps(model, images).astype(np.float32)
        scores = np.full((3, len(self.stack)), np.nan)
        scores[:, self.index] = (
            record.image_scores,
            record.lesion_scores,
            display.saliency_tops(maps),
        )
        return Views(
            predictions=self._planes(predictions, labels=True),
            saliency=self._planes(maps),
            saliency_tops=scores[2],
            scores=scores[0],
            lesion_scores=scores[1],
            metrics=record,
            refined=refined,
            measured=self.index.tolist(),
        )

    def _planes(self, maps: np.ndarray, labels: bool = False) -> np.ndarray:
        """Model-size maps of the measured images on the stack's canvas, zero elsewhere."""
        back = self.stack.from_model(maps, self.index, labels=labels)
        if len(self.index) == len(self.stack):
            return back
        out = np.zeros((len(self.stack), *back.shape[1:]), back.dtype)
        out[self.index] = back
        return out


def _num(value: float) -> str:
    return f"{value:.2f}" if np.isfinite(value) else "n/a"


def _share(value: float) -> str:
    return f"{value:.0%}" if np.isfinite(value) else "n/a"


def _cancelled(model):
    from .unlearning import UnlearnResult

    return UnlearnResult(model=model, cancelled=True)


def refuse_package_folder(folder: Path) -> None:
    """Exports never go into the installed package, its sample data or site-packages."""
    forbidden: list[str | Path] = [
        PACKAGE_DIR,
        *site.getsitepackages(),
        sysconfig.get_paths()["purelib"],
    ]
    with contextlib.suppress(FileNotFoundError):
        forbidden.append(sample_data_dir())
    for place in forbidden:
        place = Path(place).resolve()
        if folder == place or place in folder.parents:
            raise ValueError(
                f"{folder} is inside {place}, which belongs to the installed software; "
                "export to a folder of your own (the default is in your user data folder)"
            )


def _plain(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)
