"""The verdict on a run in plain words: does the model's class decision rely on the erased
pixels less, as much or more than before, and can the numbers tell at all?

It reads two records of evaluation.evaluate (`Evaluation`) made on the same images (before and
after a run). The class decision leads: the AUROC in the group where the artefact misleads
(where images carry groups), else band reliance (how much the malignancy score moves when the
erased pixels are filled with skin); the share of lesions that change class when they are
filled supports it. S_global (the predicted lesion's information about the erased pixels) is
judged too, but it describes pixels, not the diagnosis. Every reading comes from an interval: a
paired bootstrap of the per-image change where the records hold per-image values, the records'
own intervals and the permutation null otherwise. An interval that cannot tell says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import metrics
from .evaluation import BandReliance, Evaluation

LESS, SAME, MORE, UNSURE = "less", "as much", "more", "cannot tell"
OPPOSITE = {LESS: MORE, MORE: LESS}
# A larger swing of the malignant share of the predicted lesion warns: more than the 10
# points a run may move the class balance before the clinician should look.
SHARE_SWING = 0.10
# "As much": the change's 95% interval lies within this share of the value before the run.
EQUIVALENT = 0.5
N_BOOT = 1000


@dataclass(frozen=True)
class Evidence:
    """One measure before and after the run, and what it says about reliance on the erased
    pixels. `line` is for everyone; `detail` holds the intervals and chance levels."""

    name: str  # plain words
    before: float
    after: float
    reading: str  # LESS, SAME, MORE or UNSURE: reliance on the erased pixels
    why: str  # plain words: the interval or chance level behind the reading
    detail: str  # the numbers with their intervals and chance levels
    number: str = ".3f"  # format of before and after
    diagnosis: bool = True  # a measure of the class decision (S_global is not)

    def line(self) -> str:
        values = f"{self.before:{self.number}} -> {self.after:{self.number}}"
        return f"{self.name}: {values}; {self.reading}: {self.why}."


@dataclass(frozen=True)
class Verdict:
    """What a run did to the model's reliance on the erased pixels, diagnosis first."""

    reading: str  # of the class decision: LESS, SAME, MORE or UNSURE
    headline: str
    evidence: tuple[Evidence, ...]  # the lead measure first, S_global last
    warnings: tuple[str, ...]
    lesion_score_before: float  # mean per-lesion malignancy score over the measured images
    lesion_score_after: float
    n_images: int

    def lines(self) -> list[str]:
        """The plain-words report: headline, evidence, the lesion score, warnings."""
        lines = [self.headline, *(e.line() for e in self.evidence)]
        if np.isfinite(self.lesion_score_before) and np.isfinite(self.lesion_score_after):
            lines.append(
                f"Lesion malignancy score (mean malignant probability over the predicted "
                f"lesion, averaged over {self.n_images} images): "
                f"{self.lesion_score_before:.2f} -> {self.lesion_score_after:.2f}."
            )
        return lines + [f"WARNING: {w}" for w in self.warnings]

    def details(self) -> list[str]:
        return [e.detail for e in self.evidence]

    def to_dict(self) -> dict:
        """metrics.json's "verdict": the reading, the plain-words lines and the details."""
        return {"reading": self.reading, "lines": self.lines(), "details": self.details()}

    def short(self) -> str:
        """The reading in a few words, for the canvas."""
        if self.reading == UNSURE:
            return "Cannot tell whether the class decision changed"
        return f"The class decision relies {SHORT[self.reading]} on the erased pixels"


HEADLINES = {
    LESS: "The model's class decision relies less on the erased pixels than before.",
    SAME: "The model's class decision relies on the erased pixels as much as before.",
    MORE: "The model's class decision relies more on the erased pixels than before.",
}


SHORT = {LESS: "less", SAME: "as much as before", MORE: "more"}


def judge(before: Evaluation, after: Evaluation) -> Verdict:
    """The verdict on a run from evaluate's records before and after it, on the same images."""
    if before.n_images != after.n_images:
        raise ValueError(
            f"the records describe {before.n_images} and {after.n_images} "
            "images; judge a run with records of the same images"
        )
    lead = [e for e in (group_auroc(before, after), band_reliance(before, after)) if e]
    support = [e for e in (class_flips(before, after),) if e]
    information = s_global(before, after)
    reading, headline = overall(lead[:1], lead[1:] + support)
    scores = [np.asarray(r.lesion_scores, float) for r in (before, after)]
    return Verdict(
        reading=reading,
        headline=headline,
        evidence=tuple(lead + support + ([information] if information else [])),
        warnings=tuple(warnings(before, after)),
        lesion_score_before=_nanmean(scores[0]),
        lesion_score_after=_nanmean(scores[1]),
        n_images=before.n_images,
    )


