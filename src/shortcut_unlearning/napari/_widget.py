"""The dock widget: lays out controls and wires them to the Workbench, where every decision is.

Refine -> a refined Labels copy of the coarse masks with the eraser picked; the forget set is
redrawn and the edited images autosaved after each edit (brush, fill, polygon, undo, redo,
replaced data).
Unlearn -> the workbench's job in a thread worker, with progress, a live curve and Cancel.
Results -> saliency and predictions before (over the images) and after (over a copy to their
right), the verdict in the dock and on the canvas. Unlearn and Cancel, the progress bar, and
Accept, Revert, Export are pinned below the scrolling area, always in view.

Nothing here imports torch: the dock shows at once and loads PyTorch and the model in a worker.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import napari
import numpy as np
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QLineEdit,
    QProgressBar,
    QScrollArea,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from .. import display
from ..masks import MaskError
from ..progress import Cancel, ProgressTracker
from ..settings import OperatorSettings, autosave_folder, load_settings, save_settings
from ..workbench import MEASURE_AFTER, MEASURE_BEFORE, Preview, RunOutcome, Workbench
from . import _layers
from ._edits import edited_planes
from ._qt import button, duration, expander, row, section, text
from ._results import ResultsView
from ._texts import CONTEXTS, FORGET_AS_S, METHODS, SCOPES, TIPS, method_label, phase_label


class ShortcutUnlearningWidget(QWidget):
    """The dock. What scripts and tests may rely on (napari/_driver.py waits on it): `ready`,
    `busy`, `run_finished`, and the controls a user clicks."""

    # Once per run, when it has ended (finished, collapsed, cancelled or failed) and its
    # results are drawn: the RunOutcome (workbench.py).
    run_finished = Signal(object)

    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.bench = Workbench(parameters=load_settings())
        self.refined_layer = self.forget_layer = self.coarse_layer = None
        self._touched: set[int] = set()  # images edited since Refine: undo may change them
        self._suggestion = None  # the ranking of unrefined images, made when first asked for
        self._pending: set[int] | None = set()  # images to check at the next sync
        self.worker = self.cancel = None
        self._outcome: RunOutcome | None = None  # the run that ended, until its results are drawn
        self.tracker: ProgressTracker | None = None  # the last run's time left and curve
        self._ready = False  # PyTorch and the model are loaded
        self._certified: set[str] = set()  # the registry's certified methods, once loaded
        self._steps_settings: dict[str, str] = {}  # method: its steps setting, once loaded
        self._steps_for = "steps"  # the parameter the Steps box shows (relearn_steps: certified)
        self._edit_timer = QTimer(self, singleShot=True, interval=0)
        self._edit_timer.timeout.connect(self.apply_edits)
        self._build()
        self._refresh_choices()
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)
        # PyTorch loads once the dock is on screen: importing it competes with drawing the dock.
        self._start_loading = QTimer(self, singleShot=True, interval=300)
        self._start_loading.timeout.connect(self._warm_up)
        self._start_loading.start()

    # -- layout ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.image = QComboBox()
        self.coarse = QComboBox()
        self.artefacts = QComboBox(toolTip=TIPS["artefacts"])
        self.model_path = QLineEdit(str(self.bench.model_path))
        self.model_path.setToolTip("The model to unlearn from: a .safetensors checkpoint")
        browse = button("…", self._choose_model, "Choose a checkpoint")
        browse.setMaximumWidth(32)
        self.open_folder = button(
            "Open a dataset folder…",
            self.open_dataset,
            "An ISIC 2018 or project folder, with the labels CSVs you choose (for example one "
            "fold of Bissoto's trap sets); File > Open uses the folder's own CSVs",
        )
        data = section(
            "Data",
            [
                (self.open_folder,),  # the whole width: beside a label it widened the dock
                ("Images", self.image),
                ("Coarse masks", self.coarse),
                ("Artefacts (S)", self.artefacts),
                ("Model", row(self.model_path, browse)),
            ],
        )
        self.refine = button(
            "Refine masks",
            self.start_refinement,
            "Copy the coarse masks into a 'refined' layer and pick the eraser: erase what the "
            "coarse masks wrongly call lesion",
        )
        self.stats = text("Press Refine masks, then erase with the mouse.", TIPS["forget"])
        self.clip = button(
            "Remove pixels painted outside the coarse masks",
            self.clip_added,
            "A refinement may only erase; painting outside the coarse mask is not unlearning",
        )
        self.clip.setVisible(False)
        self.suggest = button(
            "Go to the image to refine next",
            self.suggest_next,
            "Ranks the unrefined images by how much of the model's malignant evidence lies in "
            "their coarse mask's band (no label you have not given is used), and shows the best",
        )
        self.suggestion = text("")
        refine = section(
            "Refine", [self.refine, self.stats, self.clip, self.suggest, self.suggestion]
        )

        self.method = QComboBox()
        self.scope = QComboBox(toolTip=TIPS["scope"])
        for name, label in SCOPES.items():
            self.scope.addItem(label, name)
        self.context = QComboBox(toolTip=TIPS["context"])
        for name, label in CONTEXTS.items():
            self.context.addItem(label, name)
        self.steps = QSpinBox(minimum=1, maximum=100_000, toolTip=TIPS["steps"])
        self.epsilon = QDoubleSpinBox(minimum=0.01, maximum=1000, singleStep=0.5, decimals=2)
        self.epsilon.setToolTip(TIPS["epsilon"])
        self.delta = QLineEdit(toolTip=TIPS["delta"])
        self.device = QComboBox()
        self.device.addItems(["auto", "cuda", "mps", "cpu"])
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1)
        self.preview = text("Loading PyTorch and the model…")
        self.preview_toggle, self.preview_details = expander("Details", TIPS["preview"])
        defaults = button("Restore defaults", self.restore_defaults)
        self.form = QFormLayout()
        for label, widget in (
            ("Method", self.method),
            ("Update", self.scope),
            ("Context", self.context),
            ("Steps", self.steps),
            ("Privacy ε", self.epsilon),
            ("Privacy δ", self.delta),
            ("Device", self.device),
            ("Seed", self.seed),
        ):
            self.form.addRow(label, widget)
        self.run = button("Unlearn", self.start_unlearning, "Run in the background")
        self.stop = button("Cancel", self.cancel_run, "Stop before the next step")
        self.stop.setEnabled(False)
        self.progress = QProgressBar(textVisible=False, maximumHeight=10)
        self.progress_text = text("")
        self._curve_canvas = None  # the live curve, made on the first run (matplotlib)
        self.curve_box = QVBoxLayout()
        settings = QGroupBox("Unlearning")
        column = QVBoxLayout(settings)
        column.addLayout(self.form)
        for part in (self.preview, self.preview_toggle, self.preview_details):
            column.addWidget(part)
        for part in (defaults,):
            column.addWidget(part)
        column.addWidget(self.progress_text)
        column.addLayout(self.curve_box)

        self.results = ResultsView(
            self.viewer,
            self.bench,
            self.image.currentText,
            lambda: self.refined_layer,
            self._overlays,
        )
        self.results.drawn.connect(self._announce_end)

        content = QWidget()
        column = QVBoxLayout(content)
        for part in (data, refine, settings, self.results):
            column.addWidget(part)
        column.addStretch()
        self.scroll = scroll = QScrollArea(widgetResizable=True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setWidget(content)
        outer = QVBoxLayout(self)
        outer.addWidget(scroll)
        # Never scrolled out of view: Unlearn and Cancel with the progress, then the actions
        # on the run shown (at 1280 x 800 Unlearn was below the fold after a refinement).
        for part in (row(self.run, self.stop), self.progress, self.results.actions):
            outer.addWidget(part)
        # A layer's name never widens the dock; the dock's own choices are never cut.
        for combo in (self.image, self.coarse, self.artefacts):
            combo.setSizeAdjustPolicy(
                QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon
            )
            combo.setMinimumContentsLength(8)
        for combo in (self.method, self.scope, self.context, self.device):
            combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        self._fit_width()

        self._run_controls = (self.method, self.scope, self.context, self.steps, self.epsilon)
        self._run_controls += (self.delta, self.device, self.seed, defaults, self.run)
        self._set_ready(False)
        self.model_path.editingFinished.connect(self._model_changed)
        for combo in (self.method, self.scope, self.context, self.device):
            combo.currentIndexChanged.connect(self._parameters_changed)
        for spin in (self.steps, self.seed, self.epsilon):
            spin.valueChanged.connect(self._parameters_changed)
        self.delta.editingFinished.connect(self._parameters_changed)

    def _fit_width(self) -> None:
        """The dock is never narrower than its content: the horizontal scroll bar is off, so
        what did not fit was cut off on the right. Again once napari's style applies (it
        widens the controls), once the methods are listed and when rows come or go. The
        dock's own choices are never cut: each such box is as wide as its longest item."""
        for combo in (self.method, self.scope, self.context, self.device):
            combo.setMinimumWidth(combo.sizeHint().width())
        scroll, margins = self.scroll, self.layout().contentsMargins()
        beside = scroll.verticalScrollBar().sizeHint().width() + 2 * scroll.frameWidth()
        beside += margins.left() + margins.right()
        width = max(300, scroll.widget().minimumSizeHint().width() + beside)
        if width != self.minimumWidth():
            self.setMinimumWidth(width)
            window = self.window()  # napari's window: its docks follow at its next layout,
            if window is not self and window.layout() is not None:  # which may be long
                window.layout().invalidate()

    def showEvent(self, event) -> None:
        self._fit_width()
        super().showEvent(event)

    # -- start-up: PyTorch and the model load in a background thread ---------------------------
    def _warm_up(self) -> None:
        """Import PyTorch and load the model off the UI thread. A plain thread, polled: it
        touches no Qt object, so closing napari while it runs cannot crash."""
        self._loading = _LOADER.submit(_load_torch_and_model, self.bench)
        self._poll = QTimer(self, interval=100)
        self._poll.timeout.connect(self._check_loading)
        self._poll.start()

    def _check_loading(self) -> None:
        if not self._loading.done():
            return
        self._poll.stop()
        try:
            loaded = self._loading.result()
        except Exception as error:  # PyTorch itself failed to import: say so, keep the dock
            self.preview.setText(f"PyTorch could not be loaded ({error}); reinstall the plugin.")
            return
        self._on_ready(loaded)

    def _on_ready(self, loaded: tuple[dict[str, tuple[bool, str]], str | None]) -> None:
        operators, problem = loaded
        self._certified = {name for name, (certified, _) in operators.items() if certified}
        self._steps_settings = {name: setting for name, (_, setting) in operators.items()}
        if not self.method.count():
            self.method.blockSignals(True)
            for name in operators:
                label, tip = METHODS.get(name, (name, ""))
                self.method.addItem(label, name)
                self.method.setItemData(self.method.count() - 1, tip, Qt.ItemDataRole.ToolTipRole)
            self.method.blockSignals(False)
            self._fit_width()
        self._set_ready(True)
        self._set_parameters(self.bench.parameters)
        self.results.current.setText(self.bench.status())
        self.results.warm_text()
        if problem:
            self.preview.setText(f"Could not load the model: {problem}")

    # -- choices and parameters ----------------------------------------------------------------
    def _layers(self, kind: str) -> list[str]:
        kind = {"image": napari.layers.Image, "labels": napari.layers.Labels}[kind]
        return [
            layer.name
            for layer in self.viewer.layers
            if isinstance(layer, kind)
            and not layer.metadata.get(_layers.RESULT)
            and layer is not self.refined_layer
        ]

    def _refresh_choices(self, event=None) -> None:
        for combo, choices in (
            (self.image, self._layers("image")),
            (self.coarse, [n for n in self._layers("labels") if "reference" not in n]),
            (self.artefacts, [FORGET_AS_S, *self._layers("labels")]),
        ):
            if choices == [combo.itemText(i) for i in range(combo.count())]:
                continue  # unchanged (a result layer came or went): no relayout, no repaint
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(choices)
            if current in choices:
                combo.setCurrentText(current)
            combo.blockSignals(False)

    def parameters(self) -> dict:
        delta = _float(self.delta.text())
        return {
            "method": self.method.currentData() or self.bench.parameters.method,
            "scope": self.scope.currentData(),
            "context": self.context.currentData(),
            "epsilon": float(self.epsilon.value()),
            "delta": self.bench.parameters.delta if delta is None else delta,
            self._steps_for: int(self.steps.value()),
            "device": self.device.currentText(),
            "seed": int(self.seed.value()),
        }

    def _set_parameters(self, values: OperatorSettings) -> None:
        self._restoring = True
        self.method.setCurrentIndex(max(0, self.method.findData(values.method)))
        self.scope.setCurrentIndex(max(0, self.scope.findData(values.scope)))
        self.context.setCurrentIndex(max(0, self.context.findData(values.context)))
        self.epsilon.setValue(values.epsilon)
        self.delta.setText(f"{values.delta:g}")
        self._steps_for = self._steps_key(values.method)
        self.steps.setValue(getattr(values, self._steps_for))
        self.device.setCurrentText(values.device)
        self.seed.setValue(values.seed)
        self._restoring = False
        self._parameters_changed()

    def _steps_key(self, method: str) -> str:
        return self._steps_settings.get(method, "steps")

    def restore_defaults(self) -> None:
        self._set_parameters(OperatorSettings())

    def _parameters_changed(self, *_) -> None:
        if getattr(self, "_restoring", False) or not self._ready:
            return
        if _float(self.delta.text()) is None:
            show_warning(f"delta must be a number like 1e-5, got {self.delta.text()!r}")
            self.delta.setText(f"{self.bench.parameters.delta:g}")
        self.bench.parameters = replace(self.bench.parameters, **self.parameters())
        method = self.bench.parameters.method
        certified = method in self._certified
        for widget in (self.epsilon, self.delta):
            widget.setVisible(certified)
            self.form.labelForField(widget).setVisible(certified)
        if self._steps_key(method) != self._steps_for:
            # Steps and relearn steps are remembered apart: show the chosen method's.
            self._steps_for = self._steps_key(method)
            self.steps.blockSignals(True)
            self.steps.setValue(getattr(self.bench.parameters, self._steps_for))
            self.steps.blockSignals(False)
        self.form.labelForField(self.steps).setText("Relearn steps" if certified else "Steps")
        QTimer.singleShot(0, self._fit_width)  # rows shown or relabelled: once laid out
        device = _device_in_use(self.bench.parameters.device)
        try:
            preview = self.bench.preview()
        except (ValueError, FileNotFoundError) as error:
            preview = Preview(str(error))
        self.preview.setText(f"Device in use: {device}\n{preview.plain}")
        self.preview_details.setText(preview.details)
        self.preview_toggle.setVisible(bool(preview.details))
        save_settings(self.bench.parameters)

    def open_dataset(self) -> None:
        """Open a folder with labels CSVs the user picks (none picked: the folder's own)."""
        folder = QFileDialog.getExistingDirectory(self, "Open a dataset folder")
        if not folder:
            return
        csvs, _ = QFileDialog.getOpenFileNames(
            self, "Labels CSVs (cancel: the folder's own)", folder, "CSV (*.csv)"
        )
        from ._io import read_dataset

        try:
            opened = read_dataset(folder, labels=csvs or None)
        except (ValueError, OSError) as error:
            show_error(str(error))
            return
        for data, kwargs, kind in opened:
            {"image": self.viewer.add_image, "labels": self.viewer.add_labels}[kind](data, **kwargs)
        self.image.setCurrentText(opened[0][1]["name"])
        self.coarse.setCurrentText(opened[1][1]["name"])

    def _choose_model(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self, "Choose a model", str(self.bench.model_path.parent), "Models (*.safetensors)"
        )
        if path:
            self.model_path.setText(path)
            self._model_changed()

    def _model_changed(self) -> None:
        self.bench.set_model_path(self.model_path.text())
        self._show_results(None)
        self._set_ready(False)  # until the new model is loaded (_on_ready)
        self._warm_up()

    # -- refinement ------------------------------------------------------------------------------
    def start_refinement(self) -> None:
        """Refine the chosen coarse masks; pressed again, it returns to the same layer."""
        if not self.coarse.currentText() or not self.image.currentText():
            show_warning("Open images and their coarse masks first (File > Open Sample).")
            return
        coarse_layer = self.viewer.layers[self.coarse.currentText()]
        if coarse_layer is self.coarse_layer and self.refined_layer in self.viewer.layers:
            self._pick_eraser()
            return
        self.flush_autosave()
        images = self.viewer.layers[self.image.currentText()].data
        meta = dict(coarse_layer.metadata)
        try:
            note = self.bench.open(images, coarse_layer.data, meta, autosave_folder())
        except (MaskError, ValueError) as error:
            show_error(str(error))
            return
        if note:
            show_info(note)
        self._drop_refinement_layers()
        refinement = self.bench.refinement
        self.coarse_layer = coarse_layer
        # Light enough that the lesion's own edge shows through while erasing.
        self.refined_layer = self.viewer.add_labels(
            refinement.refined,
            name=f"refined {coarse_layer.name}",
            metadata=meta,
            opacity=_layers.REFINED_OPACITY,
        )
        self.refined_layer.colormap = _layers.class_colormap()
        self.refined_layer.brush_size = display.eraser_size(refinement.coarse.shape)
        self.forget_layer = self.viewer.add_image(
            refinement.forget.view(np.uint8),
            name="forget set",
            colormap=_layers.forget_colormap(),
            blending="translucent",
            opacity=_layers.FORGET_OPACITY,
            contrast_limits=(0, 1),
            metadata={_layers.RESULT: True},
        )
        coarse_layer.visible = False  # the refined copy lies over it
        self._touched = set(np.flatnonzero(refinement.edited()).tolist())
        self.refined_layer.events.paint.connect(self._painted)
        self.refined_layer.events.set_data.connect(self._refreshed)
        self.refined_layer.events.data.connect(self._replaced)
        self._pick_eraser()
        self._show_stats()
        self._show_results(None)

    def _pick_eraser(self) -> None:
        self.viewer.layers.selection.active = self.refined_layer
        self.refined_layer.mode = "erase"
        self.viewer.layers.move(
            self.viewer.layers.index(self.forget_layer), len(self.viewer.layers)
        )

    def _overlays(self) -> list:
        """The editing layers over the images: refined masks, forget set, suggested band."""
        layers = [self.refined_layer, self.forget_layer]
        layers.append(_layers.result_layer(self.viewer, _layers.SUGGESTED_BAND))
        return [layer for layer in layers if layer is not None and layer in self.viewer.layers]

    def _drop_refinement_layers(self) -> None:
        for layer in (self.refined_layer, self.forget_layer):
            if layer is not None and layer in self.viewer.layers:
                self.viewer.layers.remove(layer)

    def _queue(self, planes: set[int] | None) -> None:
        """Collect the edited images; the update runs once the event loop is free, since
        napari may send an event before it writes the pixels (and bursts merge)."""
        if planes is None or self._pending is None:
            self._pending = None
        else:
            self._pending |= planes
        self._edit_timer.start()

    def _painted(self, event) -> None:  # brush, fill, polygon, data_setitem
        planes = edited_planes(getattr(event, "value", None), len(self.bench.refinement.coarse))
        if planes is not None:
            self._touched |= planes
        self._queue(planes)

    def _refreshed(self, event=None) -> None:
        """Undo and redo show up only as a refresh, and only touched images can change."""
        if self._touched:
            self._queue(set(self._touched))

    def _replaced(self, event=None) -> None:  # layer.data = new array
        if self.refined_layer.data is self.bench.refinement.refined:
            return
        try:
            self.bench.refinement.set_refined(self.refined_layer.data)
        except MaskError as error:
            show_error(f"{error}; the previous masks are kept")
            self.refined_layer.data = self.bench.refinement.refined
            return
        self.forget_layer.data = self.bench.refinement.forget.view(np.uint8)
        self._queue(None)

    def apply_edits(self) -> None:
        """Recompute the forget set where the masks changed, redraw it, autosave those images."""
        if self.bench.refinement is None:
            return
        pending, self._pending = self._pending, set()
        try:
            changed = self.bench.refinement.sync(pending, autosave_folder())
        except OSError as error:
            show_error(f"Could not autosave your edits ({error}); free disk space or export them")
            return
        if changed:
            self._touched |= set(changed)
            self.forget_layer.refresh()
            self.results.follow_overlays()
            self._show_stats()

    def flush_autosave(self) -> None:
        if self._edit_timer.isActive():
            self._edit_timer.stop()
            self.apply_edits()

    def hideEvent(self, event) -> None:  # napari closing, or the dock hidden: save now
        self.flush_autosave()
        super().hideEvent(event)

    def _show_stats(self) -> None:
        s = self.bench.refinement.stats()
        text = (
            f"{s['refined_images']} of {s['images']} images refined; forget set "
            f"{s['forget_pixels']:,} pixels ({s['forget_share']:.1%} of the coarse lesions)."
        )
        if s["added_pixels"]:
            text += f"\n{s['added_pixels']:,} pixels painted outside the coarse masks: a "
            text += "refinement may only erase."
        self.stats.setText(text)
        self.clip.setVisible(bool(s["added_pixels"]))

    # -- which image next ----------------------------------------------------------------------
    def suggest_next(self) -> None:
        """Move to the best-ranked unrefined image and show its band; the ranking is made in a
        worker the first time and again after each run."""
        if self.bench.refinement is None:
            show_warning("Press Refine masks first.")
            return
        if self._suggestion is None:
            self._rank(then_show=True)
            return
        i = self._suggestion.next(self.bench.refinement.edited())
        if i is None:
            self.suggestion.setText("Every ranked image is refined; run Unlearn to rank again.")
            return
        self.viewer.dims.set_point(0, i)
        band = np.zeros_like(self._suggestion.bands)
        band[i] = self._suggestion.bands[i]
        _layers.set_result_layer(
            self.viewer,
            _layers.SUGGESTED_BAND,
            band.view(np.uint8),
            "image",
            colormap=_layers.band_colormap(),
            blending="translucent",
            contrast_limits=(0, 1),
        )
        ids = self.bench.meta.get("ids")
        name = ids[i] if ids else f"image {i}"
        self.suggestion.setText(f"{name}, {self._suggestion.why[i]}. Its band is shaded cyan.")
        self.results.follow_overlays()
        self._pick_eraser()

    def _rank(self, then_show: bool = False) -> None:
        if not self._ready:
            self.suggestion.setText("Ranking once PyTorch and the model are loaded…")
            return
        self.suggestion.setText("Ranking the unrefined images…")
        self.suggest.setEnabled(False)
        # errored is handled here: napari would otherwise raise the error again on the UI
        # thread and show its traceback beside the dock's message.
        worker = create_worker(self.bench.suggest, _ignore_errors=True)
        worker.returned.connect(lambda ranked: self._ranked(ranked, then_show))
        worker.errored.connect(lambda error: show_error(f"Ranking failed: {error}"))
        worker.finished.connect(lambda: self.suggest.setEnabled(True))
        worker.start()
        self._rank_worker = worker

    def _ranked(self, suggestion, then_show: bool) -> None:
        self._suggestion = suggestion
        self.suggestion.setText("Ranking ready: press the button to go to the next image.")
        if then_show:
            self.suggest_next()

    def clip_added(self) -> None:
        count = self.bench.refinement.clip_added()
        self.bench.refinement.sync(None, autosave_folder())
        self.refined_layer.refresh()
        self.forget_layer.refresh()
        self.results.follow_overlays()
        self._show_stats()
        show_info(f"Removed {count} pixels painted outside the coarse masks.")

    # -- unlearning --------------------------------------------------------------------------------
    def start_unlearning(self) -> None:
        self.flush_autosave()
        try:
            spurious = None
            if self.artefacts.currentText() not in ("", FORGET_AS_S):
                spurious = self.viewer.layers[self.artefacts.currentText()].data
            plan = self.bench.plan(spurious)
        except (ValueError, FileNotFoundError, KeyError) as error:
            show_error(str(error))
            return
        self.results.clear(remove=False)
        self.bench.show(None)  # a new run replaces the one on display
        self.cancel = Cancel()
        self.tracker = ProgressTracker(waits=(MEASURE_BEFORE, MEASURE_AFTER))
        self._last_draw = 0.0
        steps = plan.operator.steps
        self.progress.setRange(0, steps)
        self.progress.setValue(0)
        self.worker = create_worker(
            self.bench.execute,
            plan,
            self.cancel,
            _ignore_errors=True,  # _on_error reports it, as for the ranking
            _progress={
                "total": steps + 3,
                "desc": f"Unlearning ({method_label(plan.operator.name)})",
            },
        )
        self.worker.yielded.connect(self._on_step)
        self.worker.returned.connect(self._on_result)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self._set_running(True)
        self.worker.start()

    def _set_running(self, running: bool) -> None:
        self.run.setEnabled(not running)
        self.stop.setEnabled(running)
        self.results.enable_actions(running)

    def cancel_run(self) -> None:
        if self.cancel is not None:
            self.cancel.set()  # the job stops before its next step and keeps the old model
            self.progress_text.setText("Cancelling after this step…")

    def _on_step(self, event) -> None:
        self.progress.setValue(event.step)
        tracker = self.tracker
        if not tracker.add(event):
            self.progress_text.setText(f"{event.phase[0].upper()}{event.phase[1:]}…")
            return
        left = tracker.seconds_left
        eta = f", about {duration(left)} left" if np.isfinite(left) else ""
        self.progress_text.setText(
            f"Step {event.step} of {event.total} ({phase_label(event.phase)}){eta}; "
            f"{duration(tracker.elapsed)} so far"
        )
        if tracker.now - self._last_draw > 0.5 or event.step == event.total:  # ~30 ms a draw
            self._last_draw = tracker.now
            self._draw_curve(event.phase)

    def _draw_curve(self, phase: str) -> None:
        if self._curve_canvas is None:
            from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
            from matplotlib.figure import Figure

            figure = Figure(figsize=(3, 1.8))
            loss_axis, s_axis = figure.subplots(2, 1, sharex=True)
            # The lines are made once and only their data change: clearing the axes and
            # laying the figure out again took about 100 ms of the UI thread per redraw.
            self._lines = (loss_axis.plot([], [])[0], s_axis.plot([], [], "o-")[0])
            loss_axis.set_ylabel("loss", fontsize=7)
            s_axis.set_ylabel("S_global", fontsize=7)
            s_axis.set_xlabel("step", fontsize=7)
            for axis in (loss_axis, s_axis):
                axis.tick_params(labelsize=6)
            figure.tight_layout()
            self._curve_canvas = FigureCanvasQTAgg(figure)
            self._curve_canvas.setFixedHeight(120)
            self.curve_box.addWidget(self._curve_canvas)
        loss_line, s_line = self._lines
        curve = self.tracker.curve
        loss_line.set_data(curve.steps, curve.losses)
        s_line.set_data(curve.probe_steps, curve.s_global)
        for line in self._lines:
            line.axes.relim()
            line.axes.autoscale_view()
        s_line.axes.set_xlabel(f"step ({phase_label(phase)})", fontsize=7)
        self._curve_canvas.draw_idle()

    def _on_result(self, record) -> None:
        self.bench.show(record)
        self._outcome = outcome = RunOutcome.of(record)
        if outcome.status == "cancelled":
            show_info(outcome.message)
        elif outcome.status == "collapsed":
            show_warning(outcome.message)
        self._show_results(self.bench.shown)

    def _on_error(self, error: Exception) -> None:
        self._outcome = RunOutcome.failed(error)
        show_error(self._outcome.message)

    def _on_finished(self) -> None:
        self.worker = None
        if self._outcome is None:  # stopped from napari's task manager: no result, no error
            self._outcome = RunOutcome("cancelled", "Stopped; the previous model is kept.")
        self._set_running(False)
        record = self.bench.shown
        self.results.enable_actions()
        if self._suggestion is not None:  # the model changed: rank again in the background
            self._suggestion = None
            self._rank()
        self.progress_text.setText(
            "" if record is None else f"Finished run {record.number} in {duration(record.seconds)}."
        )
        self._announce_end()

    def _set_ready(self, ready: bool) -> None:
        self._ready = ready
        for control in self._run_controls:
            control.setEnabled(ready)

    @property
    def ready(self) -> bool:
        """PyTorch is loaded and the chosen model was loaded (or its error shown): the run controls
        are on. `bench.loaded` says whether the model loaded."""
        return self._ready

    @property
    def running(self) -> bool:
        """A run's worker is going (its results are drawn after it ends)."""
        return self.worker is not None

    @property
    def busy(self) -> bool:
        """A run is going, or its results are still being drawn."""
        return self.running or self.results.displaying

    def _announce_end(self) -> None:
        """run_finished, once the run has ended and nothing is left to draw."""
        if self._outcome is None or self.busy:
            return
        outcome, self._outcome = self._outcome, None
        self.run_finished.emit(outcome)

    def _show_results(self, record) -> None:
        self.results.display(record)
        if record is not None:  # the verdict at the top of the view, once laid out
            QTimer.singleShot(0, lambda: self.scroll.verticalScrollBar().setValue(self.results.y()))


# -- helpers (no state) ------------------------------------------------------------------------
_LOADER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shortcut-unlearning-load")


def _load_torch_and_model(bench: Workbench) -> tuple[dict[str, tuple[bool, str]], str | None]:
    """In a worker: import PyTorch and load the model. Returns the registry's operators
    (name: certified, its steps setting) and what went wrong with the model, if anything."""
    from .. import saliency  # noqa: F401  (captum and matplotlib: not on a run's first step)
    from ..unlearning import CERTIFIED, OPERATORS

    operators = {
        name: (name in CERTIFIED, OperatorSettings.steps_field(name)) for name in OPERATORS
    }
    try:
        bench.current_model()
    except (ValueError, FileNotFoundError, RuntimeError) as error:
        return operators, str(error)
    return operators, None


def _float(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _device_in_use(name: str) -> str:
    from ..model import resolve_device

    try:
        device = resolve_device(name)
    except ValueError as error:
        return str(error)
    if device.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type
