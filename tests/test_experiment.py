import json
import math

import pytest

from shortcut_unlearning.cli import main
from shortcut_unlearning.experiment import RunConfig, run, table


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
        assert set(written[state]) >= KEYS, state
        assert 0 <= written[state]["auroc"] <= 1
        assert math.isfinite(written[state]["s_global"]["value"])
        assert written[state]["s_global"]["unit"] == "nats per pixel"
        assert any(k.endswith(":conflicting") for k in written[state]["auroc_by_group"])
    assert written["config"]["method"] == "neggrad-seg" and written["seed"] == 0
    assert len(written["refined_ids"]) == round(0.2 * written["n_train"])
    assert written["forget_pixels"] > 0
    assert {"coarse_train_s", "unlearn_s", "retrain_train_s"} <= set(written["timings"])
    assert (out / "saliency.png").stat().st_size > 5000
    assert "unlearned" in table(result)


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


def test_privacy_flags_belong_to_certified_operators(tmp_path, capsys):
    args = tiny_run(str(tmp_path), 20, "--epsilon", "1")
    assert main(args) == 2
    assert "apply to gradient-clipping and model-clipping only" in capsys.readouterr().err
