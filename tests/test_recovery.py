"""The certified operators' recovery (stopped by a validation probe on held-out retain images,
best weights kept) and their secret noise."""

import numpy as np
import pytest
import torch
from conftest import TINY, refinement, state

from shortcut_unlearning import certificate as cert
from shortcut_unlearning.model import Model
from shortcut_unlearning.progress import drive
from shortcut_unlearning.unlearning import GradientClipping, ModelClipping, UnlearnData, certified
from shortcut_unlearning.unlearning.recovery import ValidationProbe

# The noise dwarfs the tiny decoder: expected, and warned about.
pytestmark = pytest.mark.filterwarnings("ignore:.*noise has expected norm:UserWarning")
SCOPE = ("decoder", "segmentation_head")


@pytest.fixture(scope="module")
def data(tiny_data):
    images, coarse = tiny_data[0].images, tiny_data[1]
    return UnlearnData(images, coarse, refinement(coarse, tiny_data[0].masks, 6))


def scope_state(model):
    return {k: v for k, v in state(model).items() if k.split(".")[0] in SCOPE}


def fast(**options):
    """Gradient clipping with 2 noisy steps (T = ceil(0.2 / (0.1 * 1)))."""
    return GradientClipping(c0=0.2, c1=1.0, lr=0.1, batch_size=4, **options)


def test_recovery_stops_on_its_probe_and_keeps_the_best_weights(data, monkeypatch):
    """A scripted probe: the loss falls to its best at the third measurement, then rises; with
    patience 3 the run stops at the sixth and releases the weights measured third."""
    losses = iter([1.0, 0.5, 0.4, 0.6, 0.7, 0.8, 0.1, 0.1])
    seen = []

    def scripted(probe, model):
        seen.append(scope_state(model))
        return next(losses)

    monkeypatch.setattr(ValidationProbe, "loss", scripted)
    op = fast(finetune_steps=100, finetune_lr=1e-2, validate_every=5, patience=3)
    result = drive(op.run(Model(TINY), data), quiet=True)
    stop = result.stopping
    assert stop["reason"] == "the validation probe stopped improving"
    # Measured at the noisy phase's end (step 2), then every 5 recovery steps: 2, 7, ..., 27.
    assert [s for s, _ in stop["validation_curve"]] == [2, 7, 12, 17, 22, 27]
    assert stop["steps"] == result.steps == len(result.history) == 27 < op.steps
    assert stop["best_step"] == 12 and stop["validation_loss"] == 0.4
    assert stop["recovery_steps"] == 25 and stop["max_recovery_steps"] == 100
    released = scope_state(result.model)
    assert all(torch.equal(released[k], seen[2][k]) for k in released)
    assert not all(torch.equal(released[k], seen[-1][k]) for k in released)  # it did move on


def test_recovery_releases_the_weights_its_real_probe_found_best(data):
    op = fast(finetune_steps=30, finetune_lr=1e-2, validate_every=5, patience=10, noise_seed=1)
    result = drive(op.run(Model(TINY), data), quiet=True)
    stop = result.stopping
    assert stop["reason"] == "recovery reached its maximum steps" and result.steps == op.steps
    curve = dict(stop["validation_curve"])
    assert len(curve) == 7 and stop["validation_images"] > 0  # steps 2, 7, ..., 32
    assert min(curve.values()) < curve[2]  # recovery improved on the noisy phase's iterate
    assert stop["validation_loss"] == min(curve.values()) == curve[stop["best_step"]]
    # The released model measures what the probe recorded at its best step.
    assert op._probe.loss(result.model) == pytest.approx(stop["validation_loss"], rel=1e-5)


def test_held_out_images_are_unrefined_retain_images_left_out_of_training_and_statistics(
    data, monkeypatch
):
    op = fast(finetune_steps=1, validation_share=0.25)
    trained_on = []
    original = GradientClipping._logits

    def spy(model, inputs, rows):
        trained_on.extend(np.asarray(rows).tolist())
        return original(model, inputs, rows)

    estimated_on = []
    estimate = certified.estimate_batch_statistics

    def spy_estimate(model, inputs, rows, batch_size):
        estimated_on.extend(np.asarray(rows).tolist())
        return estimate(model, inputs, rows, batch_size)

    monkeypatch.setattr(GradientClipping, "_logits", staticmethod(spy))
    monkeypatch.setattr(certified, "estimate_batch_statistics", spy_estimate)
    drive(op.run(Model(TINY), data), quiet=True)
    held = set(op._probe.rows.tolist())
    refined = 6  # the first six images are refined; rows follow the image order here
    assert len(held) == round(0.25 * (len(data.images) - refined))
    assert held.isdisjoint(trained_on) and held.isdisjoint(range(refined))
    # nor do the batch-norm statistics see them
    assert estimated_on and held.isdisjoint(estimated_on)


