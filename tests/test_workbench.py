"""The plugin's state and decisions, driven without Qt."""

import json
import re
from dataclasses import replace

import numpy as np
import pytest
from conftest import TINY

from shortcut_unlearning.evaluation import Evaluation
from shortcut_unlearning.masks import MaskError
from shortcut_unlearning.model import Model
from shortcut_unlearning.progress import Cancel, drive
from shortcut_unlearning.resources import PACKAGE_DIR
from shortcut_unlearning.settings import OperatorSettings
from shortcut_unlearning.workbench import RunOutcome, Workbench


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return Model(TINY).save(tmp_path_factory.mktemp("model") / "tiny")


@pytest.fixture
def bench(tiny_data, model_path):
    data, coarse = tiny_data
    wb = Workbench(model_path, OperatorSettings("neggrad-seg", steps=3, device="cpu"))
    meta = {"ids": data.ids[:8], "labels": data.labels[:8].tolist()}
    wb.open(data.images[:8], coarse[:8], meta)
    for i in (0, 1):  # refine two images to their fine masks
        wb.refinement.refined[i][data.masks[i] == 0] = 0
    wb.refinement.sync()
    return wb


def test_a_run_shows_before_and_after_and_leaves_the_model(bench):
    start = bench.current_model()
    before = {k: v.clone() for k, v in start.net.state_dict().items()}
    record = drive(bench.execute(bench.plan()), quiet=True)
    assert not record.result.cancelled and len(record.result.history) == 3
    assert record.before.predictions.shape == record.after.saliency.shape == (8, 48, 48)
    assert record.before.scores.shape == (8,) and np.isfinite(record.after.scores).all()
    assert record.after.metrics.s_global is not None and "dice" in record.after.refined
    assert all(v.equal(start.net.state_dict()[k]) for k, v in before.items())
    # The dock leads with the verdict in plain words; the nats and intervals are the details.
    assert record.summary("a method").splitlines()[1] == record.verdict.headline
    assert "nats/px" not in record.summary("a method")
    assert "S_global (nats per pixel)" in record.details()
    assert record.after.lesion_scores.shape == (8,)
    bench.show(record)
    assert "Shown: run 1, not accepted" in bench.status()
    bench.accept()
    assert (
        bench.current_model() is record.model and "run 1 (neggrad-seg), accepted" in bench.status()
    )
    bench.revert()
    assert bench.current_model() is start and bench.shown is None


def test_the_context_term_chosen_in_the_dock_is_the_one_that_runs(bench):
    assert bench.plan().operator.context == "off"  # the paper's method unless chosen
    off = drive(bench.execute(bench.plan()), quiet=True)
    assert "context" not in off.result.history[-1].losses
    bench.parameters = replace(bench.parameters, context="blind+consistent")
    on = drive(bench.execute(bench.plan()), quiet=True)
    assert all(np.isfinite(p.losses["context"]) for p in on.result.history)
    bench.parameters = replace(bench.parameters, context="everything")
    with pytest.raises(ValueError, match="context must be one of"):
        bench.plan()


def test_a_certified_method_refuses_the_context_term_in_the_dock(bench):
    bench.parameters = replace(bench.parameters, method="gradient-clipping", context="blind")
    assert "cannot use the context term" in bench.preview().plain
    with pytest.raises(ValueError, match="cannot use the context term"):
        bench.plan()


# Words a clinician should not meet in the main text of the certified preview.
JARGON = ("scope", "norm", "sigma", "head", "noisy phase", "iterate", "read-out", "x", "=")


def sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.])\s+", text.strip()) if s]


@pytest.mark.parametrize("method", ["gradient-clipping", "model-clipping"])
@pytest.mark.parametrize("scope", ["decoder", "head"])
def test_the_certified_preview_is_two_plain_sentences_with_the_numbers_apart(bench, method, scope):
    bench.parameters = replace(bench.parameters, method=method, scope=scope)
    bench.current_model()
    preview = bench.preview()
    guaranteed, expect = sentences(preview.plain)
    assert guaranteed.startswith("Guaranteed at privacy ε 1") and expect.startswith("Expect")
    words = set(re.findall(r"[a-z=]+|x(?=\d)", preview.plain.lower()))
    assert not words & set(JARGON), words & set(JARGON)
    assert "sigma" in preview.details and "parameters" in preview.details
    wiped = "wipe out" in expect
    assert wiped == ("noise has expected norm" in preview.details)  # as the warning says
    # No smaller scope is suggested: its frozen parts may have seen the coarse masks.
    assert "last layer only" not in expect


