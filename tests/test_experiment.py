import json
import math

import pytest

from shortcut_unlearning.certificate import NOT_ISSUED
from shortcut_unlearning.cli import main
from shortcut_unlearning.experiment import RunConfig, run, table
from shortcut_unlearning.unlearning import CertifiedOperator


def tiny_run(out, n, *flags):
    """`run` arguments for a tiny synthetic set at 48 px."""
    return [
        "run",
        "--data",
        "synthetic",
        "--synth-n",
        str(n),
        "--image-size",
        "48",
        *flags,
        "--out",
        str(out),
    ]


KEYS = {"auroc", "auroc_by_group", "worst_group_auroc", "dice", "s_global", "counterfactual_drop"}
# Class-aware numbers, intervals and band reliance beside them.
NEW_KEYS = {
    "auroc_ci",
    "auroc_by_group_ci",
    "conflicting_auroc",
    "dice_by_class",
    "malignant_share",
    "class_takeover",
    "image_scores",
    "band_reliance",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = RunConfig(
        data="synthetic",
        synth_n=40,
        image_size=48,
        epochs=2,
        steps=4,
        fine_fraction=0.2,
        baselines=True,
        out=str(out),
        quiet=True,
        saliency_images=2,
    )
    return run(config), out


def test_run_writes_metrics_for_every_model_state(report):
    result, out = report
    written = json.loads((out / "metrics.json").read_text())
    for state in ("coarse", "unlearned", "retrain", "fine_oracle"):
        assert set(written[state]) >= KEYS | NEW_KEYS, state
        record = written[state]
        ci = record["auroc_ci"]
        assert ci["ci_low"] <= record["auroc"] <= ci["ci_high"]
        assert set(record["dice_by_class"]) == {"benign", "malignant"}
        assert 0 <= record["malignant_share"] <= 1
        assert len(record["image_scores"]) == written["n_test"]
        assert record["band_reliance"]["n_images"] == written["n_test"]
        assert record["band_reliance"]["value"] >= 0
        assert 0 <= written[state]["auroc"] <= 1
        assert math.isfinite(written[state]["s_global"]["value"])
        assert written[state]["s_global"]["unit"] == "nats per pixel"
        assert any(k.endswith(":conflicting") for k in written[state]["auroc_by_group"])
    assert written["config"]["method"] == "relearn" and written["seed"] == 0
    assert len(written["refined_ids"]) == round(0.2 * written["n_train"])
    assert written["forget_pixels"] > 0
    assert {"coarse_train_s", "unlearn_s", "retrain_train_s"} <= set(written["timings"])
    assert (out / "saliency.png").stat().st_size > 5000
    printed = table(result)
    assert "unlearned" in printed and "malig%" in printed and "band reliance" in printed
    # Every trained model says whether its training converged.
    for state in ("coarse", "retrain", "fine_oracle"):
        assert written[state]["training"]["converged"] in (True, False)
        assert (out / "coarse_model.json").is_file()
    saved = json.loads((out / "coarse_model.json").read_text())
    assert saved["provenance"]["training"]["val_images"] > 0
    # The probe that watched unlearning is the evaluator's, class-aware.
    assert {"dice", "dice_benign", "malignant_share", "auroc"} <= set(
        written["unlearning"]["start_probe"]
    )
    assert written["test_split"] == "test" and len(written["test_ids"]) == written["n_test"]
    for warning in written["warnings"]:
        assert f"WARNING: {warning}" in printed
    # The verdict on the test split, led by the AUROC where the artefact misleads.
    verdict = written["verdict"]
    assert verdict["reading"] in ("less", "as much", "more", "cannot tell")
    assert verdict["lines"][1].startswith("AUROC where the artefact misleads")
    assert "\n".join(verdict["lines"]) in printed


def test_table_shows_class_takeover_and_failed_training(report):
    result, _ = report
    flipped = {
        **result,
        "unlearned": {**result["unlearned"], "class_takeover": "malignant takes over: 99%"},
        "warnings": ["unlearned: malignant takes over: 99%"],
    }
    assert "WARNING: unlearned: malignant takes over" in table(flipped)


def test_run_from_a_checkpoint_on_the_command_line(report, tmp_path, capsys):
    from shortcut_unlearning.model import Model, ModelConfig

    Model(ModelConfig(image_size=48)).save(tmp_path / "start")
    args = tiny_run(
        str(tmp_path / "out"),
        30,
        "--model",
        str(tmp_path / "start.safetensors"),
        "--steps",
        "2",
        "--method",
        "finetune",
    )
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "coarse" in printed and "nats per pixel" in printed
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["timings"]["coarse_train_s"] < 5  # loaded, not trained


def test_run_on_a_balanced_test_split(tmp_path, capsys):
    from shortcut_unlearning.model import Model, ModelConfig

    Model(ModelConfig(image_size=48)).save(tmp_path / "start")
    model = ["--model", str(tmp_path / "start.safetensors"), "--steps", "1"]
    args = tiny_run(tmp_path / "out", 20, "--synth-balanced", "16", "--test-split", "test_balanced")
    assert main([*args, *model]) == 0
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["test_split"] == "test_balanced" and written["n_test"] == 16
    groups = written["coarse"]["auroc_by_group_ci"]["ink:conflicting"]
    assert groups["n_malignant"] + groups["n_benign"] < 16  # aligned images exist too
    capsys.readouterr()
    missing = tiny_run(tmp_path / "other", 20, "--test-split", "test_balanced")
    assert main([*missing, *model]) == 2
    assert "no 'test_balanced' split" in capsys.readouterr().err


def test_refined_ids_must_exist(tmp_path, capsys):
    args = tiny_run(str(tmp_path), 20, "--refined", "nope")
    assert main(args) == 2
    assert "not in the training split" in capsys.readouterr().err


def test_certified_run_reports_its_certificate(tmp_path, capsys):
    args = tiny_run(
        str(tmp_path),
        30,
        "--epochs",
        "1",
        "--method",
        "gradient-clipping",
        "--epsilon",
        "2",
        "--delta",
        "1e-4",
        "--scope",
        "head",
    )
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "(2, 1.0e-04)-certified by gradient-clipping over the head scope" in printed
    written = json.loads((tmp_path / "metrics.json").read_text())
    certificate = written["certificate"]
    assert certificate["epsilon"] == 2 and certificate["delta"] == 1e-4
    assert certificate["frozen"] == ["encoder", "decoder"]
    assert certificate["frozen_saw_coarse_labels"] is True  # the decoder trained on coarse masks
    phases = {row["phase"] for row in written["unlearning"]["trajectory"]}
    assert phases == {"noisy", "fine-tune"}
    assert written["unlearning"]["start_probe"]["dice"] > 0


def test_a_certified_run_whose_gate_kept_the_start_carries_no_certificate(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(CertifiedOperator, "collapsed", lambda self, model, before, after: True)
    args = tiny_run(
        str(tmp_path), 30, "--epochs", "1", "--method", "gradient-clipping", "--scope", "head"
    )
    assert main([*args, "--steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert NOT_ISSUED in printed and "-certified by" not in printed
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["certificate"] is None and written["unlearning"]["kept_starting_model"]


def test_privacy_flags_belong_to_certified_operators(tmp_path, capsys):
    args = tiny_run(str(tmp_path), 20, "--epsilon", "1")
    assert main(args) == 2
    assert "apply to gradient-clipping and model-clipping only" in capsys.readouterr().err


def test_the_test_split_is_read_once_after_unlearning(tmp_path, monkeypatch):
    """Every image a model sees goes through Model.to_input: before the unlearning has
    finished (training, its validation, the probe and its collapse guard, the relearning's
    stopping rule) none of them is a test image; afterwards the evaluation reads them."""
    import hashlib

    import numpy as np

    from shortcut_unlearning import experiment
    from shortcut_unlearning.model import Model

    def digest(image):
        return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()

    seen, to_input, unlearn = [], Model.to_input, experiment.unlearn

    def recording(self, images):
        if isinstance(images, np.ndarray):
            seen.append({digest(image) for image in images})
        return to_input(self, images)

    def marked(*args, **kwargs):
        result = unlearn(*args, **kwargs)
        seen.append("unlearned")
        return result

    monkeypatch.setattr(Model, "to_input", recording)
    monkeypatch.setattr(experiment, "unlearn", marked)
    config = RunConfig(
        data="synthetic",
        synth_n=40,
        image_size=48,
        epochs=2,
        method="relearn",
        steps=6,
        baselines=True,
        out=str(tmp_path / "run"),
        quiet=True,
        saliency_images=2,
    )
    run(config)
    test = {digest(image) for image in experiment.load_data(config).split("test").images}
    end = seen.index("unlearned")
    assert seen[:end] and not any(batch & test for batch in seen[:end])
    assert any(batch & test for batch in seen[end + 1 :])
