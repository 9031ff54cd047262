"""Reading and writing the project folder layout and the official ISIC 2018 Task 1 layout."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from shortcut_unlearning.data.folders import (
    FolderError,
    detect_layout,
    read_folder,
    read_isic,
    read_project,
    write_isic_masks,
    write_project,
)
from shortcut_unlearning.data.lesion_set import ARTEFACTS, LesionSet

BISSOTO_HEADER = (
    ";image;dark_corner;hair;gel_border;gel_bubble;ruler;ink;patches;label;label_string"
)
TRAP_HEADER = (
    ",image,dark_corner,hair,gel_border,gel_bubble,ruler,ink,patches,vasc,label,label_string"
)


def small_set(artefacts: bool = True) -> LesionSet:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), np.uint8)
    masks[0, 4:10, 4:10] = 1
    masks[1, 2:8, 6:12] = 2
    masks[2, 8:14, 3:9] = 2
    return LesionSet(
        ids=["a", "b", "c"],
        images=rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8),
        masks=masks,
        labels=np.array([0, 1, 1]),
        splits=np.array(["train", "val", "test"]),
        flags={"ink": np.array([False, True, True]), "hair": np.array([True, False, False])},
        artefacts=rng.integers(0, 128, (3, 16, 16), dtype=np.uint8) if artefacts else None,
        source="synthetic",
        spurious=("ink",),
    )


def test_project_round_trip(tmp_path):
    data = small_set()
    write_project(data, tmp_path / "p", {"seed": np.int64(7)})
    back = read_project(tmp_path / "p")
    assert back.ids == data.ids
    np.testing.assert_array_equal(back.images, data.images)
    np.testing.assert_array_equal(back.masks, data.masks)
    np.testing.assert_array_equal(back.artefacts, data.artefacts)
    np.testing.assert_array_equal(back.labels, data.labels)
    assert back.splits.tolist() == ["train", "val", "test"]
    np.testing.assert_array_equal(back.flags["ink"], data.flags["ink"])
    np.testing.assert_array_equal(back.flags["hair"], data.flags["hair"])
    assert not back.flags["ruler"].any()  # names absent from data.flags are written as 0
    assert set(back.flags) == set(ARTEFACTS)
    assert back.spurious == ("ink",)
    assert back.source == "synthetic"
    assert back.original_sizes == [(16, 16)] * 3
    assert detect_layout(tmp_path / "p") == "project"
    assert read_folder(tmp_path / "p", image_size=8).images.shape == (3, 8, 8, 3)


def test_project_refuses_overwrite_and_drops_stale_artefacts(tmp_path):
    write_project(small_set(), tmp_path)
    with pytest.raises(ValueError, match=r"already holds an earlier dataset.*overwrite=True"):
        write_project(small_set(), tmp_path)
    write_project(small_set(artefacts=False), tmp_path, overwrite=True)
    assert read_project(tmp_path).artefacts is None


def test_project_resize_keeps_mask_classes(tmp_path):
    write_project(small_set(), tmp_path)
    back = read_project(tmp_path, image_size=32)
    assert back.images.shape == (3, 32, 32, 3)
    assert back.artefacts.shape == (3, 32, 32)
    assert set(np.unique(back.masks[1])) == {0, 2}  # nearest: no blended classes
    np.testing.assert_array_equal(back.masks[:, ::2, ::2], small_set().masks)


# ---------------------------------------------------------------------------------------------
# ISIC 2018 helpers: a tiny archive in the official naming, written here with PIL


def smooth_image(height: int, width: int) -> np.ndarray:
    """A gradient image, so JPEG compression changes it only a little."""
    rows = np.linspace(0, 200, height)[:, None]
    cols = np.linspace(0, 50, width)[None, :]
    red, green, blue = np.broadcast_arrays(rows + cols, 120.0, 250 - rows + 0 * cols)
    return np.stack([red, green, blue], -1).astype(np.uint8)


def add_isic_image(root, number: int, size, split="Training", mask_size=None):
    """Write ISIC_<number>.jpg and its 0/255 mask; return (image, lesion) as written."""
    height, width = size
    image = smooth_image(height, width)
    lesion = np.zeros(mask_size or size, bool)
    lesion[height // 4 : height // 2, width // 4 : width // 2] = True
    input_dir = root / f"ISIC2018_Task1-2_{split}_Input"
    truth_dir = root / f"ISIC2018_Task1_{split}_GroundTruth"
    input_dir.mkdir(parents=True, exist_ok=True)
    truth_dir.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(input_dir / f"ISIC_{number:07d}.jpg", quality=95)
    Image.fromarray(lesion.astype(np.uint8) * 255).save(
        truth_dir / f"ISIC_{number:07d}_segmentation.png"
    )
    return image, lesion


def bissoto_row(index: int, number: int, label: int, ink=0, hair=0, sep=";", vasc=None):
    flags = [0, hair, 0, 0, 0, ink, 0] + ([] if vasc is None else [vasc])
    name = ["benign", "malignant"][label]
    return sep.join(map(str, [index, f"ISIC_{number:07d}.png", *flags, label, name]))


@pytest.fixture
def isic_dir(tmp_path):
    """Training images 0 (benign, 30x40) and 1 (malignant, 60x50), Test image 2 (40x40)."""
    add_isic_image(tmp_path, 0, (30, 40))
    add_isic_image(tmp_path, 1, (60, 50))
    add_isic_image(tmp_path, 2, (40, 40), split="Test")
    rows = [bissoto_row(0, 0, 0, hair=1), bissoto_row(1, 1, 1, ink=1), bissoto_row(2, 2, 1)]
    (tmp_path / "isic_bias.csv").write_text("\n".join([BISSOTO_HEADER, *rows]) + "\n")
    for stray in ("LICENSE.txt", "ATTRIBUTION.txt"):
        (tmp_path / stray).write_text("CC-BY-NC\n")
        (tmp_path / "ISIC2018_Task1-2_Training_Input" / stray).write_text("CC-BY-NC\n")
    (tmp_path / "ISIC2018_Task1-2_Training_Input" / ".DS_Store").write_bytes(b"\0\1")
    return tmp_path


def test_isic_round_trip(isic_dir):
    assert detect_layout(isic_dir) == "isic2018"
    data = read_folder(isic_dir, image_size=24)
    assert data.ids == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert data.labels.tolist() == [0, 1, 1]
    assert data.splits.tolist() == ["train", "train", "test"]
    assert data.flags["hair"].tolist() == [True, False, False]
    assert data.flags["ink"].tolist() == [False, True, False]
    assert data.original_sizes == [(30, 40), (60, 50), (40, 40)]
    assert data.source == "isic2018" and data.artefacts is None
    assert data.images.shape == (3, 24, 24, 3) and data.masks.shape == (3, 24, 24)
    for i, label in enumerate([0, 1, 1]):
        assert set(np.unique(data.masks[i])) == {0, 1 + label}


def test_isic_full_size_pixels(tmp_path):
    image, lesion = add_isic_image(tmp_path, 3, (30, 40), split="Validation")
    labels = tmp_path / "elsewhere.csv"
    labels.write_text("image,label\nISIC_0000003,malignant\n")
    data = read_isic(tmp_path, labels=labels)
    assert data.splits.tolist() == ["val"]
    assert np.abs(data.images[0].astype(int) - image).mean() < 3  # JPEG is lossy
    np.testing.assert_array_equal(data.masks[0], lesion * 2)  # masks are exact


def test_isic_differing_sizes_need_image_size(isic_dir):
    with pytest.raises(FolderError, match=r"differ in size.*image_size"):
        read_isic(isic_dir)


def test_trap_set_csvs_assign_splits(tmp_path):
    for number in range(3):
        add_isic_image(tmp_path, number, (20, 20))
    train = [bissoto_row(0, 0, 0, sep=",", vasc=0), bissoto_row(1, 1, 1, sep=",", vasc=1)]
    test = [bissoto_row(0, 2, 1, sep=",", ink=1, vasc=0)]
    (tmp_path / "isic_annotated_train1.csv").write_text("\n".join([TRAP_HEADER, *train]))
    (tmp_path / "isic_annotated_test1.csv").write_text("\n".join([TRAP_HEADER, *test]))
    data = read_isic(tmp_path)
    assert data.splits.tolist() == ["train", "train", "test"]
    assert data.labels.tolist() == [0, 1, 1]
    assert data.flags["ink"].tolist() == [False, False, True]
    assert "vasc" not in data.flags


def test_plain_and_task3_csvs(tmp_path):
    for number in range(4):
        add_isic_image(tmp_path, number, (20, 20))
    plain = tmp_path / "labels.csv"
    plain.write_text("image,label\nISIC_0000000,benign\nISIC_0000001.jpg,1\n")
    task3 = tmp_path / "task3.csv"
    task3.write_text(
        "image,MEL,NV,BCC,AKIEC,BKL,DF,VASC\n"
        "ISIC_0000002,0.0,1.0,0.0,0.0,0.0,0.0,0.0\n"
        "ISIC_0000003,0.0,0.0,0.0,1.0,0.0,0.0,0.0\n"
    )
    data = read_isic(tmp_path)
    assert data.labels.tolist() == [0, 1, 0, 1]
    assert data.flags == {}
    with pytest.warns(UserWarning, match=r"2 of 4 images"):  # task3.csv leaves out 0 and 1
        only_task3 = read_isic(tmp_path, labels=task3)
    assert only_task3.ids == ["ISIC_0000002", "ISIC_0000003"]


def test_write_isic_masks_at_original_size(tmp_path):
    masks = np.zeros((2, 8, 8), np.uint8)
    masks[0, 2:6, 2:6] = 1
    masks[1, 0:4, :] = 2
    paths = write_isic_masks(
        masks, ["ISIC_0000005", "ISIC_0000009"], [(16, 24), (8, 4)], tmp_path, split="Test"
    )
    assert paths[0] == tmp_path / "ISIC2018_Task1_Test_GroundTruth/ISIC_0000005_segmentation.png"
    first = np.asarray(Image.open(paths[0]))
    assert first.shape == (16, 24) and first.dtype == np.uint8
    assert set(np.unique(first)) == {0, 255}
    np.testing.assert_array_equal(first[::2, ::3] != 0, masks[0] != 0)
    assert np.asarray(Image.open(paths[1])).shape == (8, 4)
    with pytest.raises(ValueError, match=r"ISIC_0000005_segmentation.png already exists"):
        write_isic_masks(
            masks, ["ISIC_0000005", "ISIC_0000009"], [(16, 24), (8, 4)], tmp_path, "Test"
        )
    write_isic_masks(
        masks,
        ["ISIC_0000005", "ISIC_0000009"],
        [(16, 24), (8, 4)],
        tmp_path,
        "test",
        overwrite=True,
    )


def test_isic_mask_round_trip_through_reader(tmp_path):
    add_isic_image(tmp_path, 0, (30, 40))
    (tmp_path / "labels.csv").write_text("image,label\nISIC_0000000,1\n")
    data = read_isic(tmp_path, image_size=20)
    out = tmp_path / "predictions"
    (path,) = write_isic_masks(data.masks, data.ids, data.original_sizes, out)
    assert path.name == "ISIC_0000000_segmentation.png"
    assert np.asarray(Image.open(path)).shape == (30, 40)


# ---------------------------------------------------------------------------------------------
# Errors


def test_missing_mask(isic_dir):
    (isic_dir / "ISIC2018_Task1_Test_GroundTruth/ISIC_0000002_segmentation.png").unlink()
    with pytest.raises(
        FolderError, match=r"ISIC_0000002.jpg has no mask; expected .*ISIC_0000002_"
    ):
        read_isic(isic_dir, image_size=16)


def test_corrupt_image(isic_dir):
    (isic_dir / "ISIC2018_Task1-2_Training_Input/ISIC_0000001.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(FolderError, match=r"cannot decode .*ISIC_0000001.jpg"):
        read_isic(isic_dir, image_size=16)


def test_mask_size_mismatch(tmp_path):
    add_isic_image(tmp_path, 0, (30, 40), mask_size=(40, 30))
    (tmp_path / "labels.csv").write_text("image,label\nISIC_0000000,0\n")
    with pytest.raises(FolderError, match=r"is 40x30 but its image .* is 30x40"):
        read_isic(tmp_path)


def test_no_labels_csv(tmp_path):
    add_isic_image(tmp_path, 0, (20, 20))
    with pytest.raises(FolderError, match=r"labels CSV.*labels="):
        read_folder(tmp_path)


def test_unlabelled_image_warns(tmp_path):
    add_isic_image(tmp_path, 0, (20, 20))
    add_isic_image(tmp_path, 1, (20, 20))
    (tmp_path / "labels.csv").write_text("image,label\nISIC_0000001,malignant\n")
    with pytest.warns(UserWarning, match=r"1 of 2 images .* no label.*'image,label' CSV"):
        data = read_isic(tmp_path)
    assert data.ids == ["ISIC_0000001"]


def test_unknown_and_missing_layouts(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(FolderError, match=r"dataset.json.*ISIC2018_Task1-2_"):
        detect_layout(tmp_path)
    with pytest.raises(FolderError, match=r"does not exist"):
        read_folder(tmp_path / "nowhere")


def test_labelled_images_all_differ_from_csv(tmp_path):
    add_isic_image(tmp_path, 0, (20, 20))
    (tmp_path / "labels.csv").write_text("image,label\nISIC_0000042,1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(FolderError, match=r"none of the 1 images"):
            read_isic(tmp_path)


# ---------------------------------------------------------------------------------------------
# Parallel decoding


def test_parallel_decoding_gives_the_serial_result(isic_dir):
    serial = read_folder(isic_dir, image_size=24, workers=1)
    parallel = read_folder(isic_dir, image_size=24, workers=3)
    assert parallel.ids == serial.ids and parallel.original_sizes == serial.original_sizes
    np.testing.assert_array_equal(parallel.images, serial.images)
    np.testing.assert_array_equal(parallel.masks, serial.masks)


def test_parallel_decoding_reports_the_first_broken_file(isic_dir):
    for number in (1, 2):
        split = "Training" if number == 1 else "Test"
        path = isic_dir / f"ISIC2018_Task1-2_{split}_Input/ISIC_000000{number}.jpg"
        path.write_bytes(b"broken")
    with pytest.raises(FolderError, match=r"cannot decode .*ISIC_0000001\.jpg"):
        read_folder(isic_dir, image_size=16, workers=3)


def test_large_jpegs_decode_at_reduced_scale_close_to_a_full_decode(tmp_path):
    image, _ = add_isic_image(tmp_path, 0, (400, 600))
    (tmp_path / "labels.csv").write_text("image,label\nISIC_0000000,0\n")
    small = read_isic(tmp_path, image_size=64).images[0].astype(int)
    full = np.asarray(Image.fromarray(image).resize((64, 64), Image.Resampling.BILINEAR))
    assert np.abs(small - full).mean() < 2
