import csv

import numpy as np
import pytest

from shortcut_unlearning import masks
from shortcut_unlearning.data.folders import write_project
from shortcut_unlearning.data.lesion_set import ARTEFACTS
from shortcut_unlearning.data.synthetic import PLACEMENTS, SynthConfig, generate

BAND = ("ink", "patches", "gel_bubble")


@pytest.fixture(scope="module")
def big():
    return generate(n=400, size=64, seed=3)


def test_same_seed_same_data_other_seed_other_data():
    a, b = generate(n=6, size=48, seed=7), generate(n=6, size=48, seed=7)
    for field in ("images", "masks", "labels", "artefacts"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert list(a.splits) == list(b.splits)
    c = generate(n=6, size=48, seed=8)
    assert not np.array_equal(a.images, c.images)


def test_outputs_have_the_documented_form():
    d = generate(n=10, size=48, seed=1)
    assert d.images.shape == (10, 48, 48, 3) and d.images.dtype == np.uint8
    assert d.masks.dtype == np.uint8 and set(np.unique(d.masks)) <= {0, 1, 2}
    for i in range(10):  # one lesion, of the image's class
        assert set(np.unique(d.masks[i])) == {0, 1 + d.labels[i]}
    assert set(d.splits) <= {"train", "test"} and set(d.flags) == set(ARTEFACTS)


def _rates(rows, split, name):
    def rate(label):
        sel = [r for r in rows if r["split"] == split and r["label"] == label]
        return np.mean([r[name] == "1" for r in sel])

    return rate("1"), rate("0")


def test_written_labels_show_the_correlation_in_train_and_its_reversal_in_test(big, tmp_path):
    write_project(big, tmp_path / "set")
    with open(tmp_path / "set" / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 400
    for name in big.spurious:
        mal, ben = _rates(rows, "train", name)
        assert abs(mal - 0.9) < 0.08 and abs(ben - 0.1) < 0.08, (name, mal, ben)
        mal, ben = _rates(rows, "test", name)
        assert abs(mal - 0.1) < 0.12 and abs(ben - 0.9) < 0.12, (name, mal, ben)
    # Nuisances do not follow the label.
    for name in set(ARTEFACTS) - set(big.spurious):
        mal, ben = _rates(rows, "train", name)
        assert abs(mal - ben) < 0.2, (name, mal, ben)


def test_p_is_configurable():
    d = generate(n=300, size=48, seed=2, p=0.5, test_fraction=0.0)
    ink = d.flags["ink"]
    assert abs(ink[d.labels == 1].mean() - ink[d.labels == 0].mean()) < 0.15


def test_spurious_artefacts_lie_in_the_coarse_band_and_outside_the_fine_mask(big):
    spurious = big.artefact_mask()
    coarse = masks.coarse_masks(big.masks)
    assert spurious.sum() > 1000  # they are there at all
    assert not (spurious & (big.masks != 0)).any()
    assert not (spurious & (coarse == 0)).any()
    # Hair, a nuisance, is allowed to cross the lesion, and does somewhere.
    assert (big.artefact_mask(["hair"]) & (big.masks != 0)).any()


def test_artefact_masks_mark_painted_pixels(big):
    ink = big.artefact_mask(["ink"])
    violet = big.images[ink].astype(float)
    skin = big.images[(big.artefacts == 0) & (big.masks == 0)].astype(float)
    # Violet ink: blue above green, unlike skin.
    assert (violet[:, 2] - violet[:, 1]).mean() > 40
    assert (skin[:, 2] - skin[:, 1]).mean() < 0


def test_class_signal_is_real_but_imperfect():
    cfg = SynthConfig()
    assert 0.9 < cfg.bayes_auroc < 0.99
    assert SynthConfig(class_signal=0).bayes_auroc == pytest.approx(0.5)


def test_bad_configurations_say_what_is_allowed():
    with pytest.raises(ValueError, match="cannot be placed in the dilation band"):
        SynthConfig(spurious=("ruler",))
    with pytest.raises(ValueError, match="p must lie in"):
        SynthConfig(p=1.5)
    with pytest.raises(ValueError, match="size >= 32"):
        SynthConfig(size=8)


def test_a_balanced_test_split_beside_the_reversed_one(tmp_path):
    from shortcut_unlearning.data.folders import read_folder
    from shortcut_unlearning.experiment import evaluation_groups

    plain = generate(n=30, size=48, seed=4)
    both = generate(n=30, size=48, seed=4, balanced_test=240)
    np.testing.assert_array_equal(both.images[:30], plain.images)  # the first n unchanged
    assert list(both.splits[:30]) == list(plain.splits)
    balanced = both.split("test_balanced")
    assert len(balanced) == 240
    for name in both.spurious:  # present about half the time whatever the label
        has = balanced.flags[name]
        mal, ben = has[balanced.labels == 1].mean(), has[balanced.labels == 0].mean()
        assert abs(mal - ben) < 0.2 and 0.3 < mal < 0.7, (name, mal, ben)
    groups = evaluation_groups(balanced, both.split("train"))
    for name in both.spurious:  # both groups large, unlike the reversed split's aligned one
        assert min(groups[f"{name}:aligned"].sum(), groups[f"{name}:conflicting"].sum()) > 90
    write_project(both.select(np.arange(26, 34)), tmp_path / "set")
    assert "test_balanced" in set(read_folder(tmp_path / "set").splits)
    with pytest.raises(ValueError, match="balanced_test"):
        SynthConfig(balanced_test=-1)


def _digest(data) -> str:
    import hashlib

    digest = hashlib.sha256()
    for array in (data.images, data.masks, data.artefacts, data.labels, data.splits.astype("U16")):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def test_the_default_output_is_what_it_was_before_the_placement_options():
    # Digests of the generator's output before placements existed (same seed, same images);
    # they hold for this numpy, scipy and scikit-image, which a new version may round apart.
    assert _digest(generate(n=8, size=48, seed=11, balanced_test=4)) == (
        "33c129b383c47d36aadfa911e4b0f1885ec3b4759f8735bee1c83b2532b9385a"
    )
    outer = generate(n=6, size=64, seed=2, band_zone="outer", artefact_count=2, spurious=BAND)
    assert _digest(outer) == "c1799e496836908067b0a50aa3f0e0b19366e906fb8cea795b05b59c90e6cf14"


@pytest.fixture(scope="module")
def placed():
    """The same 24 images at 64 px with the spurious artefacts in each placement."""
    return {p: generate(n=24, size=64, seed=6, placement=p) for p in PLACEMENTS}


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_each_placement_puts_the_artefacts_where_it_claims(placed, placement):
    data = placed[placement]
    spurious, lesion = data.artefact_mask(), data.masks != 0
    coarse = {m: masks.coarse_masks(data.masks, m) != 0 for m in masks.COARSE_METHODS}
    inside = {m: int((spurious & c).sum()) for m, c in coarse.items()}  # pixels in each kind
    total = int(spurious.sum())
    # Every image drawn with a spurious artefact shows one, as with the default placement.
    carrying = spurious.any(axis=(1, 2))
    np.testing.assert_array_equal(carrying, placed["band"].artefact_mask().any(axis=(1, 2)))
    assert carrying.sum() >= 8
    on_lesion = (spurious & lesion).any(axis=(1, 2))
    if placement == "band":  # all in the dilation band, so in the box; the outline holds most
        assert not on_lesion.any() and inside["dilate"] == inside["bbox"] == total
        assert inside["outline"] > 0.8 * total
    elif placement == "corner":  # in the box, none in the dilation band or on the lesion
        assert not on_lesion.any() and inside["dilate"] == 0 and inside["bbox"] == total > 0
    elif placement == "crossing":  # over the lesion in every image, and past every coarse mask
        off_all = spurious & ~np.any(list(coarse.values()), axis=0)
        assert on_lesion[carrying].all() and off_all.any(axis=(1, 2))[carrying].all()
        band = {m: (spurious & c & ~lesion).sum() for m, c in coarse.items()}
        assert min(band.values()) > 0  # and some in every coarse mask's band
    else:  # outside: no spurious pixel in any coarse mask
        assert total > 0 and max(inside.values()) == 0


def test_a_bad_placement_names_the_choices():
    with pytest.raises(ValueError, match="placement must be one of"):
        SynthConfig(placement="everywhere")
