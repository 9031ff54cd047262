"""Widget tests in-process through the real plugin path, under Xvfb (pytest-xvfb).

The clinician's whole session in a fresh process is test_user_path.py; these check the
remaining behaviours quickly, clicking the widget's buttons."""

import numpy as np
import pytest
from qtpy.QtCore import Qt

from shortcut_unlearning.data.folders import read_folder
from shortcut_unlearning.model import Model, ModelConfig
from shortcut_unlearning.napari import _io, _layers
from shortcut_unlearning.napari._demo import erase_band
from shortcut_unlearning.napari._texts import CONTEXTS
from shortcut_unlearning.resources import SAMPLE_SET, sample_data_dir

pytestmark = pytest.mark.gui

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


def open_widget(viewer, qtbot, model_path):
    viewer.open_sample(PLUGIN, "dermoscopy")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.model_path.setText(model_path)
    widget.model_path.editingFinished.emit()
    qtbot.waitUntil(lambda: widget.ready and widget.bench.loaded, timeout=60_000)
    return widget


def click(qtbot, button):
    qtbot.mouseClick(button, Qt.MouseButton.LeftButton)


def refine(viewer, qtbot, widget, images=(0, 1, 2)):
    click(qtbot, widget.refine)
    erase_band(viewer, widget, images)
    qtbot.wait(50)


def endings(widget, viewer) -> list:
    """Every run_finished of `widget`: its outcome, whether the dock was busy then and whether
    the saliency layer was on the canvas."""
    seen = []
    widget.run_finished.connect(
        lambda outcome: seen.append((outcome, widget.busy, "saliency" in viewer.layers))
    )
    return seen


def test_sample_opens_as_one_stack_with_coarse_masks(make_napari_viewer):
    viewer = make_napari_viewer()
    viewer.open_sample(PLUGIN, "dermoscopy")
    images, coarse = viewer.layers["dermoscopy"], viewer.layers["coarse masks"]
    assert images.data.shape == (12, 128, 128, 3) and images.rgb
    assert coarse.data.shape == (12, 128, 128)
    assert ((coarse.data != 0) >= (viewer.layers["reference masks"].data != 0)).all()


def test_another_model_turns_the_run_off_until_it_has_loaded(
    make_napari_viewer, qtbot, small_model, tmp_path
):
    widget = open_widget(make_napari_viewer(), qtbot, small_model)
    other = Model.load(small_model)
    other.save(tmp_path / "other")
    widget.model_path.setFocus()
    qtbot.keyClick(widget.model_path, Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
    qtbot.keyClicks(widget.model_path, str(tmp_path / "other.safetensors"))
    qtbot.keyClick(widget.model_path, Qt.Key.Key_Return)  # typed, as a user changes it
    assert not widget.ready and not widget.run.isEnabled()
    qtbot.waitUntil(lambda: widget.ready and widget.bench.loaded, timeout=60_000)
    assert widget.run.isEnabled() and widget.bench.model_path.name == "other.safetensors"


def test_cancel_keeps_the_old_model_and_shows_no_result(make_napari_viewer, qtbot, small_model):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, small_model)
    refine(viewer, qtbot, widget, images=(0,))
    widget.steps.setValue(10_000)
    start = widget.bench.current_model()
    click(qtbot, widget.run)
    qtbot.waitUntil(lambda: len(widget.tracker.curve.steps) >= 1, timeout=60_000)
    with qtbot.waitSignal(widget.run_finished, timeout=60_000) as ended:
        click(qtbot, widget.stop)
    (outcome,) = ended.args
    assert outcome.status == "cancelled" and "previous model is kept" in outcome.message
    assert widget.worker is None and len(widget.tracker.curve.steps) < 10_000
    assert widget.bench.current_model() is start and widget.bench.shown is None
    assert "saliency" not in viewer.layers
    assert not widget.results.export.isEnabled() and not widget.results.accept.isEnabled()
    assert widget.results.current.text().startswith("Current model: small")


