import io
from functools import partial

import numpy as np
import pytest
import torch
from conftest import TINY, refinement, same_state, state

from shortcut_unlearning import progress
from shortcut_unlearning.masks import PixelSplit
from shortcut_unlearning.model import Model
from shortcut_unlearning.progress import Cancel, Losses, Progress, drive
from shortcut_unlearning.training import Divergence, TrainConfig, train
from shortcut_unlearning.unlearning import OPERATORS, FineTune, NegGradSeg, UnlearnData
from shortcut_unlearning.unlearning.base import _masked


@pytest.fixture(scope="module")
def coarse_model(tiny_data):
    data, coarse = tiny_data
    model = Model(TINY)
    drive(train(model, data.images, coarse, TrainConfig(epochs=8, batch_size=8)), quiet=True)
    return model


@pytest.fixture(scope="module")
def unlearn_data(tiny_data):
    data, coarse = tiny_data
    return UnlearnData(data.images, coarse, refinement(coarse, data.masks, 6))


def forget_probability(model, data: UnlearnData) -> float:
    """Mean probability of the coarse class on the forget pixels."""
    probs = model.probabilities(data.images)
    coarse_class = np.take_along_axis(probs, data.coarse[:, None].astype(int), 1)[:, 0]
    return float(coarse_class[data.split.forget].mean())


def test_registry_names_the_operators():
    assert set(OPERATORS) >= {"neggrad-seg", "finetune"}
    assert OPERATORS["neggrad-seg"] is NegGradSeg


def test_neggrad_seg_forgets_and_leaves_the_starting_model(coarse_model, unlearn_data):
    before = state(coarse_model)
    p_before = forget_probability(coarse_model, unlearn_data)
    result = drive(
        NegGradSeg(steps=20, lr=0.05, seed=0).run(coarse_model, unlearn_data), quiet=True
    )
    assert not result.cancelled and result.steps == 20 and len(result.history) == 20
    assert forget_probability(result.model, unlearn_data) < p_before - 0.05
    assert same_state(before, state(coarse_model))
    assert not same_state(before, state(result.model))
    # The forget term rises (ascent) while the retain term falls.
    first, last = result.history[0].losses, result.history[-1].losses
    assert last["forget"] > first["forget"] and last["retain"] < first["retain"]


