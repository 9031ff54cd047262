"""Hostile and careless input through the public entry points: the CLI, the folder reader, the
plugin's mask writer and Model.load. docs/reliability.md lists every case and its test."""

from __future__ import annotations

import csv
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shortcut_unlearning.cli import main
from shortcut_unlearning.data.folders import FolderError, read_folder, write_project
from shortcut_unlearning.data.synthetic import generate
from shortcut_unlearning.napari import _io

HOSTILE_IDS = ["../../../secret/leak", "/tmp/secret/leak", "..", "a\\..\\b", "C:leak", "", "a\0b"]


def project(folder: Path, n: int = 8, size: int = 32) -> Path:
    """A small project-layout set written by the library itself."""
    return write_project(generate(n=n, size=size, seed=1), folder)


def rewrite_labels(folder: Path, change) -> None:
    """Apply `change(rows)` to labels.csv (a list of dicts) and write it back."""
    path = folder / "labels.csv"
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    fields = list(rows[0])
    rows = change(rows) or rows
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fields)
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Security: ids are names, never paths


@pytest.fixture
def spy_open(monkeypatch):
    """Every path PIL is asked to open."""
    opened = []
    real_open = Image.open

    def spying(path, *args, **kwargs):
        opened.append(Path(path).resolve())
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(Image, "open", spying)
    return opened


@pytest.mark.parametrize("hostile", ["../../../secret/leak", "ABSOLUTE"])
def test_labels_csv_ids_cannot_reach_outside_the_folder(tmp_path, spy_open, capsys, hostile):
    secret = tmp_path / "a" / "secret"  # where ../../../ leads from the set's images/
    secret.mkdir(parents=True)
    Image.fromarray(np.full((32, 32, 3), 7, np.uint8)).save(secret / "leak.png")
    folder = project(tmp_path / "a" / "b" / "set")
    hostile = str(secret / "leak") if hostile == "ABSOLUTE" else hostile

    def plant(rows):
        rows[0]["id"] = hostile

    rewrite_labels(folder, plant)
    with pytest.raises(FolderError, match=r"labels\.csv line 2: id .* is not a plain file name"):
        read_folder(folder)
    args = ["train", "--data", str(folder), "--epochs", "1", "--image-size", "32"]
    assert main([*args, "--out", str(tmp_path / "model")]) == 2
    assert "is not a plain file name" in capsys.readouterr().err
    assert not [p for p in spy_open if not p.is_relative_to(folder.resolve())]
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize("hostile", HOSTILE_IDS)
def test_the_plugin_writer_never_writes_outside_its_folder(tmp_path, hostile):
    out = tmp_path / "deep" / "out"
    masks = np.ones((2, 8, 8), np.uint8)
    meta = {"metadata": {"ids": ["fine", hostile], "original_sizes": [[8, 8], [8, 8]]}}
    with pytest.raises(FolderError, match=r"not a plain file name"):
        _io.write_masks(str(out), masks, meta)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == []


def test_project_writer_refuses_path_ids(tmp_path):
    data = generate(n=4, size=32, seed=0)
    data.ids[1] = "../escape"
    with pytest.raises(FolderError, match=r"'\.\./escape' is not a plain file name"):
        write_project(data, tmp_path / "set")
    assert not (tmp_path / "escape.png").exists() and not (tmp_path / "set").exists()


# ---------------------------------------------------------------------------------------------
# Silent corruption becomes an error that names the file


def png(array: np.ndarray, claim: tuple[int, int] | None = None) -> bytes:
    """A 16-bit PNG of a uint16 (H, W) or (H, W, 3) array, written by hand (PIL cannot write
    16-bit RGB); `claim` puts another (height, width) in the header, as a decompression bomb does."""
    array = np.asarray(array, ">u2")
    height, width = claim or array.shape[:2]
    color = 0 if array.ndim == 2 else 2

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    rows = b"".join(b"\0" + row.tobytes() for row in array)
    header = struct.pack(">IIBBBBB", width, height, 16, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))


def first_id(folder: Path) -> str:
    with open(folder / "labels.csv", newline="") as file:
        return next(csv.DictReader(file))["id"]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ((0, 255), r"holds 0/255 like an ISIC ground-truth mask.*write_project"),
        ((0, 5), r"masks/.*\.png holds the values \[0, 5\].*only 0 \(background\)"),
    ],
)
def test_project_masks_must_hold_0_1_2(tmp_path, capsys, values, message):
    folder = project(tmp_path / "set")
    path = folder / "masks" / f"{first_id(folder)}.png"
    mask = np.asarray(Image.open(path))
    Image.fromarray(np.where(mask != 0, values[1], values[0]).astype(np.uint8)).save(path)
    with pytest.raises(FolderError, match=message):
        read_folder(folder)
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert "mask" in capsys.readouterr().err


def test_project_mask_class_must_agree_with_the_label(tmp_path):
    folder = project(tmp_path / "set")
    image_id = first_id(folder)
    path = folder / "masks" / f"{image_id}.png"
    mask = np.asarray(Image.open(path))
    Image.fromarray(np.where(mask != 0, 3 - mask.max(), 0).astype(np.uint8)).save(path)
    with pytest.raises(FolderError, match=rf"mask of '{image_id}' .* holds lesion class"):
        read_folder(folder)


