"""The dock's Results box and the result layers on the canvas.

Before over the images, after over a copy to their right: saliency and the predicted lesion in
one layer each (both halves side by side), numbers in the dock (the run's verdict in plain words,
its numbers under Details, a table of per-image lesion malignancy scores) and on the canvas (the
verdict in a few words, the current image's score). Accept, Revert and Export act on the
workbench; the box only shows what it holds, and the dock pins their row (`actions`) below its
scrolling area.
"""

from __future__ import annotations

import string
from functools import partial
from pathlib import Path

import numpy as np
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QGroupBox,
    QHeaderView,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
)

from .. import display
from ..settings import exports_folder
from ..verdict import SHORT
from ..workbench import MEASURED, Workbench
from . import _layers
from ._qt import button, expander, row, text
from ._texts import TIPS, legend_html, method_label

# Every glyph written on the canvas: show_current_image's words, numbers and verdict, and
# the colour bar's words.
TEXT_GLYPHS = "".join(
    sorted(
        set(
            "Left: before, right: after run the class decision relies on the erased pixels "
            "Cannot tell whether changed The This image (malignant benign): lesion malignancy -> "
            "no lesion was not measured (a run measures images)"
            + "".join(SHORT.values())
            + "".join(display.SALIENCY_WORDS.values())
            + string.digits
            + ".-"
        )
    )
)


