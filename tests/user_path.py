"""A clinician's session, run as a fresh process by test_user_path.py (not a test module).

napari first, the widget from the Plugins menu, the sample from File > Open Sample, Refine
clicked, the band erased with real mouse drags on the canvas, Ctrl+Z and Ctrl+Shift+Z, a short
run started with the Unlearn button, results exported with the Export button. Prints one JSON
object of what it saw; the test checks it.
"""

import json
import sys
import time

import napari  # before anything else, as a user starts it
import numpy as np
from qtpy.QtCore import QEvent, QPoint, QPointF, QRect, Qt
from qtpy.QtGui import QMouseEvent
from qtpy.QtTest import QTest
from qtpy.QtWidgets import (
    QAbstractButton,
    QApplication,
    QComboBox,
    QFileDialog,
    QGroupBox,
    QLabel,
    QStyle,
    QStyleOptionComboBox,
)

LEFT, NONE = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier
RESULT_LAYERS = ("saliency", "predicted lesion", "images (after)")
seen: dict = {}


def wait(condition, timeout_s: float = 300) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        QApplication.processEvents()
        time.sleep(0.01)
    return True


def menu_action(menu, *path):
    """The action at `path` (texts, matched by prefix) in a Qt menu."""
    for action in menu.actions():
        if action.text().replace("&", "").startswith(path[0]):
            return action if len(path) == 1 else menu_action(action.menu(), *path[1:])
    raise LookupError(f"no menu item {path[0]!r} among {[a.text() for a in menu.actions()]}")


def canvas_point(viewer, row: float, col: float) -> QPoint:
    """Canvas pixel of a data coordinate in the displayed plane."""
    canvas = viewer.window._qt_viewer.canvas
    x, y = canvas.view.scene.transform.map([col, row])[:2]
    return QPoint(round(x), round(y))


def drag(viewer, points, settle: bool = True) -> None:
    """Press at the first point, move through the rest, release: one brush stroke."""
    native = viewer.window._qt_viewer.canvas.native
    pixels = [canvas_point(viewer, r, c) for r, c in points]
    QTest.mousePress(native, LEFT, NONE, pixels[0])
    for p in pixels[1:]:
        global_p = QPointF(native.mapToGlobal(p))
        move = QMouseEvent(
            QEvent.Type.MouseMove, QPointF(p), global_p, Qt.MouseButton.NoButton, LEFT, NONE
        )
        QApplication.sendEvent(native, move)
        QApplication.processEvents()
    QTest.mouseRelease(native, LEFT, NONE, pixels[-1])
    if settle:
        wait(lambda: False, 0.2)


def key(viewer, code, modifiers) -> None:
    QTest.keyClick(viewer.window._qt_viewer.canvas.native, code, modifiers)
    wait(lambda: False, 0.2)


def dock_fits(widget) -> list:
    """The dock's content is no wider than what shows of it (the horizontal scroll bar is
    off, so anything wider is cut off on the right): [content width, visible width]."""
    wait(lambda: False, 0.3)  # let the layout settle
    needed = widget.scroll.widget().minimumSizeHint().width()
    return [needed, widget.scroll.viewport().width()]


def in_view(widget, part) -> list:
    """Whether `part` shows whole inside the dock `widget` (no parent, such as the scrolling
    area's viewport, clips it): [shown whole, its rectangle in the dock, the dock's size]."""
    wait(lambda: False, 0.3)
    rect = QRect(part.mapTo(widget, QPoint(0, 0)), part.size())
    whole = part.isVisible() and part.visibleRegion().boundingRect() == part.rect()
    inside = widget.rect().contains(rect) and widget.visibleRegion().boundingRect().contains(rect)
    return [whole and inside, rect.getRect(), [widget.width(), widget.height()]]


