"""The pipeline as stages: prepare data -> train or load -> unlearn -> evaluate -> report.

Each stage is a function over in-memory objects. `run` composes them for the command line;
`bench.seeds.seeds` composes the same stages to share one coarse model between methods. Every
number comes from the one evaluator (evaluation.py), every unlearning run is watched by its
one probe, and files are written by the last stage alone (`write_run`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from pydantic import JsonValue

from . import distributed, evaluation, figures, metrics, outputs, ranking, retain, saliency
from . import masks as masklib
from .certificate import NOT_ISSUED, Certificate
from .data.annotator import Annotator
from .data.folders import read_folder
from .data.lesion_set import LesionSet
from .data.synthetic import PLACEMENTS, SynthConfig, generate
from .evaluation import EvalSet, Evaluation
from .files import write_json
from .model import (
    Model,
    ModelConfig,
    Provenance,
    check_encoder_weights,
    read_config,
    read_encoder_info,
    resolve_device,
)
from .progress import drive
from .resources import SAMPLE_SET, sample_data_dir
from .settings import OperatorSettings, Scope
from .training import TrainConfig, train, validation_split
from .unlearning import CERTIFIED, CertifiedOperator, Operator, UnlearnResult, unlearning_job
from .unlearning.certified import issued
from .unlearning.relearn import Exactness, Relearn
from .verdict import judge


@dataclass
class RunConfig:
    """Settings of one run; the command line's flags map onto these fields."""

    data: str = "sample"  # a folder, "sample" (the shipped set) or "synthetic" (generated)
    synth_n: int = SynthConfig.n  # images to generate when data is "synthetic"
    image_size: int = 128
    coarse: str = masklib.DEFAULT_COARSE_METHOD
    coarse_margin: float = masklib.DEFAULT_COARSE_MARGIN
    fine_fraction: float = 0.1  # share of training images that get refined masks
    refined: list[str] | None = None  # or the ids of the images to refine
    # Which images get refined: "ranked" (the coarse model's ranking, see ranking.py),
    # "random" (seeded) or "given" (the --refined ids). None: given with --refined, else random.
    refine_order: str | None = None
    method: str = OperatorSettings.method
    steps: int | None = None  # unlearning steps (None: the operator's default)
    epochs: int = 20  # at most, for the coarse model and the baselines (early stopping)
    encoder: str = ModelConfig.encoder
    # The frozen encoder's start: smp's weights by name ("imagenet" downloads them), or an
    # encoder checkpoint written by pretrain-encoder; neither: random.
    encoder_weights: str | None = None
    encoder_checkpoint: str | None = None
    seed: int = 0
    device: str = "auto"
    model: str | None = None  # start from this checkpoint instead of training
    baselines: bool = False  # also train retrain-from-scratch and the fine-mask oracle
    saliency_images: int = 4
    # validation images (never test images) the unlearning loop probes: curves, collapse check
    probe_images: int = 32
    test_split: str = "test"  # the split evaluated on ("test", "test_balanced", "val")
    synth_balanced: int = 0  # with data "synthetic": images in a balanced test split
    scope: Scope | None = None  # unlearning scope (None: the model's)
    accept_collapse: bool = False
    out: str = "out/run"
    overwrite: bool = False  # replace a non-empty out folder
    labels: list[str] | None = None  # labels CSVs of an ISIC 2018 folder (default: its *.csv)
    quiet: bool = False
    operator_options: dict = field(default_factory=dict)
    # Data that do not flatter the method (docs/method.md, "Data that do not flatter the
    # method"): where the generator puts the spurious artefacts (synthetic data), and how the
    # simulated person refines: border jitter in pixels, share of artefact pixels missed.
    synth_placement: str = SynthConfig.placement
    refine_jitter: int = 0
    refine_missed: float = 0.0

    def __post_init__(self):
        if self.synth_placement not in PLACEMENTS:
            raise ValueError(
                f"synth_placement must be one of {PLACEMENTS}, got {self.synth_placement!r}"
            )
        Annotator(self.refine_jitter, self.refine_missed)  # raises on a bad setting
        if not 0 < self.fine_fraction <= 1:
            raise ValueError(f"fine_fraction must lie in (0, 1], got {self.fine_fraction}")
        if self.refine_order not in (None, *REFINE_ORDERS):
            raise ValueError(
                f"refine_order must be one of {REFINE_ORDERS}, got {self.refine_order!r}"
            )
        if self.refine_order == "given" and not self.refined:
            raise ValueError("--refine-order given refines the --refined ids in order; name them")
        if self.refine_order in ("ranked", "random") and self.refined:
            raise ValueError(
                f"--refined names the images to refine, so --refine-order {self.refine_order} "
                "has nothing to choose: drop one of the two"
            )

    @property
    def annotator(self) -> Annotator:
        """The simulated person who refines the chosen images."""
        return Annotator(self.refine_jitter, self.refine_missed, self.seed)

    @property
    def order(self) -> str:
        """The refine order in force: refine_order, or its default."""
        return self.refine_order or ("given" if self.refined else "random")

    def operator_settings(self) -> OperatorSettings:
        """The run's operator settings; `steps`, when given, where the method reads it."""
        chosen = OperatorSettings(self.method, self.scope, device=self.device, seed=self.seed)
        return chosen.with_steps(self.steps) if self.steps else chosen