@pytest.mark.parametrize("operator", [GradientClipping, ModelClipping])
def test_the_noise_is_not_reproducible_from_the_run_seed(data, operator):
    options = {"finetune_steps": 0, "batch_size": 4, "seed": 3}
    if operator is GradientClipping:
        options |= {"c0": 0.2, "c1": 1.0, "lr": 0.1}

    def released(**extra):
        return scope_state(
            drive(operator(**options, **extra).run(Model(TINY), data), quiet=True).model
        )

    first, second = released(), released()
    assert not any(torch.equal(first[k], second[k]) for k in first if "weight" in k)
    a, b = released(noise_seed=11), released(noise_seed=11)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert operator(**options).certificate(Model(TINY)).noise_source == cert.NOISE_FROM_ENTROPY
    seeded = operator(**options, noise_seed=11).certificate(Model(TINY))
    assert "noise_seed = 11" in seeded.noise_source and "does not hold" in seeded.noise_source
    assert "noise_seed = 11" in seeded.summary()


def test_the_expectation_needs_no_model():
    line = GradientClipping().expectation()
    assert line.startswith("gradient-clipping at (1, 1e-05): 10 noisy steps of sigma 0.512")
    assert "<= 0.124" in line and "eps 10.7" in line and "up to 400 recovery steps" in line
    assert "1 noisy step of" in ModelClipping(epsilon=10).expectation()


def test_recovery_settings_are_checked():
    with pytest.raises(ValueError, match="validation_share"):
        GradientClipping(validation_share=1.0)
    with pytest.raises(ValueError, match="patience"):
        GradientClipping(patience=0)


@pytest.mark.parametrize("operator", [GradientClipping, ModelClipping])
def test_the_release_reads_no_forget_label_and_recovery_adds_no_noise(data, operator, monkeypatch):
    """Recovery must be post-processing: the released model (noise fixed by noise_seed) is the
    same whatever the forget pixels' coarse labels say, and noise is drawn in the noisy phase
    only."""
    options = {"finetune_steps": 6, "validate_every": 2, "batch_size": 4, "noise_seed": 5}
    if operator is GradientClipping:
        options |= {"c0": 0.2, "c1": 1.0, "lr": 0.1}
    draws = []
    original = certified.add_noise_

    def counted(tensors, sigma, rng):
        draws.append(sigma)
        original(tensors, sigma, rng)

    monkeypatch.setattr(certified, "add_noise_", counted)
    swapped = data.coarse.copy()  # the other lesion class on every forget pixel
    forget = data.split.forget
    swapped[forget] = np.where(swapped[forget] == 1, 2, 1)
    other = UnlearnData(data.images, swapped, data.split)

    def released(d):
        op = operator(**options)
        return op, scope_state(drive(op.run(Model(TINY), d), quiet=True).model)

    op, first = released(data)
    assert len(draws) == op.noisy_steps() < op.steps  # no draw in the recovery's steps
    _, second = released(other)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_the_certificate_says_what_the_recovery_does_and_did(data):
    op = fast(finetune_steps=8, validate_every=2, patience=10, noise_seed=2)
    before = op.certificate(Model(TINY))
    for words in ("noise-free", "retain set only", "post-processing", "up to 8 Adam steps"):
        assert words in before.recovery
    assert "uncertain band" in before.forgets  # the band left out of the retain set is forgotten
    assert f"Recovery: {before.recovery}" in before.summary()
    result = drive(op.run(Model(TINY), data), quiet=True)
    after = before.after_recovery(result.stopping)
    assert after.recovery.startswith(before.recovery)
    assert "took 8 of at most 8 recovery steps (recovery reached its maximum steps)" in (
        after.recovery
    )
    best = result.stopping["best_step"] - result.stopping["noisy_steps"]
    assert f"recovery step {best}," in after.recovery
    assert after.to_dict()["recovery"] == after.recovery and before.after_recovery(None) is before
    none = fast(finetune_steps=0).certificate(Model(TINY))
    assert none.recovery.startswith("none")


