"""Hostile and careless input through the public entry points: the CLI, the folder reader, the
plugin's mask writer and Model.load. docs/reliability.md lists every case and its test."""

from __future__ import annotations

import csv
import json
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from PIL import Image
from safetensors.torch import load_file, save_file
from test_experiment import tiny_run

from shortcut_unlearning.cli import main
from shortcut_unlearning.data.folders import FolderError, read_folder, write_project
from shortcut_unlearning.data.synthetic import generate
from shortcut_unlearning.files import OutputError
from shortcut_unlearning.model import Model, ModelConfig
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
# Security: no write through a link (files.write_bytes is every writer's one way to disk)


def plant_link(link: Path, target: Path) -> Path:
    """A link at `link` to `target`, which need not exist (a dangling link)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


@pytest.mark.parametrize("ids", [["plain", "X"], ["ISIC_0000001", "ISIC_0000002"]])
def test_the_plugin_writer_never_writes_through_a_planted_link(tmp_path, ids):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere" / "stolen.png"
    elsewhere.parent.mkdir()
    name = f"{ids[1]}_segmentation.png"
    folder = out / "ISIC2018_Task1_Training_GroundTruth" if ids[0].startswith("ISIC") else out
    plant_link(folder / name, elsewhere)
    meta = {"metadata": {"ids": ids, "original_sizes": [[16, 16], [16, 16]]}}
    with pytest.raises(OutputError, match=rf"{name} is a link .*never writes through a link"):
        _io.write_masks(str(out), np.ones((2, 16, 16), np.uint8), meta)
    assert not elsewhere.exists()
    assert [p.name for p in folder.iterdir()] == [name]  # refused before writing anything


def test_replacing_never_writes_through_a_link(tmp_path):
    from shortcut_unlearning.data.folders import write_isic_masks
    from shortcut_unlearning.refinement import Refinement

    secret = tmp_path / "secret.txt"
    secret.write_text("the user's own file")
    out = tmp_path / "out"
    truth = out / "ISIC2018_Task1_Training_GroundTruth"
    plant_link(truth / "ISIC_0000001_segmentation.png", secret)
    masks, sizes = np.ones((1, 16, 16), np.uint8), [(16, 16)]
    with pytest.raises(OutputError, match="is a link"):
        write_isic_masks(masks, ["ISIC_0000001"], sizes, out, overwrite=True)
    # The plugin's autosave replaces its files each edit: a link there is refused too.
    coarse = np.ones((2, 16, 16), np.uint8)
    refinement = Refinement(coarse)
    refinement.refined[0, 0, 0] = 0
    plant_link(tmp_path / "autosave" / refinement.key / "0.npy", secret)
    with pytest.raises(OutputError, match="is a link"):
        refinement.autosave(tmp_path / "autosave")
    # A planted folder link is refused as well: the files would land at its target.
    plant_link(tmp_path / "isic" / "ISIC2018_Task1_Training_GroundTruth", tmp_path / "away")
    (tmp_path / "away").mkdir()
    with pytest.raises(OutputError, match="is a link"):
        write_isic_masks(masks, ["ISIC_0000001"], sizes, tmp_path / "isic")
    assert secret.read_text() == "the user's own file" and not any((tmp_path / "away").iterdir())


def test_the_settings_file_is_never_written_through_a_link(tmp_path, monkeypatch):
    from shortcut_unlearning.settings import OperatorSettings, save_settings, settings_file

    monkeypatch.setenv("SHORTCUT_UNLEARNING_HOME", str(tmp_path / "home"))
    plant_link(settings_file(), tmp_path / "elsewhere.json")
    with pytest.raises(OutputError, match="is a link"):
        save_settings(OperatorSettings())
    assert not (tmp_path / "elsewhere.json").exists()


# ---------------------------------------------------------------------------------------------
# Security: links inside a dataset folder never lead the reader out of it


def move_out_and_link(file: Path, away: Path) -> Path:
    """Move `file` to `away` and leave a link to it where it was."""
    away.parent.mkdir(parents=True, exist_ok=True)
    file.rename(away)
    file.symlink_to(away)
    return file


@pytest.mark.parametrize("which", ["images", "masks", "artefacts", "labels.csv", "dataset.json"])
def test_project_files_linked_from_outside_are_refused(tmp_path, capsys, spy_open, which):
    folder = project(tmp_path / "set")
    name = which if "." in which else f"{which}/{first_id(folder)}.png"
    link = move_out_and_link(folder / name, tmp_path / "outside" / name.replace("/", "_"))
    message = rf"{link.name} leads to .*outside the dataset folder"
    with pytest.raises(FolderError, match=message):
        read_folder(folder)
    args = ["train", "--data", str(folder), "--epochs", "1", "--image-size", "32"]
    assert main([*args, "--out", str(tmp_path / "model")]) == 2
    assert "outside the dataset folder" in capsys.readouterr().err
    assert not [p for p in spy_open if not p.is_relative_to(folder.resolve())]


def test_a_link_that_stays_inside_the_folder_is_read(tmp_path):
    folder = project(tmp_path / "set")
    image = folder / "images" / f"{first_id(folder)}.png"
    move_out_and_link(image, folder / "originals" / image.name)
    assert len(read_folder(folder)) == 8


@pytest.mark.parametrize("which", ["image", "mask", "csv", "input folder"])
def test_isic_files_linked_from_outside_are_refused(tmp_path, which):
    root = isic_folder(tmp_path / "isic", numbers=(0, 1))
    (root / "labels.csv").write_text("image,label\nISIC_0000000,0\nISIC_0000001,1\n")
    file = {
        "image": root / "ISIC2018_Task1-2_Training_Input/ISIC_0000001.jpg",
        "mask": root / "ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png",
        "csv": root / "labels.csv",
        "input folder": root / "ISIC2018_Task1-2_Training_Input",
    }[which]
    move_out_and_link(file, tmp_path / "outside" / file.name)
    with pytest.raises(FolderError, match=r"leads to .*outside the dataset folder"):
        read_folder(root)


def test_coarse_masks_linked_from_outside_are_refused(tmp_path):
    from shortcut_unlearning.data.folders import coarse_file

    folder = project(tmp_path / "set")
    image_id = first_id(folder)
    (folder / "coarse").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "stolen.png")
    (folder / "coarse" / f"{image_id}.png").symlink_to(tmp_path / "stolen.png")
    with pytest.raises(FolderError, match=r"leads to .*stolen\.png, outside the dataset folder"):
        coarse_file(folder, image_id)


# ---------------------------------------------------------------------------------------------
# Silent corruption becomes an error that names the file


def png(array: np.ndarray, claim: tuple[int, int] | None = None) -> bytes:
    """A 16-bit PNG of a uint16 (H, W) or (H, W, 3) array, written by hand (PIL cannot write
    16-bit RGB); `claim` puts another (height, width) in its header, as a decompression bomb
    does."""
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
    with pytest.raises(FolderError, match=rf"version {version!r}, but this tool reads .*{message}"):
        read_folder(folder)
    assert main(["train", "--data", str(folder), "--out", str(tmp_path / "m")]) == 2
    assert "this tool reads version 1" in capsys.readouterr().err


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
    (root / "labels.csv").write_text(rows)
    (root / "more.csv").write_text("image,label\nISIC_0000002,0\n")
    with pytest.raises(FolderError, match=r"ISIC_0000002 is labelled 1 in .*labels\.csv but 0 in"):
        read_folder(root)


def test_isic_csv_image_names_are_plain_names(tmp_path):
    root = isic_folder(tmp_path)
    (root / "labels.csv").write_text("image,label\nISIC_0000000,0\n../x/ISIC_0000001.jpg,1\n")
    message = r"labels\.csv line 3: column 'image': id '\.\./x/ISIC_0000001\.jpg'"
    with pytest.raises(FolderError, match=message):
        read_folder(root)


# ---------------------------------------------------------------------------------------------
# Checkpoints: Model.load names the checkpoint and what is wrong with it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny checkpoint at 48 px; tests copy it before breaking it."""
    folder = tmp_path_factory.mktemp("checkpoint")
    Model(TINY).save(folder / "model")
    return folder / "model"


