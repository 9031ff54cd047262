"""Working resolution and the model's input: letterboxed stacks and their conversions."""

import numpy as np
import pytest

from shortcut_unlearning.stack import (
    ImageStack,
    canvas_shape,
    fit_extent,
    letterbox,
    working_extent,
)


def test_letterbox_keeps_each_images_aspect_at_the_top_left():
    wide = np.full((30, 60, 3), 200, np.uint8)
    tall = np.full((80, 40, 3), 100, np.uint8)
    canvas, extents = letterbox([wide, tall], longest=40)
    assert extents == [(20, 40), (40, 20)] and canvas.shape == (2, 40, 40, 3)
    assert (canvas[0, :20, :40] == 200).all() and (canvas[0, 20:] == 0).all()
    assert (canvas[1, :, 20:] == 0).all()
    assert fit_extent(768, 1024, None) == (768, 1024)


def test_a_refinement_inside_its_coarse_mask_stays_inside_at_the_models_size():
    rng = np.random.default_rng(0)
    coarse = np.zeros((2, 60, 90), np.uint8)
    coarse[:, 10:50, 20:70] = 2
    refined = coarse * (rng.random(coarse.shape) > 0.3)
    stack = ImageStack(np.zeros((2, 60, 90, 3), np.uint8), [(60, 90), (45, 60)])
    small_c, small_r = (stack.masks_to_model(m, 32) for m in (coarse, refined))
    assert small_c.shape == (2, 32, 32)
    assert not ((small_r != 0) & (small_c == 0)).any()


def test_maps_come_back_to_each_images_extent_with_zero_padding():
    stack = ImageStack(np.zeros((2, 60, 90, 3), np.uint8), [(60, 90), (30, 45)])
    back = stack.from_model(np.ones((2, 16, 16), np.float32))
    assert back.shape == (2, 60, 90)
    assert np.allclose(back[0], 1) and np.allclose(back[1, :30, :45], 1) and not back[1, 30:].any()
    same = ImageStack(np.zeros((3, 16, 16, 3), np.uint8))
    maps = np.random.default_rng(1).random((3, 16, 16))
    assert same.from_model(maps) is maps and same.to_model(16).shape == (3, 16, 16, 3)


def test_extents_outside_the_canvas_are_refused():
    with pytest.raises(ValueError, match="extent"):
        ImageStack(np.zeros((1, 10, 10, 3), np.uint8), [(11, 10)])


def test_the_working_extent_shrinks_only_what_is_larger_and_keeps_the_aspect():
    assert working_extent(768, 1024, 1024) == (768, 1024)  # an ISIC image opens unchanged
    assert working_extent(4439, 6688, 1024) == (680, 1024)
    assert working_extent(6688, 4439, 1024) == (1024, 680)
    assert working_extent(100, 80, 1024) == (100, 80)  # never enlarged
    assert working_extent(5000, 4000, None) == (5000, 4000)
    assert canvas_shape([(680, 1024), (1024, 680), (100, 80)]) == (1024, 1024)
