"""The one evaluator that `run`, `bench` and the plugin share.

Everything is measured on an `EvalSet`: images at the model's size with whatever truth exists
(masks, labels, a spurious map S, the dilation band, groups). Two entry points:

- `probe(model, evalset)`: cheap numbers for the curves of an unlearning run and for the
  collapse check: Dice overall and by class, the malignant share of the predicted lesion, AUROC
  where labels exist, S_global where S exists.
- `evaluate(model, evalset, seed, start)`: the full record a metrics.json keeps per model state
  (an `Evaluation`, written and read with `to_json` and `from_json`): AUROC pooled and by group
  with bootstrap intervals, worst-group and conflicting-group AUROC, class-aware Dice,
  per-image malignancy scores (over the image and over the predicted lesion), S_global with its
  null, the counterfactual drop (spurious pixels inpainted) and `band_reliance` (the band
  inpainted).

`collapsed` is the project's one definition of collapse (the model stopped segmenting or went
non-finite; AUROC changes are results, never collapse), and `class_takeover` its one warning
that a lesion class took over the predicted lesions.

A "model" here is anything with `probabilities(images) -> (N, K, H, W)` softmax; collapse also
reads its `net`'s tensors when it has one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Annotated

import numpy as np
from pydantic import BeforeValidator
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict from Python 3.12

from . import masks as masklib
from . import metrics
from .data.lesion_set import BENIGN, CLASS_NAMES, MALIGNANT, LesionSet
from .files import json_ready
from .inpaint import inpaint_background
from .schemas import validate

# A run collapsed when its probe Dice falls below this share of the starting model's.
COLLAPSE_RATIO = 0.5
# class_takeover: a class holds more than this share of the predicted lesion pixels ...
TAKEOVER_SHARE = 0.95
# ... and leaves the other class less than this fraction of its share in a reference.
TAKEOVER_RATIO = 0.25
SCORE_UNIT = "malignancy score (mean P(malignant) over the image's pixels)"
LESION_SCORE_UNIT = "lesion malignancy score (mean P(malignant) over the predicted lesion)"


@dataclass
class EvalSet:
    """Images at the model's size and the truth known about them; any truth may be None.

    masks: (N, H, W) classes 0 background, 1 benign, 2 malignant (fine or refined masks);
    labels: (N,) 0 benign / 1 malignant; spurious: (N, H, W) bool S map for S_global and the
    counterfactual drop; band: (N, H, W) bool dilation band (coarse mask minus fine mask) for
    band reliance; groups: name -> (N,) bool image groups for AUROC by group.
    """

    images: np.ndarray
    masks: np.ndarray | None = None
    labels: np.ndarray | None = None
    spurious: np.ndarray | None = None
    band: np.ndarray | None = None
    groups: dict[str, np.ndarray] = field(default_factory=dict)
    ids: list[str] = field(default_factory=list)
    # Inpainted copies of the images, made once per set (inpainting is the slow part).
    _inpainted: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        self.images = np.asarray(self.images)
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (N, H, W, 3), got {self.images.dtype} {self.images.shape}"
            )
        n, maps = len(self.images), self.images.shape[:3]
        for name in ("masks", "spurious", "band"):
            value = getattr(self, name)
            if value is not None:
                value = np.asarray(value, bool if name != "masks" else None)
                if value.shape != maps:
                    raise ValueError(f"{name} has shape {value.shape}; the images need {maps}")
                setattr(self, name, value)
        if self.labels is not None:
            self.labels = np.asarray(self.labels)
            if self.labels.shape != (n,) or not np.isin(self.labels, (0, 1)).all():
                raise ValueError(f"labels must be {n} values of 0 (benign) or 1 (malignant)")
        self.groups = {k: np.asarray(v, bool) for k, v in self.groups.items()}
        for name, members in self.groups.items():
            if members.shape != (n,):
                raise ValueError(f"group {name!r} has shape {members.shape}; need ({n},)")
        self.ids = list(self.ids) or [str(i) for i in range(n)]
        if len(self.ids) != n:
            raise ValueError(f"{len(self.ids)} ids for {n} images")

    def __len__(self) -> int:
        return len(self.images)

    @classmethod
    def from_lesion_set(
        cls,
        data: LesionSet,
        coarse_method: str = masklib.DEFAULT_COARSE_METHOD,
        coarse_margin: float = masklib.DEFAULT_COARSE_MARGIN,
        groups: dict[str, np.ndarray] | None = None,
    ) -> EvalSet:
        """A LesionSet's images, fine masks and labels. S is the planted artefacts where the
        data annotates them, else the band (the pixels a coarse mask wrongly calls lesion;
        docs/method.md, "Global Spurious Mutual Information, S_global"); the band is the coarse mask
        (method, margin) minus the fine mask."""
        band = band_map(data.masks, coarse_method, coarse_margin)
        spurious = data.artefact_mask() if data.artefacts is not None and data.spurious else band
        return cls(data.images, data.masks, data.labels, spurious, band, groups or {}, data.ids)

    def select(self, index) -> EvalSet:
        """The images picked by an index array or boolean mask, with their truth."""
        index = np.flatnonzero(index) if np.asarray(index).dtype == bool else np.asarray(index)

        def pick(a):
            return None if a is None else a[index]

        return replace(
            self,
            images=self.images[index],
            masks=pick(self.masks),
            labels=pick(self.labels),
            spurious=pick(self.spurious),
            band=pick(self.band),
            groups={k: v[index] for k, v in self.groups.items()},
            ids=[self.ids[i] for i in index],
        )

    def inpainted(self, which: str) -> np.ndarray:
        """The images with the `which` map inpainted: "spurious" from its surroundings,
        "band" from the skin alone (see inpaint_band)."""
        if which not in self._inpainted:
            if which == "band":
                if self.band is None:
                    raise ValueError("this evaluation set has no band map to inpaint")
                lesion = None if self.masks is None else self.masks != 0
                self._inpainted[which] = inpaint_band(self.images, self.band, lesion)
            else:
                self._inpainted[which] = inpaint_background(self.images, getattr(self, which))
        return self._inpainted[which]


def band_map(
    masks: np.ndarray,
    method: str = masklib.DEFAULT_COARSE_METHOD,
    margin: float = masklib.DEFAULT_COARSE_MARGIN,
) -> np.ndarray:
    """(N, H, W) bool dilation band of fine masks: the coarse mask minus the fine mask."""
    return (masklib.coarse_masks(masks, method, margin) != 0) & (np.asarray(masks) == 0)


def inpaint_band(images: np.ndarray, band: np.ndarray, lesion: np.ndarray | None = None):
    """Copies of the images with the band replaced by skin (inpaint.inpaint_background).

    The band borders the lesion, and a fill from all its surroundings would smear lesion
    colour into it. With the lesion given, lesion and band are filled together from the skin
    around them and only the band's filled pixels are kept: the lesion stays as it was and the
    band becomes skin. Without it, the band is filled from all its surroundings.
    """
    band = np.asarray(band, bool)
    if lesion is None:
        return inpaint_background(images, band)
    filled = inpaint_background(images, band | np.asarray(lesion, bool))
    out = np.array(images, copy=True)
    out[band] = filled[band]
    return out


# --- the probe -------------------------------------------------------------------------------


def probe(model, evalset: EvalSet) -> dict[str, float]:
    """Cheap numbers on a (small) set: the curves of a run and the collapse check.

    Keys, where the set has the truth they need: dice, dice_benign, dice_malignant and
    malignant_share (masks), auroc (labels; nan unless both classes occur), s_global (masks
    and S). Monitoring only: nothing is tuned on it, and collapse reads only Dice.
    """
    probs = model.probabilities(evalset.images)
    out = {"malignant_share": metrics.malignant_share(probs)}
    if evalset.masks is not None:
        out["dice"] = metrics.dice(probs, evalset.masks)
        by_class = metrics.dice_by_class(probs, evalset.masks)
        out["dice_benign"], out["dice_malignant"] = by_class[BENIGN], by_class[MALIGNANT]
        if evalset.spurious is not None:
            out["s_global"] = metrics.s_global(probs, evalset.spurious, evalset.masks)
    if evalset.labels is not None:
        out["auroc"] = metrics.pooled_auroc(probs, evalset.labels)
    return out


def collapsed(
    start_probe: dict | None,
    end_probe: dict | None,
    model=None,
    ratio: float = COLLAPSE_RATIO,
    floor: float | None = None,
) -> bool:
    """Whether a model collapsed: it went non-finite, or it stopped segmenting.

    Non-finite: any floating tensor of `model.net` (parameters and buffers) or the end probe's
    Dice is nan or infinite. Stopped segmenting: the end probe's Dice fell below `floor` when
    one is given (a threshold that reads nothing of the start model), else below `ratio` times
    the start probe's. Nothing else counts: a falling AUROC, even below chance, is a result to
    report (on reversed-artefact data a shortcut model starts below chance), not a collapse.
    """
    net = getattr(model, "net", None)
    if net is not None:
        for tensor in net.state_dict().values():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                return True
    end = (end_probe or {}).get("dice")
    if end is None:
        return False
    if not np.isfinite(end):
        return True
    if floor is not None:
        return end < floor
    start = (start_probe or {}).get("dice")
    return start is not None and np.isfinite(start) and end < ratio * start


def class_takeover(
    share: float,
    references: Mapping[str, float | None],
    threshold: float = TAKEOVER_SHARE,
    ratio: float = TAKEOVER_RATIO,
) -> str | None:
    """A warning when one lesion class took over the predicted lesions, else None.

    `share` is the malignant share of the predicted lesion pixels; `references` name malignant
    shares that say what to expect ("the fine masks", "the labels", "the starting model"; None
    or nan entries are skipped). The rule: class c takes over when it holds more than
    `threshold` of the predicted lesion pixels and the other class keeps less than `ratio`
    times its share in some reference (so 2% benign against 48% in the truth warns; 2% against
    5% does not: the data are nearly all malignant there). No lesion predicted is not a
    takeover; collapse covers it.
    """
    if not np.isfinite(share):
        return None
    for name, held, other in (("malignant", share, "benign"), ("benign", 1 - share, "malignant")):
        if held <= threshold:
            continue
        for source, ref in references.items():
            if ref is None or not np.isfinite(ref):
                continue
            expected = 1 - ref if other == "benign" else ref
            if 1 - held < ratio * expected:
                return (
                    f"{name} takes over: {held:.0%} of the predicted lesion pixels are {name}, "
                    f"while {source} make {expected:.0%} of lesion pixels {other}; the model "
                    f"has stopped telling the classes apart (see dice_by_class)"
                )
    return None


# --- the full record -------------------------------------------------------------------------


def band_reliance(
    model,
    images: np.ndarray,
    band: np.ndarray,
    lesion: np.ndarray | None = None,
    *,
    inpainted: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict:
    """How much the malignancy score and the lesion's class rest on the dilation band.

    Per image with a nonempty band (`images`: their indices), the absolute change of its
    malignancy score (metrics.image_scores) when the band is inpainted with skin
    (`inpaint_band`; give the `lesion` pixels, (N, H, W) bool, so that the fill comes from the
    skin alone); `value` is the mean over those images, with a bootstrap interval over images.
    This is the quantity unlearning exists to shrink, and it needs no artefact annotation: only
    a mask. `mean_change` is the signed mean (inpainted minus original; negative: the band
    raised the score). `flipped`, per image with a band: 1.0 when the predicted lesion's class
    (metrics.lesion_probabilities) changes between benign and malignant once the band is
    inpainted, 0.0 when it stays, nan when no lesion is predicted on one side; `flips` is its
    share with an interval. Pass `inpainted` and `probs` (of `images`) when already computed.
    """
    band = np.asarray(band, bool)
    has_band = band.any(axis=(1, 2))
    if probs is None:
        probs = model.probabilities(images)
    if inpainted is None:
        inpainted = inpaint_band(images, band, lesion)
    probs_inpainted = model.probabilities(inpainted)
    scores = metrics.image_scores(probs)
    after = metrics.image_scores(probs_inpainted)
    change = (after - scores)[has_band].astype(float)
    record = metrics.mean_ci(np.abs(change), n_boot=n_boot, seed=seed)
    record["mean_change"] = float(change.mean()) if len(change) else float("nan")
    record["unit"] = SCORE_UNIT
    record["scores_inpainted"] = after.astype(float).tolist()
    record["images"] = np.flatnonzero(has_band).tolist()
    classes, classes_inpainted = (lesion_classes(p[has_band]) for p in (probs, probs_inpainted))
    flipped = np.where(
        (classes != 0) & (classes_inpainted != 0), (classes != classes_inpainted) * 1.0, np.nan
    )
    record["flipped"] = flipped.tolist()
    record["flips"] = metrics.mean_ci(flipped[np.isfinite(flipped)], n_boot=n_boot, seed=seed)
    return record


def lesion_classes(probs: np.ndarray) -> np.ndarray:
    """(N,) the class of each image's predicted lesion: the class with the larger probability
    pooled over it (BENIGN or MALIGNANT), 0 where no lesion is predicted."""
    pooled = metrics.lesion_probabilities(probs)
    kind = np.where(pooled[:, 1] > pooled[:, 0], MALIGNANT, BENIGN)
    return np.where(np.isnan(pooled[:, 0]), 0, kind)


def truth_malignant_share(evalset: EvalSet) -> tuple[str, float] | None:
    """The reference share of malignant lesion: from the masks' pixels, else the labels."""
    if evalset.masks is not None and (evalset.masks != 0).any():
        return "the true masks", metrics.malignant_share(evalset.masks)
    if evalset.labels is not None and len(evalset.labels):
        return "the labels", float(np.mean(evalset.labels))
    return None


