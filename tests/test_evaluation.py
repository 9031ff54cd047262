import copy
import json
from dataclasses import asdict

import numpy as np
import pytest
from conftest import TINY, refinement

from shortcut_unlearning import evaluation, metrics
from shortcut_unlearning.evaluation import EvalSet, Evaluation
from shortcut_unlearning.model import Model
from shortcut_unlearning.progress import drive
from shortcut_unlearning.unlearning import FineTune, UnlearnData

SKIN, LESION, INK = (200, 150, 130), (80, 50, 40), (110, 50, 150)


class PixelRule:
    """A stand-in model: P(malignant) is `high` on the pixels `rule` picks, 0.1 elsewhere."""

    def __init__(self, rule, high=0.9):
        self.rule, self.high = rule, high

    def probabilities(self, images):
        p = np.where(self.rule(images.astype(int)), self.high, 0.1)
        return np.stack([1 - p, np.zeros_like(p), p], axis=1)


def reads_ink(images):
    return images[..., 2] > images[..., 0]  # violet: more blue than red, unlike skin


def reads_lesion(images):
    return images[..., 0] < 100  # dark


def inked_set(n=6, size=32):
    """Skin with one dark lesion, its dilation band, and violet ink dots in the band of the
    odd images only."""
    yy, xx = np.mgrid[:size, :size]
    images = np.empty((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    ink = np.zeros((n, size, size), bool)
    for i in range(n):
        lesion = (yy - 14 - i % 3) ** 2 + (xx - 15) ** 2 < 25
        images[i] = SKIN
        images[i][lesion] = LESION
        masks[i][lesion] = 1 + i % 2
        if i % 2:
            dots = ((yy - 14 - i % 3) ** 2 + (xx - 15) ** 2 < 49) & ~lesion & (xx % 2 == 0)
            images[i][dots] = INK
            ink[i] = dots
    band = evaluation.band_map(masks, "dilate", 0.12)
    assert (ink <= band).all() and band.any(axis=(1, 2)).all()
    return EvalSet(images, masks, np.arange(n) % 2, ink, band), ink


# --- band reliance ---


def test_band_reliance_sees_a_score_that_rests_on_the_band_and_not_one_that_ignores_it():
    evalset, ink = inked_set()
    lesion = evalset.masks != 0
    on_band = evaluation.band_reliance(PixelRule(reads_ink), evalset.images, evalset.band, lesion)
    # Inpainting the band with skin erases the ink: each inked pixel loses 0.8 of probability.
    expected = 0.8 * ink.sum(axis=(1, 2)) / ink[0].size
    assert on_band["value"] == pytest.approx(expected.mean(), rel=1e-6)
    assert on_band["mean_change"] == pytest.approx(-expected.mean(), rel=1e-6)
    assert on_band["n_images"] == len(evalset)
    assert on_band["ci_low"] <= on_band["value"] <= on_band["ci_high"]
    ignores = evaluation.band_reliance(
        PixelRule(reads_lesion), evalset.images, evalset.band, lesion
    )
    assert ignores["value"] == 0 and ignores["ci_high"] == 0
    # The evaluator's cached counterfactual is the same one.
    record = evaluation.evaluate(PixelRule(reads_ink), evalset, n_boot=10)
    assert record.band_reliance["value"] == pytest.approx(on_band["value"])


def test_the_band_is_filled_with_skin_and_nothing_else_changes():
    evalset, _ = inked_set()
    lesion = evalset.masks != 0
    filled = evaluation.inpaint_band(evalset.images, evalset.band, lesion)
    outside = ~evalset.band
    np.testing.assert_array_equal(filled[outside], evalset.images[outside])
    np.testing.assert_allclose(
        filled[evalset.band], np.broadcast_to(SKIN, (evalset.band.sum(), 3)), atol=2
    )
    # Filled from all its surroundings, the band takes on lesion colour next to the lesion.
    smeared = evaluation.inpaint_band(evalset.images, evalset.band)
    assert (smeared[evalset.band][:, 0] < 150).any()


def test_band_reliance_counts_only_images_that_have_a_band():
    evalset, _ = inked_set()
    band = evalset.band.copy()
    band[:2] = False
    record = evaluation.band_reliance(
        PixelRule(reads_ink), evalset.images, band, evalset.masks != 0
    )
    assert record["n_images"] == len(evalset) - 2


# --- the collapse guard ---


def test_falling_auroc_from_below_chance_is_a_result_not_a_collapse():
    start = {"dice": 0.61, "auroc": 0.468}
    assert not evaluation.collapsed(start, {"dice": 0.87, "auroc": 0.30})
    assert not evaluation.collapsed(start, {"dice": 0.87, "auroc": 0.0})
    assert evaluation.collapsed(start, {"dice": 0.0, "auroc": 0.9})
    assert evaluation.collapsed(start, {"dice": 0.30, "auroc": 0.9})  # under half of 0.61
    assert not evaluation.collapsed(start, {"dice": 0.31, "auroc": 0.9})
    assert evaluation.collapsed(start, {"dice": float("nan")})
    assert not evaluation.collapsed(None, {"dice": 0.0})  # no start: nothing to compare
    assert not evaluation.collapsed(start, None)


def test_non_finite_weights_are_a_collapse():
    import torch

    model = Model(TINY)
    assert not evaluation.collapsed(None, None, model)
    with torch.no_grad():
        model.scoped_parameters()[0][0] = torch.inf
    assert evaluation.collapsed({"dice": 0.5}, {"dice": 0.5}, model)


def scripted_probe(values):
    """A probe that answers the given dicts in turn (the first for the starting model)."""
    answers = iter(values)
    return lambda model: next(answers)


@pytest.mark.parametrize(
    ("end", "collapsed"),
    [({"dice": 0.87, "auroc": 0.30}, False), ({"dice": 0.0, "auroc": 0.70}, True)],
)
def test_the_operators_guard_uses_the_one_definition(tiny_data, end, collapsed):
    data, coarse = tiny_data
    probe = scripted_probe([{"dice": 0.61, "auroc": 0.468}, {"dice": 0.7, "auroc": 0.4}, end])
    unlearn = UnlearnData(data.images, coarse, refinement(coarse, data.masks, 4), probe)
    start = Model(TINY)
    result = drive(FineTune(steps=2, probe_every=1).run(start, unlearn), quiet=True)
    assert result.collapsed is collapsed
    assert (result.model is start) is collapsed  # a collapsed model never replaces the start


# --- class takeover ---


def test_class_takeover_rule():
    assert "malignant takes over" in evaluation.class_takeover(0.99, {"the true masks": 0.5})
    assert "benign takes over" in evaluation.class_takeover(0.01, {"the labels": 0.5})
    # Data that are nearly all malignant: 99% malignant predictions are no takeover.
    assert evaluation.class_takeover(0.99, {"the true masks": 0.97}) is None
    assert evaluation.class_takeover(0.70, {"the true masks": 0.5}) is None
    assert evaluation.class_takeover(float("nan"), {"the true masks": 0.5}) is None
    assert evaluation.class_takeover(0.99, {}) is None
    warning = evaluation.class_takeover(0.99, {"the labels": None, "the starting model": 0.45})
    assert "the starting model" in warning


def test_evaluate_warns_when_every_lesion_comes_out_malignant():
    evalset, _ = inked_set()
    everything_malignant = PixelRule(reads_lesion, high=0.9)  # lesion pixels all malignant
    record = evaluation.evaluate(everything_malignant, evalset, n_boot=50)
    assert record.malignant_share == 1.0
    assert record.truth_malignant_share == pytest.approx(0.5, abs=0.1)
    assert "malignant takes over" in record.class_takeover
    assert record.dice == 1.0  # the lesions are found: overall Dice hides the flip
    assert record.dice_by_class == {"benign": 0.0, "malignant": 1.0}


# --- the evaluator ---


def test_evaluate_gives_every_number_and_is_json_ready():
    evalset, _ = inked_set(n=12)
    first = np.arange(12) < 6  # three images of each class on either side
    evalset.groups = {"ink:aligned": first, "ink:conflicting": ~first}
    record = evaluation.evaluate(PixelRule(reads_ink), evalset, seed=3, n_boot=100)
    scores = metrics.image_scores(PixelRule(reads_ink).probabilities(evalset.images))
    assert record.auroc == pytest.approx(
        metrics.pooled_auroc(PixelRule(reads_ink).probabilities(evalset.images), evalset.labels)
    )
    assert record.auroc == 1.0  # only the malignant (odd) images carry ink
    assert record.auroc_ci["n_malignant"] == 6 and record.auroc_ci["n_benign"] == 6
    assert np.testing.assert_allclose(record.image_scores, scores) is None
    assert record.conflicting_group == "ink:conflicting"
    assert record.worst_group in record.auroc_by_group
    assert record.counterfactual_drop > 0  # inpainting the ink lowers the score
    assert record.band_reliance["value"] > 0
    assert record.s_global["unit"] == "nats per pixel"
    assert json.loads(json.dumps(record.to_json(), allow_nan=False))["n_images"] == 12
    # The same seed gives the same intervals.
    again = evaluation.evaluate(PixelRule(reads_ink), evalset, seed=3, n_boot=100)
    assert again.auroc_by_group_ci == record.auroc_by_group_ci


def test_evaluate_and_probe_without_truth_give_what_they_can():
    evalset, _ = inked_set()
    bare = EvalSet(evalset.images)
    record = evaluation.evaluate(PixelRule(reads_ink), bare, n_boot=10)
    assert np.isnan(record.auroc) and np.isnan(record.dice)
    assert record.s_global is None and record.band_reliance is None
    assert record.class_takeover is None
    assert set(evaluation.probe(PixelRule(reads_ink), bare)) == {"malignant_share"}
    full = evaluation.probe(PixelRule(reads_ink), evalset)
    assert set(full) == {
        "dice",
        "dice_benign",
        "dice_malignant",
        "malignant_share",
        "auroc",
        "s_global",
    }


def test_evalset_checks_shapes_and_selects():
    evalset, _ = inked_set()
    with pytest.raises(ValueError, match="uint8"):
        EvalSet(evalset.images.astype(float))
    with pytest.raises(ValueError, match="band has shape"):
        EvalSet(evalset.images, band=evalset.band[:, :5])
    with pytest.raises(ValueError, match="labels must be 6 values"):
        EvalSet(evalset.images, labels=np.full(6, 2))
    part = evalset.select(np.array([1, 3]))
    assert part.ids == ["1", "3"] and part.masks.shape == (2, 32, 32)
    np.testing.assert_array_equal(part.inpainted("band"), evalset.inpainted("band")[[1, 3]])


# --- the record in metrics.json ---


def test_a_record_goes_to_strict_json_and_back_with_its_nans():
    evalset, _ = inked_set(n=12)
    first = np.arange(12) < 6
    evalset.groups = {"ink:aligned": first, "ink:conflicting": ~first}
    full = evaluation.evaluate(PixelRule(reads_ink), evalset, n_boot=20)
    bare = evaluation.evaluate(PixelRule(reads_ink), EvalSet(evalset.images), n_boot=20)
    assert np.isnan(full.lesion_scores).any() and np.isnan(bare.auroc)  # NaNs to carry
    for record in (full, bare):
        text = json.dumps(record.to_json(), allow_nan=False)  # NaN written as null
        back = Evaluation.from_json(json.loads(text))
        np.testing.assert_equal(asdict(back), asdict(record))  # NaN read back as NaN
    assert "null" in json.dumps(bare.to_json()) and "NaN" not in json.dumps(bare.to_json())


def test_a_record_missing_a_field_is_refused_by_name():
    evalset, _ = inked_set()
    written = evaluation.evaluate(PixelRule(reads_ink), evalset, n_boot=10).to_json()
    damaged = copy.deepcopy(written)
    del damaged["conflicting_auroc"]
    with pytest.raises(ValueError, match="conflicting_auroc"):
        Evaluation.from_json(damaged)
    damaged = copy.deepcopy(written)
    del damaged["s_global"]["null_p95"]
    with pytest.raises(ValueError, match=r"s_global\.null_p95"):
        Evaluation.from_json(damaged)
    with pytest.raises(ValueError, match="dice"):
        Evaluation.from_json(written | {"dice": "high"})
