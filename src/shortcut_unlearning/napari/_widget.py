"""The dock widget: builds the view and wires signals; every decision is in the core.

Refine -> a refined Labels copy of the coarse masks, the forget set drawn over it after each
edit, autosaved. Unlearn -> the core job in a thread worker (progress, live curve, Cancel).
Results -> saliency and predictions before/after as layers, S_global on the canvas.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import napari
import numpy as np
from magicgui import widgets
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning
from qtpy.QtCore import QTimer
from qtpy.QtWidgets import QLabel, QScrollArea, QVBoxLayout, QWidget

from ..certificate import CertificateError
from ..interactive import Outcome, unlearn_stack
from ..masks import MaskError
from ..model import Model, resolve_device
from ..progress import Cancel
from ..refinement import Refinement
from ..resources import SAMPLE_MODEL, sample_data_dir
from ..saliency import normalise_maps
from ..settings import DEFAULTS, autosave_folder, load_settings, save_settings
from ..unlearning import CERTIFIED, OPERATORS, make_operator
from ._io import write_masks

RESULT = "shortcut_unlearning_result"  # metadata flag of the layers this widget owns
FORGET_AS_S = "(the forget set)"


class ShortcutUnlearningWidget(QWidget):
    def __init__(self, napari_viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = napari_viewer
        self.refinement: Refinement | None = None
        self.refined_layer = None
        self.forget_layer = None
        self.models: list[Model] = []  # accepted models, the current one last
        self.outcome: Outcome | None = None  # the last run, until accepted or reverted
        self.worker = None
        self.cancel: Cancel | None = None
        self._autosave_timer = QTimer(self, singleShot=True, interval=1500)
        self._autosave_timer.timeout.connect(self.autosave)
        self._pending: set[int] | None = set()  # images edited since the last update
        self._edit_timer = QTimer(self, singleShot=True, interval=0)
        self._edit_timer.timeout.connect(self.apply_edits)
        self._build()
        self._restore(load_settings())
        self.viewer.layers.events.inserted.connect(self._refresh_choices)
        self.viewer.layers.events.removed.connect(self._refresh_choices)

    # -- the view ---------------------------------------------------------------------------
    def _build(self) -> None:
        w = widgets
        self.image = w.ComboBox(label="images", choices=self._layers("image"))
        self.coarse = w.ComboBox(label="coarse masks", choices=self._layers("labels"))
        # S for S_global (METHOD 4): a painted artefact layer if there is one, else the
        # forget set.
        self.artefacts = w.ComboBox(label="artefacts (S)", choices=self._artefact_choices())
        self.model_path = w.FileEdit(
            label="model", filter="*.safetensors", value=str(sample_data_dir() / SAMPLE_MODEL)
        )
        self.refine = w.PushButton(text="Refine (copy coarse masks, eraser)")
        self.stats = w.Label(value="no refinement yet")
        self.clip = w.PushButton(text="Clip pixels added outside the coarse masks", visible=False)
        self.method = w.ComboBox(label="operator", choices=sorted(OPERATORS))
        self.scope = w.ComboBox(label="scope", choices=["decoder", "head", "all"])
        self.steps = w.SpinBox(label="steps", min=1, max=100_000)
        self.epsilon = w.FloatSpinBox(label="epsilon", min=0.01, max=100, step=0.1)
        self.delta = w.LineEdit(label="delta")
        self.certificate = w.Label(value="")
        self.device = w.ComboBox(label="device", choices=["auto", "cuda", "mps", "cpu"])
        self.device_used = w.Label(value="")
        self.seed = w.SpinBox(label="seed", min=0, max=2**31 - 1)
        self.defaults = w.PushButton(text="Restore defaults")
        self.run = w.PushButton(text="Unlearn")
        self.stop = w.PushButton(text="Cancel", enabled=False)
        self.result = QLabel()  # several lines: a plain label spanning the dock
        for label in (self.stats, self.certificate):
            label.native.setWordWrap(True)
        self.accept = w.PushButton(text="Accept", enabled=False)
        self.revert = w.PushButton(text="Revert", enabled=False)
        self.export = w.PushButton(text="Export run", enabled=False)
        form = w.Container(
            widgets=[
                self.image,
                self.coarse,
                self.artefacts,
                self.model_path,
                self.refine,
                self.stats,
                self.clip,
                self.method,
                self.scope,
                self.steps,
                self.epsilon,
                self.delta,
                self.certificate,
                self.device,
                self.device_used,
                self.seed,
                self.defaults,
                w.Container(widgets=[self.run, self.stop], layout="horizontal", labels=False),
            ]
        )
        decisions = w.Container(
            widgets=[self.accept, self.revert, self.export], layout="horizontal", labels=False
        )
        self.figure = Figure(figsize=(3, 2.4))
        self.loss_axis, self.s_axis = self.figure.subplots(2, 1, sharex=True)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setMinimumHeight(200)
        # Everything scrolls, so nothing is squeezed on a short screen.
        content = QWidget()
        column = QVBoxLayout(content)
        for part in (form.native, self.result, decisions.native, self.canvas):
            column.addWidget(part)  # the result text gets the dock's full width
        scroll = QScrollArea()
        scroll.setWidgetResizable(True)
        scroll.setWidget(content)
        QVBoxLayout(self).addWidget(scroll)
        self.refine.changed.connect(self.start_refinement)
        self.clip.changed.connect(self.clip_added)
        self.run.changed.connect(self.start_unlearning)
        self.stop.changed.connect(self.cancel_run)
        self.accept.changed.connect(self.accept_model)
        self.revert.changed.connect(self.revert_model)
        self.export.changed.connect(self.export_run)
        self.defaults.changed.connect(lambda: self._restore(DEFAULTS))
        for field in (
            self.method,
            self.scope,
            self.steps,
            self.epsilon,
            self.delta,
            self.device,
            self.seed,
        ):
            field.changed.connect(self._parameters_changed)

    def _layers(self, kind: str) -> list[str]:
        return [
            layer.name
            for layer in self.viewer.layers
            if layer._type_string == kind and not layer.metadata.get(RESULT)
        ]

    def _artefact_choices(self) -> list[str]:
        return [FORGET_AS_S, *self._layers("labels")]

    def _refresh_choices(self, event=None) -> None:
        for combo, choices in (
            (self.image, self._layers("image")),
            (self.coarse, self._layers("labels")),
            (self.artefacts, self._artefact_choices()),
        ):
            current = combo.value
            combo.choices = choices
            if current in combo.choices:
                combo.value = current

    # -- parameters -------------------------------------------------------------------------
    def parameters(self) -> dict:
        return {
            "method": self.method.value,
            "scope": self.scope.value,
            "epsilon": float(self.epsilon.value),
            "delta": _float(self.delta.value),
            "steps": int(self.steps.value),
            "device": self.device.value,
            "seed": int(self.seed.value),
        }

    def _restore(self, values: dict) -> None:
        self._restoring = True
        self.method.value, self.scope.value = values["method"], values["scope"]
        self.epsilon.value, self.delta.value = values["epsilon"], f"{values['delta']:g}"
        self.steps.value, self.device.value = values["steps"], values["device"]
        self.seed.value = values["seed"]
        self._restoring = False
        self._parameters_changed()

    def _parameters_changed(self, *_) -> None:
        if getattr(self, "_restoring", False):
            return
        certified = self.method.value in CERTIFIED
        self.epsilon.visible = self.delta.visible = certified
        # The calibration fixes the noisy steps; for certified operators these are fine-tuning.
        self.steps.label = "fine-tune steps" if certified else "steps"
        try:
            device = resolve_device(self.device.value)
            self.device_used.value = f"in use: {_describe(device)}"
        except ValueError as error:
            self.device_used.value = str(error)
        self.certificate.value = self._certificate_preview() if certified else ""
        values = self.parameters()
        if values["delta"] is not None:
            save_settings(values)

    def operator(self):
        values = self.parameters()
        certified = values["method"] in CERTIFIED
        if certified and values["delta"] is None:
            raise CertificateError(f"delta must be a number, got {self.delta.value!r}")
        return make_operator(
            values["method"],
            steps=values["steps"],
            seed=values["seed"],
            scope=values["scope"],
            **({"epsilon": values["epsilon"], "delta": values["delta"]} if certified else {}),
        )

    def _certificate_preview(self) -> str:
        from ..unlearning.certified import collapse_warning

        try:
            operator = self.operator()
            certificate = operator.certificate(self.current_model())
        except (ValueError, FileNotFoundError) as error:
            return str(error)
        warning = collapse_warning(certificate)
        return certificate.summary() + (f"\nWARNING: {warning}" if warning else "")

    # -- the model --------------------------------------------------------------------------
    def current_model(self) -> Model:
        """The accepted model, loading the chosen checkpoint the first time."""
        device = resolve_device(self.device.value)
        if not self.models or getattr(self, "_model_source", None) != str(self.model_path.value):
            self.models = [Model.load(self.model_path.value, device)]
            self._model_source = str(self.model_path.value)
        if self.models[-1].device != device:
            self.models[-1].to(device)
        return self.models[-1]

    # -- refinement -------------------------------------------------------------------------
    def start_refinement(self) -> None:
        if not self.coarse.value:
            show_warning("Open or choose a coarse-mask Labels layer first.")
            return
        coarse_layer = self.viewer.layers[self.coarse.value]
        refinement = Refinement(np.asarray(coarse_layer.data))
        if refinement.restore(autosave_folder()):
            show_info("Restored your autosaved refinements of these masks.")
        name = f"refined {coarse_layer.name}"
        self.refined_layer = self.viewer.add_labels(
            refinement.refined, name=name, metadata=dict(coarse_layer.metadata)
        )
        # The layer holds the array the refinement reads: edits need no copying.
        self.refinement = Refinement(refinement.coarse, self.refined_layer.data)
        self.forget_layer = self.viewer.add_image(
            self.refinement.forget.view(np.uint8),
            name="forget set",
            colormap="red",
            blending="additive",
            opacity=0.7,
            contrast_limits=(0, 1),
            metadata={RESULT: True},
        )
        self.refined_layer.events.paint.connect(self._edited)
        self.refined_layer.events.data.connect(self._edited)
        self.viewer.layers.selection.active = self.refined_layer
        self.refined_layer.mode = "erase"
        self._show_stats()

    def _edited(self, event=None) -> None:
        """A paint event. napari may send it before writing the pixels, so the forget set is
        updated once the event loop is free again (which also merges a burst of events)."""
        planes = _edited_planes(event)
        self._pending = (
            None if planes is None or self._pending is None else (self._pending | set(planes))
        )
        self._edit_timer.start()

    def apply_edits(self) -> None:
        """Recompute the forget set where the pending edits landed, and show it."""
        pending, self._pending = self._pending, set()
        if pending is None:
            self.refinement.update()
        for plane in sorted(pending or ()):
            self.refinement.update(plane)
        self.forget_layer.refresh()
        self._show_stats()
        self._autosave_timer.start()

    def _show_stats(self) -> None:
        s = self.refinement.stats()
        self.stats.value = (
            f"{s['refined_images']} of {s['images']} images refined; "
            f"{s['forget_pixels']:,} forget pixels "
            f"({s['forget_share']:.1%} of the coarse lesion)"
        )
        if s["added_pixels"]:
            self.stats.value += (
                f"\n{s['added_pixels']:,} pixels painted outside the coarse "
                "masks: a refinement may only erase"
            )
        self.clip.visible = bool(s["added_pixels"])

    def clip_added(self) -> None:
        count = self.refinement.clip_added()
        self.refined_layer.refresh()
        self.forget_layer.refresh()
        self._show_stats()
        self.autosave()
        show_info(f"Removed {count} pixels painted outside the coarse masks.")

    def autosave(self) -> None:
        if self.refinement is not None:
            self.refinement.autosave(autosave_folder())

    # -- unlearning -------------------------------------------------------------------------
    def start_unlearning(self) -> None:
        if self.refinement is None:
            show_warning("Press Refine and erase what the coarse masks wrongly call lesion.")
            return
        try:
            operator = self.operator()
            model = self.current_model()
            images = np.asarray(self.viewer.layers[self.image.value].data)
            # The worker gets a snapshot: painting during the run cannot race with it.
            snapshot = Refinement(self.refinement.coarse, self.refinement.refined.copy())
            snapshot.split()  # raises now, in the UI, for an empty or invalid refinement
            spurious = None
            if self.artefacts.value != FORGET_AS_S:
                spurious = np.asarray(self.viewer.layers[self.artefacts.value].data) != 0
        except (ValueError, FileNotFoundError, KeyError) as error:
            show_error(str(error))
            return
        self.autosave()
        self.cancel = Cancel()
        self._curve = {"step": [], "loss": [], "probe_step": [], "s_global": []}
        self._last_draw = 0.0
        self.worker = create_worker(
            unlearn_stack,
            model,
            images,
            snapshot,
            operator,
            spurious=spurious,
            cancel=self.cancel,
            _progress={"total": operator.steps, "desc": f"Unlearning ({operator.name})"},
        )
        self.worker.yielded.connect(self._on_step)
        self.worker.returned.connect(self._on_result)
        self.worker.errored.connect(self._on_error)
        self.worker.finished.connect(self._on_finished)
        self.run.enabled, self.stop.enabled = False, True
        if model.device.type == "cpu":  # leave a core to the event loop (NAPARI.md)
            import torch

            self._threads = torch.get_num_threads()
            torch.set_num_threads(max(1, self._threads - 1))
        self.worker.start()

    def cancel_run(self) -> None:
        if self.cancel is not None:
            self.cancel.set()  # the job stops before its next step and keeps the old model

    def _on_step(self, event) -> None:
        self._curve["step"].append(event.step)
        self._curve["loss"].append(event.losses.get("total", np.nan))
        if event.metrics:
            self._curve["probe_step"].append(event.step)
            self._curve["s_global"].append(event.metrics.get("s_global", np.nan))
        # Redrawing costs tens of milliseconds on the UI thread: at most twice a second.
        now = time.monotonic()
        if now - self._last_draw < 0.5 and event.step < event.total:
            return
        self._last_draw = now
        self.loss_axis.clear()
        self.s_axis.clear()
        self.loss_axis.plot(self._curve["step"], self._curve["loss"])
        self.loss_axis.set_ylabel("loss", fontsize=7)
        self.s_axis.plot(self._curve["probe_step"], self._curve["s_global"], "o-")
        self.s_axis.set_ylabel("S_global", fontsize=7)
        self.s_axis.set_xlabel(f"step ({event.phase})", fontsize=7)
        self.canvas.draw_idle()

    def _on_result(self, outcome: Outcome) -> None:
        self.outcome = outcome
        result = outcome.result
        if result.cancelled:
            show_info(f"Cancelled after {result.steps} steps; the previous model is kept.")
            self.outcome = None
            return
        if result.collapsed:
            show_warning(
                "The unlearned model collapsed (its probe Dice fell below its floor); the "
                "previous model is kept. Try the head scope or a larger epsilon."
            )
        self._show_views(outcome)
        self.accept.enabled = self.revert.enabled = not result.collapsed
        self.export.enabled = True

    def _on_error(self, error: Exception) -> None:
        show_error(_explain(error))

    def _on_finished(self) -> None:
        import torch

        self.run.enabled, self.stop.enabled = True, False
        self.worker = None
        if getattr(self, "_threads", None):
            torch.set_num_threads(self._threads)
            self._threads = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # give the GPU memory back after each run

    def _show_views(self, outcome: Outcome) -> None:
        """Before over the images, after over a copy placed to their right: one glance."""
        before, after = outcome.before, outcome.after
        images = self.viewer.layers[self.image.value]
        shift = (0, 0, round(images.data.shape[2] * 1.06))
        self._result_layer("images (after)", images.data, "image", rgb=images.rgb, translate=shift)
        maps_before, vmax = normalise_maps(before.saliency)
        maps_after, _ = normalise_maps(after.saliency, vmax)  # one colour scale for both
        heat = {
            "colormap": "inferno",
            "opacity": 0.6,
            "blending": "additive",
            "contrast_limits": (0, 1),
        }
        self._result_layer("saliency before", maps_before, "image", **heat)
        self._result_layer("saliency after", maps_after, "image", translate=shift, **heat)
        self._result_layer("prediction before", before.predictions, "labels", contour=1)
        self._result_layer(
            "prediction after", after.predictions, "labels", contour=1, translate=shift
        )
        sb, sa = before.s_global, after.s_global
        overlay = _text_overlay(self.viewer)
        overlay.visible, overlay.font_size, overlay.position = True, 12, "top_left"
        overlay.text = (
            f"S_global {sb['value']:.2e} -> {sa['value']:.2e} nats/px\n"
            "left: before, right: after unlearning"
        )
        self.result.setText(
            f"S_global before {sb['value']:.2e} [{sb['ci_low']:.1e}, {sb['ci_high']:.1e}]\n"
            f"S_global after  {sa['value']:.2e} [{sa['ci_low']:.1e}, {sa['ci_high']:.1e}]\n"
            f"(nats per pixel, 95% CI over images; permutation null {sb['null_mean']:.1e})\n"
            f"Dice on the refined images {before.dice:.3f} -> {after.dice:.3f}"
        )
        self.result.setMinimumHeight(self.result.sizeHint().height())  # all lines, not one
        self.viewer.reset_view()

    def _result_layer(self, name: str, data, kind: str, **style) -> None:
        """Update this widget's own result layer, or add one; never a layer the user made."""
        for layer in self.viewer.layers:
            if layer.name == name and layer.metadata.get(RESULT):
                layer.data = data
                return
        contour = style.pop("contour", 0)  # a Labels property, not an add_labels argument
        add = self.viewer.add_image if kind == "image" else self.viewer.add_labels
        layer = add(data, name=name, metadata={RESULT: True}, **style)
        if contour:
            layer.contour = contour

    def accept_model(self) -> None:
        self.models.append(self.outcome.result.model)
        self.accept.enabled = False
        show_info("The unlearned model is now the current model.")

    def revert_model(self) -> None:
        if not self.accept.enabled and len(self.models) > 1:
            self.models.pop()  # undo an accept
        self.accept.enabled = self.revert.enabled = False
        show_info("Reverted: the model from before this run is current.")

    def export_run(self, folder: str | Path | None = None) -> Path:
        """Write the current model, the refined masks, metrics and pictures to a new folder."""
        base = Path(folder) if folder else Path(str(self.model_path.value)).parent / "exports"
        out = base / time.strftime("run-%Y%m%d-%H%M%S")
        out.mkdir(parents=True, exist_ok=False)  # a new folder: nothing is overwritten
        self.models[-1].save(out / "model")
        write_masks(
            str(out / "refined_masks"),
            self.refinement.refined,
            {"metadata": self.refined_layer.metadata},
        )
        outcome = self.outcome
        report = {"parameters": self.parameters(), "refinement": self.refinement.stats()}
        if outcome is not None and outcome.after is not None:
            report.update(
                s_global_before=outcome.before.s_global,
                s_global_after=outcome.after.s_global,
                dice_before=outcome.before.dice,
                dice_after=outcome.after.dice,
                collapsed=outcome.result.collapsed,
                certificate=outcome.certificate.to_dict() if outcome.certificate else None,
            )
            self.viewer.screenshot(str(out / "before_after.png"), canvas_only=True)
        (out / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
        show_info(f"Exported to {out}")
        return out


def _edited_planes(event) -> list[int] | None:
    """The image indices a paint event touched, or None if unknown."""
    atoms = getattr(event, "value", None)
    if not isinstance(atoms, list | tuple):
        return None
    planes = set()
    for atom in atoms:
        indices = atom[0] if isinstance(atom, tuple | list) else None
        if indices is None or len(indices) < 3:
            return None
        planes.update(np.unique(np.asarray(indices[0])).tolist())
    return sorted(planes)


def _text_overlay(viewer):
    """The canvas text overlay (viewer.canvas.overlays.text since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    return overlays.text if overlays is not None else viewer.text_overlay


def _float(text: str) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _describe(device) -> str:
    if device.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return device.type


def _explain(error: Exception) -> str:
    """A notification for a failed run; the previous model is always kept."""
    name = type(error).__name__
    if "OutOfMemory" in name:
        return (
            "The GPU ran out of memory; the previous model is kept. Free GPU memory, use "
            "fewer images or the cpu device."
        )
    if isinstance(error, MaskError | CertificateError | FloatingPointError | ValueError):
        return f"{error} (the previous model is kept)"
    return f"Unlearning failed ({name}: {error}); the previous model is kept."