def conflicting_group(groups) -> str | None:
    """The group where the shortcut misleads: "any:conflicting" (all spurious artefacts)
    when there are several, else the one ":conflicting" group; None without groups."""
    names = [g for g in groups if g.endswith(":conflicting")]
    if "any:conflicting" in names:
        return "any:conflicting"
    return names[0] if len(names) == 1 else None


# JSON has no NaN: a number missing for lack of truth is written as null and read back as NaN.
Number = Annotated[float, BeforeValidator(lambda value: float("nan") if value is None else value)]


class Interval(TypedDict):
    """A value with its bootstrap interval."""

    value: Number
    ci_low: Number
    ci_high: Number


class MeanInterval(Interval):
    """A mean over images (metrics.mean_ci)."""

    n_images: int


class AurocInterval(Interval):
    """AUROC (metrics.auroc_ci)."""

    n_malignant: int
    n_benign: int


SGlobal = TypedDict(  # metrics.s_global_report; "class" is a keyword, hence this form
    "SGlobal",
    {
        "value": Number,
        "class": int,
        "per_class": dict[int, Number],
        "ci_low": Number,
        "ci_high": Number,
        "null_mean": Number,
        "null_sd": Number,
        "null_p95": Number,
        "excess": Number,
        "unit": str,
        "grid": int,
        "hard": bool,
        "n_images": int,
    },
)


