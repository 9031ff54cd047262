"""Widget tests through the real plugin path, under Xvfb (pytest-xvfb)."""

import json

import numpy as np
import pytest

from shortcut_unlearning.data.folders import read_folder
from shortcut_unlearning.model import Model, ModelConfig
from shortcut_unlearning.napari import _io
from shortcut_unlearning.napari._widget import _text_overlay
from shortcut_unlearning.resources import SAMPLE_SET, sample_data_dir

PLUGIN, WIDGET = "shortcut-unlearning", "Shortcut Unlearning"


@pytest.fixture(autouse=True)
def private_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SHORTCUT_UNLEARNING_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A small untrained model at the sample's size; fast enough for widget tests."""
    path = tmp_path_factory.mktemp("model") / "small"
    Model(ModelConfig(decoder_channels=(16, 16, 8, 8, 8), image_size=128)).save(path)
    return str(path.with_suffix(".safetensors"))


def open_widget(viewer, model_path):
    viewer.open_sample(PLUGIN, "dermoscopy")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.model_path.value = model_path
    widget.image.value, widget.coarse.value = "dermoscopy", "coarse masks"
    return widget


def refine_to_fine(viewer, widget, images=(0, 1, 2)):
    """Erase, through the Labels editing API, what the coarse masks wrongly call lesion."""
    fine = viewer.layers["reference masks"].data
    layer = widget.refined_layer
    for i in images:
        wrong = np.nonzero((layer.data[i] != 0) & (fine[i] == 0))
        layer.data_setitem((np.full(len(wrong[0]), i), *wrong), 0)
    settle()


def settle():
    """Let queued Qt events (the widget's deferred overlay update) run."""
    from qtpy.QtWidgets import QApplication

    for _ in range(3):
        QApplication.processEvents()


def wait_for_run(qtbot, widget, timeout=120_000):
    qtbot.waitUntil(lambda: widget.worker is None, timeout=timeout)


def test_sample_opens_as_one_stack_with_coarse_masks(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "dermoscopy")
    images, coarse = viewer.layers["dermoscopy"], viewer.layers["coarse masks"]
    assert images.data.shape == (12, 128, 128, 3) and images.rgb
    assert coarse.data.shape == (12, 128, 128)
    assert ((coarse.data != 0) >= (viewer.layers["reference masks"].data != 0)).all()


def test_full_workflow(make_napari_viewer, qtbot, small_model, tmp_path):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, small_model)
    widget.start_refinement()
    assert widget.refined_layer.mode == "erase"
    refine_to_fine(viewer, widget)
    coarse, refined = widget.refinement.coarse, widget.refined_layer.data
    expected = (coarse != 0) & (refined == 0)
    np.testing.assert_array_equal(viewer.layers["forget set"].data.astype(bool), expected)
    assert expected[:3].any() and not expected[3:].any()
    assert "3 of 12 images refined" in widget.stats.value
    widget.steps.value = 3
    # S for S_global from a painted artefact layer (here simply a copy of the forget set).
    viewer.add_labels((widget.refinement.forget).astype(np.uint8), name="artefacts")
    widget.artefacts.value = "artefacts"
    start = widget.current_model()
    widget.start_unlearning()
    wait_for_run(qtbot, widget)
    for name in (
        "saliency before",
        "saliency after",
        "prediction before",
        "prediction after",
        "images (after)",
    ):
        assert name in viewer.layers
    before = viewer.layers["saliency before"].data
    assert before.shape == (12, 128, 128) and np.isfinite(before).all()
    s_before = widget.outcome.before.s_global["value"]
    assert np.isfinite(s_before) and np.isfinite(widget.outcome.after.s_global["value"])
    assert "S_global" in _text_overlay(viewer).text and "S_global before" in widget.result.text()
    widget.accept_model()
    assert widget.current_model() is widget.outcome.result.model
    widget.revert_model()
    assert widget.current_model() is start
    out = widget.export_run(tmp_path / "exports")
    assert (out / "model.safetensors").is_file() and (out / "before_after.png").is_file()
    report = json.loads((out / "metrics.json").read_text())
    assert report["refinement"]["refined_images"] == 3
    assert len(list((out / "refined_masks").glob("*_segmentation.png"))) == 12


