"""The whole pipeline as one function: data -> coarse model -> unlearn -> evaluate -> report."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import figures, metrics, outputs, ranking, saliency
from . import masks as masklib
from .data.folders import read_folder
from .data.lesion_set import LesionSet
from .data.synthetic import SynthConfig, generate
from .model import Model, ModelConfig, read_config, resolve_device
from .progress import drive
from .resources import SAMPLE_SET, sample_data_dir
from .training import TrainConfig, train
from .unlearning import UnlearnData, make_operator


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
    method: str = "neggrad-seg"
    steps: int | None = None  # unlearning steps (None: the operator's default)
    epochs: int = 20  # training epochs of the coarse model and the baselines
    encoder: str = ModelConfig.encoder
    seed: int = 0
    device: str = "auto"
    model: str | None = None  # start from this checkpoint instead of training
    baselines: bool = False  # also train retrain-from-scratch and the fine-mask oracle
    saliency_images: int = 4
    probe_images: int = 32  # test images the unlearning loop probes (curves, collapse check)
    scope: str | None = None  # unlearning scope (None: the model's)
    accept_collapse: bool = False
    out: str = "out/run"
    overwrite: bool = False  # replace a non-empty out folder
    labels: list[str] | None = None  # labels CSVs of an ISIC 2018 folder (default: its *.csv)
    quiet: bool = False
    operator_options: dict = field(default_factory=dict)

    def __post_init__(self):
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
    def order(self) -> str:
        """The refine order in force: refine_order, or its default."""
        return self.refine_order or ("given" if self.refined else "random")


REFINE_ORDERS = ("ranked", "random", "given")


def load_data(config: RunConfig) -> LesionSet:
    if config.data == "synthetic":
        if config.labels:
            raise ValueError("--labels names the labels CSVs of a dataset folder; drop it here")
        return generate(n=config.synth_n, size=config.image_size, seed=config.seed)
    folder = sample_data_dir() / SAMPLE_SET if config.data == "sample" else Path(config.data)
    return read_folder(folder, image_size=config.image_size, labels=config.labels)


def choose_refined(
    train_set: LesionSet, config: RunConfig, coarse: np.ndarray | None = None, model=None
) -> np.ndarray:
    """Indices of the training images whose masks get refined, in refinement order.

    "ranked" needs the coarse masks and the model, and reads nothing else of the training
    images' annotations (no fine mask, label or artefact map).
    """
    if config.order == "given":
        missing = sorted(set(config.refined) - set(train_set.ids))
        if missing:
            raise ValueError(f"--refined names images not in the training split: {missing[:5]}")
        return np.array([train_set.ids.index(i) for i in config.refined])
    count = max(1, round(config.fine_fraction * len(train_set)))
    if config.order == "ranked":
        if model is None or coarse is None:
            raise ValueError("the ranked order needs the coarse masks and the model to rank with")
        return ranking.rank_images(model, train_set.images, coarse).top(count)
    return np.sort(np.random.default_rng(config.seed).choice(len(train_set), count, replace=False))


def spurious_map(data: LesionSet, config: RunConfig) -> np.ndarray:
    """S for S_global: planted artefacts where annotated, else the coarse mask's band (METHOD 4)."""
    if data.artefacts is not None and data.spurious:
        return data.artefact_mask()
    coarse = masklib.coarse_masks(data.masks, config.coarse, config.coarse_margin)
    return (coarse != 0) & (data.masks == 0)


def evaluation_groups(test: LesionSet, train_set: LesionSet) -> dict[str, np.ndarray]:
    """Aligned and conflicting test images per artefact, the direction read off the train split."""
    names = list(test.spurious) or [n for n, f in test.flags.items() if f.any()]
    direction = {}
    for name in names:
        flags, labels = train_set.flags[name], train_set.labels
        rates = [flags[labels == c].mean() if (labels == c).any() else 0.0 for c in (1, 0)]
        direction[name] = 1 if rates[0] >= rates[1] else -1
    return metrics.shortcut_groups(test.flags, test.labels, names, direction)


def evaluate(
    model: Model,
    test: LesionSet,
    s_map: np.ndarray,
    inpainted: np.ndarray,
    groups: dict[str, np.ndarray],
    seed: int = 0,
) -> dict:
    """AUROC (pooled, by group, worst group), Dice, S_global and the counterfactual drop."""
    probs = model.probabilities(test.images)
    by_group = metrics.auroc_by_group(probs, test.labels, groups)
    with_artefacts = s_map.any(axis=(1, 2))
    drop = metrics.image_scores(probs) - metrics.image_scores(model.probabilities(inpainted))
    return {
        "auroc": metrics.pooled_auroc(probs, test.labels),
        "auroc_by_group": by_group,
        "worst_group_auroc": metrics.worst_group_auroc(by_group),
        "dice": metrics.dice(probs, test.masks),
        "s_global": metrics.s_global_report(probs, s_map, test.masks, seed=seed),
        # Malignancy score lost when the spurious pixels are painted over with skin.
        "counterfactual_drop": float(drop[with_artefacts].mean())
        if with_artefacts.any()
        else float("nan"),
    }