REFINE_ORDERS = ("ranked", "random", "given")


def load_data(config: RunConfig) -> LesionSet:
    if config.data == "synthetic":
        if config.labels:
            raise ValueError("--labels names the labels CSVs of a dataset folder; drop it here")
        return generate(
            n=config.synth_n,
            size=config.image_size,
            seed=config.seed,
            balanced_test=config.synth_balanced,
            placement=config.synth_placement,
        )
    if config.synth_placement != SynthConfig.placement:
        raise ValueError("--synth-placement places generated artefacts: use --data synthetic")
    folder = sample_data_dir() / SAMPLE_SET if config.data == "sample" else Path(config.data)
    return read_folder(folder, image_size=config.image_size, labels=config.labels)


def training_split(data: LesionSet) -> LesionSet:
    """The data's train split; ValueError when it holds no image (every image in another
    split: there is nothing to train or unlearn on)."""
    train_set = data.split("train")
    if not len(train_set):
        splits = ", ".join(sorted(set(data.splits.tolist())))
        raise ValueError(
            f"the data has no training images: all {len(data)} are in the {splits} split; "
            "put images in the train split (the split column of labels.csv)"
        )
    return train_set


def choose_refined(
    train_set: LesionSet, config: RunConfig, coarse: np.ndarray | None = None, model=None
) -> np.ndarray:
    """Indices of the training images whose masks get refined, in refinement order.

    "ranked" needs the coarse masks and the model, and reads nothing else of the training
    images' annotations (no fine mask, label or artefact map).
    """
    if config.order == "given":
        given = config.refined or []  # the given order has them (RunConfig.__post_init__)
        missing = sorted(set(given) - set(train_set.ids))
        if missing:
            raise ValueError(f"--refined names images not in the training split: {missing[:5]}")
        return np.array([train_set.ids.index(i) for i in given])
    count = max(1, round(config.fine_fraction * len(train_set)))
    if config.order == "ranked":
        if model is None or coarse is None:
            raise ValueError("the ranked order needs the coarse masks and the model to rank with")
        return ranking.rank_images(model, train_set.images, coarse).top(count)
    return np.sort(np.random.default_rng(config.seed).choice(len(train_set), count, replace=False))


def evaluation_groups(test: LesionSet, train_set: LesionSet) -> dict[str, np.ndarray]:
    """Aligned and conflicting test images per artefact, the direction read off the train split.

    Works for any test split: the reversed one, or a balanced one whose artefacts are
    independent of the label (there each group holds about half of the images)."""
    names = list(test.spurious) or [n for n, f in test.flags.items() if f.any()]
    direction = {}
    for name in names:
        flags, labels = train_set.flags[name], train_set.labels
        rates = [flags[labels == c].mean() if (labels == c).any() else 0.0 for c in (1, 0)]
        direction[name] = 1 if rates[0] >= rates[1] else -1
    return metrics.shortcut_groups(test.flags, test.labels, names, direction)