class BandReliance(MeanInterval):
    """What `band_reliance` measures."""

    mean_change: Number
    unit: str
    scores_inpainted: list[Number]
    images: list[int]
    flipped: list[Number]
    flips: MeanInterval


@dataclass(frozen=True)
class Evaluation:
    """The full record of one model state on an EvalSet (`evaluate`); NaN or None where the set
    lacks the truth a number needs. `to_json` gives metrics.json's section of the state and
    `from_json` reads one back against these types (schemas.py): a missing or mistyped field
    is an error that names it."""

    n_images: int
    auroc: Number
    auroc_ci: AurocInterval | None
    auroc_by_group: dict[str, Number]
    auroc_by_group_ci: dict[str, AurocInterval]
    worst_group_auroc: Number
    worst_group: str | None
    conflicting_auroc: Number
    conflicting_group: str | None
    dice: Number
    dice_by_class: dict[str, Number]  # "benign", "malignant"; empty without masks
    malignant_share: Number  # of the predicted lesion pixels
    truth_malignant_share: float | None  # of the true masks' lesion pixels, else the labels
    class_takeover: str | None  # the warning of `class_takeover`
    image_scores: list[Number]
    score_unit: str
    lesion_scores: list[Number]  # NaN where no lesion is predicted
    lesion_score_unit: str
    s_global: SGlobal | None
    counterfactual_drop: Number
    band_reliance: BandReliance | None

    def to_json(self) -> dict:
        """The record as strict JSON values (NaN as null: files.json_ready)."""
        return json_ready(asdict(self))

    @classmethod
    def from_json(cls, data, source: str = "the evaluation record") -> Evaluation:
        """The record `to_json` wrote (other keys are ignored); schemas.InputError, a
        ValueError, names `source` and each missing or mistyped field."""
        hint = "give a model state's section of a metrics.json that shortcut-unlearning wrote"
        return validate(cls, data, source, hint)


