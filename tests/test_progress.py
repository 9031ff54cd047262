"""What a reader shows of a running job (progress.ProgressTracker), without Qt."""

import math

from shortcut_unlearning.progress import Progress, ProgressTracker


class Clock:
    """Seconds that move only when the test says so."""

    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_time_left_counts_from_the_first_step_not_the_slow_start():
    clock = Clock()
    tracker = ProgressTracker(waits=("measuring",), clock=clock)
    clock.now += 30  # loading and measuring the start: no rate from these
    assert not tracker.add(Progress(0, 10, "loading"))
    assert not tracker.add(Progress(0, 10, "measuring"))
    assert tracker.add(Progress(1, 10, "train", {"total": 0.5}))
    assert math.isnan(tracker.seconds_left)  # one step: no rate yet
    clock.now += 4
    assert tracker.add(Progress(3, 10, "train", {"total": 0.4}))
    assert tracker.seconds_left == 14  # 2 s a step, 7 to go
    assert tracker.elapsed == 34
    clock.now += 1
    assert not tracker.add(Progress(10, 10, "measuring"))  # the end's measurement: no point
    assert tracker.curve.steps == [1, 3] and tracker.curve.losses == [0.5, 0.4]


def test_the_curve_keeps_the_loss_and_s_global_where_the_probe_measured():
    tracker = ProgressTracker()
    tracker.add(Progress(1, 3, "train", {"total": 2.0}))
    tracker.add(Progress(2, 3, "train", {"forget": 1.0}, {"s_global": 0.25}))
    tracker.add(Progress(3, 3, "train", {"total": 1.0}, {"dice": 0.8}))
    curve = tracker.curve
    assert curve.steps == [1, 2, 3]
    assert curve.losses[::2] == [2.0, 1.0] and math.isnan(curve.losses[1])  # no total: a gap
    assert curve.probe_steps == [2, 3]
    assert curve.s_global[0] == 0.25 and math.isnan(curve.s_global[1])