# --- stage 1: prepare data ------------------------------------------------------------------


@dataclass
class Prepared:
    """The data of a run, split and masked once: what every later stage reads.

    The test split is read once, by the final evaluation (evaluate_states): every decision
    before it (training's early stopping, the unlearning probe and its collapse guard, an
    operator's stopping rule) runs on training images or on `val`, which is held out of them."""

    train: LesionSet
    val: LesionSet | None  # the data's own validation split, or images held out of train
    test: LesionSet  # the split evaluated on
    coarse: np.ndarray  # (N, H, W) coarse masks of the training images
    refined: np.ndarray  # indices of the training images with refined masks
    split: masklib.PixelSplit | None  # their forget/retain pixels; None until ranked
    evalset: EvalSet  # the test split with its truth, S map, band and groups
    probe_set: EvalSet | None  # the first probe_images validation images, or None
    seconds: float = 0.0

    @property
    def pixel_split(self) -> masklib.PixelSplit:
        """`split`, which training the baselines and unlearning need."""
        if self.split is None:
            raise ValueError(
                "the ranked order chooses the refined images with the starting model: "
                "call refine_ranked before training baselines or unlearning"
            )
        return self.split

    def coarse_of(self, data: LesionSet, config: RunConfig) -> np.ndarray:
        return masklib.coarse_masks(data.masks, config.coarse, config.coarse_margin)


def refinement_split(
    train: LesionSet, coarse: np.ndarray, refined, annotator: Annotator | None = None
) -> masklib.PixelSplit:
    """The forget and retain pixels when the `refined` images get their fine masks, or the
    masks `annotator` draws from them (a person's refinements)."""
    annotator = annotator or Annotator()
    artefacts = train.artefact_mask() if train.artefacts is not None else None
    drawn = {}
    for i in map(int, refined):
        seen = None if artefacts is None else artefacts[i]
        drawn[i] = annotator.refine(train.masks[i], coarse[i], seen, i)
    return masklib.split_pixels(coarse, drawn)


def refine_ranked(prepared: Prepared, config: RunConfig, model: Model) -> Prepared:
    """For the ranked order: the refined images the starting model ranks first."""
    if prepared.split is not None:
        return prepared
    # ranked on rank 0 and broadcast: a tie broken differently would split the ranks' data
    refined = distributed.from_main(
        lambda: choose_refined(prepared.train, config, prepared.coarse, model)
    )
    split = refinement_split(prepared.train, prepared.coarse, refined, config.annotator)
    return replace(prepared, refined=refined, split=split)


def evaluation_split(data: LesionSet, name: str) -> LesionSet:
    """The split to evaluate on; "test" falls back to "val" where the data has no test split."""
    present = sorted(set(data.splits.tolist()))
    if name == "test" and "test" not in present and "val" in present:
        name = "val"
    if name not in present:
        raise ValueError(
            f"the data has no {name!r} split to evaluate on; its splits are {present}"
            + ("; generate one with --synth-balanced N" if name == "test_balanced" else "")
        )
    return data.split(name)


def prepare_data(config: RunConfig) -> Prepared:
    """Load the data, choose the refined images, and build the evaluation and probe sets."""
    clock = time.perf_counter()
    data = load_data(config)
    train_set = training_split(data)
    test = evaluation_split(data, config.test_split)
    val: LesionSet | None
    if (data.splits == "val").any() and test.splits[0] != "val":
        val = data.split("val")
    else:  # as training would hold them out (the same images for the same seed)
        fit, held = validation_split(len(train_set), TrainConfig.val_fraction, config.seed)
        val = train_set.select(held) if len(held) else None
        train_set = train_set.select(fit)
    coarse = masklib.coarse_masks(train_set.masks, config.coarse, config.coarse_margin)
    # The ranked order is chosen once the starting model exists (refine_ranked).
    ranked = config.order == "ranked"
    refined = np.zeros(0, int) if ranked else choose_refined(train_set, config)
    split = None if ranked else refinement_split(train_set, coarse, refined, config.annotator)
    evalset = EvalSet.from_lesion_set(
        test, config.coarse, config.coarse_margin, evaluation_groups(test, train_set)
    )
    probe_set = None
    if val is not None and config.probe_images:
        probe_set = EvalSet.from_lesion_set(
            val, config.coarse, config.coarse_margin, evaluation_groups(val, train_set)
        ).select(np.arange(min(config.probe_images, len(val))))
    return Prepared(
        train=train_set,
        val=val,
        test=test,
        coarse=coarse,
        refined=refined,
        split=split,
        evalset=evalset,
        probe_set=probe_set,
        seconds=time.perf_counter() - clock,
    )