def overall(lead: list[Evidence], support: list[Evidence]) -> tuple[str, str]:
    """The class decision's reading: the lead measure's, unless it cannot tell or another
    measure points the opposite way."""
    if not lead:
        why = "no measure of the class decision (it needs erased pixels or image groups)"
        return UNSURE, f"Cannot tell whether the model's class decision changed: {why}."
    first = lead[0]
    if first.reading == UNSURE:
        return UNSURE, (
            f"Cannot tell whether the model's class decision relies less on the erased pixels: "
            f"{_lower(first.name)}, {first.why}."
        )
    against = [e for e in support if e.reading == OPPOSITE.get(first.reading)]
    if against:
        return UNSURE, (
            "Cannot tell whether the model's class decision relies less on the erased pixels: "
            f"the measures disagree ({_lower(first.name)}: {first.reading}; "
            f"{_lower(against[0].name)}: {against[0].reading})."
        )
    moved = [e for e in support if e.reading in OPPOSITE]
    if first.reading == SAME and moved:  # a change the reader sees below must not look ignored
        way = "fell" if moved[0].reading == LESS else "rose"
        return SAME, (
            f"By {_lower(first.name)}, the model's class decision relies on the erased pixels "
            f"as much as before, although the {_lower(moved[0].name)} {way} "
            f"({moved[0].before:{moved[0].number}} -> {moved[0].after:{moved[0].number}})."
        )
    return first.reading, HEADLINES[first.reading]


# --- the measures ------------------------------------------------------------------------------


def band_reliance(before: Evaluation, after: Evaluation) -> Evidence | None:
    """The malignancy score's change when the erased pixels are filled with skin, paired over
    the images with erased pixels."""
    b, a = before.band_reliance, after.band_reliance
    if not b or not a or not b["images"]:
        return None
    _same_images(b, a)
    at = np.asarray(b["images"], int)
    moved = [
        np.abs(np.asarray(r["scores_inpainted"])[at] - np.asarray(s.image_scores)[at])
        for r, s in ((b, before), (a, after))
    ]
    return paired(
        "Score change when the erased pixels are filled with skin",
        moved[0],
        moved[1],
        chance="0 means the score ignores them",
        number=".3f",
    )


def class_flips(before: Evaluation, after: Evaluation) -> Evidence | None:
    """The share of lesions whose predicted class changes when the erased pixels are filled
    with skin, paired over the images with a lesion predicted both times by both models."""
    b, a = before.band_reliance, after.band_reliance
    if not b or not a:
        return None
    _same_images(b, a)
    flipped = [np.asarray(r["flipped"], float) for r in (b, a)]
    both = np.isfinite(flipped[0]) & np.isfinite(flipped[1])
    if not both.any():
        return None
    return paired(
        "Lesions that change class when the erased pixels are filled with skin",
        flipped[0][both],
        flipped[1][both],
        chance="0% means none does",
        number=".0%",
    )


def paired(name: str, before, after, chance: str, number: str) -> Evidence:
    """A measure that is a mean of per-image values where lower is less reliance, read from
    the 95% bootstrap interval of the mean per-image change."""
    change = metrics.mean_ci(np.asarray(after) - np.asarray(before), n_boot=N_BOOT)
    low, high = change["ci_low"], change["ci_high"]
    start = float(np.mean(before))
    interval = f"{low:+{number}} to {high:+{number}}"
    if high < 0:
        reading, why = LESS, f"the 95% interval of the change, {interval}, is below 0"
    elif low > 0:
        reading, why = MORE, f"the 95% interval of the change, {interval}, is above 0"
    elif max(-low, high) <= EQUIVALENT * start:
        reading, why = SAME, f"the 95% interval of the change, {interval}, is small"
    else:
        reading, why = UNSURE, f"the 95% interval of the change, {interval}, is too wide"
    detail = (
        f"{name}: {start:{number}} -> {float(np.mean(after)):{number}} over "
        f"{change['n_images']} images ({chance}); paired change {change['value']:+{number}}, "
        f"95% bootstrap interval [{low:+{number}}, {high:+{number}}]."
    )
    return Evidence(name, start, float(np.mean(after)), reading, why, detail, number)