def elided(widget) -> list[str]:
    """The texts in the dock cut short: a label, button, group title or chosen item of a
    combo box with less room than its text needs."""
    cut = []
    for label in widget.findChildren(QLabel):
        if not label.isVisible() or not label.text():
            continue
        if label.wordWrap():
            short = label.heightForWidth(label.width()) > label.height()
        else:
            short = label.minimumSizeHint().width() > label.width()
        if short:
            cut.append(label.text())
    for button in widget.findChildren(QAbstractButton):
        if button.isVisible() and button.text() and button.sizeHint().width() > button.width():
            cut.append(button.text())
    for box in widget.findChildren(QGroupBox):
        if box.isVisible() and box.fontMetrics().horizontalAdvance(box.title()) > box.width():
            cut.append(box.title())
    for combo in widget.findChildren(QComboBox):
        if not combo.isVisible() or not combo.currentText():
            continue
        option = QStyleOptionComboBox()
        combo.initStyleOption(option)
        field = combo.style().subControlRect(
            QStyle.ComplexControl.CC_ComboBox,
            option,
            QStyle.SubControl.SC_ComboBoxEditField,
            combo,
        )
        if combo.fontMetrics().horizontalAdvance(combo.currentText()) > field.width():
            cut.append(combo.currentText())
    return cut


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
    seen["ready"] = wait(lambda: widget._ready)

    QTest.mouseClick(widget.refine, LEFT)
    refined = widget.refined_layer
    seen["mode"] = str(refined.mode)
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
    QTest.mouseClick(widget.refine, LEFT)  # pressed again: no second layer
    seen["refined_layers"] = sum(layer.name.startswith("refined") for layer in viewer.layers)
    seen["dock_fits_after_refine"] = dock_fits(widget)

    widget.steps.setValue(steps)
    QTest.mouseClick(widget.run, LEFT)
    progress = set()

    def finished() -> bool:
        progress.add(widget.progress_text.text())
        return not widget.busy and widget.bench.shown is not None

    seen["finished"] = wait(finished)
    seen["progress_lines"] = sorted(progress)
    seen["method"] = [widget.bench.parameters["method"], widget.method.currentText()]
    seen["result_layers"] = sorted(
        layer.name for layer in viewer.layers if layer.name in RESULT_LAYERS and layer.visible
    )
    seen["result_text"] = widget.results.result.text()
    seen["current"] = widget.results.current.text()
    seen["export_enabled"] = widget.results.export.isEnabled()
    seen["dock_fits_after_run"] = dock_fits(widget)
    seen["verdict"] = widget.bench.shown.verdict.headline
    results = widget.results
    seen["actions_in_view"] = {b.text(): in_view(widget, b) for b in actions(results)}
    seen["elided_after_run"] = elided(widget)
    toggle = getattr(results, "details_toggle", None)
    if toggle is not None:  # the numbers, one click away
        QTest.mouseClick(toggle, LEFT)
        seen["details_text"] = results.details.text() if results.details.isVisible() else ""
        seen["actions_in_view_with_details"] = {
            b.text(): in_view(widget, b) for b in actions(results)
        }
        seen["elided_with_details"] = elided(widget)
    table = results.scores
    names = [table.item(r, 0) for r in range(table.rowCount())]
    seen["table_names_in_tooltips"] = bool(names) and all(
        item.toolTip() == item.text() for item in names
    )
    seen["table_elides_middle"] = table.textElideMode() == Qt.TextElideMode.ElideMiddle
    QFileDialog.getExistingDirectory = staticmethod(lambda *a, **k: export_to)
    QTest.mouseClick(widget.results.export, LEFT)
    shown = widget.bench.shown
    seen["shown_after_s_global"] = shown.after.metrics["s_global"]["value"]
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


def actions(results) -> list:
    return [results.accept, results.revert, results.export]


if __name__ == "__main__":
    try:
        main(sys.argv[1], int(sys.argv[2]))
    finally:
        print("SEEN " + json.dumps(seen, default=str))