# --- stage 2: train or load -----------------------------------------------------------------


@dataclass
class Trained:
    model: Model
    seconds: float  # training (or loading) time


def train_model(images, targets, config: RunConfig, device, masks: str, val=None) -> Model:
    """A fresh model trained on (images, targets); `masks` names the targets in provenance.

    `val` (images, targets) validates training; without it training holds images out."""
    # Provenance keeps keys beyond its fields (pydantic's extra="allow"); mypy's TypedDict
    # does not know that.
    provenance: Provenance = {  # type: ignore[typeddict-unknown-key]
        "data": config.data,
        "masks": masks,
        "images": len(images),
        "epochs": config.epochs,
        "seed": config.seed,
        "scope": ModelConfig.scope,  # what training updated; the rest never saw these masks
    }
    model_config = ModelConfig(
        encoder=config.encoder,
        encoder_weights=config.encoder_weights,
        image_size=config.image_size,
        seed=config.seed,
        provenance=provenance,
    )
    model = Model(model_config, device, config.encoder_checkpoint)
    train_config = TrainConfig(epochs=config.epochs, seed=config.seed)
    job = train(model, images, targets, train_config, val=val)
    drive(job, desc=f"train on {masks}", quiet=config.quiet)
    return model


def train_or_load(config: RunConfig, prepared: Prepared, device) -> Trained:
    """The starting model: the checkpoint config.model, or one trained on coarse masks."""
    clock = time.perf_counter()
    if config.model:
        model = Model.load(config.model, device)
    else:
        kind = f"coarse ({config.coarse} {config.coarse_margin:g})"
        val = prepared.val
        checked = (val.images, prepared.coarse_of(val, config)) if val is not None else None
        model = train_model(prepared.train.images, prepared.coarse, config, device, kind, checked)
    return Trained(model, time.perf_counter() - clock)


def train_baselines(config: RunConfig, prepared: Prepared, device) -> dict[str, Trained]:
    """Retrain-from-scratch on the corrected masks, on every coarse mask with its uncertain
    band ignored (no refined mask used as a label), and the fine-mask oracle (docs/method.md,
    "Baselines")."""
    val = prepared.val
    # The val split is unrefined: its coarse masks check both retrains, its fine masks the
    # oracle (validation Dice reads an ignored band as lesion, so coarse masks it is).
    val_coarse = None if val is None else (val.images, prepared.coarse_of(val, config))
    val_fine = None if val is None else (val.images, val.masks)
    # The band width the retain set uses, read off the refinements' depth.
    split = prepared.pixel_split
    width = retain.band_width(prepared.coarse, split)
    band_ignored = retain.certain_targets(prepared.coarse, width)
    baselines = (
        ("retrain", split.targets, "corrected (refined where refined)", val_coarse),
        (
            "retrain_band_ignored",
            band_ignored,
            f"coarse, the uncertain band ({width} px) ignored",
            val_coarse,
        ),
        ("fine_oracle", prepared.train.masks, "fine", val_fine),
    )
    out = {}
    for name, targets, kind, checked in baselines:
        clock = time.perf_counter()
        model = train_model(prepared.train.images, targets, config, device, kind, checked)
        out[name] = Trained(model, time.perf_counter() - clock)
    return out


# --- stage 3: unlearn -----------------------------------------------------------------------


def build_operator(config: RunConfig) -> Operator:
    """The operator the config names; built first, so a bad setting fails before training."""
    return config.operator_settings().operator(
        accept_collapse=config.accept_collapse, **config.operator_options
    )