def test_duplicate_project_ids_are_refused(tmp_path):
    folder = project(tmp_path / "set")
    rewrite_labels(folder, lambda rows: [*rows, rows[0]])
    with pytest.raises(FolderError, match=r"lists '.*' twice \(lines 2 and 10\)"):
        read_folder(folder)


def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    folder = project(tmp_path / "set")
    path = folder / "images" / f"{first_id(folder)}.png"
    grey = np.linspace(0, 65535, 32 * 32).reshape(32, 32)
    path.write_bytes(png(grey))
    pixels = read_folder(folder).images[0]
    np.testing.assert_allclose(pixels[..., 0], grey / 257, atol=0.51)
    assert (pixels[..., 0] == pixels[..., 2]).all()
    colour = np.stack([grey, 65535 - grey, np.full_like(grey, 30000)], -1)
    path.write_bytes(png(colour))
    np.testing.assert_allclose(read_folder(folder).images[0], colour / 257, atol=1)


def test_32_bit_float_images_get_an_error(tmp_path):
    folder = project(tmp_path / "set")
    path = folder / "images" / f"{first_id(folder)}.png"
    Image.fromarray(np.ones((32, 32), np.float32)).save(path, format="TIFF")
    with pytest.raises(FolderError, match=r"32-bit float pixels.*8- or 16-bit PNG"):
        read_folder(folder)


def test_tiny_images_are_refused_not_enlarged(tmp_path):
    folder = project(tmp_path / "set")
    image_id = first_id(folder)
    for name in ("images", "masks"):
        Image.fromarray(np.zeros((1, 1), np.uint8)).convert(
            "RGB" if name == "images" else "L"
        ).save(folder / name / f"{image_id}.png")
    with pytest.raises(FolderError, match=rf"{image_id}\.png is 1x1 pixels.*at least 16"):
        read_folder(folder, image_size=32)


@pytest.mark.parametrize("side", [10_000, 20_000])  # PIL warns above 89 M pixels, raises at 179 M
def test_decompression_bombs_are_refused_by_name(tmp_path, capsys, side):
    folder = project(tmp_path / "set")
    path = folder / "images" / f"{first_id(folder)}.png"
    path.write_bytes(png(np.zeros((1, 1)), claim=(side, side)))
    with pytest.raises(FolderError, match=rf"{path.name} is too large to open safely"):
        read_folder(folder)
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and path.name in err


@pytest.mark.parametrize(("version", "message"), [(2, "update"), ("1", "rewrite the folder")])
def test_dataset_json_of_another_version(tmp_path, capsys, version, message):
    folder = project(tmp_path / "set")
    info = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**info, "version": version}))
    with pytest.raises(FolderError, match=rf"version {version!r} but this reader .*{message}"):
        read_folder(folder)
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert "this reader reads version 1" in capsys.readouterr().err


def isic_folder(root: Path, numbers=(0, 1, 2), mask_values=(0, 255)) -> Path:
    """Training images ISIC_000000<n> (32 x 32) with masks in the given encoding."""
    for split in ("Input", "GroundTruth"):
        prefix = "ISIC2018_Task1-2" if split == "Input" else "ISIC2018_Task1"
        (root / f"{prefix}_Training_{split}").mkdir(parents=True, exist_ok=True)
    for number in numbers:
        name = f"ISIC_{number:07d}"
        image = np.full((32, 32, 3), 90 + number, np.uint8)
        Image.fromarray(image).save(root / f"ISIC2018_Task1-2_Training_Input/{name}.jpg")
        mask = np.full((32, 32), mask_values[0], np.uint8)
        mask[8:24, 8:24] = mask_values[1]
        Image.fromarray(mask).save(
            root / f"ISIC2018_Task1_Training_GroundTruth/{name}_segmentation.png"
        )
    return root


def test_isic_masks_must_hold_0_255(tmp_path):
    root = isic_folder(tmp_path, mask_values=(0, 1))
    (root / "labels.csv").write_text(
        "image,label\nISIC_0000000,0\nISIC_0000001,1\nISIC_0000002,1\n"
    )
    with pytest.raises(
        FolderError,
        match=r"ISIC_0000000_segmentation\.png holds the values \[0, 1\].*multiply it by 255",
    ):
        read_folder(root)


def test_isic_duplicate_rows(tmp_path):
    root = isic_folder(tmp_path)
    rows = "image,label\nISIC_0000000,0\nISIC_0000001,1\nISIC_0000002,1\n"
    (root / "labels.csv").write_text(rows + "ISIC_0000001,1\n")  # the same row twice: harmless
    assert read_folder(root).labels.tolist() == [0, 1, 1]
    (root / "labels.csv").write_text(rows + "ISIC_0000001,0\n")
    with pytest.raises(FolderError, match=r"labels\.csv lists ISIC_0000001 on lines 3 and 5"):
        read_folder(root)