def test_the_certified_preview_says_when_frozen_parts_void_it():
    from shortcut_unlearning.certificate import guarantee

    assert guarantee(1, 1e-5, "head", ["encoder", "decoder"], saw=True).endswith(
        "but the frozen encoder and decoder saw the coarse masks, which voids it."
    )
    assert "(not recorded)" in guarantee(1, 1e-5, "decoder", ["encoder"], saw=None)
    assert "frozen" not in guarantee(1, 1e-5, "decoder", ["encoder"], saw=False)
    # Before the model is loaded: what is guaranteed, and when to expect the rest.
    bench = Workbench(None, OperatorSettings(method="gradient-clipping", device="cpu"))
    first, second = sentences(bench.preview().plain)
    assert first.startswith("Guaranteed") and "once the model is loaded" in second


def test_a_certified_run_whose_gate_kept_the_start_says_no_certificate_was_issued(
    bench, monkeypatch
):
    from shortcut_unlearning.certificate import NOT_ISSUED
    from shortcut_unlearning.unlearning import CertifiedOperator

    monkeypatch.setattr(CertifiedOperator, "collapsed", lambda self, model, before, after: True)
    bench.parameters = replace(
        bench.parameters, method="model-clipping", relearn_steps=1, scope="head"
    )
    record = drive(bench.execute(bench.plan()), quiet=True)
    assert record.result.model is bench.current_model() and record.certificate is None
    summary = record.summary("model-clipping")
    assert NOT_ISSUED in summary and "-certified by" not in summary
    bench.show(record)
    assert bench.history[-1].certificate is None


def test_the_plan_is_a_snapshot_and_edits_during_a_run_do_not_leak(bench):
    plan = bench.plan()
    bench.refinement.refined[5][...] = 0
    assert plan.refinement.refined[5].any()


def test_nothing_to_forget_and_foreign_artefact_maps_are_refused(tiny_data, model_path):
    data, coarse = tiny_data
    wb = Workbench(model_path)
    with pytest.raises(MaskError, match="Refine"):
        wb.plan()
    wb.open(data.images[:4], coarse[:4])
    with pytest.raises(MaskError, match="nothing to unlearn"):
        wb.plan()
    wb.refinement.refined[0][data.masks[0] == 0] = 0
    wb.refinement.sync()
    with pytest.raises(MaskError, match="artefact layer"):
        wb.plan(spurious=np.zeros((4, 10, 10), bool))
    with pytest.raises(MaskError, match="pick the masks of these images"):
        wb.open(data.images[:4], coarse[:3])


def test_a_cancelled_run_shows_nothing(bench):
    cancel = Cancel()
    job = bench.execute(bench.plan(), cancel)
    next(job)
    cancel.set()
    record = drive(job, quiet=True)
    assert record.result.cancelled and record.after is None
    outcome = RunOutcome.of(record)
    assert outcome.status == "cancelled" and outcome.record is record
    assert outcome.message == "Cancelled after 0 steps; the previous model is kept."
    collapsed = replace(record, result=replace(record.result, cancelled=False, collapsed=True))
    assert RunOutcome.of(collapsed).status == "collapsed"
    assert "Accept is off" in RunOutcome.of(collapsed).message
    bench.show(record)
    assert bench.shown is None
    with pytest.raises(ValueError, match="accept"):
        bench.accept()


def test_a_failed_run_says_what_went_wrong_and_that_the_old_model_is_kept():
    class OutOfMemoryError(RuntimeError):  # torch.cuda.OutOfMemoryError's name
        pass

    memory = RunOutcome.failed(OutOfMemoryError("CUDA out of memory"))
    assert memory.status == "failed" and memory.record is None
    assert "pick the cpu device" in memory.message and "previous model is kept" in memory.message
    # The user's own input: the message as it is, the old model kept.
    bad = RunOutcome.failed(ValueError("the forget set is empty"))
    assert bad.message == "the forget set is empty (the previous model is kept)"
    other = RunOutcome.failed(KeyError("layer"))
    assert other.message == "Unlearning failed (KeyError: 'layer'); the previous model is kept."


