"""Hostile and careless input through the public entry points, beside test_reliability.py:
the command line (`main([...])`) and the readers of every file the tool reads (Model.load and
read_config, read_encoder_info, read_folder, load_settings, Refinement.restore, bench merge).
The last part feeds random JSON values, nesting and CSV cells to every reader: each returns a
valid record or raises the tool's own error. docs/reliability.md lists every case and its test.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_reliability import (
    broken_copy,
    fast_run,
    first_id,
    isic_folder,
    project,
    rewrite_labels,
    with_keys,
)

from shortcut_unlearning import files
from shortcut_unlearning.cli import main
from shortcut_unlearning.data.folders import FolderError, read_folder, write_project
from shortcut_unlearning.data.synthetic import generate
from shortcut_unlearning.model import Model, ModelConfig, read_config, read_encoder_info
from shortcut_unlearning.schemas import MAX_DEPTH, InputError

DEEP = 100_000  # nesting that overflows Python's parser


def one_error_line(capsys) -> str:
    """The command's stderr, checked to be one line starting 'error: '."""
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


# ---------------------------------------------------------------------------------------------
# Checkpoint sidecars: one schema, every violation named


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoint")
    Model(TINY).save(folder / "model")
    return folder / "model"


TRAINING = {
    "epochs": 2,
    "epochs_run": 2,
    "best_epoch": 1,
    "val_dice": 0.7,
    "val_class_dice": 0.6,
    "val_images": 4,
    "val_source": "held out",
    "stopped_early": False,
    "min_val_dice": 0.5,
    "converged": True,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (with_keys(classes=3.0), r"classes should be a whole number \(it is 3\.0\)"),
        (with_keys(seed=True), r"seed should be a whole number \(it is True\)"),
        (with_keys(seed=2**70), r"seed should be less than or equal to 4294967295"),
        (with_keys(decoder_channels=[True, 8, 8, 8, 8]), r"decoder_channels\.0 should be a whole"),
        (with_keys(decoder_channels=[10**9] * 5), r"decoder_channels\.0 should be less than"),
        (with_keys(image_size=30000), r"image_size should be less than or equal to 4096"),
        (with_keys(encoder="tu-doesnotexist"), r"encoder: unknown encoder 'tu-doesnotexist'"),
        (with_keys(provenance={"scope": "everything"}), r"provenance\.scope should be 'decoder'"),
        (with_keys(provenance={"encoder": "random"}), r"provenance\.encoder should be a JSON obj"),
        (
            with_keys(provenance={"training": {**TRAINING, "converged": "no"}}),
            r"provenance\.training\.converged should be true or false",
        ),
        (
            with_keys(provenance={"training": {"converged": False}}),
            r"provenance\.training\.epochs is missing",
        ),
        (
            with_keys(provenance={"training": {**TRAINING, "val_dice": float("nan")}}),
            r"provenance\.training\.val_dice should be a finite number",
        ),
    ],
)
def test_sidecar_values_of_another_type_or_range_are_named(checkpoint, tmp_path, change, message):
    """Each used to load (a bool seed, classes 3.0, a tu- encoder timm lacks) and fail later
    with a traceback, some only after unlearning (the training record, the encoder record)."""
    path = broken_copy(checkpoint, tmp_path, change_config=change)
    with pytest.raises(InputError, match=rf"checkpoint {path.with_suffix('.json')}: {message}"):
        Model.load(path)


def test_a_sidecar_that_breaks_the_schema_stops_run_before_any_work(checkpoint, tmp_path, capsys):
    path = broken_copy(checkpoint, tmp_path, change_config=with_keys(provenance="coarse"))
    assert main(fast_run(tmp_path / "run", "--model", str(path))) == 2
    assert "provenance should be a JSON object (it is 'coarse')" in one_error_line(capsys)
    assert not (tmp_path / "run").exists()


def test_a_sidecar_nested_deep_is_refused_before_parsing(checkpoint, tmp_path, capsys):
    path = broken_copy(checkpoint, tmp_path)
    text = path.with_suffix(".json").read_text()
    deep = text.replace('"provenance": {', '"provenance": {"x": ' + "[" * DEEP + "]" * DEEP + ",")
    path.with_suffix(".json").write_text(deep)
    with pytest.raises(InputError, match=rf"nests {DEEP + 2} levels deep.*at most {MAX_DEPTH}"):
        read_config(path)
    assert main(fast_run(tmp_path / "run", "--model", str(path))) == 2
    assert "levels deep" in one_error_line(capsys)


