"""How results are drawn, in numbers (display.py): saliency scales, outlines, the eraser."""

import warnings

import numpy as np

from shortcut_unlearning import display


def maps_of(strengths, size=32, seed=0):
    """One map per strength: uniform noise times the strength."""
    rng = np.random.default_rng(seed)
    return np.stack([s * rng.random((size, size)) for s in strengths]).astype(np.float32)


def top_share(percent: np.ndarray) -> np.ndarray:
    """Each image's 99th percentile as drawn, in percent."""
    return display.saliency_tops(percent)


def drawn(before, after, per_image=True) -> tuple[np.ndarray, np.ndarray]:
    """Before and after maps as drawn, in percent."""
    scales = display.saliency_scales(
        display.saliency_tops(before), display.saliency_tops(after), per_image
    )
    return display.as_percent(before, scales[0]), display.as_percent(after, scales[1])


def test_per_image_scale_shows_a_weak_image_as_fully_as_a_strong_one():
    # As on the ISIC folder: one image's evidence a tenth of another's.
    before = maps_of([2000.0, 200.0])
    after = maps_of([2000.0, 20.0], seed=1)
    per_image = drawn(before, after)
    assert all(np.allclose(top_share(half), 100, atol=2) for half in per_image)
    shared = drawn(before, after, per_image=False)
    assert top_share(shared[0])[1] < 12 and top_share(shared[1])[1] < 2  # nearly blank


def test_a_shared_scale_compares_before_and_after_in_strength():
    before, after = maps_of([100.0]), maps_of([50.0], seed=1)
    halves = drawn(before, after, per_image=False)
    assert np.allclose([top_share(h)[0] for h in halves], [100, 50], atol=2)


def test_one_hot_pixel_does_not_set_the_scale():
    before = maps_of([1.0])
    before[0, 0, 0] = 1e6
    assert top_share(drawn(before, before.copy())[0])[0] > 90


def test_images_not_measured_are_drawn_empty_without_warnings():
    maps = np.zeros((3, 8, 8), np.float32)
    maps[0] = 1.0
    tops = np.array([1.0, np.nan, 0.0])  # measured; not measured; measured, no evidence
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for per_image in (True, False):
            for scale in display.saliency_scales(tops, tops, per_image):
                out = display.as_percent(maps, scale)
                assert out.dtype == np.float32 and np.isfinite(out).all()
                assert (out[1:] == 0).all() and np.allclose(out[0], 100)
        nothing = display.saliency_scales([np.nan], [np.nan], per_image=False)
        assert all(np.isnan(scale).all() for scale in nothing)


def test_outlines_and_the_eraser_scale_with_the_image():
    assert display.outline_width((128, 128)) == 1
    assert display.outline_width((768, 1024)) == 5
    # The sample's coarse margin is 10 pixels: the eraser spans half of it.
    assert display.eraser_size((12, 128, 128)) == 5
    assert display.eraser_size((768, 1024)) == 30
