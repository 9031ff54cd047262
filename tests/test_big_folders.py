"""Dataset folders as the clinician edits them: full resolution, their own coarse masks, a cache,
lazy (dask) arrays for big folders, and the open-time benchmark."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import make_isic_folder
from shortcut_unlearning import masks as masklib
from shortcut_unlearning.cli import main
from shortcut_unlearning.data import folders, working
from shortcut_unlearning.data.folders import FolderError, read_folder
from shortcut_unlearning.data.working import folder_cache, open_working
from shortcut_unlearning.napari import _io
from shortcut_unlearning.settings import cache_folder

SIZES = [(384, 512), (300, 225), (200, 260)]  # landscape, portrait, small: (height, width)
META_KEYS = {"ids", "original_sizes", "labels", "extents", "source"}


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTCUT_UNLEARNING_HOME", str(tmp_path / "home"))
    for name in ("SHORTCUT_UNLEARNING_CACHE", working.WORKING_SIZE_ENV, working.LAZY_ENV):
        monkeypatch.delenv(name, raising=False)


def blob(height: int, width: int, seed: int) -> np.ndarray:
    """An irregular lesion: an ellipse with a wobbly border, so edges are not axis-aligned."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    centre = rng.uniform(0.4, 0.6, 2) * (height, width)
    axes = rng.uniform(0.15, 0.3, 2) * min(height, width)
    angle = np.arctan2(rows - centre[0], cols - centre[1])
    wobble = 1 + 0.1 * np.cos(5 * angle + rng.uniform(0, 6))
    return np.hypot((rows - centre[0]) / axes[0], (cols - centre[1]) / axes[1]) <= wobble


def isic_folder(root: Path, sizes=SIZES) -> Path:
    """ISIC 2018 training images ISIC_000000<i> of `sizes`, their 0/255 masks and labels."""
    inputs, truths = (
        root / "ISIC2018_Task1-2_Training_Input",
        root / "ISIC2018_Task1_Training_GroundTruth",
    )
    inputs.mkdir(parents=True)
    truths.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (height, width) in enumerate(sizes):
        image = rng.integers(60, 200, (height, width, 3), dtype=np.uint8)
        Image.fromarray(image).save(inputs / f"ISIC_{i:07d}.jpg", quality=90)
        mask = blob(height, width, i).astype(np.uint8) * 255
        Image.fromarray(mask).save(truths / f"ISIC_{i:07d}_segmentation.png")
    rows = "".join(f"ISIC_{i:07d},{i % 2}\n" for i in range(len(sizes)))
    (root / "labels.csv").write_text("image,label\n" + rows)
    return root


def truth(root: Path, i: int) -> np.ndarray:
    path = root / f"ISIC2018_Task1_Training_GroundTruth/ISIC_{i:07d}_segmentation.png"
    return np.asarray(Image.open(path)) != 0


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def by_name(layers) -> dict:
    return {kwargs["name"]: (data, kwargs) for data, kwargs, _ in layers}


# ---------------------------------------------------------------------------------------------
# Full resolution


def test_reader_shows_images_at_their_own_size_and_writes_masks_back_exactly(tmp_path):
    root = isic_folder(tmp_path / "isic")
    layers = by_name(_io.read_dataset(str(root)))
    images, image_kwargs = layers["isic"]
    fine, fine_kwargs = layers["reference masks"]
    assert images.shape == (3, 384, 512, 3) and image_kwargs["rgb"]
    for _, kwargs in layers.values():
        assert set(kwargs["metadata"]) >= META_KEYS
    meta = fine_kwargs["metadata"]
    assert meta["extents"] == [list(s) for s in SIZES] == meta["original_sizes"]
    for i, (h, w) in enumerate(SIZES):
        jpeg = root / f"ISIC2018_Task1-2_Training_Input/ISIC_{i:07d}.jpg"
        np.testing.assert_array_equal(images[i, :h, :w], np.asarray(Image.open(jpeg)))
        assert not images[i, h:].any() and not images[i, :, w:].any()  # padding
    paths = _io.write_masks(str(tmp_path / "out"), fine, {"metadata": meta})
    for i, path in enumerate(paths):
        assert iou(np.asarray(Image.open(path)) != 0, truth(root, i)) == 1.0
    # The 128 x 128 reader this replaces could not: its masks come back blocky.
    squashed = read_folder(root, image_size=128)
    back = _io.write_masks(
        str(tmp_path / "old"), squashed.masks, {"metadata": {**meta, "extents": None}}
    )
    assert iou(np.asarray(Image.open(back[0])) != 0, truth(root, 0)) < 0.995