def test_an_encoder_sidecar_is_checked_against_its_schema(checkpoint, tmp_path):
    from shortcut_unlearning.model import ENCODER_FORMAT

    weights = broken_copy(checkpoint, tmp_path)
    info = {
        "format": ENCODER_FORMAT,
        "version": 1,
        "encoder": "resnet18",
        "storage": "float16",
        "provenance": {"saw_coarse_labels": "no"},
    }
    weights.with_suffix(".json").write_text(json.dumps(info))
    message = r"provenance\.saw_coarse_labels should be true or false \(it is 'no'\)"
    with pytest.raises(InputError, match=message):
        read_encoder_info(weights)
    weights.with_suffix(".json").write_text(json.dumps({**info, "storage": 16}))
    with pytest.raises(InputError, match=r"storage should be 'float16' or 'float32'"):
        read_encoder_info(weights)


# ---------------------------------------------------------------------------------------------
# The command line: one line and exit 2 for what a user can fix


@pytest.mark.parametrize("command", ["run", "train", "pretrain-encoder"])
def test_an_encoder_timm_does_not_have_is_refused_when_parsed(tmp_path, capsys, command):
    """`tu-` names were accepted unchecked and failed in timm with a traceback."""
    args = [command, "--encoder", "tu-doesnotexist", "--out", str(tmp_path / "out")]
    assert main(args) == 2
    assert "unknown encoder 'tu-doesnotexist'" in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_an_encoder_timm_has_is_accepted():
    from shortcut_unlearning.model import check_encoder

    assert check_encoder("tu-resnet18") == "tu-resnet18"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--image-size", "30000"], "--image-size: must be a whole number from 32 to"),
        (["synth", "--size", "60000"], "--size: must be a whole number from 16 to 4096"),
        (["pretrain-encoder", "--image-size", "8192"], "--image-size: must be a whole number"),
        (["train", "--seed", str(2**70)], "--seed: must be a whole number from 0 to 4294967295"),
        (["synth", "--seed", str(2**64)], "(seeds are 32-bit)"),
        (["bench", "seeds", "--seeds", f"0,{2**40}"], "--seeds: must be a whole number from 0"),
    ],
)
def test_sizes_and_seeds_beyond_their_limits_are_refused(tmp_path, capsys, args, message):
    """--image-size 30000 and synth --size 60000 ran out of memory (MemoryError), a huge seed
    overflowed in torch ("Overflow when unpacking long long")."""
    assert main([*args, "--out", str(tmp_path / "out")]) == 2
    assert message in one_error_line(capsys)
    assert list(tmp_path.iterdir()) == []


def test_running_out_of_memory_is_one_line(tmp_path, capsys, monkeypatch):
    from shortcut_unlearning.data import synthetic

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(synthetic, "generate", no_memory)
    assert main(["synth", "--out", str(tmp_path / "set"), "--n", "8"]) == 2
    assert "out of memory; use a smaller --image-size" in one_error_line(capsys)


def test_data_without_training_images_is_refused(tmp_path, capsys):
    """Every split `test` used to end in numpy's "a must be a positive integer ..."."""
    folder = project(tmp_path / "set")

    def all_test(rows):
        for row in rows:
            row["split"] = "test"

    rewrite_labels(folder, all_test)
    for command in (["run"], ["train"]):
        args = [*command, "--data", str(folder), "--image-size", "32", "--epochs", "1"]
        assert main([*args, "--out", str(tmp_path / "out")]) == 2
        assert "has no training images: all 8 are in the test split" in one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def summary_folder(root: Path, content: str) -> Path:
    root.mkdir(parents=True)
    (root / "summary.json").write_text(content)
    return root


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{}", r"summary\.json: seeds is missing; methods is missing"),
        ("[1, 2]", r"summary\.json: the whole should be a JSON object describing a BenchSummary"),
        ("{broken", r"summary\.json is not valid JSON \(Expecting property name"),
        ("[" * DEEP + "]" * DEEP, r"summary\.json nests 100000 levels deep"),
        (
            '{"seeds": [0], "methods": ["m"], "config": {}, "runs": {"coarse": [{"dice": 1}]}}',
            r"runs\.coarse rows should each hold the measures .* \(they lack \[",
        ),
        (
            '{"seeds": [0, 1], "methods": [], "config": {}, "runs": {"coarse": []}}',
            r"runs\.coarse holds 0 rows for 2 seeds",
        ),
    ],
)
def test_bench_merge_names_the_summary_that_is_not_one(tmp_path, capsys, content, message):
    """{} and a list used to end in KeyError and TypeError tracebacks; broken JSON in a
    message that named no file."""
    broken = summary_folder(tmp_path / "a", content)
    args = ["bench", "merge", "--runs", str(broken), "--runs", str(broken)]
    assert main([*args, "--out", str(tmp_path / "merged")]) == 2
    err = one_error_line(capsys)
    assert str(broken / "summary.json") in err
    import re

    assert re.search(message, err), err
    assert not (tmp_path / "merged").exists()