def unlearn(
    config: RunConfig, operator: Operator, start: Model, prepared: Prepared
) -> tuple[UnlearnResult, float]:
    """Unlearn the refinement's forget set from `start`, watched by the one probe; returns the
    result and its seconds. A kept model records what unlearning it went through."""
    clock = time.perf_counter()
    job = unlearning_job(
        operator,
        start,
        prepared.train.images,
        prepared.coarse,
        prepared.pixel_split,
        prepared.probe_set,
    )
    outcome = drive(job, desc=config.method, quiet=config.quiet)
    seconds = time.perf_counter() - clock
    if outcome.model is not start:  # not kept back after a collapse
        unlearned: dict[str, JsonValue] = {
            "method": config.method,
            "steps": outcome.steps,
            "refined_images": len(prepared.refined),
        }
        outcome.model.config = replace(
            outcome.model.config, provenance={**start.config.provenance, "unlearned": unlearned}
        )
    return outcome, seconds


# --- stage 4: evaluate ----------------------------------------------------------------------


def evaluate_states(models: dict[str, Model], evalset: EvalSet, seed: int) -> dict[str, Evaluation]:
    """evaluation.evaluate for each model state; "unlearned" is judged against "coarse" for
    the class-takeover check."""
    records: dict[str, Evaluation] = {}
    for name, model in models.items():
        start = records.get("coarse") if name == "unlearned" else None
        records[name] = evaluation.evaluate(model, evalset, seed, start)
    return records


@dataclass
class SaliencyPicture:
    """Before/after saliency of a few test images, ready to draw."""

    images: np.ndarray
    before: np.ndarray
    after: np.ndarray
    artefacts: np.ndarray
    captions: list[str]
    shares: dict[str, float]  # mean share of saliency on the spurious pixels, per model


def saliency_picture(coarse: Model, unlearned: Model, evalset: EvalSet, count: int):
    """Saliency of benign test images that carry spurious pixels (where the shortcut
    misleads), before and after unlearning; None without labels or S."""
    if evalset.spurious is None or evalset.labels is None or not count:
        return None
    s_map = evalset.spurious
    candidates = np.flatnonzero(s_map.any(axis=(1, 2)) & (evalset.labels == 0))
    if len(candidates) == 0:
        candidates = np.arange(len(evalset))
    picks = candidates[:count]
    maps = {
        name: saliency.saliency_maps(m, evalset.images[picks])
        for name, m in (("coarse", coarse), ("unlearned", unlearned))
    }
    shares = {name: saliency.saliency_share(m, s_map[picks]) for name, m in maps.items()}
    captions = [
        f"{evalset.ids[i]}\nbenign\non artefacts: {shares['coarse'][j]:.0%} -> "
        f"{shares['unlearned'][j]:.0%}"
        for j, i in enumerate(picks)
    ]
    return SaliencyPicture(
        images=evalset.images[picks],
        before=maps["coarse"],
        after=maps["unlearned"],
        artefacts=s_map[picks],
        captions=captions,
        shares={name: float(v.mean()) for name, v in shares.items()},
    )


# --- stage 5: report ------------------------------------------------------------------------


def trajectory(outcome: UnlearnResult) -> list[dict]:
    """The probe's curve: the start, then one row per step (probe numbers where probed)."""
    start = {"step": 0, "phase": "start", **(outcome.start_metrics or {})}
    rows = [
        {"step": e.step, "phase": e.phase, **e.losses, **(e.metrics or {})} for e in outcome.history
    ]
    return [start, *rows]


def unlearning_report(
    operator: Operator, certificate, outcome: UnlearnResult, exactness: Exactness | None = None
) -> dict:
    """metrics.json's operator, certificate (or exactness) and unlearning sections (`run` and
    the plugin's export write the same)."""
    return {
        "operator": {"name": operator.name, **asdict(operator)},
        "certificate": {**certificate.to_dict(), "summary": certificate.summary()}
        if certificate
        else None,
        "exactness": exactness.to_dict() if exactness else None,
        "unlearning": {
            "collapsed": outcome.collapsed,
            "kept_starting_model": outcome.rejected is not None,
            "stopping": outcome.stopping,  # why the run ended where it did (the recovery's probe)
            "start_probe": outcome.start_metrics,
            "trajectory": trajectory(outcome)[1:],
        },
    }


