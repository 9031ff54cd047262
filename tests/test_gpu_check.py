"""`bench gpu` and `bench removal` on the CPU at tiny sizes: every path runs, numbers add up."""

import json
from itertools import pairwise

import numpy as np
import pytest

from shortcut_unlearning.bench import removal
from shortcut_unlearning.bench.gpu_check import BASELINE, VARIANTS
from shortcut_unlearning.cli import main
from shortcut_unlearning.experiment import RunConfig
from shortcut_unlearning.model import Model, ModelConfig
from shortcut_unlearning.saliency import METHODS
from shortcut_unlearning.unlearning import OPERATORS


def test_the_gpu_check_runs_every_path_on_the_cpu(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)  # the widget's job without a viewer
    tiny = "--n 16 --image-size 32 --batch-size 4 --epochs 1 --steps 2 --repeats 1"
    assert main(["bench", "gpu", "--device", "cpu", *tiny.split(), "--out", str(tmp_path)]) == 0
    assert "| training | plain fp32 |" in capsys.readouterr().out
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["failed"] == [] and report["host_waits"] is None
    assert report["environment"]["device"] == "cpu"
    speed = {(row["loop"], row["variant"]): row for row in report["speed"]}
    assert set(speed) == {(loop, v) for loop in ("training", "unlearning") for v in VARIANTS}
    for (loop, _), row in speed.items():
        assert row["images_per_s"] > 0 and len(row["runs"]) == 1
        base = speed[loop, BASELINE]["images_per_s"]
        assert row["ratio_to_plain_fp32"] == pytest.approx(row["images_per_s"] / base)
        cpu_base = speed[loop, BASELINE]["images_per_cpu_s"]
        assert row["cpu_time_ratio_to_plain_fp32"] == pytest.approx(
            row["images_per_cpu_s"] / cpu_base
        )
        assert row["fast_paths_apply"] == (row["variant"] == BASELINE)  # no bf16 on a CPU
    bare = report["bare"]  # the anchor model has no cached variant (nothing frozen)
    assert len(bare) == 2 * (2 * len(VARIANTS) - 1) and all(r["images_per_s"] > 0 for r in bare)
    assert [r["ratio_to_plain_fp32"] for r in bare[:1] + bare[4:5]] == [1.0, 1.0]
    operators = {row["operator"]: row for row in report["operators"]}
    assert set(operators) == set(OPERATORS)
    assert all(row["finite"] and row["model_device"] == "cpu" for row in operators.values())
    assert [row["method"] for row in report["saliency"]] == list(METHODS)
    assert all(row["finite"] and row["shape"][1:] == [32, 32] for row in report["saliency"])
    assert np.isfinite(report["evaluation"]["s_global"])
    widget = report["widget"]
    assert widget["error"] is None and widget["model_device"] == "cpu" and not widget["viewer"]
    assert widget["losses_read"] == 2  # one per step, read on the main thread
    assert "| unlearning | cached decoder-only" in (tmp_path / "gpu_check.md").read_text()


def test_time_to_removal_counts_unlearning_only_and_stops_at_the_target():
    base = RunConfig(
        data="synthetic", synth_n=40, image_size=32, epochs=1, fine_fraction=0.2, quiet=True
    )
    with pytest.warns(UserWarning, match="did not converge"):  # one epoch at 32 px
        result = removal.time_to_removal(base, steps=4, probe_every=2)
    assert result["retrain_s"] > 0 and result["coarse_train_s"] > 0
    curve = result["curve"]
    assert curve[0]["step"] == 0 and curve[0]["unlearning_s"] >= 0
    assert [row["step"] for row in curve[1:]] == [2, 4][: len(curve) - 1]
    assert all(a["unlearning_s"] < b["unlearning_s"] for a, b in pairwise(curve))
    target = result["target_worst_group_auroc"]
    hits = [row for row in curve[1:] if row["wga"] >= target]
    assert result["reached"] == bool(hits)
    if hits:  # the run stops at its first measurement on target
        assert curve[-1] == hits[0] and result["steps_to_target"] == hits[0]["step"]
        assert result["ratio_to_retrain"] == hits[0]["unlearning_s"] / result["retrain_s"]


def test_s_global_timing_covers_sparse_and_dense_spurious_maps():
    result = removal.s_global_times(n=7, size=32, distinct=3)
    assert result["images"] == 7 and result["distinct_images"] == 3
    sparse, dense = result["artefacts"], result["band"]
    assert 0 < sparse["s_coverage"] < dense["s_coverage"] < 1
    for timing in (sparse, dense):
        assert timing["s_global_s"] > 0 and timing["report_s"] > 0
        assert np.isfinite(timing["value"]) and np.isfinite(timing["null_mean"])


def test_a_failing_path_is_reported_and_the_others_still_run(tmp_path, monkeypatch):
    from shortcut_unlearning.bench import gpu_check

    def broken(*args):
        raise RuntimeError("no such kernel")

    monkeypatch.delenv("DISPLAY", raising=False)
    model = Model(ModelConfig(image_size=32))
    monkeypatch.setattr(gpu_check, "speed_table", lambda *args: ([], model))
    monkeypatch.setattr(gpu_check, "operator_runs", lambda *args: [])
    monkeypatch.setattr(gpu_check, "saliency_runs", broken)
    config = gpu_check.CheckConfig(images=12, size=32, batch_size=4, steps=1, device="cpu")
    report = gpu_check.run_check(config, tmp_path)
    assert report["failed"] == ["saliency"]
    assert "no such kernel" in report["saliency"]["error"]
    assert report["evaluation"]["images"] > 0 and report["widget"]["error"] is None
    written = (tmp_path / "gpu_check.md").read_text()
    assert "saliency: FAILED" in written and "failed: saliency." in written


def test_the_gpu_checks_widget_part_runs_in_a_viewer_on_the_cpu(qtbot, tmp_path, monkeypatch):
    """The part `bench gpu` runs where there is a display (here Xvfb): the plugin's dock in a
    viewer, the sample refined and unlearned on the device the check names."""
    from shortcut_unlearning.bench import gpu_check

    monkeypatch.setenv("SHORTCUT_UNLEARNING_HOME", str(tmp_path / "home"))
    assert gpu_check._has_viewer()  # with a display the check takes this path
    widget = gpu_check._widget_in_viewer("cpu", 2)
    assert widget["viewer"] and widget["error"] is None, widget
    assert widget["model_device"] == "cpu" and widget["usable"] is not None
    assert widget["curve_points"] == 2 and widget["seconds"] > 0
