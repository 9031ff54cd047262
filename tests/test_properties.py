"""Properties of the masks and the metrics that must hold for every input (hypothesis)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from shortcut_unlearning import masks, metrics

FAST = settings(max_examples=60, deadline=None)
SIDE = st.integers(3, 8)


@st.composite
def coarse_stack(draw, min_images=1, max_images=4):
    """(N, H, W) coarse masks, one lesion class per image; some images have no lesion."""
    n, h, w = draw(st.integers(min_images, max_images)), draw(SIDE), draw(SIDE)
    lesion = draw(arrays(bool, (n, h, w)))
    classes = np.array(draw(st.lists(st.sampled_from([1, 2]), min_size=n, max_size=n)))
    return (lesion * classes[:, None, None]).astype(np.uint8)


@st.composite
def refinements(draw):
    """Coarse masks and erase-only refinements of some of them."""
    coarse = draw(coarse_stack())
    refined = {}
    for i in range(len(coarse)):
        if draw(st.booleans()):
            erase = draw(arrays(bool, coarse[i].shape))
            refined[i] = np.where(erase, 0, coarse[i]).astype(np.uint8)
    return coarse, refined


@FAST
@given(refinements())
def test_forget_and_retain_partition_the_coarse_foreground(case):
    coarse, refined = case
    erased = any(((coarse[i] != 0) & (m == 0)).any() for i, m in refined.items())
    lesion_kept = all((m != 0).any() or not coarse[i].any() for i, m in refined.items())
    if not (erased and lesion_kept):
        with pytest.raises(masks.MaskError):
            masks.split_pixels(coarse, refined)
        return
    split = masks.split_pixels(coarse, refined)
    foreground = coarse != 0
    assert not (split.forget & split.retain).any()
    assert (split.forget | split.retain).all()  # retain covers everything else too
    assert not (split.forget & ~foreground).any()
    for i in range(len(coarse)):
        expected = (
            foreground[i] & (refined[i] == 0) if i in refined else np.zeros_like(foreground[i])
        )
        np.testing.assert_array_equal(split.forget[i], expected)
    assert split.forget_count == int(split.forget.sum()) > 0
    np.testing.assert_array_equal(
        split.targets[split.retain & foreground], coarse[split.retain & foreground]
    )


@st.composite
def edits(draw):
    """One non-empty coarse mask, pixels to erase from it and pixels to add outside it."""
    coarse = draw(coarse_stack(max_images=1))[0]
    if not coarse.any():
        coarse[0, 0] = draw(st.sampled_from([1, 2]))
    erase = draw(arrays(bool, coarse.shape)) & (coarse != 0)
    add = draw(arrays(bool, coarse.shape)) & (coarse == 0) & draw(st.booleans())
    refined = np.where(erase, 0, coarse)
    refined[add] = coarse.max()
    return coarse, refined.astype(np.uint8), add


@FAST
@given(edits())
def test_check_refinement_accepts_exactly_the_subsets(case):
    coarse, refined, added = case
    if added.any():
        with pytest.raises(masks.AddedPixelsError) as caught:
            masks.check_refinement(coarse, refined, added="error")
        assert caught.value.count == int(added.sum())
    elif not refined.any():
        with pytest.raises(masks.MaskError, match="erases the whole lesion"):
            masks.check_refinement(coarse, refined)
    else:  # a subset with at least one lesion pixel left
        np.testing.assert_array_equal(masks.check_refinement(coarse, refined), refined)
    if (refined & (~added)).any():  # clipping the additions leaves a valid subset
        clipped = masks.check_refinement(coarse, refined, added="clip")
        np.testing.assert_array_equal(clipped, np.where(added, 0, refined))


@FAST
@given(coarse_stack(max_images=1), st.integers(0, 63))
def test_one_lesion_pixel_left_is_a_valid_refinement(stack, which):
    coarse = stack[0]
    if not coarse.any():
        return
    lesion = np.flatnonzero(coarse)
    refined = np.zeros_like(coarse)
    keep = lesion[which % len(lesion)]
    refined.flat[keep] = coarse.flat[keep]
    np.testing.assert_array_equal(masks.check_refinement(coarse, refined), refined)


@st.composite
def predictions(draw):
    """Softmax probabilities, a spurious map and fine masks for a few small images."""
    n, h, w = draw(st.integers(2, 5)), draw(SIDE), draw(SIDE)
    logits = draw(arrays(np.float64, (n, 3, h, w), elements=st.floats(-6, 6)))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    spurious = draw(arrays(bool, (n, h, w)))
    labels = draw(arrays(np.uint8, (n, h, w), elements=st.integers(0, 2)))
    order = np.array(draw(st.permutations(range(n))))
    return probs.astype(np.float32), spurious, labels, order


@FAST
@given(predictions(), st.booleans(), st.sampled_from([1, 2]))
def test_s_global_is_non_negative_and_ignores_image_order(case, hard, grid):
    probs, spurious, labels, order = case
    grid = min(grid, *probs.shape[2:])
    value = metrics.s_global(probs, spurious, labels, hard=hard, grid=grid)
    assert value >= 0
    shuffled = metrics.s_global(probs[order], spurious[order], labels[order], hard=hard, grid=grid)
    assert shuffled == pytest.approx(value, rel=1e-5, abs=1e-9)