def run_warnings(
    records: dict[str, Evaluation], extra: dict[str, dict], outcome: UnlearnResult | None
) -> list[str]:
    """What a reader must not miss: a collapse, a class takeover, a fit that failed (the
    training record among a state's `extra`)."""
    found = []
    if outcome is not None and outcome.collapsed:
        kept = outcome.rejected is not None
        found.append(
            "the unlearned model COLLAPSED (its probe Dice fell below the floor or it went "
            "non-finite)" + ("; the starting model was kept (unlearned = coarse)" if kept else "")
        )
    for name, record in records.items():
        if record.class_takeover:
            found.append(f"{name}: {record.class_takeover}")
        training = extra.get(name, {}).get("training") or {}
        if training.get("converged") is False:
            found.append(
                f"{name}: training did not converge (best validation Dice "
                f"{training['val_dice']:.3f} < {training['min_val_dice']})"
            )
    return found


def build_report(
    config: RunConfig,
    operator: Operator,
    prepared: Prepared,
    records: dict[str, Evaluation],
    extra: dict[str, dict],
    done: Unlearned,
    device,
    timings: dict,
) -> dict:
    """metrics.json's content: per model state its record and what `extra` keeps beside it
    (its training, its saliency share, whether it collapsed), the run's settings and history."""
    outcome = done.outcome
    return {
        **{name: record.to_json() | extra.get(name, {}) for name, record in records.items()},
        "config": asdict(config),
        "seed": config.seed,
        "device": str(device),
        **unlearning_report(operator, done.certificate, outcome, done.exactness),
        "warnings": run_warnings(records, extra, outcome),
        "verdict": judge(records["coarse"], records["unlearned"]).to_dict(),
        "refined_ids": [prepared.train.ids[i] for i in prepared.refined],
        "refine_order": config.order,
        "forget_pixels": prepared.pixel_split.forget_count,
        "n_train": len(prepared.train),
        "n_test": len(prepared.test),
        "test_split": str(prepared.test.splits[0]),
        "test_ids": prepared.evalset.ids,
        "timings": timings,
    }


def write_run(
    out: Path | str,
    report: dict,
    models: dict[str, Model],
    picture: SaliencyPicture | None = None,
    trajectories: dict[str, list[dict]] | None = None,
) -> Path:
    """Write a run's files into `out`: each model (file stem -> model), saliency.png,
    trajectory.png and metrics.json. The only stage that touches the disk."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stem, model in models.items():
        model.save(out / stem)
    if picture is not None:
        figures.saliency_grid(
            picture.images,
            picture.before,
            picture.after,
            picture.captions,
            out / "saliency.png",
            artefacts=picture.artefacts,
            title="Saliency of the malignant score over the predicted lesion",
        )
    if trajectories:
        figures.trajectory_plot(trajectories, out / "trajectory.png")
    # Written last: a folder with metrics.json holds a finished run.
    write_json(out / "metrics.json", report, replace=True, default=_plain)
    return out


@dataclass
class Unlearned:
    """An unlearning run before any test image is read: its outcome, its guarantee and time."""

    outcome: UnlearnResult
    certificate: Certificate | None  # a certified operator's
    seconds: float
    exactness: Exactness | None = None  # what erase-and-relearn guarantees


def unlearn_stage(
    config: RunConfig, operator: Operator, prepared: Prepared, start: Trained
) -> Unlearned:
    """Unlearn from `start`; a certified operator's certificate says what its recovery did."""
    certificate = (
        operator.certificate(start.model) if isinstance(operator, CertifiedOperator) else None
    )
    outcome, seconds = unlearn(config, operator, start.model, prepared)
    if certificate is not None:  # what the recovery did; none if the gate kept the start
        certificate = issued(certificate, outcome)
    exact = operator.exactness(start.model) if isinstance(operator, Relearn) else None
    return Unlearned(outcome, certificate, seconds, exact)