def test_accept_makes_the_run_current_and_revert_undoes_it(make_napari_viewer, qtbot, small_model):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, small_model)
    refine(viewer, qtbot, widget)
    widget.steps.setValue(2)
    start = widget.bench.current_model()
    ended = endings(widget, viewer)
    click(qtbot, widget.run)
    qtbot.waitUntil(lambda: bool(ended), timeout=120_000)
    qtbot.wait(300)
    # Once, after the results are drawn.
    [(outcome, busy, drawn)] = ended
    assert outcome.status == "finished" and not busy and drawn
    assert outcome.record is widget.bench.shown is not None
    assert widget.results.scores.rowCount() == 12
    verdict = widget.bench.shown.verdict
    assert widget.results.result.text().splitlines()[1] == verdict.headline
    details = widget.results.details
    assert details.isHidden()  # the numbers are one click away
    click(qtbot, widget.results.details_toggle)
    assert not details.isHidden() and "nats per pixel" in details.text()
    # The eraser stays at hand (the widget holds napari's proxies of the layers: compare names).
    assert viewer.layers.selection.active.name == widget.refined_layer.name
    click(qtbot, widget.results.accept)
    assert widget.bench.current_model() is widget.bench.shown.model
    assert "accepted" in widget.results.current.text() and not widget.results.accept.isEnabled()
    click(qtbot, widget.results.revert)
    assert widget.bench.current_model() is start and "saliency" not in viewer.layers


def halves(viewer, offset: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """The canvas colours at the centre of each pixel of image 0, before half and after."""
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(float)
    transform = viewer.window._qt_viewer.canvas.view.scene.transform
    rows, cols = (a.ravel() for a in np.mgrid[:width, :width])

    def sample(left: int) -> np.ndarray:
        xy = transform.map(np.c_[cols + left + 0.5, rows + 0.5])[:, :2]  # pixel i: [i, i+1]
        x, y = np.round(xy).astype(int).T
        return shot[y, x]

    return sample(0), sample(offset)


def test_both_halves_carry_the_same_overlays_and_each_image_its_own_scale(
    make_napari_viewer, qtbot, small_model
):
    from shortcut_unlearning import display

    viewer = make_napari_viewer(show=True)
    widget = open_widget(viewer, qtbot, small_model)
    refine(viewer, qtbot, widget, images=(0, 1))
    widget.steps.setValue(2)
    click(qtbot, widget.run)
    qtbot.waitUntil(lambda: not widget.busy and widget.bench.shown is not None, timeout=120_000)
    record, width = widget.bench.shown, 128
    offset = _layers.after_offset(width)
    # Saliency and predictions differ between the halves by design: hide them, and what is
    # left (image, refined masks, forget set) must look the same on both.
    for name in ("saliency", "predicted lesion"):
        viewer.layers[name].visible = False
    viewer.dims.set_point(0, 0)
    qtbot.wait(100)
    before, after = halves(viewer, offset, width)
    same = np.abs(before - after).mean()
    mirrors = [viewer.layers[f"{layer.name} (after)"] for layer in widget._overlays()]
    assert len(mirrors) == 2
    for mirror in mirrors:
        mirror.visible = False
    qtbot.wait(100)
    before, after = halves(viewer, offset, width)
    assert same < np.abs(before - after).mean() / 4, "the after half lacks the overlays"
    # The copies follow the overlays: hidden with them, and an edit shows on both halves.
    widget.forget_layer.visible = False
    widget.forget_layer.visible = True
    assert all(mirror.visible for mirror in mirrors)
    widget.forget_layer.visible = False
    assert not viewer.layers["forget set (after)"].visible
    widget.forget_layer.visible = True
    erase_band(viewer, widget, [3])
    viewer.dims.set_point(0, 3)
    qtbot.waitUntil(lambda: widget.bench.refinement.edited()[3], timeout=5_000)
    qtbot.wait(100)
    before, after = halves(viewer, offset, width)
    assert np.abs(before - after).mean() <= 2 * same + 1
    # Saliency in percent of each image's own scale by default; one scale on request.
    saliency = viewer.layers["saliency"]
    assert tuple(saliency.contrast_limits) == (0, 100)
    measured = np.flatnonzero(np.isfinite(record.before.saliency_tops))

    def drawn_tops() -> np.ndarray:  # each half's top as drawn, (2, images)
        panels = saliency.data[measured]
        return np.array([display.saliency_tops(h) for h in np.split(panels, [offset], axis=2)])

    assert np.allclose(drawn_tops(), 100, rtol=0.05)
    caption = viewer.canvas.overlays[_layers.SALIENCY_WORDS]
    assert caption.text == display.SALIENCY_WORDS[True]
    widget.results.shared_scale.setChecked(True)
    tops = drawn_tops()
    assert tops.max() == pytest.approx(100, rel=0.05) and tops.min() < 95
    assert caption.text == display.SALIENCY_WORDS[False]
    # Outlines scale with the image; the colour bar's words go with the saliency layer.
    assert viewer.layers["predicted lesion"].contour == display.outline_width((width, width))
    saliency.visible = True
    assert caption.visible
    saliency.visible = False
    assert not caption.visible


def test_revert_while_results_are_drawn_leaves_none_on_the_canvas(
    make_napari_viewer, qtbot, small_model
):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, small_model)
    refine(viewer, qtbot, widget, images=(0,))
    widget.steps.setValue(2)
    ended = endings(widget, viewer)
    click(qtbot, widget.run)
    qtbot.waitUntil(lambda: widget.bench.shown is not None, timeout=120_000)
    assert widget.results.displaying  # the result layers come one per turn of the event loop
    click(qtbot, widget.results.revert)
    qtbot.wait(1000)  # the rest of the drawing would have run by now
    owned = [layer.name for layer in viewer.layers if layer.metadata.get(_layers.RESULT)]
    assert owned == ["forget set"] and not widget.results.displaying
    assert not _layers.text_overlay(viewer).visible
    # The drawing dropped, the run's end is still announced, once.
    assert [(outcome.status, busy) for outcome, busy, _ in ended] == [("finished", False)]


