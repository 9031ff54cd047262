"""A clinician's task, timed, with real mouse events (needs a display, e.g. Xvfb):

napari first; the widget from the Plugins menu and the sample from File > Open Sample (clicks
on the menu bar and its menus); Refine masks; five times "Go to the image to refine next" and
the band erased with eraser strokes on the canvas; Unlearn with the dock's defaults; the
verdict read; Accept; Export (the folder dialog answered at once, counted as one click).

    xvfb-run -a -s "-screen 0 1280x800x24" python benchmarks/clinician_task.py \
        --out benchmarks/results/clinician_task.json

The UI time is the task's wall time less the run itself (Unlearn pressed to the worker
finished): what the software makes a user wait for, with the script's own actions instant.
Each stroke sends every mouse move (one per two image pixels) and lets the canvas draw it
before the next; its time is reported apart (strokes_s, ms_per_mouse_move): a hand's events
come at their own pace and Qt merges those the canvas cannot keep up with.
It counts clicks, strokes and scrolls (a scroll when a control to press is not wholly in the
dock's view). A human's time adds the hand's: `human_estimate_s` is the UI time without the
strokes, plus each click and stroke priced with the Keystroke-Level Model's operators (Card,
Moran and Newell 1980: mental preparation M 1.35 s, pointing P 1.1 s, button press and
release 0.2 s), a stroke's drag at an assumed 2 s (the canvas draws what it can meanwhile
and napari joins the positions it gets); an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import napari  # first, as a user starts it
import numpy as np
from qtpy.QtWidgets import QFileDialog

from shortcut_unlearning.napari._driver import RunWatch, wait, wait_loaded
from shortcut_unlearning.napari._mouse import band_strokes, click, click_menu, drag, in_view

DOCK = "Shortcut Unlearning (Shortcut Unlearning)"
CLICK_S = 1.35 + 1.1 + 0.2  # M + P + press and release
STROKE_S = 1.1 + 0.2 + 2.0  # P + press and release + an assumed drag


class Task:
    def __init__(self, viewer):
        self.viewer, self.widget = viewer, None
        self.clicks = self.strokes = self.moves = 0
        self.strokes_s = 0.0  # the canvas taking each stroke's mouse moves, one by one
        self.scrolled_to: list[str] = []  # controls that needed a scroll first
        self.steps: list[dict] = []
        self.run_s = 0.0

    @contextmanager
    def step(self, name: str):
        start = time.perf_counter()
        yield
        self.steps.append({"step": name, "seconds": round(time.perf_counter() - start, 3)})

    def menu(self, *path) -> None:
        self.clicks += click_menu(self.viewer.window._qt_window, *path)

    def press(self, button) -> None:
        """Click a control of the dock, scrolling to it first if it is not wholly in view."""
        if not in_view(self.widget, button)[0]:
            self.widget.scroll.ensureWidgetVisible(button)
            self.scrolled_to.append(button.text())
            wait(lambda: False, 0.1)
        click(button)
        self.clicks += 1


def moved_on(widget, seen: tuple[str, ...]) -> bool:
    """The suggestion button has shown its next image."""
    return widget.suggestion.text() not in seen and widget.suggest.isEnabled()


def main(out: Path, images: int, size: tuple[int, int]) -> dict:
    os.environ.setdefault("SHORTCUT_UNLEARNING_HOME", tempfile.mkdtemp(prefix="clinician-"))
    viewer = napari.Viewer()
    viewer.window.resize(*size)
    wait(lambda: False, 1.0)  # napari is up: the task starts here
    task = Task(viewer)
    start = time.perf_counter()
    with task.step("open the plugin (Plugins menu)"):
        task.menu("Plugins", "Shortcut Unlearning")
        wait(lambda: DOCK in viewer.window.dock_widgets, 30)
        widget = task.widget = viewer.window.dock_widgets[DOCK]
    with task.step("open the sample (File > Open Sample)"):
        task.menu("File", "Open Sample", "Synthetic dermoscopy with coarse masks")
    with task.step("Refine masks"):
        task.press(widget.refine)
    reference = viewer.layers["reference masks"].data  # the clinician's eye: the true lesion
    refined_images = []
    for k in range(images):
        with task.step(f"go to the image to refine next ({k + 1})"):
            wait_loaded(widget, 600)  # the ranking needs the model
            before = (widget.suggestion.text(), "Ranking the unrefined images…")
            task.press(widget.suggest)
            wait(lambda seen=before: moved_on(widget, seen), 600)
        i = int(viewer.dims.current_step[0])
        refined_images.append(i)
        with task.step(f"erase the band of image {i}"):
            coarse = widget.bench.refinement.coarse[i]
            for path in band_strokes(coarse, reference[i], widget.refined_layer.brush_size):
                stroke = time.perf_counter()
                drag(viewer, path, settle=False)
                task.strokes_s += time.perf_counter() - stroke
                task.strokes += 1
                task.moves += len(path)
            widget.flush_autosave()  # the forget set and the autosave brought up to date
    with task.step("Unlearn (pressed, to the worker started)"):
        watch = RunWatch(widget, lambda: task.press(widget.run))
    run_start = time.perf_counter()
    wait(lambda: not widget.running, 3600)
    task.run_s = time.perf_counter() - run_start
    with task.step("results drawn"):
        watch.wait(600)
        wait(lambda: False, 0.3)
    record = widget.bench.shown
    verdict_in_view = in_view(widget, widget.results.result)[0]
    with task.step("Accept"):
        task.press(widget.results.accept)
    folder = Path(tempfile.mkdtemp(prefix="clinician-export-"))
    QFileDialog.getExistingDirectory = staticmethod(lambda *a, **k: str(folder))
    with task.step("Export (the folder chosen at once)"):
        task.press(widget.results.export)
        task.clicks += 1  # the dialog's Choose
    total = time.perf_counter() - start
    erased = (widget.bench.refinement.coarse != 0) & (widget.refined_layer.data == 0)
    lesion, band = reference != 0, (widget.bench.refinement.coarse != 0) & (reference == 0)
    at = np.array(refined_images)
    result = {
        "machine": f"the 2-core CPU machine under Xvfb ({platform.machine()}, "
        f"{os.cpu_count()} cores seen)",
        "window": list(size),
        "images_refined": refined_images,
        "method": widget.bench.parameters.method,
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
        "ui_s": round(total - task.run_s, 2),
        "ui_s_without_strokes": round(total - task.run_s - task.strokes_s, 2),
        "strokes_s": round(task.strokes_s, 2),
        "mouse_moves": task.moves,
        "ms_per_mouse_move": round(1000 * task.strokes_s / max(task.moves, 1), 1),
        "run_s": round(task.run_s, 2),
        "total_s": round(total, 2),
        "clicks": task.clicks,
        "strokes": task.strokes,
        "scrolls": len(task.scrolled_to),
        "scrolled_to": task.scrolled_to,
        "verdict_in_view_without_scrolling": verdict_in_view,
        "verdict": record.verdict.headline if record is not None else None,
        "accepted": bool(record is not None and record.accepted),
        "exported": [p.name for p in folder.iterdir()],
        "band_erased_share": round(float(erased[at][band[at]].mean()), 3),
        "lesion_pixels_erased": int((erased & lesion).sum()),
        "human_estimate_s": round(
            total - task.run_s - task.strokes_s + task.clicks * CLICK_S + task.strokes * STROKE_S,
            1,
        ),
        "steps": task.steps,
    }
    viewer.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clinician_task.json"))
    parser.add_argument("--images", type=int, default=5, help="images to refine")
    parser.add_argument("--size", type=int, nargs=2, default=(1280, 800), help="window size")
    args = parser.parse_args()
    print(json.dumps(main(args.out, args.images, tuple(args.size)), indent=2))
