"""Hostile and careless input through the public entry points: the CLI, the folder reader, the
plugin's mask writer and Model.load. docs/reliability.md lists every case and its test."""

from __future__ import annotations

import csv
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