def test_a_failed_run_ends_with_its_message_and_the_old_model(
    make_napari_viewer, qtbot, small_model, monkeypatch
):
    from shortcut_unlearning.napari import _widget
    from shortcut_unlearning.progress import Progress

    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, small_model)
    refine(viewer, qtbot, widget, images=(0,))
    start = widget.bench.current_model()

    def failing(plan, cancel):
        yield Progress(0, 1, "loading the model")
        raise ValueError("the refined masks went missing")

    monkeypatch.setattr(widget.bench, "execute", failing)
    errors = []
    monkeypatch.setattr(_widget, "show_error", errors.append)
    # The dock's message is the only report: napari does not raise the error again on the
    # UI thread (which would show a second, traceback notification).
    finished = qtbot.waitSignal(widget.run_finished, timeout=60_000)
    with qtbot.capture_exceptions() as raised, finished as ended:
        click(qtbot, widget.run)
    assert raised == []
    (outcome,) = ended.args
    assert outcome.status == "failed" and outcome.record is None
    assert (
        errors
        == [outcome.message]
        == ["the refined masks went missing (the previous model is kept)"]
    )
    assert widget.bench.current_model() is start and not widget.busy and widget.run.isEnabled()


def test_pixels_added_outside_the_coarse_mask_are_flagged_and_clipped(
    make_napari_viewer, qtbot, small_model
):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, small_model)
    click(qtbot, widget.refine)
    outside = np.argwhere(widget.bench.refinement.coarse[0] == 0)[:5]
    widget.refined_layer.data_setitem((np.zeros(5, int), outside[:, 0], outside[:, 1]), 2)
    qtbot.wait(50)
    assert "5 pixels painted outside the coarse masks" in widget.stats.text()
    assert not widget.clip.isHidden()
    click(qtbot, widget.clip)
    assert widget.bench.refinement.stats()["added_pixels"] == 0 and widget.clip.isHidden()