def test_run_and_the_plugin_say_what_to_expect_before_a_run(tmp_path):
    from shortcut_unlearning.cli import _expectation, _run_config, build_parser
    from shortcut_unlearning.settings import OperatorSettings
    from shortcut_unlearning.workbench import Workbench

    def parsed(*flags):
        return _run_config(build_parser().parse_args(["run", "--out", str(tmp_path), *flags]))

    line = _expectation(parsed("--method", "gradient-clipping", "--epsilon", "3"))
    assert line == GradientClipping(epsilon=3).expectation()
    assert "signal-to-noise of any linear read-out of the scope <=" in line
    assert "eps 10.7 (sigma" in line and "would keep 1" in line
    assert "eps does not set it; sigma 0.5 keeps 1" in _expectation(
        parsed("--method", "model-clipping")
    )
    assert _expectation(parsed("--method", "neggrad-seg")) is None
    bench = Workbench(None, OperatorSettings(method="gradient-clipping", epsilon=3.0, device="cpu"))
    assert not bench.loaded
    preview = bench.preview().details  # before the model is loaded
    assert bench.operator().expectation() in preview and "<= 0.335; eps 10.7" in preview


def test_the_recovery_starts_from_a_fresh_initialisations_scale():
    """After the noise, batch-norm scales and biases take the value a fresh model gives them
    (1 and 0: scaled like the weights they came out with random signs and sizes, and some
    draws then predicted one class for every lesion); every other tensor keeps its direction
    at a fresh tensor's norm. The frozen encoder is untouched."""
    model, fresh = Model(TINY, "cpu"), Model(TINY, "cpu")
    encoder = {k: v.clone() for k, v in model.net.encoder.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.scoped_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 1.6)
    noisy = {k: v.detach().clone() for k, v in model.scoped_named_parameters().items()}
    certified.rescale_to_initial_norms(model)
    reference = dict(fresh.net.named_parameters())
    constants = 0
    for name, p in model.scoped_named_parameters().items():
        start = reference[name].detach()
        if bool((start == start.flatten()[0]).all()):  # batch-norm scales, biases
            constants += 1
            assert torch.equal(p, start), name
        else:
            assert float(p.norm()) == pytest.approx(float(start.norm()), rel=1e-5), name
            cosine = torch.nn.functional.cosine_similarity(p.flatten(), noisy[name].flatten(), 0)
            assert float(cosine) == pytest.approx(1.0, abs=1e-5), name
    assert constants >= 2 * len(certified.scope_batch_norms(model))
    assert all(torch.equal(v, model.net.encoder.state_dict()[k]) for k, v in encoder.items())


@pytest.mark.parametrize("weight", [1.0, 0.0])
def test_the_recovery_trains_on_the_dice_term_the_noisy_phase_does_not(data, weight, monkeypatch):
    """The recovery's loss is cross-entropy plus finetune_dice_weight x the retain batch's soft
    Dice (as training's); the noisy phase's calibrated steps stay on cross-entropy."""
    from shortcut_unlearning.unlearning import base

    calls = []
    real = base.soft_dice_loss
    monkeypatch.setattr(base, "soft_dice_loss", lambda *a: calls.append(1) or real(*a))
    op = fast(finetune_steps=4, validation_share=0.0, finetune_dice_weight=weight)
    result = drive(op.run(Model(TINY), data), quiet=True)
    for event in result.history:
        total = event.losses["total"]
        if event.phase == "noisy" or not weight:
            assert "dice_loss" not in event.losses
            assert total == pytest.approx(event.losses["retain"])
        else:
            expected = event.losses["retain"] + weight * event.losses["dice_loss"]
            assert total == pytest.approx(expected, rel=1e-5) and event.losses["dice_loss"] > 0
    assert len(calls) == (4 if weight else 0)
    with pytest.raises(ValueError, match="finetune_dice_weight"):
        fast(finetune_dice_weight=-1.0)
