"""Progress events, cancellation, and the adapter that runs a generator to its end.

Long jobs (training, unlearning) are generators that yield Progress events and return their
result. The command line drives them with `drive` (a tqdm bar); the napari plugin runs the same
generator in a thread worker. Cancellation is a flag the generator checks every step.

A step's losses stay on the device until someone reads them (`Losses`), so a loop on a GPU
never waits for the device just to report a number; the tqdm bar reads them a few times a
second, and a reader such as the napari widget pays the wait itself, off the loop.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Generator, Iterator, Mapping
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