def test_replacing_the_layers_data_keeps_the_forget_set_in_step(
    make_napari_viewer, qtbot, small_model
):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, small_model)
    click(qtbot, widget.refine)
    new = widget.bench.refinement.coarse.copy()
    new[4][viewer.layers["reference masks"].data[4] == 0] = 0
    widget.refined_layer.data = new
    qtbot.wait(50)
    expected = (widget.bench.refinement.coarse != 0) & (new == 0)
    np.testing.assert_array_equal(viewer.layers["forget set"].data.astype(bool), expected)
    assert "1 of 12 images refined" in widget.stats.text()


def test_edits_come_back_in_a_new_viewer(make_napari_viewer, qtbot, small_model):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, small_model)
    refine(viewer, qtbot, widget, images=(1,))
    edited = widget.refined_layer.data.copy()
    viewer.close()
    again = make_napari_viewer()
    widget = open_widget(again, qtbot, small_model)
    click(qtbot, widget.refine)
    np.testing.assert_array_equal(widget.refined_layer.data, edited)


def test_the_canvas_text_is_warmed_up_unseen_and_left_as_it_was(
    make_napari_viewer, qtbot, small_model
):
    from shortcut_unlearning.napari._layers import text_overlay

    viewer = make_napari_viewer()
    overlay = text_overlay(viewer)
    colour = overlay.color
    widget = open_widget(viewer, qtbot, small_model)
    seen = []  # while warming up: visible only in a transparent colour
    overlay.events.text.connect(lambda e: seen.append((overlay.visible, overlay.color[3])))
    qtbot.waitUntil(lambda: not overlay.visible and overlay.text == "", timeout=10_000)
    qtbot.wait(200)
    assert widget.ready and not overlay.visible and overlay.text == ""
    np.testing.assert_array_equal(overlay.color, colour)
    assert all(alpha == 0 for visible, alpha in seen if visible)


def test_parameters_persist_and_reset(make_napari_viewer, qtbot, small_model):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, small_model)
    assert widget.method.currentData() == "relearn"  # the default
    widget.method.setCurrentIndex(widget.method.findData("neggrad-seg"))
    widget.steps.setValue(12)
    widget.method.setCurrentIndex(widget.method.findData("model-clipping"))
    assert widget.steps.value() == 400  # the relearn steps are remembered apart
    widget.steps.setValue(90)
    widget.seed.setValue(7)
    # Two plain sentences; the certificate's numbers one click away.
    assert widget.preview.text().splitlines()[1].startswith("Guaranteed at privacy ε")
    assert "scope" not in widget.preview.text() and widget.preview_details.isHidden()
    click(qtbot, widget.preview_toggle)
    assert "certified by model-clipping" in widget.preview_details.text()
    assert not widget.preview_details.isHidden()
    widget.context.setCurrentIndex(widget.context.findData("blind+consistent"))
    assert widget.bench.parameters.context == "blind+consistent"
    # it inpaints at the forget positions: a certified method refuses it, and the dock says why
    assert "cannot use the context term" in widget.preview.text()
    assert not widget.epsilon.isHidden()
    widget.method.setCurrentIndex(widget.method.findData("neggrad-seg"))
    assert widget.steps.value() == 12
    widget.method.setCurrentIndex(widget.method.findData("model-clipping"))
    assert widget.steps.value() == 90
    assert widget.bench.operator({"context": "off"}).finetune_steps == 90
    viewer2 = make_napari_viewer()
    second = open_widget(viewer2, qtbot, small_model)
    assert second.method.currentData() == "model-clipping" and second.seed.value() == 7
    assert second.context.currentData() == "blind+consistent"
    defaults = [b for b in second.findChildren(type(second.run)) if b.text() == "Restore defaults"]
    click(qtbot, defaults[0])
    assert second.method.currentData() == "relearn" and second.seed.value() == 0
    assert second.context.currentData() == "off" and second.bench.operator().context == "off"
    # Every mode of the core's context term has its words in the dock.
    from shortcut_unlearning.unlearning.context import CONTEXT_TERMS

    assert list(CONTEXTS) == list(CONTEXT_TERMS)


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
    from shortcut_unlearning.bench import widget as _bench

    overlay = _bench.overlay_update(images=2, size=64, edits=3, viewer=make_napari_viewer())
    assert overlay["edits"] == 3 and overlay["max_ms"] >= overlay["median_ms"] > 0
    stall = _bench.event_loop_stall(steps=2, refine=1, runs=2, viewer=make_napari_viewer())
    for run in (1, 2):
        for phase in ("launch", "running", "display"):
            assert stall[f"run{run}_{phase}_max_gap_ms"] >= 0 and stall[f"run{run}_{phase}_s"] > 0


