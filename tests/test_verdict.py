"""The verdict on a run: plain words from evaluate's records, judged against chance."""

from dataclasses import replace

import numpy as np
import pytest
from test_evaluation import PixelRule, inked_set, reads_ink, reads_lesion

from shortcut_unlearning import evaluation
from shortcut_unlearning.evaluation import Evaluation
from shortcut_unlearning.verdict import LESS, MORE, SAME, UNSURE, judge

N = 12


def record(moves=None, s_global=None, share=0.5, auroc=None, flipped=None) -> Evaluation:
    """A record of N images with what the verdict reads (the rest NaN or empty). moves: each
    image's score change when its erased pixels are filled; s_global: (value, null_p95);
    auroc: (value, low, high) in the group where the artefact misleads; flipped: per image,
    whether its lesion changed class."""
    nan = float("nan")
    out = {
        "n_images": N,
        "auroc": nan,
        "auroc_ci": None,
        "auroc_by_group": {},
        "auroc_by_group_ci": {},
        "worst_group_auroc": nan,
        "worst_group": None,
        "conflicting_auroc": nan,
        "conflicting_group": None,
        "dice": nan,
        "dice_by_class": {},
        "malignant_share": share,
        "truth_malignant_share": None,
        "class_takeover": None,
        "image_scores": [0.2] * N,
        "score_unit": evaluation.SCORE_UNIT,
        "lesion_scores": [0.6] * N,
        "lesion_score_unit": evaluation.LESION_SCORE_UNIT,
        "s_global": None,
        "counterfactual_drop": nan,
        "band_reliance": None,
    }
    if moves is not None:
        out["band_reliance"] = {
            "images": list(range(N)),
            "scores_inpainted": (0.2 - np.asarray(moves, float)).tolist(),
            "flipped": [0.0] * N if flipped is None else list(flipped),
        }
    if s_global is not None:
        value, p95 = s_global
        out["s_global"] = {
            "value": value,
            "ci_low": 0.8 * value,
            "ci_high": 1.2 * value,
            "null_mean": 0.6 * p95,
            "null_p95": p95,
        }
    if auroc is not None:
        value, low, high = auroc
        out["conflicting_group"] = "ink:conflicting"
        out["auroc_by_group_ci"] = {
            "ink:conflicting": {"value": value, "ci_low": low, "ci_high": high}
        }
    return Evaluation(**out)


def spread(level: float) -> np.ndarray:
    """N score changes around `level`, not all equal (so that intervals have width)."""
    return level * np.linspace(0.8, 1.2, N)


def test_the_verdict_follows_band_reliance_as_evaluate_measures_it():
    evalset, _ = inked_set(n=N)
    ink = evaluation.evaluate(PixelRule(reads_ink), evalset, n_boot=50)
    lesion = evaluation.evaluate(PixelRule(reads_lesion), evalset, n_boot=50)
    assert ink.band_reliance["value"] > 0 == lesion.band_reliance["value"]
    forgot = judge(ink, lesion)
    assert forgot.reading == LESS
    assert (
        forgot.headline
        == "The model's class decision relies less on the erased pixels than before."
    )
    assert forgot.evidence[0].name.startswith("Score change when the erased pixels")
    assert forgot.short() == "The class decision relies less on the erased pixels"
    assert judge(lesion, ink).reading == MORE
    assert judge(ink, ink).reading == SAME
    assert "as much as before" in judge(ink, ink).headline
    # The lesion score is pooled over the predicted lesion: the ink the model calls malignant.
    assert forgot.lesion_score_before == pytest.approx(0.9)


def test_s_global_within_chance_before_the_run_cannot_tell():
    # 63% lower, but it started under the permutation null's 95th percentile.
    within = judge(record(s_global=(3.1e-3, 5.0e-3)), record(s_global=(1.1e-3, 5.0e-3)))
    (information,) = within.evidence
    assert information.reading == UNSURE and "cannot tell" in information.line()
    assert "within chance" in information.line()
    assert within.reading == UNSURE and within.headline.startswith("Cannot tell")
    assert any("within chance before the run" in w for w in within.warnings)
    # Started above chance and fell to it: less, and no warning.
    fell = judge(record(s_global=(3.1e-2, 5.0e-3)), record(s_global=(1.1e-3, 5.0e-3)))
    assert fell.evidence[0].reading == LESS and not fell.warnings


def test_a_swing_of_the_malignant_share_above_10_points_warns():
    swung = judge(record(share=0.45), record(share=0.57))
    (warning,) = swung.warnings
    assert "from 45% to 57% (12 points)" in warning
    assert "WARNING: " + warning in swung.lines()
    assert not judge(record(share=0.45), record(share=0.54)).warnings


def test_band_reliance_reads_less_as_much_more_or_cannot_tell():
    moves = spread(0.05)
    assert judge(record(moves), record(moves / 4)).reading == LESS
    assert judge(record(moves), record(moves * 3)).reading == MORE
    assert judge(record(moves), record(moves[::-1])).reading == SAME
    noisy = np.where(np.arange(N) % 2, 0.0, 0.12)  # big changes both ways: a wide interval
    unsure = judge(record(moves), record(noisy))
    assert unsure.reading == UNSURE and "too wide" in unsure.headline


def test_the_auroc_where_the_artefact_misleads_leads_the_verdict():
    stuck, fixed = (0.34, 0.25, 0.43), (0.80, 0.70, 0.90)
    assert judge(record(auroc=stuck), record(auroc=fixed)).reading == LESS
    assert judge(record(auroc=fixed), record(auroc=stuck)).reading == MORE
    # Band reliance fell sixfold while the AUROC stayed: the decision still follows the artefact.
    moves = spread(0.06)
    stayed = judge(record(moves, auroc=stuck), record(moves / 6, auroc=(0.35, 0.26, 0.44)))
    assert stayed.reading == SAME and stayed.evidence[1].reading == LESS
    assert "as much as before, although the score change" in stayed.headline
    assert any(
        "within chance" in w
        for w in judge(record(auroc=stuck), record(auroc=(fixed[0], 0.45, 0.9))).warnings
    )
    # The measures disagree: cannot tell.
    mixed = judge(record(moves, auroc=stuck), record(moves * 3, auroc=fixed))
    assert mixed.reading == UNSURE and "disagree" in mixed.headline


def test_class_flips_pair_images_and_support_the_lead():
    moves = spread(0.05)
    flips = np.arange(N) < 6  # half the lesions change class when the band is filled
    before = record(moves, flipped=flips.astype(float))
    after = record(moves / 4, flipped=np.zeros(N))
    verdict = judge(before, after)
    flip = next(e for e in verdict.evidence if e.name.startswith("Lesions that change class"))
    assert (flip.before, flip.after, flip.reading) == (0.5, 0.0, LESS)
    assert "50% -> 0%" in flip.line()
    # More flips after a run that lowered the score change: the measures disagree.
    assert judge(after, record(moves / 8, flipped=flips.astype(float))).reading == UNSURE


def test_records_of_different_images_are_refused():
    with pytest.raises(ValueError, match="same images"):
        judge(record(), replace(record(), n_images=N + 1))
