"""A clinician's session, run as a fresh process by test_user_path.py (not a test module).

napari first, the widget from the Plugins menu, the sample from File > Open Sample, Refine
clicked, the band erased with real mouse drags on the canvas, Ctrl+Z and Ctrl+Shift+Z, a short
run started with the Unlearn button, results exported with the Export button. Prints one JSON
object of what it saw; the test checks it.
"""

import json
import sys

import napari  # before anything else, as a user starts it
import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtTest import QTest
from qtpy.QtWidgets import QFileDialog

from shortcut_unlearning.napari._driver import RunWatch, wait, wait_loaded
from shortcut_unlearning.napari._mouse import LEFT, drag, elided, in_view, menu_action, rings

RESULT_LAYERS = ("saliency", "predicted lesion", "images (after)")
seen: dict = {}


def key(viewer, code, modifiers) -> None:
    QTest.keyClick(viewer.window._qt_viewer.canvas.native, code, modifiers)
    wait(lambda: False, 0.2)


def dock_fits(widget) -> list:
    """The dock's content is no wider than what shows of it (the horizontal scroll bar is
    off, so anything wider is cut off on the right): [content width, visible width]."""
    wait(lambda: False, 0.3)  # let the layout settle
    needed = widget.scroll.widget().minimumSizeHint().width()
    return [needed, widget.scroll.viewport().width()]


def actions_in_view(widget) -> dict:
    wait(lambda: False, 0.3)  # let the layout settle
    return {b.text(): in_view(widget, b) for b in actions(widget)}


