"""The development sets of benchmarks/make_dev_isic.py: the ISIC 2018 layout with Bissoto's
CSV quirks, read back by the project's own reader; and the generator options behind them."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import make_dev_isic
from shortcut_unlearning import masks as masklib
from shortcut_unlearning.data.folders import read_folder
from shortcut_unlearning.data.synthetic import SynthConfig, generate

ROOT = Path(__file__).parents[1]


@pytest.mark.parametrize("variant", ["dev", "check"])
def test_dev_folder_reads_back_with_its_trap_set_csvs(tmp_path, variant):
    script = make_dev_isic
    with pytest.raises(SystemExit, match="inside the repository"):
        script.write_folder(ROOT / "dev-here", variant, n=2, balanced=0)
    out = script.write_folder(tmp_path / variant, variant, n=30, balanced=10, seed=1)
    traps = out / "trap_sets"
    images = sorted((out / script.INPUT).glob("*.jpg"))
    assert len(images) == 40
    sizes = {Image.open(f).size for f in images}
    assert len(sizes) > 5  # sizes vary per image
    mask = np.asarray(Image.open(out / script.TRUTH / f"{images[0].stem}_segmentation.png"))
    assert set(np.unique(mask)) == {0, 255} and mask.shape == Image.open(images[0]).size[::-1]
    assert (out / "isic_bias.csv").read_text().startswith(";image;dark_corner;")
    train, test, balanced = (
        traps / f"isic_annotated_{s}1.csv" for s in ("train", "test", "test_balanced")
    )
    data = read_folder(out, image_size=48, labels=[train, test])
    held = read_folder(out, image_size=48, labels=[train, balanced])
    assert set(data.splits) == {"train", "test"} and len(data) == 30
    assert (held.splits == "test").sum() == 10
    assert not set(data.split("test").ids) & set(held.split("test").ids)
    # Bissoto's ';' annotation of every image agrees with the trap sets' labels and flags.
    every = read_folder(out, image_size=48)
    by_id = dict(zip(every.ids, every.labels, strict=True))
    assert [by_id[i] for i in data.ids] == data.labels.tolist()
    spurious = script.VARIANTS[variant]["generator"]["spurious"]
    assert all(data.flags[name].any() for name in spurious)
    assert data.original_sizes != [data.original_sizes[0]] * len(data)


def test_artefact_options_paint_bigger_artefacts_in_the_outer_band():
    base = generate(n=60, size=64, seed=4)
    big = generate(n=60, size=64, seed=4, artefact_scale=2, artefact_count=2, band_zone="outer")
    np.testing.assert_array_equal(base.labels, big.labels)
    area = {name: d.artefact_mask().sum(axis=(1, 2)) for name, d in (("base", base), ("big", big))}
    carrying = (area["base"] > 0) & (area["big"] > 0)
    assert area["big"][carrying].mean() > 2 * area["base"][carrying].mean()
    # Every spurious pixel lies in the band's outer half (farther than its half width).
    from scipy.ndimage import distance_transform_edt

    band = (masklib.coarse_masks(big.masks) != 0) & (big.masks == 0)
    for i in np.flatnonzero(carrying):
        dist = distance_transform_edt(big.masks[i] == 0)
        outer = dist > dist[band[i]].max() / 2
        assert (big.artefact_mask()[i] <= (band[i] & outer)).all()
    with pytest.raises(ValueError, match="band_zone"):
        SynthConfig(band_zone="inner")
    with pytest.raises(ValueError, match="artefact_count"):
        SynthConfig(artefact_count=0)


def test_lesion_scale_shrinks_the_lesion_and_keeps_the_rest_of_the_draw():
    base = generate(n=20, size=48, seed=2)
    small = generate(n=20, size=48, seed=2, lesion_scale=0.6)
    np.testing.assert_array_equal(base.labels, small.labels)
    np.testing.assert_array_equal(base.splits, small.splits)
    ratio = (small.masks != 0).sum() / (base.masks != 0).sum()
    assert 0.2 < ratio < 0.5  # area goes with the radius squared: 0.36
    with pytest.raises(ValueError, match="lesion_scale"):
        SynthConfig(lesion_scale=0)
