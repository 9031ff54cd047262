"""The contract every operator in the registry keeps, run over all of them."""

from dataclasses import replace

import pytest
import torch
from conftest import TINY, refinement, same_state, state

from shortcut_unlearning.certificate import Certificate
from shortcut_unlearning.model import Model
from shortcut_unlearning.progress import Cancel, drive
from shortcut_unlearning.unlearning import (
    CERTIFIED,
    OPERATORS,
    CertifiedOperator,
    UnlearnData,
    make_operator,
)
from shortcut_unlearning.unlearning.certified import issued
from shortcut_unlearning.unlearning.recovery import Relearning

# The certified operators warn that their noise dwarfs the tiny decoder; that is expected here.
pytestmark = pytest.mark.filterwarnings("ignore:.*noise has expected norm:UserWarning")

# Four steps each: the certified operators' 2 calibrated noisy steps (gradient clipping:
# T = ceil(0.2 / (0.1 * 1)); model clipping at r = 2 C2 / sigma = 0.4), then 2 fine-tuning ones.
FAST = {"gradient-clipping": {"c0": 0.2, "c1": 1.0, "lr": 0.1}, "model-clipping": {"c2": 0.1}}
PROBE_EVERY = 3  # four steps: probes after step 3 (the schedule) and step 4 (the last)


def operator(name, **options):
    steps = 2 if name in CERTIFIED else 4
    return make_operator(
        name, steps=steps, probe_every=PROBE_EVERY, batch_size=4, **FAST.get(name, {}), **options
    )


@pytest.fixture(scope="module")
def start():
    return Model(TINY)


@pytest.fixture(scope="module")
def data(tiny_data):
    images, coarse = tiny_data[0].images, tiny_data[1]
    return UnlearnData(images, coarse, refinement(coarse, tiny_data[0].masks, 6))


def with_probe(data, dice):
    """The data with a probe that reports the next of `dice` (the first is the start's)."""
    calls = []

    def probe(model):
        calls.append(model)
        return {"dice": dice[min(len(calls), len(dice)) - 1]}

    return UnlearnData(data.images, data.coarse, data.split, probe), calls


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_a_run_leaves_the_start_logs_every_step_and_probes_on_schedule(name, start, data):
    before = state(start)
    op = operator(name)
    probed, calls = with_probe(data, [0.8])
    result = drive(op.run(start, probed), quiet=True)
    assert same_state(before, state(start))
    assert not (result.cancelled or result.collapsed) and result.model is not start
    assert result.steps == op.steps and [e.step for e in result.history] == list(
        range(1, op.steps + 1)
    )
    assert all(e.total == op.steps for e in result.history)
    assert op.steps == 4
    schedule = sorted({*range(PROBE_EVERY, op.steps + 1, PROBE_EVERY), op.steps})
    assert [e.step for e in result.history if e.metrics] == schedule
    assert len(calls) == 1 + len(schedule) and calls[0] is start  # the start, then the schedule
    assert result.start_metrics == {"dice": 0.8}
    assert all(torch.isfinite(p).all() for p in result.model.scoped_parameters())
    # Only the operators that relearn decide where they end (their validation probe); here
    # the relearning is too short for it to stop early, so they run to their maximum.
    if name in CERTIFIED:
        assert result.stopping["reason"] == "recovery reached its maximum steps"
        assert result.stopping["steps"] == op.steps and result.stopping["recovery_steps"] == 2
    elif isinstance(op, Relearning):
        assert result.stopping["reason"] == "relearning reached its maximum steps"
        assert result.stopping["steps"] == op.steps == result.stopping["recovery_steps"]
    else:
        assert result.stopping is None


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_cancel_returns_the_start(name, start, data):
    before, cancel = state(start), Cancel()
    job = operator(name).run(start, data, cancel)
    next(job)
    next(job)
    cancel.set()
    with pytest.raises(StopIteration) as stop:
        next(job)
    result = stop.value.value
    assert result.cancelled and result.model is start and result.steps == 2
    assert len(result.history) == 2
    assert same_state(before, state(start))


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_the_guard_keeps_the_start_on_a_collapsed_run(name, start, data):
    probed, _ = with_probe(data, [0.9, 0.0])  # Dice 0 after the start
    result = drive(operator(name).run(start, probed), quiet=True)
    assert result.collapsed and result.model is start and result.rejected is not None
    probed, _ = with_probe(data, [0.9, 0.0])
    result = drive(operator(name, accept_collapse=True).run(start, probed), quiet=True)
    assert result.collapsed and result.model is not start and result.rejected is None