def evaluate(
    model, evalset: EvalSet, seed: int = 0, start: Evaluation | None = None, n_boot: int = 1000
) -> Evaluation:
    """The full record of one model state on `evalset`.

    `start`: the starting model's record (for an unlearned model), whose malignant share
    becomes a reference of the class-takeover check.
    """
    probs = model.probabilities(evalset.images)
    scores = metrics.image_scores(probs)
    record: dict = {"n_images": len(evalset)}

    labels = evalset.labels
    pooled = (
        metrics.auroc_ci(scores, labels, n_boot=n_boot, seed=seed) if labels is not None else None
    )
    by_group = (
        metrics.auroc_by_group_ci(scores, labels, evalset.groups, n_boot=n_boot, seed=seed)
        if pooled
        else {}
    )
    values = {name: r["value"] for name, r in by_group.items()}
    defined = {name: v for name, v in values.items() if np.isfinite(v)}
    worst = min(defined, key=defined.__getitem__) if defined else None
    conflicting = conflicting_group(values)
    record |= {
        "auroc": pooled["value"] if pooled else float("nan"),
        "auroc_ci": pooled,
        "auroc_by_group": values,
        "auroc_by_group_ci": by_group,
        "worst_group_auroc": metrics.worst_group_auroc(values),
        "worst_group": worst,
        "conflicting_auroc": values[conflicting] if conflicting else float("nan"),
        "conflicting_group": conflicting,
    }

    share = metrics.malignant_share(probs)
    reference = truth_malignant_share(evalset)
    references = dict([reference]) if reference else {}
    if start is not None:
        references["the starting model"] = start.malignant_share
    masks = evalset.masks
    by_class = metrics.dice_by_class(probs, masks) if masks is not None else {}
    record |= {
        "dice": metrics.dice(probs, masks) if masks is not None else float("nan"),
        "dice_by_class": {CLASS_NAMES[k]: v for k, v in by_class.items()},
        "malignant_share": share,
        "truth_malignant_share": reference[1] if reference else None,
        "class_takeover": class_takeover(share, references),
        "image_scores": scores.astype(float).tolist(),
        "score_unit": SCORE_UNIT,
        "lesion_scores": metrics.lesion_probabilities(probs)[:, 1].tolist(),
        "lesion_score_unit": LESION_SCORE_UNIT,
    }

    spurious = evalset.spurious
    record["s_global"] = (
        metrics.s_global_report(probs, spurious, masks, seed=seed)
        if spurious is not None and masks is not None
        else None
    )
    record["counterfactual_drop"] = float("nan")
    if spurious is not None and spurious.any():
        with_s = spurious.any(axis=(1, 2))
        after = metrics.image_scores(model.probabilities(evalset.inpainted("spurious")))
        # Malignancy score lost when the spurious pixels are painted over with skin.
        record["counterfactual_drop"] = float((scores - after)[with_s].mean())
    record["band_reliance"] = (
        band_reliance(
            model,
            evalset.images,
            evalset.band,
            inpainted=evalset.inpainted("band"),
            probs=probs,
            n_boot=n_boot,
            seed=seed,
        )
        if evalset.band is not None and evalset.band.any()
        else None
    )
    return Evaluation(**record)
