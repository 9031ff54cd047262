import numpy as np
import pytest

from shortcut_unlearning import masks


def square(size=20, top=5, left=5, side=6, cls=2):
    m = np.zeros((size, size), np.uint8)
    m[top : top + side, left : left + side] = cls
    return m


def test_dilation_grows_by_the_radius_and_keeps_the_class():
    fine = square(size=40, top=15, left=15, side=10, cls=1)
    coarse = masks.coarse_mask(fine, "dilate", margin=0.1)  # 4 px at 40 px
    assert set(np.unique(coarse)) == {0, 1}
    assert (coarse[fine != 0] == 1).all()
    rows = np.flatnonzero(coarse.any(1))
    assert rows[0] == 15 - 4 and rows[-1] == 24 + 4
    # Isotropic: the corner of the square is rounded, not grown as a square.
    assert coarse[11, 11] == 0 and coarse[11, 19] == 1


def test_bbox_with_margin_is_clipped_to_the_image():
    fine = np.zeros((30, 30), np.uint8)
    fine[2:5, 10:12] = 2
    fine[8, 20] = 2
    coarse = masks.coarse_mask(fine, "bbox", margin=0.1)  # 3 px
    expected = np.zeros_like(fine)
    expected[0:12, 7:24] = 2
    np.testing.assert_array_equal(coarse, expected)


def test_coarse_masks_of_a_batch_and_bad_requests():
    batch = np.stack([square(cls=1), square(cls=2), np.zeros((20, 20), np.uint8)])
    coarse = masks.coarse_masks(batch, margin=0.1)
    assert coarse.shape == batch.shape and not coarse[2].any()
    assert ((coarse != 0) >= (batch != 0)).all()
    with pytest.raises(masks.MaskError, match="unknown coarse method"):
        masks.coarse_mask(batch[0], "blob")
    with pytest.raises(masks.MaskError, match="margin"):
        masks.coarse_mask(batch[0], margin=1.5)
    two = square(cls=1)
    two[0, 0] = 2
    with pytest.raises(masks.MaskError, match="several lesion classes"):
        masks.coarse_mask(two)


@pytest.mark.parametrize("shape", [(3, 20, 20, 1), (20,), (1, 3, 20, 20, 1)])
def test_coarse_masks_refuse_other_shapes(shape):
    # (N, H, W, 1) used to be dilated along the wrong axes.
    with pytest.raises(masks.MaskError, match=rf"got shape \({shape[0]},.*mask\[\.\.\., 0\]"):
        masks.coarse_masks(np.zeros(shape, np.uint8))


def test_forget_and_retain_sets_by_hand():
    coarse = np.zeros((2, 4, 4), np.uint8)
    coarse[0, :3, :3] = 2
    coarse[1, 1:, 1:] = 1
    refined = coarse[0].copy()
    refined[0, :] = 0  # erase the top row: 3 coarse pixels forgotten
    split = masks.split_pixels(coarse, {0: refined})
    expected_forget = np.zeros((2, 4, 4), bool)
    expected_forget[0, 0, :3] = True
    np.testing.assert_array_equal(split.forget, expected_forget)
    np.testing.assert_array_equal(split.retain, ~expected_forget)
    assert split.forget_count == 3
    np.testing.assert_array_equal(split.targets[0], refined)
    np.testing.assert_array_equal(split.targets[1], coarse[1])  # unrefined: coarse labels
    np.testing.assert_array_equal(split.refined, [True, False])
    assert not split.forget[1].any()


def test_refinement_errors_name_the_problem():
    coarse = square(cls=2)
    with pytest.raises(masks.MaskError, match=r"shape \(10, 10\).*shape \(20, 20\)"):
        masks.check_refinement(coarse, np.zeros((10, 10), np.uint8), image=3)
    grown = coarse.copy()
    grown[0, :4] = 2
    with pytest.raises(masks.AddedPixelsError, match="adds 4 lesion pixel") as err:
        masks.check_refinement(coarse, grown, image=1)
    assert err.value.count == 4 and err.value.image == 1
    relabelled = np.where(coarse == 2, 1, 0).astype(np.uint8)
    with pytest.raises(masks.MaskError, match="changes the lesion class from 2 to 1"):
        masks.check_refinement(coarse, relabelled)
    with pytest.raises(masks.MaskError, match="erases the whole lesion"):
        masks.check_refinement(coarse, np.zeros_like(coarse))
    with pytest.raises(masks.MaskError, match="integer labels"):
        masks.check_refinement(coarse, coarse.astype(float))
    with pytest.raises(masks.MaskError, match="nothing to unlearn"):
        masks.split_pixels(coarse[None], {0: coarse.copy()})
    with pytest.raises(masks.MaskError, match="only 1 images"):
        masks.split_pixels(coarse[None], {4: coarse})


def test_added_pixels_can_be_clipped_or_kept():
    coarse = square(cls=2)
    grown = coarse.copy()
    grown[5, 5] = 0
    grown[0, :4] = 2
    clipped = masks.check_refinement(coarse, grown, added="clip")
    assert not clipped[0].any() and clipped[5, 5] == 0
    np.testing.assert_array_equal(clipped[1:], grown[1:])
    kept = masks.check_refinement(coarse, grown, added="keep")
    np.testing.assert_array_equal(kept, grown)
    split = masks.split_pixels(coarse[None], {0: grown}, added="clip")
    assert split.forget_count == 1
    # The caller's mask is never changed in place.
    assert grown[0, :4].tolist() == [2, 2, 2, 2]


def _disc(size, centre, radius, cls=1):
    yy, xx = np.mgrid[:size, :size]
    return ((np.hypot(yy - centre[0], xx - centre[1]) <= radius) * cls).astype(np.uint8)


def test_outline_holds_the_lesion_loosely_and_is_the_same_for_the_same_lesion():
    from scipy.ndimage import distance_transform_edt

    crescent = _disc(64, (30, 30), 14, 2) * (1 - _disc(64, (30, 38), 11))
    corner = np.zeros((64, 64), np.uint8)
    corner[:20, :6] = corner[:6, :30] = 1  # an L at the image's edge
    for fine in (_disc(64, (30, 34), 10), crescent, corner):
        outline = masks.coarse_mask(fine, "outline", margin=0.125)  # 8 px
        assert set(np.unique(outline)) == {0, fine.max()}
        assert (outline[fine != 0] != 0).all()
        np.testing.assert_array_equal(outline, masks.coarse_mask(fine, "outline", 0.125))
    # Around a disc the gap wanders between 0.4 and 1.6 margins: loose, and no dilation.
    disc = _disc(64, (30, 34), 10)
    outline = masks.coarse_mask(disc, "outline", margin=0.125) != 0
    gap = distance_transform_edt(disc == 0)
    edge = outline & ~np.roll(outline, 1, 0) | outline & ~np.roll(outline, -1, 0)
    assert gap[edge].min() >= 0.4 * 8 - 1.5 and gap[edge].max() <= 1.6 * 8 / np.cos(np.pi / 64) + 2
    assert gap[edge].max() - gap[edge].min() > 4
    other = masks.coarse_mask(_disc(64, (31, 34), 10), "outline", margin=0.125) != 0
    assert not np.array_equal(np.roll(other, -1, 0), outline)  # seeded by the lesion itself