def group_auroc(before: Evaluation, after: Evaluation) -> Evidence | None:
    """AUROC in the group where the artefact misleads (else the worst group before the run):
    higher means the class decision follows the artefact less. Chance is 0.5."""
    group = before.conflicting_group or before.worst_group
    b = before.auroc_by_group_ci.get(group)
    a = after.auroc_by_group_ci.get(group)
    if not b or not a or not (np.isfinite(b["value"]) and np.isfinite(a["value"])):
        return None
    if a["ci_low"] > b["ci_high"]:
        reading, why = LESS, "higher, and the 95% intervals do not overlap"
    elif a["ci_high"] < b["ci_low"]:
        reading, why = MORE, "lower, and the 95% intervals do not overlap"
    elif b["ci_low"] <= a["value"] <= b["ci_high"] and a["ci_low"] <= b["value"] <= a["ci_high"]:
        reading, why = SAME, "each value lies in the other's 95% interval"
    else:
        reading, why = UNSURE, "the 95% intervals overlap"
    detail = (
        f"AUROC in group {group}: {b['value']:.2f} [{b['ci_low']:.2f}, {b['ci_high']:.2f}] -> "
        f"{a['value']:.2f} [{a['ci_low']:.2f}, {a['ci_high']:.2f}] (95% bootstrap intervals; "
        "chance 0.50)."
    )
    misleads = group == before.conflicting_group
    where = "where the artefact misleads" if misleads else "in the worst group"
    name = f"AUROC {where} ({group}; chance 0.50)"
    return Evidence(name, b["value"], a["value"], reading, why, detail, ".2f")


def s_global(before: Evaluation, after: Evaluation) -> Evidence | None:
    """S_global against its permutation null: within chance before the run, it cannot tell;
    down to chance after it, less; else the excess over chance's intervals decide."""
    b, a = before.s_global, after.s_global
    if not b or not a:
        return None
    if not b["value"] > b["null_p95"]:
        reading, why = UNSURE, "before the run it was already within chance"
    elif not a["value"] > a["null_p95"]:
        reading, why = LESS, "down to chance"
    else:
        bl, bh = b["ci_low"] - b["null_mean"], b["ci_high"] - b["null_mean"]
        al, ah = a["ci_low"] - a["null_mean"], a["ci_high"] - a["null_mean"]
        if ah < bl:
            reading, why = LESS, "its excess over chance fell, and the intervals do not overlap"
        elif al > bh:
            reading, why = MORE, "its excess over chance rose, and the intervals do not overlap"
        else:
            reading, why = UNSURE, "the intervals of its excess over chance overlap"
    detail = "S_global (nats per pixel): " + "; ".join(
        f"{when} {r['value']:.1e} [{r['ci_low']:.1e}, {r['ci_high']:.1e}], chance "
        f"{r['null_mean']:.1e} (95th percentile {r['null_p95']:.1e})"
        for when, r in (("before", b), ("after", a))
    )
    name = "Information the predicted lesion carries from the erased pixels (S_global)"
    return Evidence(name, b["value"], a["value"], reading, why, detail + ".", ".1e", False)


# --- warnings ----------------------------------------------------------------------------------


def warnings(before: Evaluation, after: Evaluation) -> list[str]:
    """A malignant share that swung, measures within chance, a class that took over."""
    out = []
    share = before.malignant_share, after.malignant_share
    if all(math.isfinite(s) for s in share):
        swing = share[1] - share[0]
        if abs(swing) > SHARE_SWING:
            out.append(
                f"the share of the predicted lesion called malignant moved from {share[0]:.0%} "
                f"to {share[1]:.0%} ({abs(swing) * 100:.0f} points): check that the model "
                "still tells benign from malignant lesions"
            )
    b = before.s_global
    if b and not b["value"] > b["null_p95"]:
        out.append(
            f"S_global was within chance before the run ({b['value']:.1e}, chance up to "
            f"{b['null_p95']:.1e}): its change means nothing on these images"
        )
    group = before.conflicting_group or before.worst_group
    a = after.auroc_by_group_ci.get(group)
    if a and a["ci_low"] <= 0.5 <= a["ci_high"]:
        out.append(
            f"after the run the AUROC in group {group} is within chance ({a['value']:.2f}, "
            f"interval {a['ci_low']:.2f} to {a['ci_high']:.2f}): there the model tells "
            "malignant from benign no better than a coin toss"
        )
    if after.class_takeover:
        out.append(after.class_takeover)
    return out


def _same_images(b: BandReliance, a: BandReliance) -> None:
    if b["images"] != a["images"]:
        raise ValueError(
            "the records' erased pixels lie on different images; judge a run with records "
            "of the same images and erased pixels"
        )


def _lower(name: str) -> str:
    return name[:1].lower() + name[1:] if not name[:2].isupper() else name


def _nanmean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else float("nan")