def test_a_folder_opens_with_the_labels_csvs_the_user_picks(
    make_napari_viewer, qtbot, tmp_path, monkeypatch
):
    from qtpy.QtWidgets import QFileDialog
    from test_folders import TRAP_HEADER, add_isic_image, bissoto_row

    from shortcut_unlearning.napari import _widget

    for number in range(3):
        add_isic_image(tmp_path, number, (40, 40))
    traps = tmp_path / "traps"  # Bissoto's folds live in a subfolder, not beside the images
    traps.mkdir()
    folds = {
        "isic_annotated_train1.csv": [bissoto_row(0, 0, 0, sep=","), bissoto_row(1, 1, 1, sep=",")],
        "isic_annotated_test1.csv": [bissoto_row(0, 2, 1, sep=",")],
        "isic_annotated_test2.csv": [bissoto_row(0, 0, 0, sep=",")],  # image 0: train in fold 1
    }
    for name, rows in folds.items():
        (traps / name).write_text("\n".join([TRAP_HEADER, *rows]) + "\n")
    viewer = make_napari_viewer()
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    picked = [str(traps / "isic_annotated_train1.csv"), str(traps / "isic_annotated_test1.csv")]
    monkeypatch.setattr(QFileDialog, "getExistingDirectory", lambda *a, **k: str(tmp_path))
    monkeypatch.setattr(QFileDialog, "getOpenFileNames", lambda *a, **k: (picked, ""))
    click(qtbot, widget.open_folder)
    coarse = viewer.layers["coarse masks"]
    assert coarse.metadata["ids"] == ["ISIC_0000000", "ISIC_0000001", "ISIC_0000002"]
    assert coarse.metadata["labels"] == [0, 1, 1]
    assert widget.coarse.currentText() == "coarse masks"
    errors = []
    monkeypatch.setattr(_widget, "show_error", errors.append)
    picked[1] = str(traps / "isic_annotated_test2.csv")  # disagrees with train1 on image 0
    click(qtbot, widget.open_folder)
    assert errors and "isic_annotated_test2.csv" in errors[0]


def test_the_dock_measurement_runs_in_a_fresh_process():
    from shortcut_unlearning.bench import widget as _bench

    dock = _bench.dock_open()
    assert dock["menu_to_dock_ms"] > 0 and not dock["torch_imported_when_shown"]


def test_the_next_suggested_image_is_shown_with_its_band(make_napari_viewer, qtbot, small_model):
    viewer = make_napari_viewer()
    widget = open_widget(viewer, qtbot, small_model)
    refine(viewer, qtbot, widget, images=(0, 1))
    click(qtbot, widget.suggest)
    qtbot.waitUntil(lambda: "ranked 1 of 10" in widget.suggestion.text(), timeout=120_000)
    best = widget._suggestion.order[0]
    assert best not in (0, 1)  # refined images are not suggested again
    assert viewer.dims.current_step[0] == best
    band = viewer.layers["band to refine"].data
    assert band[best].any() and not np.delete(band, best, axis=0).any()
    assert viewer.layers.selection.active.name == widget.refined_layer.name  # eraser at hand
    erase_band(viewer, widget, [best])  # refine it: the button moves on to the next one
    qtbot.wait(50)
    click(qtbot, widget.suggest)
    assert viewer.dims.current_step[0] == widget._suggestion.order[1]
