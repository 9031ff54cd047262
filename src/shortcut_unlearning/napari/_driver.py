"""The waits every script that drives the dock needs: the demo, the benchmarks, the GPU check
and the user-path test. They run Qt's event loop until the dock says so through its public
surface (`ready`, `busy`, `run_finished`), never by reading its private state.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from qtpy.QtWidgets import QApplication

if TYPE_CHECKING:
    from ..workbench import RunOutcome
    from ._widget import ShortcutUnlearningWidget


def wait(condition: Callable[[], object], timeout_s: float = 300) -> bool:
    """Run the Qt event loop until `condition()` holds; False on time-out."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        QApplication.processEvents()
        time.sleep(0.01)
    return True


def wait_loaded(widget: ShortcutUnlearningWidget, timeout_s: float = 300) -> bool:
    """Until PyTorch and the model are loaded and the run controls are on; False on time-out."""
    return wait(lambda: widget.ready, timeout_s)


class RunWatch:
    """Unlearn pressed (by `press`, a click on the button unless given) and the run watched:
    `outcome` is run_finished's once the run has ended and its results are drawn."""

    def __init__(self, widget: ShortcutUnlearningWidget, press: Callable[[], object] | None = None):
        self.widget, self.outcome = widget, None
        widget.run_finished.connect(self._ended)
        (press or widget.run.click)()
        if self.outcome is None and not widget.busy:  # the dock refused to plan it
            widget.run_finished.disconnect(self._ended)
            raise RuntimeError("Unlearn started no run; napari's notifications say why")

    def _ended(self, outcome: RunOutcome) -> None:
        self.outcome = outcome
        self.widget.run_finished.disconnect(self._ended)

    def wait(self, timeout_s: float = 300) -> RunOutcome | None:
        """The run's outcome once it has ended and its results are drawn; None on time-out."""
        wait(lambda: self.outcome is not None, timeout_s)
        return self.outcome


def unlearn(
    widget: ShortcutUnlearningWidget,
    timeout_s: float = 300,
    press: Callable[[], object] | None = None,
) -> RunOutcome | None:
    """Press Unlearn and wait for the run's outcome (RunWatch); None on time-out."""
    return RunWatch(widget, press).wait(timeout_s)