def broken_copy(checkpoint: Path, folder: Path, change_config=None, change_weights=None) -> Path:
    """A copy of `checkpoint` in `folder` with its JSON config and/or weights changed."""
    info = json.loads(checkpoint.with_suffix(".json").read_text())
    info = change_config(info) if change_config else info
    (folder / "model.json").write_text(json.dumps(info))
    state = load_file(checkpoint.with_suffix(".safetensors"))
    save_file(change_weights(state) if change_weights else state, folder / "model.safetensors")
    return folder / "model.safetensors"


def with_keys(**changes):
    def change(info):
        info = {**info, **changes}
        return {k: v for k, v in info.items() if v is not DROP}

    return change


DROP = object()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda info: [info], r"model\.json is not a shortcut-unlearning model config"),
        (with_keys(architecture="FPN"), r"model\.json: architecture is not a known field"),
        (with_keys(seed=DROP, mean=DROP), r"lacks the keys \['mean', 'seed'\]"),
        (with_keys(encoder="resnet9000"), r"unknown encoder 'resnet9000'.*e\.g\. resnet18"),
        (with_keys(std=[0.2, 0.0, 0.2]), r"model\.json: std\.1 should be greater than 0"),
        (with_keys(mean=[0.5, float("nan"), 0.5]), r"mean\.1 should be a finite number"),
        (with_keys(version=2), r"version 2, but this tool reads version 1; update"),
        (with_keys(encoder="resnet34"), r"weights in .*model\.safetensors do not fit the resnet34"),
    ],
)
def test_broken_sidecars_name_the_checkpoint(checkpoint, tmp_path, capsys, change, message):
    path = broken_copy(checkpoint, tmp_path, change_config=change)
    with pytest.raises(ValueError, match=message) as caught:
        Model.load(path)
    assert len(str(caught.value)) < 400  # a few encoders named, not all 76
    args = tiny_run(tmp_path / "run", 16, "--model", str(path))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_nan_weights_name_the_checkpoint(checkpoint, tmp_path):
    def poison(state):
        name = next(k for k, v in state.items() if v.is_floating_point())
        state[name][...] = float("nan")
        return state

    path = broken_copy(checkpoint, tmp_path, change_weights=poison)
    with pytest.raises(ValueError, match=rf"checkpoint {path} holds NaN or infinite weights"):
        Model.load(path)