def test_a_working_size_shrinks_large_images_keeping_their_aspect(tmp_path, monkeypatch):
    root = isic_folder(tmp_path / "isic")
    monkeypatch.setenv(working.WORKING_SIZE_ENV, "256")
    layers = by_name(_io.read_dataset(str(root)))
    coarse, kwargs = layers["coarse masks"]
    assert kwargs["metadata"]["extents"] == [[192, 256], [256, 192], [197, 256]]
    assert coarse.shape == (3, 256, 256)
    assert working.working_size_from_env() == 256
    monkeypatch.setenv(working.WORKING_SIZE_ENV, "huge")
    with pytest.raises(ValueError, match=r"SHORTCUT_UNLEARNING_WORKING_SIZE.*'original'"):
        _io.read_dataset(str(root))
    monkeypatch.setenv(working.WORKING_SIZE_ENV, "original")
    assert by_name(_io.read_dataset(str(root)))["isic"][0].shape == (3, 384, 512, 3)


def test_derived_coarse_masks_use_each_images_own_shorter_side(tmp_path):
    opened = open_working(isic_folder(tmp_path / "isic"))
    for i, (h, w) in enumerate(opened.extents):
        expected = masklib.coarse_mask(opened.fine[i, :h, :w])
        np.testing.assert_array_equal(opened.coarse[i, :h, :w], expected)
        assert not opened.coarse[i, h:].any() and not opened.coarse[i, :, w:].any()
        grown = (opened.coarse[i] != 0).sum(1).max() - (opened.fine[i] != 0).sum(1).max()
        assert abs(grown - 2 * round(0.08 * min(h, w))) <= 2  # the margin on both sides
    assert opened.coarse_source.startswith("derived")


# ---------------------------------------------------------------------------------------------
# A clinician's own coarse masks


def draw_boxes(root: Path, grow: int = 10, tail: str = "", classes: bool = False) -> list:
    (root / "coarse").mkdir(exist_ok=True)
    boxes = []
    for i in range(len(SIZES)):
        lesion = truth(root, i)
        rows, cols = np.flatnonzero(lesion.any(1)), np.flatnonzero(lesion.any(0))
        box = np.zeros(lesion.shape, np.uint8)
        box[rows[0] - grow : rows[-1] + grow + 1, cols[0] - grow : cols[-1] + grow + 1] = 1
        value = 1 + i % 2 if classes else 255
        Image.fromarray(box * value).save(root / "coarse" / f"ISIC_{i:07d}{tail}.png")
        boxes.append(box * (1 + i % 2))
    return boxes