@pytest.mark.parametrize("name", CERTIFIED)
def test_the_certified_gate_reads_an_absolute_floor_and_a_kept_start_has_no_certificate(
    name, start, data
):
    """The gate of a certified run reads nothing of the start model (trained with the forget
    set): the released model's probe Dice against collapse_dice alone."""
    op = operator(name)
    assert op.collapse_dice == 0.25
    probed, _ = with_probe(data, [0.9, 0.3])  # under half the start's, above the floor
    result = drive(op.run(start, probed), quiet=True)
    assert not result.collapsed and result.model is not start
    assert issued(op.certificate(start), result) is not None
    probed, _ = with_probe(data, [0.1, 0.2])  # above the start's, under the floor
    result = drive(op.run(start, probed), quiet=True)
    assert result.collapsed and result.model is start
    assert issued(op.certificate(start), result) is None  # nothing certified was released


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_certified_operators_report_a_certificate(name, start):
    op = operator(name)
    certified = issubclass(OPERATORS[name], CertifiedOperator)
    assert (name in CERTIFIED) == certified == isinstance(op, CertifiedOperator)
    if certified:
        c = op.certificate(start)
        assert isinstance(c, Certificate) and c.operator == name
        assert (c.epsilon, c.delta, c.noisy_steps) == (op.epsilon, op.delta, op.noisy_steps())
        assert op.steps == op.noisy_steps() + 2  # make_operator's steps are fine-tuning steps
        assert c.coverage and c.snr_bound > 0
    else:
        assert not hasattr(op, "certificate") and op.steps == 4


def test_the_registry_maps_parameters_to_operators():
    assert set(CERTIFIED) == {"gradient-clipping", "model-clipping"}
    op = make_operator("gradient-clipping", steps=7, epsilon=3.0, delta=1e-6)
    assert (op.finetune_steps, op.epsilon, op.delta) == (7, 3.0, 1e-6)
    with pytest.raises(ValueError, match="epsilon and delta apply to"):
        make_operator("neggrad-seg", epsilon=1.0)
    with pytest.raises(ValueError, match="unknown operator"):
        make_operator("retrain")


def test_one_settings_object_gives_the_steps_to_run_and_the_plugin():
    from shortcut_unlearning.experiment import RunConfig, build_operator
    from shortcut_unlearning.settings import OperatorSettings

    defaults = OperatorSettings()
    # The operators' own defaults are the settings' defaults.
    assert make_operator("neggrad-seg").steps == defaults.steps
    assert make_operator("relearn").steps == defaults.relearn_steps
    assert make_operator("model-clipping").finetune_steps == defaults.relearn_steps
    # The plugin remembers both; each method reads its own.
    chosen = OperatorSettings(steps=7, relearn_steps=90)
    for method, field, value in (("finetune", "steps", 7), ("relearn", "steps", 90)):
        assert getattr(replace(chosen, method=method).operator(), field) == value
    assert replace(chosen, method="gradient-clipping").operator().finetune_steps == 90
    # `run --steps` sets the one its method reads; an operator option of its own wins.
    for method, field in (("neggrad-seg", "steps"), ("gradient-clipping", "finetune_steps")):
        assert getattr(build_operator(RunConfig(method=method, steps=5)), field) == 5
    options = {"finetune_steps": 11}
    config = RunConfig(method="model-clipping", steps=5, operator_options=options)
    assert build_operator(config).finetune_steps == 11