def test_a_dotted_checkpoint_name_keeps_its_dots(tmp_path):
    weights = Model(TINY).save(tmp_path / "model.v2")
    assert weights == tmp_path / "model.v2.safetensors"
    assert (tmp_path / "model.v2.json").is_file() and not (tmp_path / "model.json").exists()
    assert Model.load(tmp_path / "model.v2").config.image_size == 48
    assert Model.load(weights).config == Model(TINY).config


# ---------------------------------------------------------------------------------------------
# Arguments: refused at parse time, on one line, with exit code 2, before any work

BAD_ARGUMENTS = [
    (["--steps", "0"], "--steps: must be a whole number >= 1"),
    (["--steps", "-5"], "--steps: must be a whole number >= 1"),
    (["--epochs", "-1"], "--epochs: must be a whole number >= 1"),
    (["--epochs", "0"], "--epochs: must be a whole number >= 1"),
    (["--refined", ""], "--refined: needs comma-separated image ids"),
    (["--refined", "a,,b"], "--refined: needs comma-separated image ids"),
    (["--refined", "a,b, a"], "--refined: names 'a' more than once"),
    (["--image-size", "7"], "--image-size: must be a whole number from 32 to 4096"),
    (["--device", "tpu"], "--device: must be auto, cpu, cuda, cuda:N or mps"),
    (["--fine-fraction", "0"], "--fine-fraction: must lie in (0, 1]"),
    (["--fine-fraction", "1.5"], "--fine-fraction: must lie in (0, 1]"),
    (["--fine-fraction", "nan"], "--fine-fraction: must lie in (0, 1]"),
    (["--coarse-margin", "1"], "--coarse-margin: must lie in [0, 1)"),
    (["--delta", "1"], "--delta: must lie in (0, 1)"),
    (["--epsilon", "0"], "--epsilon: must lie in (0, inf)"),
    (["--seed", "-1"], "--seed: must be a whole number from 0 to 4294967295"),
    (["--encoder", "resnet9000"], "unknown encoder 'resnet9000'"),
    (["--method", "magic"], "--method: invalid choice"),
]


