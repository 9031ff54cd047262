"""Real input for scripted sessions (the user-path test, the clinician task benchmark): Qt
mouse events on napari's canvas and the dock's widgets, and checks of what a user sees.

A data coordinate maps to canvas pixels through the vispy view's scene transform; events go
to the canvas's native widget.
"""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QEvent, QPoint, QPointF, QRect, Qt
from qtpy.QtGui import QMouseEvent
from qtpy.QtTest import QTest
from qtpy.QtWidgets import (
    QAbstractButton,
    QApplication,
    QComboBox,
    QGroupBox,
    QLabel,
    QStyle,
    QStyleOptionComboBox,
)

from ._driver import wait

LEFT, NONE = Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier


def menu_action(menu, *path):
    """The action at `path` (texts, matched by prefix) in a Qt menu."""
    for action in menu.actions():
        if action.text().replace("&", "").startswith(path[0]):
            return action if len(path) == 1 else menu_action(action.menu(), *path[1:])
    raise LookupError(f"no menu item {path[0]!r} among {[a.text() for a in menu.actions()]}")


def click_menu(window, *path) -> int:
    """Choose `path` (texts, matched by prefix) from the menu bar of the Qt main `window`
    with real clicks: the title, then each item. Returns the number of clicks."""

    def item(actions, text):
        for action in actions:
            if action.text().replace("&", "").startswith(text):
                return action
        raise LookupError(f"no menu item {text!r} among {[a.text() for a in actions]}")

    bar = window.menuBar()
    action = item(bar.actions(), path[0])
    QTest.mouseClick(bar, LEFT, NONE, bar.actionGeometry(action).center())
    menu = action.menu()
    wait(menu.isVisible, 10)
    for text in path[1:]:
        action = item(menu.actions(), text)
        QTest.mouseClick(menu, LEFT, NONE, menu.actionGeometry(action).center())
        if action.menu() is not None:
            menu = action.menu()
            wait(menu.isVisible, 10)
    wait(lambda: False, 0.1)
    return len(path)


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


def click(widget) -> None:
    QTest.mouseClick(widget, LEFT)


def in_view(dock, part) -> list:
    """Whether `part` shows whole inside the dock (no parent, such as the scrolling area's
    viewport, clips it): [shown whole, its rectangle in the dock, the dock's size]."""
    rect = QRect(part.mapTo(dock, QPoint(0, 0)), part.size())
    whole = part.isVisible() and part.visibleRegion().boundingRect() == part.rect()
    inside = dock.rect().contains(rect) and dock.visibleRegion().boundingRect().contains(rect)
    return [whole and inside, rect.getRect(), [dock.width(), dock.height()]]


def elided(widget) -> list[str]:
    """The texts in `widget` cut short: a label, button, group title or chosen item of a
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


def rings(lesion: np.ndarray, distance: float) -> list[np.ndarray]:
    """Closed paths at `distance` pixels from the lesion, as (row, col) points about two
    pixels apart: where a user's cursor goes to erase along the lesion."""
    from scipy.ndimage import distance_transform_edt
    from skimage.measure import find_contours

    paths = find_contours(distance_transform_edt(lesion == 0), distance)
    paths = [p for p in paths if len(p) > 2]
    return [p[:: max(1, int(2 / np.median(np.hypot(*np.diff(p, axis=0).T))))] for p in paths]


def band_strokes(coarse: np.ndarray, lesion: np.ndarray, brush: int) -> list[np.ndarray]:
    """Strokes that erase the band between a coarse mask and the lesion as a careful user
    would: rings around the lesion, the brush's edge one pixel off it, as many as the band's
    width needs."""
    from scipy.ndimage import distance_transform_edt

    band = (coarse != 0) & (lesion == 0)
    if not band.any():
        return []
    deepest = float(distance_transform_edt(lesion == 0)[band].max())
    levels = np.arange(1 + brush / 2, deepest + 0.5, brush)
    return [path for level in levels for path in rings(lesion, level)]