def make_probe(test: LesionSet, s_map: np.ndarray, count: int):
    """Dice, AUROC and S_global on the first `count` test images: the curves of a run and
    the collapse check. Monitoring only; nothing is tuned on it."""
    images, labels, fine, s = (
        test.images[:count],
        test.labels[:count],
        test.masks[:count],
        s_map[:count],
    )

    def probe(model: Model) -> dict:
        probs = model.probabilities(images)
        return {
            "dice": metrics.dice(probs, fine),
            "auroc": metrics.pooled_auroc(probs, labels),
            "s_global": metrics.s_global(probs, s, fine),
        }

    return probe


def saliency_picture(
    models: dict[str, Model], test: LesionSet, s_map: np.ndarray, count: int, out: Path
) -> dict:
    """Before/after saliency of benign test images that carry spurious pixels (where the
    shortcut misleads); returns the share of saliency on those pixels per model."""
    candidates = np.flatnonzero(s_map.any(axis=(1, 2)) & (test.labels == 0))
    if len(candidates) == 0:
        candidates = np.arange(len(test))
    picks = candidates[:count]
    maps = {name: saliency.saliency_maps(m, test.images[picks]) for name, m in models.items()}
    shares = {name: saliency.saliency_share(m, s_map[picks]) for name, m in maps.items()}
    captions = [
        f"{test.ids[i]}\nbenign\non artefacts: {shares['coarse'][j]:.0%} -> "
        f"{shares['unlearned'][j]:.0%}"
        for j, i in enumerate(picks)
    ]
    figures.saliency_grid(
        test.images[picks],
        maps["coarse"],
        maps["unlearned"],
        captions,
        out,
        artefacts=s_map[picks],
        title="Saliency of the malignant score over the predicted lesion",
    )
    return {name: float(v.mean()) for name, v in shares.items()}


def train_model(images, targets, config: RunConfig, device, masks: str) -> Model:
    """A fresh model trained on (images, targets); `masks` names the targets in provenance."""
    provenance = {
        "data": config.data,
        "masks": masks,
        "images": len(images),
        "epochs": config.epochs,
        "seed": config.seed,
        "scope": ModelConfig.scope,  # what training updated; the rest never saw these masks
    }
    model_config = ModelConfig(
        encoder=config.encoder,
        image_size=config.image_size,
        seed=config.seed,
        provenance=provenance,
    )
    model = Model(model_config, device)
    train_config = TrainConfig(epochs=config.epochs, seed=config.seed)
    drive(train(model, images, targets, train_config), desc=f"train on {masks}", quiet=config.quiet)
    return model


def run(config: RunConfig) -> dict:
    """Run the pipeline and write metrics.json and saliency pictures to config.out.

    The output is checked before any work and written through a staging folder that is moved
    to config.out only when the run completes (see outputs.staged_folder).
    """
    model_config, checkpoints = ModelConfig(encoder=config.encoder), 2  # coarse and unlearned
    if config.model:  # a checkpoint runs at the size it was trained at, never resized silently
        model_config, checkpoints = read_config(config.model), 1
        if model_config.image_size != config.image_size:
            raise ValueError(
                f"{config.model} was trained at {model_config.image_size} px but this run works "
                f"at {config.image_size} px; pass --image-size {model_config.image_size}"
            )
    needed = checkpoints * outputs.checkpoint_bytes(model_config)
    with outputs.staged_folder(config.out, config.overwrite, needed) as out:
        return _run(config, out)


