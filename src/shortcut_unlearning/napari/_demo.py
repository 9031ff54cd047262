"""`shortcut-unlearning demo`: napari with the sample loaded and the widget docked.

With a display it stays open for you. Headless (under Xvfb) it drives the workflow itself:
refines three sample masks from their fine masks, unlearns a short run, and saves a
screenshot and the exported run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..settings import OperatorSettings
from ._driver import unlearn, wait, wait_loaded

PLUGIN, WIDGET = "shortcut-unlearning", "Shortcut Unlearning"


def open_viewer(show: bool = True, viewer=None):
    import napari

    viewer = viewer or napari.Viewer(title="Shortcut Unlearning demo", show=show)
    viewer.open_sample(PLUGIN, "dermoscopy")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.image.setCurrentText("dermoscopy")
    widget.coarse.setCurrentText("coarse masks")
    return viewer, widget


def erase_band(viewer, widget, images) -> None:
    """Erase, as a clinician would, what the coarse masks wrongly call lesion."""
    fine = viewer.layers["reference masks"].data
    layer = widget.refined_layer
    for i in images:
        wrong = np.nonzero((layer.data[i] != 0) & (fine[i] == 0))
        layer.data_setitem((np.full(len(wrong[0]), i), *wrong), 0)


def hide_notifications(viewer) -> None:
    """Hide napari's notification pop-ups (they stay in the notification list)."""
    from qtpy.QtWidgets import QWidget

    for child in viewer.window._qt_window.findChildren(QWidget):
        if type(child).__name__ == "NapariQtNotification":
            child.hide()


def interactive() -> None:
    import napari

    open_viewer()
    napari.run()


def scripted(
    out: Path,
    refine: int = 3,
    steps: int | None = None,
    timeout_s: float = 900,
    size: tuple[int, int] = (1600, 1000),
    export: bool = True,
    methods: tuple[str, ...] = (OperatorSettings.method,),
) -> dict:
    """Drive the workflow as a clinician would, headless, at the window `size`: a screenshot
    after the refinement, then one run of each method from the same model (Revert between
    them), each with its screenshot (`steps` None: the dock's). Returns what it wrote and the
    last run's verdict."""
    viewer, widget = open_viewer(show=True)
    viewer.window.resize(*size)
    if not wait_loaded(widget, timeout_s):
        raise RuntimeError("PyTorch and the model did not load")
    widget.refine.click()
    erase_band(viewer, widget, range(refine))
    viewer.dims.set_point(0, 0)
    wait(lambda: False, 0.3)
    out.mkdir(parents=True, exist_ok=True)
    name = f"widget-{size[0]}x{size[1]}"
    shots = {"refined": out / f"{name}-refined.png"}
    viewer.screenshot(str(shots["refined"]), canvas_only=False)
    for method in methods:
        if widget.bench.shown is not None:
            widget.results.revert.click()
        viewer.layers["forget set"].visible = True
        widget.method.setCurrentIndex(widget.method.findData(method))
        if steps is not None:
            widget.steps.setValue(steps)
        outcome = unlearn(widget, timeout_s)
        if widget.bench.shown is None:
            why = outcome.message if outcome else f"not within {timeout_s} s"
            raise RuntimeError(f"the demo's {method} run did not finish: {why}")
        viewer.layers["forget set"].visible = False  # the erased pixels: see the legend
        viewer.dims.set_point(0, 0)
        hide_notifications(viewer)  # Revert's would cover the colour bar's words
        wait(lambda: False, 0.3)
        shots[method] = out / f"{name}-{method}.png"
        viewer.screenshot(str(shots[method]), canvas_only=False)
    exported = widget.results.export_run(out / "exports") if export else None
    text = widget.results.result.text()
    viewer.close()
    return {"screenshots": shots, "export": exported, "result": text}


# The README's pictures: the method most use, erase and relearn, and a certified method.
SCREENSHOT_METHODS = ("model-clipping", "neggrad-seg", "relearn", "gradient-clipping")


def screenshots(out: Path, steps: int | None = 40) -> list[Path]:
    """The README's pictures: after the refinement and after a run of each of
    SCREENSHOT_METHODS, at 1280 x 800 and 1600 x 1000."""
    import os
    import tempfile

    shots = []
    for size in ((1280, 800), (1600, 1000)):
        # Each window size starts from nothing saved: no autosave restored, default settings.
        os.environ["SHORTCUT_UNLEARNING_HOME"] = tempfile.mkdtemp(prefix="shortcut-unlearning-")
        done = scripted(out, steps=steps, size=size, export=False, methods=SCREENSHOT_METHODS)
        shots += list(done["screenshots"].values())
    return shots
