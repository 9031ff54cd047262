"""Measured, not assumed: how responsive the viewer stays (needs a display, e.g. Xvfb).

- stall: a 10 ms heartbeat timer runs in the Qt event loop while the widget unlearns on the
  CPU in its worker; the longest gap between beats is the longest freeze a user would feel.
- overlay: time of one forget-set update after an edit on an 8 x 1024 x 1024 stack (check the
  images edited so far, recompute the changed plane, autosave it, redraw the overlay).
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from ..napari._demo import erase_band, open_viewer
from ..napari._driver import RunWatch, wait, wait_loaded


def event_loop_stall(steps: int = 40, refine: int = 3, runs: int = 2, viewer=None) -> dict:
    """Longest gap between 10 ms heartbeats while the widget unlearns on the CPU and while it
    shows the results, for `runs` runs in a row (the first adds the result layers, later runs
    update them). A gap belongs to the phase in which it ends."""
    from qtpy.QtCore import QTimer

    owned = viewer is None  # a viewer handed in belongs to the caller
    viewer, widget = open_viewer(show=True, viewer=viewer)
    wait_loaded(widget, 120)
    widget.device.setCurrentText("cpu")
    widget.start_refinement()
    erase_band(viewer, widget, range(refine))
    widget.method.setCurrentIndex(widget.method.findData("neggrad-seg"))
    widget.steps.setValue(steps)
    wait(lambda: False, 0.2)
    beats = []
    timer = QTimer(interval=10)
    timer.timeout.connect(lambda: beats.append(time.perf_counter()))
    timer.start()
    wait(lambda: False, 1.0)  # idle baseline
    idle_gaps = np.diff(beats) * 1000
    phases = []  # (name, run, begin, end)
    for run in range(1, runs + 1):
        start = time.perf_counter()
        watch = RunWatch(widget)  # Unlearn, on the UI thread: the parameters, the masks' snapshot
        launched = time.perf_counter()
        wait(lambda: not widget.running, 1800)
        finished = time.perf_counter()
        watch.wait(600)
        shown = time.perf_counter()
        phases += [
            ("launch", run, start, launched),
            ("running", run, launched, finished),
            ("display", run, finished, shown),
        ]
        wait(lambda: False, 0.3)
    timer.stop()
    beats = np.array(beats)
    gaps, ends = np.diff(beats) * 1000, beats[1:]
    result = {"idle_max_gap_ms": float(idle_gaps.max()), "steps": steps, "runs": runs}
    for name, run, begin, end in phases:
        inside = gaps[(ends > begin) & (ends <= end + 0.05)]
        inside = inside if len(inside) else np.zeros(1)  # too short to hold a beat
        result[f"run{run}_{name}_max_gap_ms"] = float(inside.max())
        result[f"run{run}_{name}_s"] = end - begin
        if name == "running":
            result[f"run{run}_running_p99_gap_ms"] = float(np.percentile(inside, 99))
    if owned:
        viewer.close()
    return result


def overlay_update(images: int = 8, size: int = 1024, edits: int = 20, viewer=None) -> dict:
    """Per-edit forget-set update on an images x size x size stack: median and worst."""
    import napari

    from ..refinement import Refinement

    rng = np.random.default_rng(0)
    coarse = np.zeros((images, size, size), np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(images):
        coarse[i][(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2] = 1 + i % 2
    owned = viewer is None
    viewer = viewer or napari.Viewer(show=True)
    refined_layer = viewer.add_labels(coarse.copy(), name="refined")
    refinement = Refinement(coarse, refined_layer.data)
    forget_layer = viewer.add_image(
        refinement.forget.view(np.uint8),
        name="forget set",
        colormap="red",
        blending="additive",
        contrast_limits=(0, 1),
    )
    wait(lambda: False, 0.5)
    seconds, touched = [], set()
    with tempfile.TemporaryDirectory() as autosave:
        for _ in range(edits):
            plane = int(rng.integers(images))
            viewer.dims.set_point(0, plane)
            y, x = rng.integers(size // 3, 2 * size // 3, 2)
            refined_layer.data[plane, y - 20 : y + 20, x - 20 : x + 20] = 0  # one brush dab
            touched.add(plane)
            start = time.perf_counter()
            # What the widget does after a stroke: check the images edited so far, redraw the
            # forget set, autosave what changed.
            refinement.sync(touched, autosave)
            forget_layer.refresh()
            seconds.append(time.perf_counter() - start)
            wait(lambda: False, 0.02)
    if owned:
        viewer.close()
    ms = np.array(seconds) * 1000
    return {
        "median_ms": float(np.median(ms)),
        "max_ms": float(ms.max()),
        "edits": edits,
        "stack": [images, size, size],
    }


DOCK_SCRIPT = """
import json, sys, time
start = time.perf_counter()
import napari
from qtpy.QtWidgets import QApplication
viewer = napari.Viewer()
for _ in range(20):
    QApplication.processEvents()
menu = viewer.window.plugins_menu
action = next(a for a in menu.actions() if a.text().startswith("Shortcut Unlearning"))
clicked = time.perf_counter()
action.trigger()
widget = viewer.window.dock_widgets["Shortcut Unlearning (Shortcut Unlearning)"]
torch_then = "torch" in sys.modules  # the dock is built; PyTorch must not be loading yet
QApplication.processEvents()
shown = time.perf_counter()
from shortcut_unlearning.napari._driver import wait_loaded
wait_loaded(widget, 600)
ready = time.perf_counter()
print("DOCK " + json.dumps({
    "napari_start_s": clicked - start,
    "menu_to_dock_ms": (shown - clicked) * 1000,
    "torch_imported_when_shown": torch_then,
    "dock_to_model_loaded_s": ready - shown,
}))
viewer.close()
"""


def dock_open() -> dict:
    """In a fresh process, as a user starts it: napari first, then the widget from the Plugins
    menu. How long until the dock is on screen, and until PyTorch and the model are loaded in
    the background."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", DOCK_SCRIPT], capture_output=True, text=True, timeout=900
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("DOCK ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the dock measurement failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1][5:])