def report_run(
    config: RunConfig,
    operator: Operator,
    prepared: Prepared,
    states: dict[str, Model],
    done: Unlearned,
    evaluated: dict[str, Evaluation],
    device,
    timings: dict,
) -> tuple[dict, dict[str, Model], SaliencyPicture | None]:
    """Evaluate the unlearned model beside the `states` already `evaluated` (coarse, and the
    baselines where trained); returns the report, the model to save and the saliency picture."""
    outcome, start = done.outcome, states["coarse"]
    timings["unlearn_s"] = done.seconds
    clock = time.perf_counter()
    if outcome.model is start:  # kept back after a collapse: the same numbers
        unlearned = evaluated["coarse"]
    else:
        unlearned = evaluation.evaluate(
            outcome.model, prepared.evalset, config.seed, evaluated["coarse"]
        )
    records = {"coarse": evaluated["coarse"], "unlearned": unlearned}
    records |= {k: v for k, v in evaluated.items() if k != "coarse"}
    extra: dict[str, dict[str, object]] = {
        name: {"training": model.config.provenance["training"]}
        for name, model in states.items()
        if model.config.provenance.get("training") is not None
    }
    picture = saliency_picture(start, outcome.model, prepared.evalset, config.saliency_images)
    if picture is not None:
        for name, share in picture.shares.items():
            extra.setdefault(name, {})["saliency_on_artefacts"] = share
    extra.setdefault("unlearned", {})["collapsed"] = outcome.collapsed
    timings["evaluate_s"] = timings.get("evaluate_s", 0.0) + time.perf_counter() - clock
    report = build_report(config, operator, prepared, records, extra, done, device, timings)
    saved = {"unlearned_model": outcome.model} if outcome.model is not start else {}
    return report, saved, picture


def check_encoder_settings(config: RunConfig) -> None:
    """Fail before any work when the encoder's start cannot be had: weights smp does not
    have, an unreadable encoder checkpoint or one of another encoder, both at once, or either
    beside --model (whose checkpoint holds its encoder)."""
    if config.encoder_weights and config.encoder_checkpoint:
        raise ValueError("--encoder-weights and --encoder-checkpoint exclude each other")
    if config.model and (config.encoder_weights or config.encoder_checkpoint):
        raise ValueError(
            "--model starts from a whole checkpoint, encoder included: drop --encoder-weights "
            "and --encoder-checkpoint"
        )
    check_encoder_weights(config.encoder, config.encoder_weights)
    if config.encoder_checkpoint:
        held = read_encoder_info(config.encoder_checkpoint).encoder
        if held != config.encoder:
            raise ValueError(
                f"{config.encoder_checkpoint} holds a {held} encoder; pass --encoder {held}"
            )


def run(config: RunConfig) -> dict:
    """Run the pipeline and write metrics.json, the models and pictures to config.out.

    The output is checked before any work and written through a staging folder that is moved
    to config.out only when the run completes (see outputs.staged_folder).

    Under torchrun every rank trains and unlearns its part of each batch (distributed.py);
    rank 0 alone evaluates, writes and returns the report, the others return {}.
    """
    operator = build_operator(config)
    check_encoder_settings(config)
    model_config, checkpoints = ModelConfig(encoder=config.encoder), 2  # coarse and unlearned
    if config.model:  # a checkpoint runs at the size it was trained at, never resized silently
        model_config, checkpoints = read_config(config.model), 1
        if model_config.image_size != config.image_size:
            raise ValueError(
                f"{config.model} was trained at {model_config.image_size} px but this run works "
                f"at {config.image_size} px; pass --image-size {model_config.image_size}"
            )
        # The checkpoint holds its encoder: the report and the baselines use that one.
        config = replace(config, encoder=model_config.encoder)
    needed = checkpoints * outputs.checkpoint_bytes(model_config)
    if not distributed.is_main():
        return _run(config, operator, None)
    with outputs.staged_folder(config.out, config.overwrite, needed) as out:
        return _run(config, operator, out)