@pytest.mark.parametrize(("tail", "classes"), [("", False), ("_segmentation", True)])
def test_a_coarse_folder_becomes_the_coarse_masks(tmp_path, tail, classes):
    root = isic_folder(tmp_path / "isic")
    boxes = draw_boxes(root, tail=tail, classes=classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every lesion lies inside its box: no warning
        layers = by_name(_io.read_dataset(str(root)))
    coarse, kwargs = layers["coarse masks"]
    for i, (h, w) in enumerate(SIZES):
        np.testing.assert_array_equal(coarse[i, :h, :w], boxes[i])
    assert kwargs["metadata"]["coarse"] == f"drawn: {root / 'coarse'}"


def test_coarse_masks_that_leave_lesion_pixels_out_are_named(tmp_path):
    root = isic_folder(tmp_path / "isic")
    draw_boxes(root, grow=-3)  # boxes 3 px inside the lesion's extent
    with pytest.warns(UserWarning, match=r"3 coarse mask\(s\) .* ISIC_0000000 \(\d+ px\).*redraw"):
        open_working(root)
    with pytest.warns(UserWarning, match=r"ISIC_0000002 \(\d+ px\)"):  # lazy: when it is read
        np.asarray(open_working(root, lazy=True).coarse[2])


def test_wrong_coarse_masks_are_refused_with_what_to_do(tmp_path):
    root = isic_folder(tmp_path / "isic")
    draw_boxes(root)
    path = root / "coarse" / "ISIC_0000001.png"
    good = np.asarray(Image.open(path))

    def refused(pixels, message):
        Image.fromarray(pixels).save(path)
        with pytest.raises(FolderError, match=message):
            open_working(root)

    refused(good[:-2], r"is 298x225 but its image is 300x225.*full image")
    refused(good // 2, r"holds the values \[0, 127\].*no antialiasing")
    refused((good != 0).astype(np.uint8), r"class \[1\] but 'ISIC_0000001' is labelled 1")
    path.unlink()
    with pytest.raises(FolderError, match=r"coarse masks for 2 of 3 images; 1 have none"):
        open_working(root)
    Image.fromarray(good).save(path)
    Image.fromarray(good).save(root / "coarse" / "ISIC_0000001_segmentation.png")
    with pytest.raises(FolderError, match=r"both coarse masks of 'ISIC_0000001'"):
        open_working(root)


# ---------------------------------------------------------------------------------------------
# The cache


def count_decodes(monkeypatch) -> list:
    seen = []
    real = working.decode_item

    def spying(item, *args, **kwargs):
        seen.append(item.id)
        return real(item, *args, **kwargs)

    monkeypatch.setattr(working, "decode_item", spying)
    return seen


def test_a_second_open_reads_the_cache(tmp_path, monkeypatch):
    root = isic_folder(tmp_path / "isic")
    decodes = count_decodes(monkeypatch)
    first = open_working(root)
    assert len(decodes) == 3 and first.reader.from_cache == 0
    second = open_working(root)
    assert len(decodes) == 3 and second.reader.from_cache == 3
    for kind in ("images", "fine", "coarse"):
        np.testing.assert_array_equal(getattr(second, kind), getattr(first, kind))
    assert cache_folder() in folder_cache(root, 1024, cache_folder()).slot.parents
    assert not [p for p in root.rglob("*") if p.suffix == ".npy"]  # nothing written in the set


def test_a_touched_file_is_decoded_again_and_its_old_entry_dropped(tmp_path, monkeypatch):
    root = isic_folder(tmp_path / "isic")
    first = open_working(root)
    slot = folder_cache(root, 1024, cache_folder()).slot
    assert len(list(slot.glob("*.npy"))) == 9
    decodes = count_decodes(monkeypatch)
    mask = root / "ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png"
    os.utime(mask, ns=(mask.stat().st_atime_ns, mask.stat().st_mtime_ns + 10**9))
    again = open_working(root)
    assert decodes == ["ISIC_0000001"] and again.reader.from_cache == 2
    assert len(list(slot.glob("*.npy"))) == 9  # the stale entry is gone
    np.testing.assert_array_equal(again.fine, first.fine)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "other shape"])
def test_a_damaged_cache_entry_is_rebuilt_not_trusted(tmp_path, monkeypatch, damage):
    root = isic_folder(tmp_path / "isic")
    first = open_working(root)
    slot = folder_cache(root, 1024, cache_folder()).slot
    entry = sorted(slot.glob("*.image.npy"))[0]
    if damage == "garbage":
        entry.write_bytes(b"\x93NUMPY not really")
    elif damage == "truncated":
        entry.write_bytes(entry.read_bytes()[:1000])
    else:
        np.save(entry, np.zeros((4, 4, 3), np.uint8))
    decodes = count_decodes(monkeypatch)
    with pytest.warns(UserWarning, match=r"cache entry was damaged.*decoding it again"):
        again = open_working(root)
    assert len(decodes) == 1
    np.testing.assert_array_equal(again.images, first.images)
    assert open_working(root).reader.from_cache == 3  # rebuilt


def test_no_cache_when_off_or_when_the_disk_is_full(tmp_path, monkeypatch):
    root = isic_folder(tmp_path / "isic")
    monkeypatch.setenv("SHORTCUT_UNLEARNING_CACHE", "off")
    assert cache_folder() is None and open_working(root).reader.cache is None
    monkeypatch.setenv("SHORTCUT_UNLEARNING_CACHE", str(tmp_path / "elsewhere"))
    nearly_full = type("Usage", (), {"free": 10 << 20})
    monkeypatch.setattr("shutil.disk_usage", lambda path: nearly_full)
    with pytest.warns(UserWarning, match=r"needs .* GiB .* reading without caching"):
        opened = open_working(root)
    assert opened.images.shape[0] == 3
    assert not list((tmp_path / "elsewhere").rglob("*.npy"))


# ---------------------------------------------------------------------------------------------
# Lazy arrays