def test_export_writes_exactly_the_run_on_display(bench, tmp_path):
    with pytest.raises(ValueError, match="no run is shown"):
        bench.export(tmp_path)
    record = drive(bench.execute(bench.plan()), quiet=True)
    bench.show(record)
    out = bench.export(tmp_path)
    report = json.loads((out / "metrics.json").read_text())
    assert Evaluation.from_json(report["unlearned"]).to_json() == record.after.metrics.to_json()
    assert report["coarse"]["dice_refined"] == record.before.refined["dice"]
    assert report["unlearning"]["accepted"] is False and report["refined_ids"] == record_ids(bench)
    saved = Model.load(out / "model.safetensors")
    for key, value in record.model.net.state_dict().items():
        assert value.equal(saved.net.state_dict()[key]), key
    assert (out / "before_after.png").stat().st_size > 10_000
    assert len(list((out / "refined_masks").glob("*_segmentation.png"))) == 8
    assert bench.export(tmp_path) != out  # a second export never overwrites the first


def record_ids(bench):
    return [bench.meta["ids"][i] for i in (0, 1)]


def test_exports_never_go_into_the_package(bench):
    bench.show(drive(bench.execute(bench.plan()), quiet=True))
    with pytest.raises(ValueError, match="belongs to the installed software"):
        bench.export(PACKAGE_DIR / "exports")


def test_a_big_stack_is_measured_on_the_refined_images_and_a_sample(bench, monkeypatch):
    from shortcut_unlearning import workbench

    monkeypatch.setattr(workbench, "MEASURED", 5)
    record = drive(bench.execute(bench.plan()), quiet=True)
    measured = record.before.measured
    assert len(measured) == 5 and {0, 1} <= set(measured)
    unmeasured = sorted(set(range(8)) - set(measured))
    assert np.isnan(record.after.scores[unmeasured]).all()
    assert np.isfinite(record.after.scores[measured]).all()
    assert not record.after.saliency[unmeasured].any() and record.after.saliency[measured].any()


def test_sequential_rounds_are_kept_in_the_export(bench, tiny_data, tmp_path):
    data, _ = tiny_data
    first = drive(bench.execute(bench.plan()), quiet=True)
    bench.show(first)
    bench.accept()
    bench.refinement.refined[2][data.masks[2] == 0] = 0  # a second round refines one more
    bench.refinement.sync()
    second = drive(bench.execute(bench.plan()), quiet=True)
    assert second.start_name.startswith("run 1")  # it starts from the accepted model
    bench.show(second)
    report = json.loads((bench.export(tmp_path) / "metrics.json").read_text())
    rounds = report["rounds"]["rounds"]
    assert [r["index"] for r in rounds] == [1, 2] and [r["accepted"] for r in rounds] == [
        True,
        False,
    ]
    assert rounds[0]["images"] == [0, 1] and rounds[1]["images"] == [2]
    assert "round 1" in report["rounds"]["certificate"]
    assert "not certified" in report["rounds"]["certificate"]


def test_erase_and_relearn_says_what_it_guarantees_beside_the_verdict(bench):
    bench.parameters = replace(bench.parameters, method="relearn", relearn_steps=3)
    record = drive(bench.execute(bench.plan()), quiet=True)
    summary = record.summary("Erase and relearn").splitlines()
    assert summary[1] == record.verdict.headline
    assert summary[-1] == record.exactness.summary()


def test_remembered_settings_come_back_as_they_were_saved(tmp_path, monkeypatch):
    from shortcut_unlearning.settings import load_settings, save_settings

    monkeypatch.setenv("SHORTCUT_UNLEARNING_HOME", str(tmp_path))
    chosen = OperatorSettings("gradient-clipping", "head", epsilon=3.0, relearn_steps=90)
    save_settings(chosen)
    assert load_settings() == chosen
