"""`shortcut-unlearning demo`: napari with the sample loaded and the widget docked.

With a display it stays open for you. Headless (under Xvfb) it drives the workflow itself:
refines three sample masks from their fine masks, unlearns a short run, and saves a
screenshot and the exported run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

PLUGIN, WIDGET = "shortcut-unlearning", "Shortcut Unlearning"


def open_viewer(show: bool = True, viewer=None):
    import napari

    viewer = viewer or napari.Viewer(title="Shortcut Unlearning demo", show=show)
    viewer.open_sample(PLUGIN, "dermoscopy")
    _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, WIDGET)
    widget.image.value, widget.coarse.value = "dermoscopy", "coarse masks"
    return viewer, widget


def interactive() -> None:
    import napari

    open_viewer()
    napari.run()


def scripted(out: Path, refine: int = 3, steps: int = 40, timeout_s: float = 900) -> dict:
    """Drive the workflow as a clinician would, headless; returns what it wrote."""
    from qtpy.QtWidgets import QApplication

    viewer, widget = open_viewer(show=True)
    viewer.window.resize(1600, 1000)
    widget.start_refinement()
    fine = viewer.layers["reference masks"].data
    layer = widget.refined_layer
    for i in range(refine):  # erase what the coarse mask wrongly calls lesion
        wrong = np.nonzero((layer.data[i] != 0) & (fine[i] == 0))
        layer.data_setitem((np.full(len(wrong[0]), i), *wrong), 0)
    QApplication.processEvents()
    widget.method.value, widget.steps.value = "neggrad-seg", steps
    widget.start_unlearning()
    deadline = time.monotonic() + timeout_s
    while widget.worker is not None and time.monotonic() < deadline:
        QApplication.processEvents()
        time.sleep(0.02)
    if widget.outcome is None:
        raise RuntimeError("the demo's unlearning run did not finish")
    viewer.layers["forget set"].visible = False
    viewer.dims.set_point(0, 0)
    out.mkdir(parents=True, exist_ok=True)
    screenshot = out / "napari.png"
    viewer.screenshot(str(screenshot), canvas_only=False)
    exported = widget.export_run(out / "exports")
    text = widget.result.text()
    viewer.close()
    return {"screenshot": screenshot, "export": exported, "result": text}