@pytest.mark.parametrize(("flags", "message"), BAD_ARGUMENTS)
def test_bad_run_arguments_are_refused_on_one_line(tmp_path, capsys, flags, message):
    assert main(tiny_run(tmp_path / "run", 16, *flags)) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"error: argument {flags[0]}") or message in captured.err
    assert message in captured.err and captured.err.count("\n") == 1
    assert captured.out == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["synth", "--size", "4"], "--size: must be a whole number from 16 to 4096"),
        (["bench", "seeds", "--methods", "neggrad-seg,magic"], "'magic' is not a method"),
        (["bench", "seeds", "--seeds", "0,x"], "--seeds: must be a whole number from 0 to"),
        (["demo", "--steps", "0"], "--steps: must be a whole number >= 1"),
        (["train", "--epochs", "0"], "--epochs: must be a whole number >= 1"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_bad_arguments_of_other_commands(tmp_path, capsys, args, message):
    out = [] if args[0] == "frobnicate" else ["--out", str(tmp_path / "out")]
    assert main([*args, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_an_absent_device_is_refused_before_any_work(tmp_path, capsys):
    for command in (tiny_run(tmp_path / "run", 16), ["train", "--out", str(tmp_path / "m")]):
        assert main([*command, "--device", "cuda"]) == 2
        assert "torch sees no CUDA GPU" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_checkpoint_runs_at_its_own_size(tmp_path, capsys):
    Model(ModelConfig(image_size=128)).save(tmp_path / "big")
    args = tiny_run(tmp_path / "run", 16, "--model", str(tmp_path / "big.safetensors"))
    args[args.index("--image-size") + 1] = "64"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "trained at 128 px but this run works at 64 px; pass --image-size 128" in err
    assert not (tmp_path / "run").exists()


def test_a_checkpoint_runs_with_its_own_encoder(tmp_path, capsys):
    small = ModelConfig(encoder="mobilenet_v2", decoder_channels=(16, 16, 8, 8, 8), image_size=48)
    Model(small).save(tmp_path / "m32")
    model = ["--model", str(tmp_path / "m32"), "--steps", "1"]
    assert main(tiny_run(tmp_path / "run", 16, *model, "--encoder", "resnet34")) == 2
    err = capsys.readouterr().err
    assert "holds a mobilenet_v2 model but --encoder says resnet34" in err
    assert not (tmp_path / "run").exists()
    # Without --encoder (its default is resnet18) the run is recorded with the checkpoint's.
    assert main(tiny_run(tmp_path / "run", 16, *model)) == 0
    report = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert report["config"]["encoder"] == "mobilenet_v2"


# ---------------------------------------------------------------------------------------------
# Nothing lost, nothing mixed


def fast_run(out: Path, *flags: str) -> list[str]:
    """A tiny complete run: 16 synthetic images at 48 px, one epoch, two unlearning steps."""
    return tiny_run(out, 16, "--epochs", "1", "--steps", "2", *flags)


def test_run_output_is_never_mixed_and_the_same_seed_gives_the_same_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(fast_run(out)) == 0
    first = json.loads((out / "metrics.json").read_text())
    names = sorted(p.name for p in out.iterdir())
    assert "coarse_model.safetensors" in names and "INCOMPLETE" not in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left

    # An earlier run is never overwritten silently, and the refusal comes before any work.
    (out / "notes.txt").write_text("an earlier result")
    assert main(fast_run(out)) == 2
    assert "already holds an earlier run" in capsys.readouterr().err
    assert (out / "notes.txt").is_file()

    # --overwrite replaces only an earlier run's folder, never one that holds other things.
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("id,label,split\n")
    assert main(fast_run(tmp_path / "data", "--overwrite")) == 2
    assert "not an earlier run's folder" in capsys.readouterr().err
    assert (tmp_path / "data" / "labels.csv").is_file()
    (tmp_path / "data" / "labels.csv").unlink()
    (tmp_path / "data").rmdir()

    # --overwrite replaces the folder as a whole: nothing of the earlier run stays beside it.
    assert main(fast_run(out, "--overwrite")) == 0
    assert sorted(p.name for p in out.iterdir()) == names
    second = json.loads((out / "metrics.json").read_text())

    # Determinism: the same seed on the CPU gives the same metrics.json, timings aside.
    for report in (first, second):
        report.pop("timings")
        report["config"].pop("overwrite")
    assert first == second


def test_overwrite_refuses_a_folder_the_tool_did_not_write(tmp_path, capsys, monkeypatch):
    from shortcut_unlearning import experiment

    monkeypatch.setattr(experiment, "train", lambda *a, **k: pytest.fail("trained"))
    thesis = tmp_path / "thesis"
    (thesis / "src").mkdir(parents=True)
    (thesis / "metrics.json").write_text("{}")  # a file of that name is no proof
    (thesis / "thesis.tex").write_text("years of work")
    (thesis / "src" / "main.py").write_text("print(1)")
    before = sorted(p.relative_to(thesis) for p in thesis.rglob("*"))
    assert main(fast_run(thesis, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert "no shortcut-unlearning.json" in err and "will not replace it" in err
    # A marker of another kind (a dataset the tool wrote) is not a run's folder either.
    (thesis / "shortcut-unlearning.json").write_text(
        json.dumps({"format": "shortcut-unlearning", "folder": "dataset", "version": 1})
    )
    assert main(fast_run(thesis, "--overwrite")) == 2
    assert "not an earlier run's folder" in capsys.readouterr().err
    (thesis / "shortcut-unlearning.json").unlink()
    assert sorted(p.relative_to(thesis) for p in thesis.rglob("*")) == before
    # --out naming a link is refused: the finished run could not be moved over it.
    (tmp_path / "link").symlink_to(thesis)
    assert main(fast_run(tmp_path / "link", "--overwrite")) == 2
    assert "is a link" in capsys.readouterr().err
    assert sorted(p.relative_to(thesis) for p in thesis.rglob("*")) == before


def test_a_failed_run_is_marked_incomplete_and_leaves_out_alone(tmp_path, monkeypatch):
    from shortcut_unlearning import experiment

    def fail(*args, **kwargs):
        raise KeyboardInterrupt  # as if the run were stopped after training

    monkeypatch.setattr(experiment, "evaluate_states", fail)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        main(fast_run(out))
    assert not out.exists()
    (stage,) = tmp_path.iterdir()
    assert stage.name.startswith("run.incomplete-")
    held = {p.name for p in stage.iterdir()}
    assert {"INCOMPLETE", "coarse_model.safetensors"} <= held and "metrics.json" not in held


@pytest.mark.parametrize("where", ["file", "under a file", "full disk", "read-only"])
def test_unwritable_outputs_fail_before_training(tmp_path, capsys, monkeypatch, where):
    from shortcut_unlearning import experiment, files

    if where == "read-only" and os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    monkeypatch.setattr(experiment, "train", lambda *a, **k: pytest.fail("trained"))
    target = tmp_path / "target"
    message = {
        "file": "is a file; name a folder",
        "under a file": "part of that path is a file",
        "full disk": "MiB are free in",
        "read-only": "permission denied",
    }[where]
    if where == "file":
        target.write_text("a file")
    elif where == "under a file":
        (tmp_path / "blocker").write_text("a file")
        target = tmp_path / "blocker" / "run"
    elif where == "full disk":
        usage = shutil.disk_usage(tmp_path)._replace(free=10 * 2**20)
        monkeypatch.setattr(files.shutil, "disk_usage", lambda path: usage)
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        target = tmp_path / "locked" / "run"
    assert main(fast_run(target)) == 2
    assert message in capsys.readouterr().err
    if where != "file":
        args = ["train", "--data", "synthetic", "--synth-n", "16", "--image-size", "48"]
        assert main([*args, "--out", str(target / "model")]) == 2
        assert message in capsys.readouterr().err


def test_train_refuses_to_replace_a_checkpoint_and_keeps_dotted_names(tmp_path, capsys):
    args = ["train", "--data", "synthetic", "--synth-n", "16", "--image-size", "48"]
    args += ["--epochs", "1", "--out", str(tmp_path / "model.v2")]
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.v2.json", "model.v2.safetensors"]
    before = (tmp_path / "model.v2.safetensors").read_bytes()
    assert main([*args, "--seed", "1"]) == 2
    assert "model.v2.safetensors already exists" in capsys.readouterr().err
    assert (tmp_path / "model.v2.safetensors").read_bytes() == before
    assert main([*args[:-1], str(tmp_path)]) == 2
    assert "is a folder; name the checkpoint" in capsys.readouterr().err
    assert main([*args, "--seed", "1", "--overwrite"]) == 0
    assert (tmp_path / "model.v2.safetensors").read_bytes() != before
    assert Model.load(tmp_path / "model.v2").config.provenance["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.v2.json", "model.v2.safetensors"]


# ---------------------------------------------------------------------------------------------
# --labels: Bissoto's trap sets, one CSV per flag, the file name sets the split

TRAP = ",image,dark_corner,hair,gel_border,gel_bubble,ruler,ink,patches,label,label_string"


def trap_csv(path: Path, rows: list[tuple[int, int, int]]) -> Path:
    """A trap-set CSV of (number, label, ink) rows, in Bissoto's column layout."""
    lines = [TRAP] + [
        f"{i},ISIC_{n:07d}.png,0,0,0,0,0,{ink},0,{label},{['benign', 'malignant'][label]}"
        for i, (n, label, ink) in enumerate(rows)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_labels_flags_pick_trap_set_csvs_from_a_subfolder(tmp_path, capsys):
    root = isic_folder(tmp_path / "isic", numbers=range(6))
    sets = root / "trap-sets"
    train1 = trap_csv(sets / "isic_annotated_train1.csv", [(0, 0, 0), (1, 1, 1), (2, 0, 0)])
    val1 = trap_csv(sets / "isic_annotated_val1.csv", [(3, 1, 1)])
    test1 = trap_csv(sets / "isic_annotated_test1.csv", [(4, 1, 0), (5, 0, 1)])
    trap_csv(sets / "isic_annotated_test2.csv", [(0, 0, 0), (4, 1, 0)])

    data = read_folder(root, labels=[train1, val1, test1])
    assert data.splits.tolist() == ["train", "train", "train", "val", "test", "test"]
    assert data.labels.tolist() == [0, 1, 0, 1, 1, 0]
    assert data.flags["ink"].tolist() == [False, True, False, True, False, True]

    args = ["train", "--data", str(root), "--image-size", "32", "--epochs", "1"]
    args += ["--masks", "fine", "--labels", str(train1), "--labels", str(test1)]
    with pytest.warns(UserWarning, match="1 of 6 images"):  # val1 was not passed
        assert main([*args, "--out", str(tmp_path / "model")]) == 0
    assert "trained on 3 images" in capsys.readouterr().out

    # ISIC_0000000 is in train1's train split but in test2's test split.
    with pytest.raises(
        FolderError,
        match=r"ISIC_0000000 is in the train split by .*train1\.csv "
        r"but in the test split by .*test2\.csv",
    ):
        read_folder(root, labels=[train1, sets / "isic_annotated_test2.csv"])
    assert (
        main([*args[:-1], str(sets / "isic_annotated_test2.csv"), "--out", str(tmp_path / "x")])
        == 2
    )
    err = capsys.readouterr().err
    assert "isic_annotated_train1.csv" in err and "isic_annotated_test2.csv" in err
    assert main([*args, "--labels", f"{train1},{test1}", "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.fixture
def full_disk(monkeypatch):
    """Call full_disk() and the disk fills up after a few bytes of each file written."""
    from shortcut_unlearning import files

    real_fdopen = os.fdopen

    class HalfWritten:
        def __init__(self, handle, mode):
            self.file = real_fdopen(handle, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

        def write(self, data):
            self.file.write(data[:10])
            raise OSError(28, "No space left on device")

    return lambda: monkeypatch.setattr(files.os, "fdopen", HalfWritten)


def test_a_failed_checkpoint_write_leaves_the_old_checkpoint(tmp_path, full_disk):
    from shortcut_unlearning import files, outputs

    outputs.save_checkpoint(Model(TINY), tmp_path / "m")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    full_disk()
    message = r"cannot write .*m\.safetensors: the disk is full .*keeps its earlier content"
    with pytest.raises(files.DiskError, match=message):
        outputs.save_checkpoint(Model(ModelConfig(image_size=48, seed=3)), tmp_path / "m")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.parametrize(("column", "value"), [("label", "2"), ("split", "holdout")])
def test_label_and_split_values_are_checked(tmp_path, column, value):
    folder = project(tmp_path / "set")

    def change(rows):
        rows[2][column] = value

    rewrite_labels(folder, change)
    with pytest.raises(FolderError, match=r"labels\.csv line 4: column '(label|split)' should be"):
        read_folder(folder)


# ---------------------------------------------------------------------------------------------
# Silent misreads: flags, ids and mask formats are read right or refused


@pytest.mark.parametrize("value", ["no", "false", "nan", "", "2", "yes", "0.0"])
def test_project_artefact_flags_are_0_or_1(tmp_path, value):
    folder = project(tmp_path / "set")

    def change(rows):
        rows[1]["ink"] = value

    rewrite_labels(folder, change)
    with pytest.raises(FolderError, match=r"labels\.csv line 3: column 'ink' should be '0' or '1'"):
        read_folder(folder)


def test_project_flags_with_spaces_are_read_and_short_rows_refused(tmp_path):
    folder = project(tmp_path / "set")
    ink = read_folder(folder).flags["ink"]

    def pad(rows):
        for row in rows:
            row["ink"] = f" {row['ink']} "

    rewrite_labels(folder, pad)
    np.testing.assert_array_equal(read_folder(folder).flags["ink"], ink)  # " 0" is absent
    lines = (folder / "labels.csv").read_text().splitlines()
    lines[2] = lines[2].rsplit(",", 2)[0]  # the last two flags cut off
    (folder / "labels.csv").write_text("\n".join(lines) + "\n")
    short = r"line 3: column '\w+' should be .* \(it is nothing: the row is short\)"
    with pytest.raises(FolderError, match=short):
        read_folder(folder)


@pytest.mark.parametrize("value", ["no", "false", "nan", "", "0.5"])
def test_isic_artefact_flags_are_0_or_1(tmp_path, value):
    root = isic_folder(tmp_path, numbers=(0, 1))
    (root / "labels.csv").write_text(f"image,label,ink\nISIC_0000000,0,1\nISIC_0000001,1,{value}\n")
    with pytest.raises(FolderError, match=r"labels\.csv line 3: column 'ink' should be '0' or '1'"):
        read_folder(root)
    (root / "labels.csv").write_text("image,label,ink\nISIC_0000000,0, 1\nISIC_0000001,1,0\n")
    assert read_folder(root).flags["ink"].tolist() == [True, False]
    (root / "labels.csv").write_text("image,label,ink\nISIC_0000000,0,1\nISIC_0000001,1\n")
    short = r"line 3: column 'ink' should be .* \(it is nothing: the row is short\)"
    with pytest.raises(FolderError, match=short):
        read_folder(root)


@pytest.mark.parametrize("name", ["ISIC_00000011", "ISIC_00000011.jpg", "XISIC_0000001"])
def test_isic_ids_of_other_lengths_are_not_cut_short(tmp_path, name):
    root = isic_folder(tmp_path, numbers=(0, 1))
    (root / "labels.csv").write_text(f"image,label\nISIC_0000000,0\n{name},1\n")
    with pytest.raises(FolderError, match=rf"line 3: image '{name}' has no ISIC_<7 digits> id"):
        read_folder(root)
    (root / "labels.csv").write_text("image,label\nISIC_0000000.jpg,0\nISIC_0000001.png,1\n")
    assert read_folder(root).ids == ["ISIC_0000000", "ISIC_0000001"]


@pytest.mark.parametrize("layout", ["project", "isic", "coarse"])
def test_masks_saved_as_jpeg_under_png_are_refused(tmp_path, layout):
    from shortcut_unlearning.data.folders import coarse_file, read_coarse

    if layout == "isic":
        root = isic_folder(tmp_path, numbers=(0, 1))
        (root / "labels.csv").write_text("image,label\nISIC_0000000,0\nISIC_0000001,1\n")
        mask = root / "ISIC2018_Task1_Training_GroundTruth/ISIC_0000001_segmentation.png"
    else:
        root = project(tmp_path / "set")
        mask = root / "masks" / f"{first_id(root)}.png"
    if layout == "coarse":
        (root / "coarse").mkdir()
        mask = root / "coarse" / f"{first_id(root)}.png"
        Image.fromarray(np.zeros((32, 32), np.uint8)).save(mask, format="PNG")
        assert read_coarse(coarse_file(root, first_id(root)), "x", 0, (32, 32)).shape == (32, 32)
    Image.open(mask).convert("L").save(mask, format="JPEG", quality=75)
    with pytest.raises(FolderError, match=rf"{mask.name} is stored as JPEG, not PNG"):
        if layout == "coarse":
            read_coarse(coarse_file(root, first_id(root)), "x", 0, (32, 32))
        else:
            read_folder(root)


def plugin_masks(values=(1, 1), ids=("a", "b"), sizes=((16, 16), (16, 16)), dtype=np.int32):
    """Masks as the plugin's labels layer holds them, with the layer's metadata."""
    masks = np.zeros((len(values), 16, 16), dtype)
    for i, value in enumerate(values):
        masks[i, 4:12, 4:12] = value
    return masks, {"metadata": {"ids": list(ids), "original_sizes": [list(s) for s in sizes]}}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ({"values": (1, 300)}, r"the mask of 'b' holds the values \[0, 300\]"),
        ({"values": (1, 256)}, r"the mask of 'b' holds the values \[0, 256\]"),
        ({"values": (1, -1)}, r"the mask of 'b' holds the values \[-1, 0\]"),
        ({"ids": ("a", "a")}, r"images 0 and 1 both have the id 'a'"),
        ({"ids": ("a", "b", "c")}, r"got 2 masks but 3 ids"),
        ({"sizes": ((16, 16),)}, r"got 2 masks but 1 original sizes"),
        ({"sizes": ((16, 16), (0, 16))}, r"original sizes \[0, 16\] is not a \(height, width\)"),
        ({"sizes": ((16, 16), (16.5, 16))}, r"is not a \(height, width\) pair"),
        ({"ids": ("ISIC_0000001", "ISIC_0000001")}, r"both have the id 'ISIC_0000001'"),
        ({"ids": ("ISIC_0000001", "ISIC_0000002"), "values": (1, 300)}, r"values \[0, 300\]"),
    ],
)
def test_the_plugin_writer_checks_everything_before_writing_anything(tmp_path, case, message):
    masks, meta = plugin_masks(**case)
    with pytest.raises(FolderError, match=message):
        _io.write_masks(str(tmp_path / "out"), masks, meta)
    assert not (tmp_path / "out").exists()


def test_the_plugin_writer_checks_extents_before_writing_anything(tmp_path):
    masks, meta = plugin_masks()
    meta["metadata"]["extents"] = [[16, 16], [16, 20]]  # wider than the 16 px canvas
    with pytest.raises(FolderError, match=r"exceeds the \(16, 16\) canvas"):
        _io.write_masks(str(tmp_path / "out"), masks, meta)
    meta["metadata"]["extents"] = [[16, 16]]
    with pytest.raises(FolderError, match=r"got 2 masks but 1 extents"):
        _io.write_masks(str(tmp_path / "out"), masks, meta)
    assert not (tmp_path / "out").exists()
    meta["metadata"]["extents"] = [[16, 16], [8, 8]]
    written = _io.write_masks(str(tmp_path / "out"), masks, meta)
    assert [Image.open(p).size for p in written] == [(16, 16), (16, 16)]
