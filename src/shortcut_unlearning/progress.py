"""Progress events, cancellation, and the adapter that runs a generator to its end.

Long jobs (training, unlearning) are generators that yield Progress events and return their
result. The command line drives them with `drive` (a tqdm bar); the napari plugin runs the same
generator in a thread worker and shows what a ProgressTracker keeps of its events (the time
left, the loss curve). Cancellation is a flag the generator checks every step.

A step's losses stay on the device until someone reads them (`Losses`), so a loop on a GPU
never waits for the device just to report a number; the tqdm bar reads them a few times a
second, and a reader such as the napari widget pays the wait itself, off the loop.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


class Losses(Mapping):
    """A step's loss values by name, read as floats.

    Values may be tensors still being computed on the device: they are converted together,
    with one wait for the device, the first time any of them is read, and never if nobody
    reads them.
    """

    def __init__(self, values: Mapping):
        self._values = {k: v.detach() if hasattr(v, "detach") else v for k, v in values.items()}
        self._floats: dict[str, float] | None = None

    def _read(self) -> dict[str, float]:
        if self._floats is None:
            tensors = {k: v for k, v in self._values.items() if hasattr(v, "detach")}
            if tensors:
                import torch  # only a running job's tensors get here: torch is loaded

                values = torch.stack([v.float().reshape(()) for v in tensors.values()])
                self._values.update(zip(tensors, values.tolist(), strict=True))
            self._floats = {k: float(v) for k, v in self._values.items()}
        return self._floats

    def __getitem__(self, key: str) -> float:
        return self._read()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Losses({self._read()})"


@dataclass
class Progress:
    """One step of a long job."""

    step: int
    total: int
    phase: str = ""  # e.g. "train", "noisy", "fine-tune"
    losses: Mapping[str, float] = field(default_factory=dict)  # a dict or Losses
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


# Seconds between the bar's loss readouts: reading a loss waits for the device.
POSTFIX_EVERY = 0.5


def drive(job: Generator[Progress, None, T], desc: str = "", quiet: bool = False) -> T:
    """Run a job synchronously with a tqdm bar and return its result. Under torchrun only
    rank 0 shows the bar."""
    if not quiet and "torch.distributed" in sys.modules:  # never import torch just to ask
        from .distributed import is_main

        quiet = not is_main()
    bar, shown = None, 0.0
    try:
        while True:
            event = next(job)
            if bar is None:
                bar = tqdm(
                    total=event.total, desc=desc, disable=True if quiet else None, leave=False
                )
            bar.update(event.step - bar.n)  # redraws at tqdm's own pace
            now = time.monotonic()
            if bar.disable or (now - shown < POSTFIX_EVERY and event.step < event.total):
                continue
            shown = now
            bar.set_postfix({k: f"{v:.3g}" for k, v in event.losses.items()}, refresh=True)
    except StopIteration as done:
        return done.value
    finally:
        if bar is not None:
            bar.close()


@dataclass
class Curve:
    """A job's loss at each step, and S_global where the job measured its probe set."""

    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    probe_steps: list[int] = field(default_factory=list)
    s_global: list[float] = field(default_factory=list)


class ProgressTracker:
    """What a reader shows of a running job: the time so far, the time left and the curve.

    Events at step 0 or in one of the `waits` phases (loading, measuring) are not steps: they
    add no point, and the time left is the rate since the first step times the steps to go,
    so a slow start does not count. Reading a step's loss waits for the device (Losses), so
    `add` belongs on the reader's thread, never in the job's loop.
    """

    def __init__(self, waits: Collection[str] = (), clock: Callable[[], float] = time.monotonic):
        self.waits, self.clock = frozenset(waits), clock
        self.started = self.now = clock()
        self.curve = Curve()
        self.event: Progress | None = None  # the last event taken
        self._first: tuple[float, int] | None = None  # time and step of the first step

    def add(self, event: Progress) -> bool:
        """Take the job's next event; True when it is a step (a point on the curve)."""
        self.now, self.event = self.clock(), event
        if event.step == 0 or event.phase in self.waits:
            return False
        if self._first is None:
            self._first = (self.now, event.step)
        self.curve.steps.append(event.step)
        self.curve.losses.append(event.losses.get("total", math.nan))
        if event.metrics:
            self.curve.probe_steps.append(event.step)
            self.curve.s_global.append(event.metrics.get("s_global", math.nan))
        return True

    @property
    def elapsed(self) -> float:
        """Seconds from the start to the last event."""
        return self.now - self.started

    @property
    def seconds_left(self) -> float:
        """The steps to go at the rate since the first step; NaN before a second step."""
        if self._first is None or self.event is None:
            return math.nan
        t0, s0 = self._first
        done = self.event.step - s0
        return (self.now - t0) / done * (self.event.total - self.event.step) if done else math.nan