def _run(config: RunConfig, out: Path) -> dict:
    # Built first, so a bad setting fails before any training.
    operator = make_operator(
        config.method,
        steps=config.steps,
        seed=config.seed,
        scope=config.scope,
        accept_collapse=config.accept_collapse,
        **config.operator_options,
    )
    device = resolve_device(config.device)
    timings = {}
    clock = time.perf_counter()
    data = load_data(config)
    train_set = data.split("train")
    test = data.split("test") if (data.splits == "test").any() else data.split("val")
    if len(test) == 0:
        raise ValueError("the data has no test or val split to evaluate on")
    coarse = masklib.coarse_masks(train_set.masks, config.coarse, config.coarse_margin)
    # Checked before training; the ranked order is chosen once the model exists.
    refined_idx = None if config.order == "ranked" else choose_refined(train_set, config)
    s_map = spurious_map(test, config)
    inpainted = saliency.inpaint_background(test.images, s_map)
    groups = evaluation_groups(test, train_set)
    timings["data_s"] = time.perf_counter() - clock

    clock = time.perf_counter()
    if config.model:
        model = Model.load(config.model, device)
    else:
        coarse_kind = f"coarse ({config.coarse} {config.coarse_margin:g})"
        model = train_model(train_set.images, coarse, config, device, coarse_kind)
        model.save(out / "coarse_model")
    timings["coarse_train_s"] = time.perf_counter() - clock
    if refined_idx is None:
        refined_idx = choose_refined(train_set, config, coarse, model)
    split = masklib.split_pixels(coarse, {int(i): train_set.masks[i] for i in refined_idx})
    results = {"coarse": evaluate(model, test, s_map, inpainted, groups, config.seed)}

    certificate = operator.certificate(model) if hasattr(operator, "certificate") else None
    probe = make_probe(test, s_map, config.probe_images) if config.probe_images else None
    clock = time.perf_counter()
    job = operator.run(model, UnlearnData(train_set.images, coarse, split, probe))
    outcome = drive(job, desc=config.method, quiet=config.quiet)
    timings["unlearn_s"] = time.perf_counter() - clock
    if outcome.model is not model:  # not kept back after a collapse
        unlearned = {
            "method": config.method,
            "steps": outcome.steps,
            "refined_images": len(refined_idx),
        }
        outcome.model.config = replace(
            outcome.model.config, provenance={**model.config.provenance, "unlearned": unlearned}
        )
        outcome.model.save(out / "unlearned_model")
    results["unlearned"] = evaluate(outcome.model, test, s_map, inpainted, groups, config.seed)
    results["unlearned"]["collapsed"] = outcome.collapsed
    if config.saliency_images:
        shares = saliency_picture(
            {"coarse": model, "unlearned": outcome.model},
            test,
            s_map,
            config.saliency_images,
            out / "saliency.png",
        )
        for name, share in shares.items():
            results[name]["saliency_on_artefacts"] = share

    if config.baselines:
        baselines = (
            ("retrain", split.targets, "corrected (refined where refined)"),
            ("fine_oracle", train_set.masks, "fine"),
        )
        for name, targets, kind in baselines:
            clock = time.perf_counter()
            baseline = train_model(train_set.images, targets, config, device, kind)
            timings[f"{name}_train_s"] = time.perf_counter() - clock
            results[name] = evaluate(baseline, test, s_map, inpainted, groups, config.seed)

    report = {
        **results,
        "config": asdict(config),
        "seed": config.seed,
        "device": str(device),
        "operator": {"name": operator.name, **asdict(operator)},
        "certificate": {**certificate.to_dict(), "summary": certificate.summary()}
        if certificate
        else None,
        "unlearning": {
            "collapsed": outcome.collapsed,
            "kept_starting_model": outcome.model is model,
            "start_probe": outcome.start_metrics,
            "trajectory": [
                {"step": e.step, "phase": e.phase, **e.losses, **(e.metrics or {})}
                for e in outcome.history
            ],
        },
        "refined_ids": [train_set.ids[i] for i in refined_idx],
        "refine_order": config.order,
        "forget_pixels": split.forget_count,
        "n_train": len(train_set),
        "n_test": len(test),
        "timings": timings,
    }
    if config.probe_images:
        start = {"step": 0, "phase": "start", **(outcome.start_metrics or {})}
        figures.trajectory_plot(
            {config.method: [start, *report["unlearning"]["trajectory"]]}, out / "trajectory.png"
        )
    # Written last: a folder with metrics.json holds a finished run.
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=_plain) + "\n")
    return report


def _plain(value):
    if isinstance(value, np.generic | np.ndarray):
        return value.tolist()
    return str(value)


def table(report: dict) -> str:
    """The printed summary: one row per model state."""
    rows = [f"{'model':<12} {'AUROC':>6} {'worst':>6} {'Dice':>6} {'S_global':>10} {'excess':>10}"]
    for name in ("coarse", "unlearned", "retrain", "fine_oracle"):
        if name in report:
            r, s = report[name], report[name]["s_global"]
            rows.append(
                f"{name:<12} {r['auroc']:>6.3f} {r['worst_group_auroc']:>6.3f} "
                f"{r['dice']:>6.3f} {s['value']:>10.2e} {s['excess']:>10.2e}"
            )
    rows.append("S_global in nats per pixel; excess = value - permutation-null mean")
    if report.get("unlearning", {}).get("collapsed"):
        kept = report["unlearning"]["kept_starting_model"]
        rows.append(
            "the unlearned model COLLAPSED"
            + ("; the starting model was kept (unlearned = coarse)" if kept else "")
        )
    if report.get("certificate"):
        rows.append(report["certificate"]["summary"])
    return "\n".join(rows)