def _run(config: RunConfig, operator: Operator, out: Path | None) -> dict:
    device = resolve_device(config.device)
    prepared = prepare_data(config)
    timings = {"data_s": prepared.seconds}
    start = train_or_load(config, prepared, device)
    timings["coarse_train_s"] = start.seconds
    if not config.model and out:  # saved at once: a run stopped later keeps the trained model
        start.model.save(out / "coarse_model")
    prepared = refine_ranked(prepared, config, start.model)
    baselines = train_baselines(config, prepared, device) if config.baselines else {}
    if out is None:  # a rank other than 0: its part of the unlearning, nothing to report
        unlearn(config, operator, start.model, prepared)
        return {}
    for name, trained in baselines.items():
        timings[f"{name}_train_s"] = trained.seconds
    done = unlearn_stage(config, operator, prepared, start)
    clock = time.perf_counter()  # the test split is read from here on, once
    states = {"coarse": start.model, **{k: v.model for k, v in baselines.items()}}
    evaluated = evaluate_states(states, prepared.evalset, config.seed)
    timings["evaluate_s"] = time.perf_counter() - clock
    report, saved, picture = report_run(
        config, operator, prepared, states, done, evaluated, device, timings
    )
    curves = {config.method: trajectory(done.outcome)} if config.probe_images else None
    write_run(out, report, saved, picture, curves)
    return report


def _plain(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


STATES = ("coarse", "unlearned", "retrain", "retrain_band_ignored", "fine_oracle")


def _cell(value, spec: str, width: int) -> str:
    """A number formatted to `spec`, or n/a where it is missing or not finite."""
    ok = value is not None and np.isfinite(value)
    return f"{format(value, spec) if ok else 'n/a':>{width}}"


def table(report: dict) -> str:
    """The printed summary: one row per model state, class-aware, then the warnings."""
    head = (
        f"{'model':<20} {'AUROC [95% CI]':>21} {'worst':>6} {'confl.':>6} {'Dice':>6} "
        f"{'benign':>6} {'malig.':>6} {'malig%':>6} {'band':>7} {'S_global':>9} {'excess':>9}"
    )
    rows = [head]
    for name in STATES:
        if name not in report:
            continue
        r = Evaluation.from_json(report[name])
        ci = r.auroc_ci
        interval = (
            f"[{ci['ci_low']:.3f},{ci['ci_high']:.3f}]" if ci and np.isfinite(ci["ci_low"]) else ""
        )
        by_class = r.dice_by_class  # empty without masks
        s_global, band = r.s_global, r.band_reliance
        rows.append(
            f"{name:<20} {_cell(r.auroc, '.3f', 6)} {interval:>14} "
            f"{_cell(r.worst_group_auroc, '.3f', 6)} "
            f"{_cell(r.conflicting_auroc, '.3f', 6)} {_cell(r.dice, '.3f', 6)} "
            f"{_cell(by_class.get('benign'), '.3f', 6)} "
            f"{_cell(by_class.get('malignant'), '.3f', 6)} "
            f"{_cell(r.malignant_share, '.0%', 6)} "
            f"{_cell(band['value'] if band else None, '.4f', 7)} "
            f"{_cell(s_global['value'] if s_global else None, '.2e', 9)} "
            f"{_cell(s_global['excess'] if s_global else None, '.2e', 9)}"
        )
    rows += [
        "AUROC of the malignancy score with a bootstrap 95% CI; worst: lowest group AUROC; "
        "confl.: the group opposing the shortcut",
        "Dice overall, then per class (benign, malig.); malig%: malignant share of the "
        "predicted lesion pixels",
        "band: band reliance, mean |change| of the malignancy score when the dilation band "
        "is inpainted",
        "S_global in nats per pixel; excess = value - permutation-null mean",
    ]
    rows += [f"WARNING: {w}" for w in report.get("warnings", [])]
    if report.get("verdict"):
        rows += ["Verdict (unlearned against coarse):", *report["verdict"]["lines"]]
    for guarantee in ("certificate", "exactness"):
        if report.get(guarantee):
            rows.append(report[guarantee]["summary"])
    if not report.get("certificate") and report.get("operator", {}).get("name") in CERTIFIED:
        rows.append(NOT_ISSUED)
    return "\n".join(rows)