class ResultsView(QGroupBox):
    """Results of the run on display. `images()` names the image layer; `refined()` is the
    layer the eraser works on (selected again once results are drawn); `overlays()` are the
    editing layers over the images (refined masks, forget set, band), copied over the "after"
    half so that both halves carry the same overlays."""

    drawn = Signal()  # nothing is left to draw: the last step ran, or the rest was dropped

    def __init__(self, viewer, bench: Workbench, images, refined, overlays):
        super().__init__("Results")
        self.viewer, self.bench, self._images, self._refined = viewer, bench, images, refined
        self._overlays = overlays
        self._offset = 0  # columns from an image to its "after" copy, once results are drawn
        self._steps: list = []  # what is left to draw, one step per turn of the event loop
        self._next_turn = False  # a turn of the event loop is booked for the next step
        self._warmed = False  # the canvas text's glyphs (warm_text)
        self.current = text(bench.status())
        self.current.setStyleSheet("font-weight: bold")
        self.result = text("")
        self.shared_scale = QCheckBox("One saliency scale for all images", toolTip=TIPS["scale"])
        self.shared_scale.toggled.connect(self.apply_scale)
        self.scores = QTableWidget(0, 4)
        self.scores.setHorizontalHeaderLabels(["image", "label", "before", "after"])
        header = self.scores.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.scores.verticalHeader().setVisible(False)
        self.scores.setMaximumHeight(160)
        self.scores.setToolTip(TIPS["scores"])
        self.scores.setTextElideMode(Qt.TextElideMode.ElideMiddle)  # names keep both ends
        self._rows = np.zeros(0, int)  # the image of each table row
        self.scores.cellClicked.connect(lambda r, _: self.viewer.dims.set_point(0, self._rows[r]))
        self.accept = button("Accept", self.accept_model, "Make the unlearned model current")
        self.revert = button("Revert", self.revert_model, "Go back to the model before the run")
        self.export = button("Export…", self.export_run, "Save this run into a folder you pick")
        self.actions = row(self.accept, self.revert, self.export)  # the dock pins it in view
        self.details_toggle, self.details = expander("Details", TIPS["details"])
        column = QVBoxLayout(self)
        for part in (
            self.current,
            self.result,
            self.details_toggle,
            self.details,
            text("Lesion malignancy score per image (click a row to go there):", TIPS["scores"]),
            self.scores,
            self.shared_scale,
            text(legend_html()),
        ):
            column.addWidget(part)
        self.viewer.dims.events.current_step.connect(self.show_current_image)
        self.display(None)

    def warm_text(self, chunk: int = 6) -> None:
        """Draw the canvas text's glyphs once, transparent, a few per turn of the event loop.
        vispy rasterises each glyph on its first draw, which froze the first result display
        for about 250 ms. Measured under Xvfb: the first turn about 140 ms (the overlay is
        made), later ones about 50. Once per view (the model may load again)."""
        if self._warmed:
            return
        self._warmed = True
        overlay = _layers.text_overlay(self.viewer)
        chunks = [TEXT_GLYPHS[i : i + chunk] for i in range(0, len(TEXT_GLYPHS), chunk)]
        colour = overlay.color

        def next_chunk():
            if self.bench.shown is not None or not chunks:  # a run is on display: leave it
                if self.bench.shown is None:
                    overlay.visible, overlay.text = False, ""
                overlay.color = colour
                return
            overlay.color, overlay.font_size, overlay.text = (0, 0, 0, 0), 12, chunks.pop()
            overlay.visible = True
            QTimer.singleShot(30, next_chunk)

        next_chunk()

    # -- what is on display ------------------------------------------------------------------
    def display(self, record) -> None:
        """The run on display, or nothing; the current model is named in both cases."""
        self.current.setText(self.bench.status())
        if record is None:
            self.clear()
            self.result.setText("No run on display.")
            for widget in (self.shared_scale, self.scores, self.details_toggle):
                widget.setEnabled(False)
            self.enable_actions()
            return
        self._draw_layers(record)
        self.result.setText(record.summary(method_label(record.method)))
        self.details.setText(record.details())
        self._fill_scores(record)
        for widget in (self.shared_scale, self.scores, self.details_toggle):
            widget.setEnabled(True)
        self.show_current_image()
        self.enable_actions()

    def enable_actions(self, running: bool = False) -> None:
        record = None if running else self.bench.shown
        self.accept.setEnabled(bool(record and record.usable and not record.accepted))
        self.revert.setEnabled(record is not None)
        self.export.setEnabled(record is not None)

    def clear(self, remove: bool = True) -> None:
        """Take the shown run off the screen: its layers go (or hide, when a new run will
        reuse them), with the canvas text and the dock's numbers."""
        self._run_steps([])  # results still being drawn are not drawn
        self._offset = 0  # nothing drawn: the overlays' copies no longer follow them
        if remove:
            _layers.remove_result_layers(self.viewer, keep=("forget set",))
        for layer in self.viewer.layers:
            if layer.metadata.get(_layers.RESULT) and layer.name != "forget set":
                layer.visible = False
        _layers.text_overlay(self.viewer).visible = False
        _layers.set_caption(self.viewer, False)
        self.result.setText("")
        self.details.setText("")
        self.scores.setRowCount(0)

    @property
    def displaying(self) -> bool:
        """Results are still being put on the canvas."""
        return bool(self._steps)

    def _draw_layers(self, record) -> None:
        """Layers already on the canvas are updated in place. A new layer is made in one turn
        of the event loop and put on the canvas in the next: on our 2-core machine napari
        takes 10-50 ms to make one and 90-130 ms to put it on the canvas."""
        images = self.viewer.layers[self._images()]
        self._offset = _layers.after_offset(images.data.shape[2])
        per_image = not self.shared_scale.isChecked()
        panels = _layers.saliency_panels(record, per_image)
        heat = {
            "colormap": _layers.saliency_colormap(),
            "blending": "translucent",
            "contrast_limits": (0, 100),
        }
        after = {"rgb": images.rgb, "translate": (0, 0, self._offset)}
        predictions = _layers.side_by_side(record.before.predictions, record.after.predictions)
        outline = {"contour": display.outline_width(images.data.shape[1:3])}
        saliency = _layers.SALIENCY_LAYER
        words = display.SALIENCY_WORDS[per_image]
        self._run_steps(
            [
                *self._layer_steps(_layers.AFTER_IMAGES, images.data, "image", after),
                *self._mirror_steps(),
                *self._layer_steps(saliency, panels, "image", heat),
                partial(_layers.show_colorbar, self.viewer, saliency, "bottom_right", words),
                *self._layer_steps(_layers.PREDICTION_LAYER, predictions, "labels", outline),
                self._drawn,
            ]
        )

    def _layer_steps(self, name: str, data, kind: str, style: dict) -> list:
        """One step that updates the result layer `name`, or two that make and add it."""
        return self._steps_for(
            name,
            lambda: _layers.make_result_layer(name, data, kind, **style),
            partial(_layers.update_result_layer, data=data, style=style),
        )

    def _mirror_steps(self) -> list:
        """Steps that copy each editing overlay over the "after" half, or bring its copy up
        to date; a copy follows its overlay's look from then on (follow_overlays)."""
        steps = []
        for layer in self._overlays():
            for attribute in _layers.LOOK:
                if hasattr(layer.events, attribute):
                    getattr(layer.events, attribute).connect(self._overlay_changed)
            steps += self._steps_for(
                _layers.mirror_name(layer),
                partial(_layers.make_mirror, layer, self._offset),
                partial(_layers.follow, layer, offset=self._offset),
            )
        return steps

    def _steps_for(self, name: str, make, update) -> list:
        """One step that updates the result layer `name` (`update(layer)`), or two that make
        it (`make()`) and add it."""
        layer = _layers.result_layer(self.viewer, name)
        if layer is not None:
            return [partial(update, layer)]
        made = []
        return [lambda: made.append(make()), lambda: self.viewer.layers.append(made.pop())]

    def follow_overlays(self) -> None:
        """After an edit or a new overlay: the "after" half shows the overlays as they are."""
        if not self._offset or self.bench.shown is None or self.displaying:
            return  # nothing drawn, or the drawing will do it
        for step in self._mirror_steps():
            step()

    def _overlay_changed(self, event=None) -> None:  # an overlay shown, hidden, restyled
        self.follow_overlays()

    def _run_steps(self, steps) -> None:
        """Run `steps` one per turn of the event loop, from the next one on, in place of any
        still waiting."""
        dropped = bool(self._steps) and not steps
        self._steps = list(steps)
        if self._steps and not self._next_turn:
            self._next_turn = True
            QTimer.singleShot(0, self._draw_next)
        if dropped:
            self.drawn.emit()

    def _draw_next(self) -> None:
        self._next_turn = False
        if not self._steps:  # cleared meanwhile
            return
        try:
            self._steps.pop(0)()
        finally:
            if self._steps:
                self._run_steps(self._steps)
            else:
                self.drawn.emit()

    def _drawn(self) -> None:
        self.viewer.reset_view()
        refined = self._refined()
        if refined is not None and refined in self.viewer.layers:  # the eraser stays at hand
            self.viewer.layers.selection.active = refined

    def apply_scale(self, *_) -> None:
        record = self.bench.shown
        layer = _layers.result_layer(self.viewer, _layers.SALIENCY_LAYER)
        if record is None or layer is None:
            return
        per_image = not self.shared_scale.isChecked()
        layer.data = _layers.saliency_panels(record, per_image)
        _layers.set_caption(self.viewer, layer.visible, display.SALIENCY_WORDS[per_image])

    def _fill_scores(self, record) -> None:
        """One row per measured image with its lesion malignancy scores; a click on it moves
        the viewer there. Long names are elided in the middle, whole in the tooltip."""
        measured = np.flatnonzero(np.isfinite(record.before.scores))
        ids = self.bench.meta.get("ids") or [f"image {i}" for i in range(len(self.bench.stack))]
        labels = self.bench.labels
        self.scores.setRowCount(len(measured))
        self._rows = measured
        for r, i in enumerate(measured):
            label = "" if labels is None else ("malignant" if labels[i] else "benign")
            before, after = record.before.lesion_scores[i], record.after.lesion_scores[i]
            cells = (str(ids[i]), label, _score(before), _score(after))
            for column, cell in enumerate(cells):
                item = QTableWidgetItem(cell)
                item.setToolTip(str(ids[i]) if column == 0 else TIPS["scores"])
                self.scores.setItem(r, column, item)

    def show_current_image(self, *_) -> None:
        record = self.bench.shown
        overlay = _layers.text_overlay(self.viewer)
        if record is None:
            overlay.visible = False
            return
        i = int(self.viewer.dims.current_step[0]) if self.viewer.dims.ndim > 2 else 0
        if not 0 <= i < len(record.before.scores):
            return
        labels = self.bench.labels
        truth = "" if labels is None else f" ({'malignant' if labels[i] else 'benign'})"
        before, after = record.before.lesion_scores[i], record.after.lesion_scores[i]
        this = (
            # two lines: one was wider than the canvas beside the dock at 1280 x 800
            f"This image{truth}:\nlesion malignancy {_score(before)} -> {_score(after)}"
            if np.isfinite(record.before.scores[i])
            else f"This image{truth} was not measured\n(a run measures {MEASURED} images)"
        )
        overlay.visible, overlay.font_size, overlay.position = True, 12, "top_left"
        verdict = record.verdict.short()
        overlay.text = f"Left: before, right: after run {record.number}\n{verdict}\n{this}"

    # -- actions -----------------------------------------------------------------------------
    def accept_model(self) -> None:
        self.bench.accept()
        self.enable_actions()
        self.current.setText(self.bench.status())
        show_info("The unlearned model is now the current model.")

    def revert_model(self) -> None:
        self.bench.revert()
        self.display(None)
        show_info("Reverted: the model from before the run is current.")

    def export_run(self, folder: str | Path | None = None) -> Path | None:
        """Export the run on display into a new folder inside `folder` (asked for if None)."""
        if folder is None:
            default = exports_folder()
            default.mkdir(parents=True, exist_ok=True)
            folder = QFileDialog.getExistingDirectory(self, "Export the run into", str(default))
            if not folder:
                return None
        try:
            out = self.bench.export(folder)
        except (ValueError, OSError) as error:
            show_error(str(error))
            return None
        show_info(f"Exported run {self.bench.shown.number} to {out}")
        return out


def _score(value: float) -> str:
    """A lesion malignancy score; "no lesion" where the model predicts none."""
    return f"{value:.2f}" if np.isfinite(value) else "no lesion"
