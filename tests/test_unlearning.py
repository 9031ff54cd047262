import numpy as np
import pytest
import torch
from conftest import TINY, refinement, same_state, state

from shortcut_unlearning.masks import PixelSplit
from shortcut_unlearning.model import Model
from shortcut_unlearning.progress import Cancel, drive
from shortcut_unlearning.training import TrainConfig, train
from shortcut_unlearning.unlearning import OPERATORS, FineTune, NegGradSeg, UnlearnData


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