def test_finetune_lowers_the_retain_loss(coarse_model, unlearn_data):
    result = drive(FineTune(steps=20, lr=0.05).run(coarse_model, unlearn_data), quiet=True)
    losses = [e.losses["retain"] for e in result.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert forget_probability(result.model, unlearn_data) < forget_probability(
        coarse_model, unlearn_data
    )


def test_retain_from_all_images_also_runs(coarse_model, unlearn_data):
    result = drive(
        NegGradSeg(steps=3, retain_images="all").run(coarse_model, unlearn_data), quiet=True
    )
    assert result.steps == 3


def test_cancel_returns_the_original_model(coarse_model, unlearn_data):
    cancel = Cancel()
    job = NegGradSeg(steps=50).run(coarse_model, unlearn_data, cancel)
    next(job)
    next(job)
    cancel.set()
    with pytest.raises(StopIteration) as stop:
        next(job)
    result = stop.value.value
    assert result.cancelled and result.model is coarse_model and result.steps == 2


def test_probe_snapshots_arrive_on_schedule(coarse_model, unlearn_data):
    calls = []
    data = UnlearnData(
        unlearn_data.images,
        unlearn_data.coarse,
        unlearn_data.split,
        probe=lambda m: calls.append(1) or {"dice": 0.5},
    )
    result = drive(FineTune(steps=7, probe_every=3).run(coarse_model, data), quiet=True)
    assert [e.step for e in result.history if e.metrics] == [3, 6, 7]


def test_failures_leave_the_model_and_say_why(coarse_model, unlearn_data, monkeypatch):
    before = state(coarse_model)
    op = NegGradSeg(steps=5)
    monkeypatch.setattr(op, "loss", lambda r, f: {"total": r * torch.nan})
    with pytest.raises(FloatingPointError, match="neggrad-seg loss"):
        drive(op.run(coarse_model, unlearn_data), quiet=True)
    assert same_state(before, state(coarse_model))
    empty = PixelSplit(
        forget=np.zeros_like(unlearn_data.split.forget),
        retain=np.ones_like(unlearn_data.split.forget),
        targets=unlearn_data.coarse,
        refined=np.zeros(len(unlearn_data.coarse), bool),
    )
    with pytest.raises(ValueError, match="forget set is empty"):
        drive(
            NegGradSeg().run(
                coarse_model, UnlearnData(unlearn_data.images, unlearn_data.coarse, empty)
            ),
            quiet=True,
        )
    with pytest.raises(ValueError, match="beta"):
        NegGradSeg(beta=2)
    with pytest.raises(ValueError, match="retain_images"):
        NegGradSeg(retain_images="some")


def test_collapse_floors():
    op = NegGradSeg()
    model = Model(TINY)
    assert op.collapsed(model, {"dice": 0.8, "auroc": 0.8}, {"dice": 0.39, "auroc": 0.8})
    # A falling AUROC is a result, not a collapse (evaluation.collapsed).
    assert not op.collapsed(model, {"dice": 0.8, "auroc": 0.8}, {"dice": 0.8, "auroc": 0.3})
    assert not op.collapsed(model, {"dice": 0.8, "auroc": 0.8}, {"dice": 0.41, "auroc": 0.66})
    assert not op.collapsed(model, None, {"dice": 0.0})
    with torch.no_grad():
        model.scoped_parameters()[0][0] = torch.nan
    assert op.collapsed(model, None, None)


# --- no waiting for the device: losses read late, divergence checked when the host reads ---


def test_the_loop_leaves_each_steps_losses_unread(coarse_model, unlearn_data):
    result = drive(NegGradSeg(steps=4, probe_every=2).run(coarse_model, unlearn_data), quiet=True)
    assert all(isinstance(e.losses, Losses) and e.losses._floats is None for e in result.history)
    last = result.history[-1].losses  # read now: one conversion for all its terms
    assert set(last) == {"total", "retain", "forget"}
    assert all(isinstance(v, float) for v in last.values())
    assert last["total"] == pytest.approx(0.95 * last["retain"] - 0.05 * last["forget"], 1e-5)
    assert {**last} == dict(last.items()) and last._floats is not None


def test_drive_reads_the_losses_only_now_and_then(monkeypatch):
    def job(events):
        for step in range(1, 6):
            events.append(Progress(step, 5, "x", Losses({"loss": torch.tensor(float(step))})))
            yield events[-1]
        return "done"

    quiet = []
    assert drive(job(quiet), quiet=True) == "done"
    assert all(e.losses._floats is None for e in quiet)  # no bar: nothing read
    shown = []  # a bar on a terminal: the first event, then at most twice a second, the last
    terminal = partial(progress.tqdm, file=io.StringIO())
    monkeypatch.setattr(progress, "tqdm", lambda **kw: terminal(**{**kw, "disable": False}))
    assert drive(job(shown)) == "done"
    assert [e.losses._floats is not None for e in shown] == [True, False, False, False, True]


def test_masked_selection_equals_boolean_indexing():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(4, 9, 7, generator=generator)
    mask = torch.rand(4, 9, 7, generator=generator) < 0.3
    assert torch.equal(_masked(values, mask, int(mask.sum())), values[mask])
    assert _masked(values, torch.zeros_like(mask), 0).numel() == 0


def test_divergence_names_the_first_bad_step_when_checked():
    watch = Divergence(torch.device("cpu"), "test loss")
    watch.watch(torch.tensor(1.0), 1)
    watch.check()  # all finite so far
    for step, value in ((2, float("inf")), (3, float("nan")), (4, 2.0)):
        watch.watch(torch.tensor(value), step)
    with pytest.raises(FloatingPointError, match="test loss became inf at step 2"):
        watch.check()
