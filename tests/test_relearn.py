"""Erase and relearn: what it releases does not depend on what the coarse scope learned."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, refinement

from shortcut_unlearning import metrics
from shortcut_unlearning.model import FrozenInputs, Model
from shortcut_unlearning.progress import drive
from shortcut_unlearning.unlearning import UnlearnData, make_operator
from shortcut_unlearning.unlearning.relearn import Relearn


def scope(model):
    return {k: v.detach().clone() for k, v in model.scoped_named_parameters().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data(tiny_data):
    images, coarse = tiny_data[0].images, tiny_data[1]
    return UnlearnData(images, coarse, refinement(coarse, tiny_data[0].masks, 6))


def relearn(**options):
    return make_operator("relearn", steps=6, batch_size=4, validate_every=2, **options)


@pytest.mark.parametrize(
    "options",
    [{}, {"statistics": "reestimated"}, {"start": "noise"}, {"average": 0.9, "calibrate": True}],
)
def test_a_fresh_start_releases_the_same_scope_whatever_the_coarse_scope_learned(data, options):
    """Two starting models that share the frozen encoder and differ in the scope, and forget
    pixels whose coarse class differs: the released scope is the same to the bit."""
    first = Model(TINY)
    second = first.copy()
    with torch.no_grad():
        for p in second.scoped_parameters():
            p.add_(torch.randn_like(p))
    coarse = data.coarse.copy()
    coarse[data.split.forget] = 3 - coarse[data.split.forget]  # 1 <-> 2 on the forget pixels
    other = UnlearnData(data.images, coarse, data.split)
    a = drive(relearn(**options).run(first, data), quiet=True).model
    b = drive(relearn(**options).run(second, other), quiet=True).model
    assert same(scope(a), scope(b))
    # while a start that keeps the coarse weights releases something else
    kept = drive(relearn(start="kept").run(second, data), quiet=True).model
    assert not same(scope(a), scope(kept))


@pytest.mark.parametrize("start_kind", ["fresh", "noise"])
def test_the_scope_is_erased_before_relearning(data, start_kind):
    start = Model(TINY)
    op = Relearn(seed=3, start=start_kind)
    work = start.copy()
    op.prepare(work, FrozenInputs(work, data.images[:4], cache=False), np.arange(4))
    fresh = Model(replace(TINY, seed=0))  # another initialisation of the same architecture
    moved = [
        not torch.equal(a, b)
        for a, b in zip(scope(work).values(), scope(start).values(), strict=True)
        if a.numel() > 1 and not bool((a == a.flatten()[0]).all())
    ]
    assert moved and all(moved)
    norms = [float(p.norm()) for p in fresh.scoped_parameters()]
    assert np.allclose([float(p.norm()) for p in work.scoped_parameters()], norms, rtol=0.3)


@pytest.mark.parametrize(
    ("trained_scope", "holds"), [("decoder", True), ("all", False), (None, False)]
)
def test_exactness_holds_only_when_the_frozen_blocks_never_saw_the_coarse_labels(
    trained_scope, holds
):
    provenance = {} if trained_scope is None else {"scope": trained_scope}
    model = Model(replace(TINY, provenance=provenance))
    record = Relearn().exactness(model)
    assert record.holds is holds
    assert record.to_dict()["epsilon"] == (0.0 if holds else None)
    assert ("Exact unlearning" in record.summary()) is holds
    assert not Relearn(start="rescaled").exactness(model).holds
    assert Relearn(start="noise", statistics="fixed").exactness(model).holds is holds


def test_settings_are_checked():
    with pytest.raises(ValueError, match="start must be one of"):
        Relearn(start="noisy-ish")
    with pytest.raises(ValueError, match="validation_share"):
        Relearn(validation_share=1.0)
    with pytest.raises(ValueError, match="batches one of"):
        Relearn(batches="stratified")
    with pytest.raises(ValueError, match="average must lie"):
        Relearn(average=1.0)


def test_pooled_batches_draw_every_retain_image_alike():
    """Paired batches give the refined images half of every step; pooled ones their share."""
    refined, others = np.arange(2), np.arange(2, 20)
    rng = np.random.default_rng(0)

    def drawn(op):
        return np.concatenate(
            [np.concatenate(op.batch_rows(rng, refined, others)) for _ in range(200)]
        )

    paired = drawn(Relearn(batch_size=8))
    pooled = drawn(Relearn(batch_size=8, batches="pooled"))
    assert np.isin(paired, refined).mean() == 0.5
    assert abs(np.isin(pooled, refined).mean() - 0.1) < 0.05  # 2 of 20 images
    assert set(np.unique(pooled)) == set(range(20))


def test_pooled_relearning_runs(data):
    result = drive(relearn(batches="pooled").run(Model(TINY), data), quiet=True)
    assert result.steps >= 1 and not result.collapsed


class Watched(Relearn):
    """Relearn that keeps the scope after the erase and after every step."""

    def prepare(self, model, inputs, retain_rows):
        super().prepare(model, inputs, retain_rows)
        self.seen = [[p.detach().clone() for p in model.scoped_parameters()]]

    def after_step(self, model, step, rng):
        super().after_step(model, step, rng)
        self.seen.append([p.detach().clone() for p in model.scoped_parameters()])


def test_averaging_releases_the_moving_average_of_the_weights(data):
    """Measured at the last step only, the release is the exponential moving average of the
    erased start and every step's weights, not the last step's weights."""
    op = Watched(steps=5, batch_size=4, validate_every=5, average=0.6)
    released = drive(op.run(Model(TINY), data), quiet=True).model.scoped_parameters()
    average = op.seen[0]
    for weights in op.seen[1:]:
        average = [0.6 * a + 0.4 * w for a, w in zip(average, weights, strict=True)]
    assert all(torch.allclose(r, a, atol=1e-6) for r, a in zip(released, average, strict=True))
    assert not all(torch.equal(r, w) for r, w in zip(released, op.seen[-1], strict=True))


def test_calibration_gives_the_held_out_images_their_labels_class_mix(data):
    op = relearn(calibrate=True, validation_share=0.5)
    result = drive(op.run(Model(TINY), data), quiet=True)
    record = result.stopping["class_calibration"]
    logits, targets = op._probe.logits(result.model)  # the released model's
    lesion = (targets == 1) | (targets == 2)
    wanted = float((targets == 2).sum() / lesion.sum())
    called = metrics.malignant_share(F.softmax(logits, dim=1).cpu().numpy())
    assert record["target_share"] == pytest.approx(wanted)
    assert called == pytest.approx(wanted, abs=0.02)
    assert abs(record["share_before"] - wanted) > 0.02  # there was something to correct


def test_a_benchmark_names_relearn_options_in_its_method():
    from shortcut_unlearning.bench.seeds import method_config
    from shortcut_unlearning.experiment import RunConfig, build_operator

    def built(method):
        return build_operator(method_config(RunConfig(), method))

    op = built("relearn:average=0.95:calibrate=true:seed=7")
    assert (op.average, op.calibrate, op.seed) == (0.95, True, 7)
    assert built("relearn:calibrate=false").calibrate is False
    with pytest.raises(ValueError, match="calibrate must be true or false"):
        built("relearn:calibrate=yes")
