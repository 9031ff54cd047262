"""Progress events, cancellation, and the adapter that runs a generator to its end.

Long jobs (training, unlearning) are generators that yield Progress events and return their
result. The command line drives them with `drive` (a tqdm bar); the napari plugin runs the same
generator in a thread worker. Cancellation is a flag the generator checks every step.
"""

from __future__ import annotations

import threading
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


@dataclass
class Progress:
    """One step of a long job."""

    step: int
    total: int
    phase: str = ""  # e.g. "train", "noisy", "fine-tune"
    losses: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] | None = None  # an occasional snapshot, e.g. S_global on a probe set


class Cancel:
    """A flag the caller sets and a running job checks every step."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def __bool__(self) -> bool:
        return self._event.is_set()


class Cancelled(Exception):
    """Raised by a job that stopped because its Cancel flag was set."""


def drive(job: Generator[Progress, None, T], desc: str = "", quiet: bool = False) -> T:
    """Run a job synchronously with a tqdm bar and return its result."""
    bar = None
    try:
        while True:
            event = next(job)
            if bar is None:
                bar = tqdm(
                    total=event.total, desc=desc, disable=True if quiet else None, leave=False
                )
            bar.n = event.step
            bar.set_postfix({k: f"{v:.3g}" for k, v in {**event.losses}.items()}, refresh=True)
    except StopIteration as done:
        return done.value
    finally:
        if bar is not None:
            bar.close()