def test_cancel_keeps_the_old_model(make_napari_viewer, qtbot, small_model):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, small_model)
    widget.start_refinement()
    refine_to_fine(viewer, widget, images=(0,))
    widget.steps.value = 10_000
    start = widget.current_model()
    widget.start_unlearning()
    qtbot.waitUntil(lambda: len(widget._curve["step"]) >= 1, timeout=60_000)
    widget.cancel_run()
    wait_for_run(qtbot, widget)
    assert len(widget._curve["step"]) < 10_000
    assert widget.current_model() is start and widget.outcome is None
    assert "saliency after" not in viewer.layers


def test_pixels_added_outside_the_coarse_mask_are_flagged_and_clipped(
    make_napari_viewer, small_model
):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, small_model)
    widget.start_refinement()
    outside = np.argwhere(widget.refinement.coarse[0] == 0)[:5]
    widget.refined_layer.data_setitem((np.zeros(5, int), outside[:, 0], outside[:, 1]), 2)
    settle()
    assert "5 pixels painted outside the coarse masks" in widget.stats.value
    assert not widget.clip.native.isHidden()
    widget.clip_added()
    assert widget.refinement.stats()["added_pixels"] == 0 and widget.clip.native.isHidden()


def test_autosave_survives_closing_the_viewer(make_napari_viewer, small_model):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, small_model)
    widget.start_refinement()
    refine_to_fine(viewer, widget, images=(1,))
    widget.autosave()
    edited = widget.refined_layer.data.copy()
    viewer.close()
    again = make_napari_viewer()
    widget = open_widget(again, small_model)
    widget.start_refinement()
    np.testing.assert_array_equal(widget.refined_layer.data, edited)


def test_parameters_persist_and_reset(make_napari_viewer, small_model):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, small_model)
    widget.method.value = "model-clipping"
    widget.seed.value = 7
    assert "certified by model-clipping" in widget.certificate.value
    assert not widget.epsilon.native.isHidden()
    viewer2 = make_napari_viewer()
    _, second = viewer2.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    assert second.method.value == "model-clipping" and second.seed.value == 7
    second.defaults.changed.emit(True)
    assert second.method.value == "neggrad-seg" and second.seed.value == 0


def test_reader_and_writer_round_trip(make_napari_viewer, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(sample_data_dir() / SAMPLE_SET), plugin=PLUGIN)
    assert viewer.layers["coarse masks"].data.shape[1:] == (128, 128)
    assert _io.get_reader(str(tmp_path)) is None  # not a dataset folder: napari tries others
    data = read_folder(sample_data_dir() / SAMPLE_SET).select(np.arange(3))
    meta = {
        "metadata": {
            "ids": ["ISIC_0000001", "ISIC_0000002", "ISIC_0000003"],
            "original_sizes": [[60, 80], [128, 128], [90, 70]],
        }
    }
    paths = _io.write_masks(str(tmp_path / "out"), data.masks, meta)
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        f"ISIC_000000{i}_segmentation.png" for i in (1, 2, 3)
    ]
    from PIL import Image

    assert Image.open(paths[0]).size == (80, 60)
    with pytest.raises(ValueError, match="already exists"):
        _io.write_masks(str(tmp_path / "out"), data.masks, meta)


def test_responsiveness_measurements_run(make_napari_viewer):
    from shortcut_unlearning.napari import _bench

    overlay = _bench.overlay_update(images=2, size=64, edits=3, viewer=make_napari_viewer())
    assert overlay["edits"] == 3 and overlay["max_ms"] >= overlay["median_ms"] > 0
    stall = _bench.event_loop_stall(steps=2, refine=1, viewer=make_napari_viewer())
    assert stall["beats"] > 0 and stall["max_stall_ms"] >= stall["max_stall_while_running_ms"] >= 0