def main(export_to: str, steps: int) -> None:
    viewer = napari.Viewer()
    viewer.window.resize(1280, 800)
    menu_action(viewer.window.plugins_menu, "Shortcut Unlearning").trigger()
    widget = viewer.window.dock_widgets["Shortcut Unlearning (Shortcut Unlearning)"]
    wait(lambda: False, 0.3)
    seen["dock_visible"] = widget.isVisible()
    file_menu = viewer.window.file_menu
    menu_action(file_menu, "Open Sample", "Synthetic dermoscopy with coarse masks").trigger()
    seen["layers"] = [layer.name for layer in viewer.layers]
    seen["ready"] = wait_loaded(widget)

    QTest.mouseClick(widget.refine, LEFT)
    refined = widget.refined_layer
    seen["mode"] = str(refined.mode)
    default_brush = refined.brush_size  # the eraser as it comes
    # Erase along the band of image 0: what the coarse mask wrongly calls lesion.
    viewer.dims.set_point(0, 0)
    fine = viewer.layers["reference masks"].data[0]
    band = (widget.bench.refinement.coarse[0] != 0) & (fine == 0)
    rows, cols = np.nonzero(band)
    row = int(np.median(rows))
    in_row = np.sort(cols[rows == row])
    refined.brush_size = 4
    drag(viewer, [(row, c) for c in np.linspace(in_row[0], in_row[0] + 6, 8)])
    wait(lambda: False, 0.3)
    forget = viewer.layers["forget set"].data.astype(bool)
    expected = (widget.bench.refinement.coarse != 0) & (refined.data == 0)
    seen["erased_after_drag"] = int(forget[0].sum())
    seen["overlay_matches"] = bool((forget == expected).all())
    seen["stats_after_drag"] = widget.stats.text()
    key(viewer, Qt.Key.Key_Z, Qt.KeyboardModifier.ControlModifier)
    seen["erased_after_undo"] = int(viewer.layers["forget set"].data[0].sum())
    key(
        viewer,
        Qt.Key.Key_Z,
        Qt.KeyboardModifier.ControlModifier | Qt.KeyboardModifier.ShiftModifier,
    )
    seen["erased_after_redo"] = int(viewer.layers["forget set"].data[0].sum())
    # The eraser as it comes, along the middle of image 2's band (the cursor stays in the
    # band): no pixel of the true lesion is erased.
    viewer.dims.set_point(0, 2)
    wait(lambda: False, 0.2)
    lesion = viewer.layers["reference masks"].data[2] != 0
    band = (widget.bench.refinement.coarse[2] != 0) & ~lesion
    from scipy.ndimage import distance_transform_edt

    middle = float(distance_transform_edt(~lesion)[band].max()) / 2
    refined.brush_size = default_brush
    for path in rings(lesion, middle):
        drag(viewer, path)
    wait(lambda: False, 0.3)
    erased = (widget.bench.refinement.coarse[2] != 0) & (refined.data[2] == 0)
    seen["band_stroke"] = {
        "brush": int(refined.brush_size),
        "distance": middle,
        "erased_band": int((erased & band).sum()),
        "erased_lesion": int((erased & lesion).sum()),
        "opacity": float(refined.opacity),
    }
    QTest.mouseClick(widget.refine, LEFT)  # pressed again: no second layer
    seen["refined_layers"] = sum(layer.name.startswith("refined") for layer in viewer.layers)
    seen["dock_fits_after_refine"] = dock_fits(widget)
    seen["actions_in_view_after_refine"] = actions_in_view(widget)

    widget.steps.setValue(steps)
    watch = RunWatch(widget, lambda: QTest.mouseClick(widget.run, LEFT))
    progress = set()

    def finished() -> bool:
        progress.add(widget.progress_text.text())
        return watch.outcome is not None

    seen["finished"] = wait(finished) and widget.bench.shown is not None
    seen["progress_lines"] = sorted(progress)
    seen["method"] = [widget.bench.parameters.method, widget.method.currentText()]
    seen["result_layers"] = sorted(
        layer.name for layer in viewer.layers if layer.name in RESULT_LAYERS and layer.visible
    )
    seen["result_text"] = widget.results.result.text()
    seen["current"] = widget.results.current.text()
    seen["export_enabled"] = widget.results.export.isEnabled()
    seen["dock_fits_after_run"] = dock_fits(widget)
    seen["verdict"] = widget.bench.shown.verdict.headline
    results = widget.results
    seen["actions_in_view"] = actions_in_view(widget)
    seen["elided_after_run"] = elided(widget)
    toggle = getattr(results, "details_toggle", None)
    if toggle is not None:  # the numbers, one click away
        QTest.mouseClick(toggle, LEFT)
        seen["details_text"] = results.details.text() if results.details.isVisible() else ""
        seen["actions_in_view_with_details"] = actions_in_view(widget)
        seen["elided_with_details"] = elided(widget)
    # A certified method's settings: its name, privacy boxes and preview, none cut short.
    widget.method.setCurrentIndex(widget.method.findData("gradient-clipping"))
    QTest.mouseClick(widget.preview_toggle, LEFT)
    seen["certified_shown"] = [widget.method.currentText(), widget.epsilon.isVisible()]
    seen["actions_in_view_certified"] = actions_in_view(widget)
    seen["elided_certified"] = elided(widget)
    QTest.mouseClick(widget.preview_toggle, LEFT)
    widget.method.setCurrentIndex(widget.method.findData(seen["method"][0]))
    table = results.scores
    names = [table.item(r, 0) for r in range(table.rowCount())]
    seen["table_names_in_tooltips"] = bool(names) and all(
        item.toolTip() == item.text() for item in names
    )
    seen["table_elides_middle"] = table.textElideMode() == Qt.TextElideMode.ElideMiddle
    QFileDialog.getExistingDirectory = staticmethod(lambda *a, **k: export_to)
    QTest.mouseClick(widget.results.export, LEFT)
    shown = widget.bench.shown
    seen["shown_after_s_global"] = shown.after.metrics.s_global["value"]
    seen["shown_model_norm"] = float(
        sum(float((p.float() ** 2).sum()) for p in shown.model.net.parameters())
    )
    viewer.screenshot(f"{export_to}/user_path.png", canvas_only=False)
    QTest.mouseClick(widget.results.revert, LEFT)
    seen["after_revert_layers"] = [layer.name for layer in viewer.layers]
    seen["after_revert_overlay"] = viewer.canvas.overlays.text.visible
    seen["after_revert_export_enabled"] = widget.results.export.isEnabled()
    seen["after_revert_current"] = widget.results.current.text()
    # One more stroke on image 1, and napari closed at once: the edit must survive.
    viewer.dims.set_point(0, 1)
    wait(lambda: False, 0.2)
    coarse1 = widget.bench.refinement.coarse[1]
    rows, cols = np.nonzero(coarse1)
    row = int(np.median(rows))
    c0 = int(np.sort(cols[rows == row])[0])
    drag(viewer, [(row, c) for c in np.linspace(c0, c0 + 5, 6)], settle=False)
    seen["closing_with_erased"] = int((refined.data[1] == 0).sum() - (coarse1 == 0).sum())
    viewer.close()


def actions(widget) -> list:
    """The buttons that must never need a scroll: Unlearn, and the actions on a run."""
    return [widget.run, widget.results.accept, widget.results.revert, widget.results.export]


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]))
    finally:
        print("SEEN " + json.dumps(seen, default=str))