def test_lazy_arrays_give_the_eager_pixels_and_read_only_what_is_looked_at(tmp_path):
    import dask.array as da

    root = isic_folder(tmp_path / "isic")
    eager = open_working(root, 256, cache=False)
    lazy = open_working(root, 256, cache=False, lazy=True)
    assert isinstance(lazy.images, da.Array) and lazy.reader.decoded == 0
    np.testing.assert_array_equal(lazy.images[1].compute(), eager.images[1])
    assert lazy.reader.decoded == 1
    for kind in ("images", "fine", "coarse"):
        np.testing.assert_array_equal(np.asarray(getattr(lazy, kind)), getattr(eager, kind))
    canvas = lazy.reader.dask("fine")  # the array-like behind it takes numpy's index forms
    np.testing.assert_array_equal(canvas[-1, 5:9].compute(), eager.fine[-1, 5:9])
    np.testing.assert_array_equal(canvas[::2, ..., 3].compute(), eager.fine[::2, ..., 3])
    assert lazy.metadata() == eager.metadata()


def test_big_folders_open_lazily_by_default(tmp_path, monkeypatch):
    root = isic_folder(tmp_path / "isic")
    monkeypatch.setattr(working, "LAZY_ABOVE_BYTES", 1000)
    assert type(by_name(_io.read_dataset(str(root)))["isic"][0]).__name__ == "Array"
    monkeypatch.setenv(working.LAZY_ENV, "0")
    assert isinstance(by_name(_io.read_dataset(str(root)))["isic"][0], np.ndarray)


def test_napari_reads_only_the_image_on_screen(make_napari_viewer, tmp_path, monkeypatch):
    root = isic_folder(tmp_path / "isic", SIZES * 4)
    monkeypatch.setenv(working.LAZY_ENV, "1")
    decodes = count_decodes(monkeypatch)
    viewer = make_napari_viewer()
    layers = viewer.open(str(root), plugin="shortcut-unlearning")
    assert [layer.name for layer in layers] == ["isic", "coarse masks", "reference masks"]
    assert 1 <= len(set(decodes)) <= 2 < len(SIZES * 4)
    assert set(viewer.layers["coarse masks"].metadata) >= META_KEYS


# ---------------------------------------------------------------------------------------------
# Ids


def test_ids_cannot_make_the_reader_look_outside_the_folder(tmp_path, monkeypatch):
    from shortcut_unlearning.data.synthetic import generate

    root = folders.write_project(generate(n=3, size=32, seed=0), tmp_path / "set")
    secret = tmp_path / "secret.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(secret)
    labels = (root / "labels.csv").read_text().splitlines()
    first_id = labels[1].split(",")[0]
    labels[1] = labels[1].replace(first_id, "../../secret", 1)
    (root / "labels.csv").write_text("\n".join(labels) + "\n")
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    with pytest.raises(FolderError, match=r"line 2: id '\.\./\.\./secret' is not a plain"):
        _io.read_dataset(str(root))
    assert not opened
    with pytest.raises(FolderError, match=r"not a plain file name"):
        folders.coarse_file(root, "../secret")


# ---------------------------------------------------------------------------------------------
# The benchmark


def test_bench_open_on_a_small_folder_from_the_script(tmp_path, capsys):
    script = make_isic_folder
    with pytest.raises(SystemExit, match="inside the repository"):
        script.write_folder(Path(__file__).parents[1] / "isic-here", n=1)
    out = tmp_path / "isic20"
    assert script.main(["--out", str(out), "--n", "20", "--height", "96", "--width", "128"]) == 0
    data = read_folder(out)
    assert len(data) == 20 and data.images.shape == (20, 96, 128, 3)
    capsys.readouterr()
    args = ["bench", "open", "--data", str(out), "--edits", "3", "--overlay-images", "2,4"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cold"]["decoded"] == 20 and result["cold"]["from_cache"] == 0
    assert result["cached"]["decoded"] == 0 and result["cached"]["from_cache"] == 20
    assert result["canvas"] == [96, 128] and [o["images"] for o in result["overlay"]] == [2, 4]
    assert all(o["edits"] == 3 and o["max_ms"] >= o["median_ms"] > 0 for o in result["overlay"])
    assert main(["bench", "open"]) == 2
    assert "required: --data" in capsys.readouterr().err
    assert main(["bench", "open", "--data", "sample"]) == 2
    assert "needs --data DIR, a dataset folder" in capsys.readouterr().err
