"""Named retain sets: what unlearning keeps training on."""

import numpy as np
import pytest

from shortcut_unlearning import masks
from shortcut_unlearning.retain import IGNORE, band_width, certain_targets, retain_set


def disc_set(n=4, size=40, radius=8, margin=4):
    yy, xx = np.mgrid[:size, :size]
    fine = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        fine[i][(yy - 20) ** 2 + (xx - 20) ** 2 <= radius**2] = 1 + i % 2
    coarse = masks.coarse_masks(fine, "dilate", margin / size)
    return fine, coarse


def test_refined_plus_certain_keeps_both_classes_and_leaves_the_band_out():
    fine, coarse = disc_set()
    split = masks.split_pixels(coarse, {0: fine[0]})
    kept = retain_set(split, coarse, "refined+certain")
    assert kept.band_width == 4 and list(kept.refined) == [0] and list(kept.others) == [1, 2, 3]
    np.testing.assert_array_equal(kept.targets[0], fine[0])  # the corrected mask
    for i in (1, 2, 3):
        t = kept.targets[i]
        assert set(np.unique(t[t != IGNORE])) == {0, 1 + i % 2}  # both kinds of pixel
        assert not (t[coarse[i] == 0]).any()  # outside the coarse mask: background
        assert (t[(coarse[i] != 0) & (fine[i] == 0)] == IGNORE).all()  # the band is left out
        assert (t[t == 1 + i % 2] == fine[i][t == 1 + i % 2]).all()  # the core is lesion
    assert kept.left_out == int(sum((kept.targets[i] == IGNORE).sum() for i in (1, 2, 3)))


def test_refined_alone_and_all_images():
    fine, coarse = disc_set()
    split = masks.split_pixels(coarse, {0: fine[0]})
    only = retain_set(split, coarse, "refined")
    assert (only.targets[1:] == IGNORE).all() and not len(only.others)
    whole = retain_set(split, coarse, "all")
    np.testing.assert_array_equal(whole.targets[1:], coarse[1:])  # band labelled lesion
    with pytest.raises(ValueError, match="retain set"):
        retain_set(split, coarse, "everything")


def test_band_width_follows_how_deep_the_refinements_cut():
    fine, coarse = disc_set(margin=6)
    split = masks.split_pixels(coarse, {0: fine[0], 1: fine[1]})
    assert 5 <= band_width(coarse, split) <= 7
    assert (certain_targets(coarse[:1], 0) == coarse[:1]).all()