def test_an_unexpected_error_is_one_line_and_a_log_with_the_traceback(
    tmp_path, capsys, monkeypatch
):
    from shortcut_unlearning import experiment

    def bug(config):
        raise RuntimeError("a bug\nover two lines")

    monkeypatch.setenv("SHORTCUT_UNLEARNING_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(experiment, "run", bug)
    assert main(fast_run(tmp_path / "run")) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: unexpected RuntimeError: a bug over")
    (log,) = (tmp_path / "home" / "log").iterdir()
    assert str(log) in err
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in bug" in text
    assert text.startswith("shortcut-unlearning run --data synthetic")


# ---------------------------------------------------------------------------------------------
# Full and read-only disks: one line that says what was kept


@pytest.fixture
def failing_disk(monkeypatch):
    """Call failing_disk(errno) and every file written fails after ten bytes with that error
    (28: the disk is full; 30: the file system is read-only)."""
    real_fdopen = os.fdopen

    def fail_with(number: int, text: str = "") -> None:
        class Failing:
            def __init__(self, handle, mode):
                self.file = real_fdopen(handle, mode)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

            def write(self, data):
                self.file.write(data[:10])
                raise OSError(number, text or os.strerror(number))

        monkeypatch.setattr(files.os, "fdopen", Failing)

    return fail_with


@pytest.mark.parametrize(("number", "words"), [(28, "the disk is full"), (30, "read-only")])
def test_synth_on_a_full_or_read_only_disk(tmp_path, capsys, failing_disk, number, words):
    failing_disk(number)
    assert main(["synth", "--out", str(tmp_path / "set"), "--n", "8", "--size", "32"]) == 2
    err = one_error_line(capsys)
    assert words in err and "free some space" in err
    assert list(tmp_path.iterdir()) == []  # no staging folder left behind


def test_a_run_on_a_disk_that_fills_up_keeps_its_trained_model(
    tmp_path, capsys, failing_disk, monkeypatch
):
    """A full disk at the end of a run used to be a traceback; the line now says which
    unfinished run folder holds the trained model."""
    from shortcut_unlearning import experiment

    real_write_run = experiment.write_run

    def fills_up(*args, **kwargs):
        failing_disk(28)
        return real_write_run(*args, **kwargs)

    monkeypatch.setattr(experiment, "write_run", fills_up)
    assert main(fast_run(tmp_path / "run")) == 2
    err = one_error_line(capsys)
    (stage,) = tmp_path.iterdir()
    assert f"kept: the unfinished run in {stage} (it holds coarse_model.json" in err
    assert "the disk is full" in err and "--out is empty" in err
    assert (stage / "coarse_model.safetensors").is_file() and not (tmp_path / "run").exists()


def test_train_on_a_full_disk_keeps_the_earlier_checkpoint(
    tmp_path, capsys, failing_disk, monkeypatch
):
    from shortcut_unlearning import outputs

    Model(TINY).save(tmp_path / "model")
    before = (tmp_path / "model.safetensors").read_bytes()
    real_save = outputs.save_checkpoint

    def fills_up(*args):
        failing_disk(28)
        return real_save(*args)

    monkeypatch.setattr(outputs, "save_checkpoint", fills_up)
    args = ["train", "--data", "synthetic", "--synth-n", "16", "--image-size", "48"]
    assert main([*args, "--epochs", "1", "--overwrite", "--out", str(tmp_path / "model")]) == 2
    err = one_error_line(capsys)
    assert "model.safetensors: the disk is full" in err and "keeps its earlier content" in err
    assert (tmp_path / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]


def test_train_into_a_read_only_file_system_says_so(tmp_path, capsys, monkeypatch):
    """It said "permission denied" (the test runs as root, so the file system is simulated)."""

    class ReadOnly:
        f_flag = os.ST_RDONLY

    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    monkeypatch.setattr(os, "statvfs", lambda path: ReadOnly)
    assert main(["train", "--out", str(tmp_path / "model")]) == 2
    assert "(the file system is read-only); choose another --out" in one_error_line(capsys)


# ---------------------------------------------------------------------------------------------
# Dataset folders: dataset.json, labels CSVs, ids, masks


def test_labels_without_a_column_dataset_json_names_spurious(tmp_path, capsys):
    """Used to read, then fail in the run's evaluation with KeyError: 'ink'."""
    folder = project(tmp_path / "set")

    def drop_ink(rows):
        for row in rows:
            del row["ink"]

    path = folder / "labels.csv"
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    drop_ink(rows)
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    message = r"labels\.csv has no column for 'ink', which .*dataset\.json names as spurious"
    with pytest.raises(FolderError, match=message):
        read_folder(folder)
    assert main(["run", "--data", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert "has no column for 'ink'" in one_error_line(capsys)


def test_dataset_json_nested_deep_or_of_the_wrong_types(tmp_path):
    folder = project(tmp_path / "set")
    info = json.loads((folder / "dataset.json").read_text())
    (folder / "dataset.json").write_text(json.dumps({**info, "x": 1})[:-1] + ', "y": ' + "[" * DEEP)
    with pytest.raises(FolderError, match=r"dataset\.json nests 100001 levels deep"):
        read_folder(folder)
    (folder / "dataset.json").write_text(json.dumps({**info, "spurious": "ink"}))
    with pytest.raises(FolderError, match=r"dataset\.json: spurious should be a JSON list"):
        read_folder(folder)
    (folder / "dataset.json").write_text(json.dumps({**info, "artefact_masks": "yes"}))
    with pytest.raises(FolderError, match=r"artefact_masks should be true or false"):
        read_folder(folder)


@pytest.mark.parametrize(
    ("image_id", "message"),
    [
        ("x" * 300, r"is 300 bytes long, but ids are at most 200"),
        ("a\nb", r"control characters such as a newline"),
        ("tab\there", r"control characters"),
    ],
)
def test_ids_too_long_or_with_control_characters(tmp_path, capsys, image_id, message):
    """A 300-character id failed with 'File name too long' in a traceback; a newline passed."""
    folder = project(tmp_path / "set")

    def rename(rows):
        rows[0]["id"] = image_id

    rewrite_labels(folder, rename)
    with pytest.raises(FolderError, match=message):
        read_folder(folder)
    data = generate(n=8, size=32, seed=1)
    data.ids[0] = image_id
    with pytest.raises(FolderError, match=message):
        write_project(data, tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    from shortcut_unlearning.napari import _io

    meta = {"metadata": {"ids": [image_id], "original_sizes": [[16, 16]]}}
    with pytest.raises(FolderError, match=message):
        _io.write_masks(str(tmp_path / "masks"), np.ones((1, 16, 16), np.uint8), meta)
    assert not (tmp_path / "masks").exists()


def latin1(path: Path) -> None:
    """Rewrite the CSV at `path` in Latin-1 with an accented id."""
    text = path.read_text(encoding="utf-8")
    path.write_bytes(text.replace("synth_", "café_", 1).encode("latin-1"))


def test_a_latin1_labels_csv_is_named_with_its_encoding(tmp_path, capsys):
    """Used to say "'utf-8' codec can't decode byte 0xe9 in position 40" and name no file."""
    folder = project(tmp_path / "set")
    latin1(folder / "labels.csv")
    message = r"labels\.csv is not UTF-8 text: byte 0xe9 on line 2 .*perhaps Latin-1"
    with pytest.raises(FolderError, match=message):
        read_folder(folder)
    root = isic_folder(tmp_path / "isic")
    (root / "labels.csv").write_bytes("image,label,note\nISIC_0000000,0,naïve\n".encode("latin-1"))
    with pytest.raises(FolderError, match=r"labels\.csv is not UTF-8 text: byte 0xef on line 2"):
        read_folder(root)


def test_a_byte_order_mark_is_read_as_the_isic_reader_reads_it(tmp_path):
    """A project labels.csv with a BOM used to have "no 'id' column"."""
    folder = project(tmp_path / "set")
    path = folder / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert len(read_folder(folder)) == 8


def test_palette_masks_are_read_by_their_stored_indices(tmp_path):
    """A palette PNG was read by its colours' brightness: 'values [0, 76]'."""
    folder = project(tmp_path / "set")
    image_id = first_id(folder)
    path = folder / "masks" / f"{image_id}.png"
    classes = np.asarray(Image.open(path))
    palette = Image.fromarray(classes, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)  # 1 red, 2 green
    palette.save(path)
    data = read_folder(folder)
    assert np.array_equal(data.masks[data.ids.index(image_id)], classes)
    root = isic_folder(tmp_path / "isic", mask_values=(0, 1))
    (root / "labels.csv").write_text("image,label\nISIC_0000000,0\n")
    mask = root / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000000_segmentation.png"
    palette = Image.open(mask).convert("P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(mask)
    with pytest.raises(FolderError, match=r"holds the values \[0, 1\].*multiply it by 255"):
        read_folder(root, labels=root / "labels.csv")


def test_colour_masks_are_refused(tmp_path):
    folder = project(tmp_path / "set")
    path = folder / "masks" / f"{first_id(folder)}.png"
    classes = np.asarray(Image.open(path))
    Image.fromarray(np.stack([classes * 100, classes, classes], -1)).save(path)
    with pytest.raises(FolderError, match=r"stores colours \(such as .*single-channel PNG"):
        read_folder(folder)


# ---------------------------------------------------------------------------------------------
# What is written: strict JSON, modes that follow the umask, no stale staging folders


def strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_json_files_never_hold_bare_nan(tmp_path):
    path = files.write_json(tmp_path / "m.json", {"a": float("nan"), "b": [np.float32("inf")]})
    assert strict_json(path.read_text()) == {"a": None, "b": [None]}


def test_a_run_writes_strict_json_in_folders_the_umask_opens(tmp_path, capsys):
    """Run folders were 0700 and metrics.json held bare NaN."""
    old = os.umask(0o022)
    try:
        assert main(fast_run(tmp_path / "run")) == 0
    finally:
        os.umask(old)
    out = tmp_path / "run"
    strict_json((out / "metrics.json").read_text())
    assert out.stat().st_mode & 0o777 == 0o755
    for path in out.iterdir():
        assert path.stat().st_mode & 0o777 == 0o644, path


def test_stale_staging_folders_are_cleaned_or_named(tmp_path, capsys):
    """Staging folders of killed runs piled up beside --out."""
    empty, holding = tmp_path / "set.incomplete-aaaa", tmp_path / "set.incomplete-bbbb"
    recent = tmp_path / "set.incomplete-cccc"
    for stage in (empty, holding, recent):
        stage.mkdir()
        (stage / files.INCOMPLETE).write_text("")
        files.write_json(stage / files.MARKER, {"format": files.FORMAT, "folder": "dataset"})
    (holding / "coarse_model.safetensors").write_bytes(b"weights")
    day_ago = time.time() - files.STALE_SECONDS - 60
    for stage in (empty, holding):
        os.utime(stage, (day_ago, day_ago))
    with pytest.warns(UserWarning, match=rf"older than a day hold a trained model: {holding}"):
        assert main(["synth", "--out", str(tmp_path / "set"), "--n", "8", "--size", "32"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["set", holding.name, recent.name])


# ---------------------------------------------------------------------------------------------
# The plugin's settings and autosave


def test_settings_that_break_their_schema_fall_back_to_defaults(tmp_path, monkeypatch):
    from shortcut_unlearning.settings import OperatorSettings, load_settings, settings_file

    monkeypatch.setenv("SHORTCUT_UNLEARNING_HOME", str(tmp_path))
    settings_file().parent.mkdir(parents=True)
    saved = {"steps": 0, "method": "magic", "seed": 7, "delta": 1.5, "device": "tpu"}
    settings_file().write_text(json.dumps(saved))
    with pytest.warns(UserWarning, match=r"widget\.json: .*method 'magic' is not one of"):
        loaded = load_settings()
    assert loaded == OperatorSettings(seed=7)
    settings_file().write_text("[" * DEEP)
    with pytest.warns(UserWarning, match=r"nests 100000 levels deep"):
        assert load_settings() == OperatorSettings()


def test_an_autosave_claiming_a_huge_array_is_kept_aside(tmp_path):
    """np.load believed the header and tried to allocate 931 GiB (MemoryError)."""
    from shortcut_unlearning.refinement import Refinement

    coarse = np.zeros((2, 16, 16), np.uint8)
    coarse[:, 4:12, 4:12] = 1
    refinement = Refinement(coarse)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((16, 16), np.uint8))
    header = buffer.getvalue().replace(b"(16, 16)", b"(999999, 999999)", 1)
    (tmp_path / refinement.key).mkdir()
    (tmp_path / refinement.key / "0.npy").write_bytes(header)
    note = refinement.restore(tmp_path)
    assert "0.npy (it holds uint8 (999999, 999999), not a (16, 16) integer mask" in note
    assert (tmp_path / refinement.key / "0.npy.damaged-1").is_file()


# ---------------------------------------------------------------------------------------------
# Properties: every reader returns a valid record or raises the tool's own error

QUICK = settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
NESTING = st.integers(1, 3000).map(lambda depth: "[" * depth + "]" * depth)


def json_text(value) -> str:
    return json.dumps(value)


def mutated(base: dict):
    """`base` with one key set to a random JSON value, or dropped, or `base` replaced."""
    keys = st.sampled_from(sorted(base))
    return (
        st.one_of(
            st.tuples(keys, JSON).map(lambda kv: {**base, kv[0]: kv[1]}),
            keys.map(lambda key: {k: v for k, v in base.items() if k != key}),
            JSON,
        ).map(json_text)
        | NESTING
    )


@pytest.fixture(scope="module")
def sidecar(checkpoint):
    return json.loads(checkpoint.with_suffix(".json").read_text())


@QUICK
@given(data=st.data())
def test_any_sidecar_gives_a_config_or_the_tools_error(checkpoint, tmp_path, sidecar, data):
    path = broken_copy(checkpoint, tmp_path)
    provenance = st.tuples(st.sampled_from(["scope", "training", "encoder", "seed"]), JSON).map(
        lambda kv: {**sidecar, "provenance": {kv[0]: kv[1]}}
    )
    text = data.draw(mutated(sidecar) | provenance.map(json_text))
    path.with_suffix(".json").write_text(text)
    try:
        config = read_config(path)
    except InputError:
        return
    assert isinstance(config, ModelConfig) and isinstance(config.provenance, dict)
    assert all(isinstance(v, int) and not isinstance(v, bool) for v in config.decoder_channels)
    assert all(math.isfinite(v) for v in (*config.mean, *config.std))


@QUICK
@given(data=st.data())
def test_any_encoder_sidecar_gives_a_record_or_the_tools_error(checkpoint, tmp_path, data):
    from shortcut_unlearning.model import ENCODER_FORMAT

    base = {
        "format": ENCODER_FORMAT,
        "version": 1,
        "encoder": "resnet18",
        "storage": "float16",
        "provenance": {"saw_coarse_labels": False},
    }
    path = broken_copy(checkpoint, tmp_path)
    path.with_suffix(".json").write_text(data.draw(mutated(base)))
    try:
        info = read_encoder_info(path)
    except InputError:
        return
    assert isinstance(info.provenance["saw_coarse_labels"], bool)


@pytest.fixture(scope="module")
def project_template(tmp_path_factory):
    return project(tmp_path_factory.mktemp("template") / "set")


CELL = st.text(st.characters(codec="utf-8"), max_size=6) | st.sampled_from(["0", "1", " 1", ""])


@QUICK
@given(data=st.data())
def test_any_project_folder_gives_a_listing_or_the_tools_error(project_template, tmp_path, data):
    import shutil

    from shortcut_unlearning.data.folders import list_project

    folder = Path(tempfile.mkdtemp(dir=tmp_path)) / "set"
    shutil.copytree(project_template, folder)
    info = json.loads((folder / "dataset.json").read_text())
    if data.draw(st.booleans()):
        (folder / "dataset.json").write_text(data.draw(mutated(info)))
    with open(folder / "labels.csv", newline="") as file:
        table = list(csv.reader(file))
    for _ in range(data.draw(st.integers(0, 3))):
        row = data.draw(st.integers(0, len(table) - 1))
        column = data.draw(st.integers(0, len(table[row])))
        cells = table[row]
        if column == len(cells) or data.draw(st.booleans()):
            table[row] = cells[:column]  # a short row, or a header without some columns
        else:
            cells[column] = data.draw(CELL)
    buffer = io.StringIO()
    csv.writer(buffer).writerows(table)
    (folder / "labels.csv").write_text(buffer.getvalue(), encoding="utf-8", errors="surrogatepass")
    try:
        listing = list_project(folder)
    except FolderError:
        return
    assert all(item.label in (0, 1) for item in listing.items)
    assert all(isinstance(v, bool) for item in listing.items for v in item.flags.values())
    assert set(listing.spurious) <= set(listing.flag_names)


@QUICK
@given(
    header=st.lists(st.sampled_from(["image", "label", "ink", "MEL", "NV", "", "x"]), max_size=6),
    rows=st.lists(st.lists(CELL | st.just("ISIC_0000001"), max_size=6), max_size=4),
    delimiter=st.sampled_from([",", ";", "\t"]),
)
def test_any_isic_labels_csv_gives_labels_or_the_tools_error(tmp_path, header, rows, delimiter):
    from shortcut_unlearning.data.folders import list_isic

    root = isic_folder(tmp_path / "isic", numbers=(1,))
    buffer = io.StringIO()
    csv.writer(buffer, delimiter=delimiter).writerows([header, *rows])
    (root / "labels.csv").write_text(buffer.getvalue(), encoding="utf-8", errors="surrogatepass")
    try:
        listing = list_isic(root, root / "labels.csv")
    except FolderError:
        return
    assert [item.label for item in listing.items] in ([0], [1])


@QUICK
@given(text=(JSON.map(json_text) | NESTING | st.text(max_size=20)))
def test_any_settings_file_gives_valid_settings(tmp_path, monkeypatch, text):
    import warnings

    from shortcut_unlearning.schemas import validate
    from shortcut_unlearning.settings import OperatorSettings, load_settings, settings_file

    monkeypatch.setenv("SHORTCUT_UNLEARNING_HOME", str(tmp_path))
    settings_file().parent.mkdir(parents=True, exist_ok=True)
    settings_file().write_text(text, encoding="utf-8", errors="surrogatepass")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_settings()
    validate(OperatorSettings, asdict(loaded), "loaded", "")  # raises if a value broke it


@pytest.fixture(scope="module")
def summary(tmp_path_factory):
    from shortcut_unlearning.bench.curve import CURVE_KEYS
    from shortcut_unlearning.bench.tables import COLUMNS, PAIRED_KEYS

    row = dict.fromkeys({*COLUMNS, *PAIRED_KEYS, *CURVE_KEYS, "wall_s", "collapsed"}, 0.5)
    return {"seeds": [0], "methods": ["neggrad-seg"], "config": {}, "runs": {"coarse": [row]}}


@QUICK
@given(data=st.data())
def test_any_bench_summary_gives_a_record_or_the_tools_error(tmp_path, summary, data):
    from shortcut_unlearning.bench.merge import BenchSummary, read_summary

    path = tmp_path / "summary.json"
    path.write_text(data.draw(mutated(summary)))
    try:
        record = read_summary(path)
    except InputError:
        return
    assert isinstance(record, BenchSummary)
    assert all(len(rows) == len(record.seeds) for rows in record.runs.values())


@QUICK
@given(content=st.binary(max_size=200))
def test_any_autosave_file_is_restored_or_kept_aside(tmp_path, content):
    from shortcut_unlearning.refinement import Refinement

    refinement = Refinement(np.ones((2, 16, 16), np.uint8))
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    (folder / refinement.key).mkdir(parents=True)
    buffer = io.BytesIO()
    np.save(buffer, np.zeros((16, 16), np.uint8))
    valid = buffer.getvalue()
    cut = len(content) % len(valid)
    (folder / refinement.key / "0.npy").write_bytes(valid[:cut] + content)
    note = refinement.restore(folder)
    assert note is None or "Restored" in note or "Could not read" in note
