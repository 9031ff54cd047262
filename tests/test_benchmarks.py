import json

import numpy as np
import pytest

from shortcut_unlearning import experiment
from shortcut_unlearning.bench import curve, data_matrix, seeds, timings
from shortcut_unlearning.cli import main
from shortcut_unlearning.experiment import RunConfig


def test_cache_benchmark_reports_a_ratio_of_two_measured_times():
    result = timings.cache_speedup(n=8, size=48, epochs=1, device="cpu")
    assert result["plain_s"] > 0 and result["cached_s"] > 0
    assert result["speedup"] == result["plain_s"] / result["cached_s"]


def test_seed_benchmark_shares_the_coarse_model_across_methods(tmp_path):
    base = RunConfig(
        data="synthetic",
        synth_n=30,
        image_size=48,
        epochs=1,
        steps=2,
        quiet=True,
        saliency_images=1,
        fine_fraction=0.2,
    )
    result = seeds.seeds(base, [0, 1], ["neggrad-seg", "finetune"], tmp_path)
    baselines = {"coarse", "retrain", "retrain_band_ignored", "fine_oracle"}
    assert set(result["summary"]) == baselines | {"neggrad-seg", "finetune"}
    assert len(result["runs"]["finetune"]) == 2
    first = json.loads((tmp_path / "seed1" / "neggrad-seg" / "metrics.json").read_text())
    second = json.loads((tmp_path / "seed1" / "finetune" / "metrics.json").read_text())
    # One coarse model per seed, trained and evaluated once, shared by every method.
    assert (tmp_path / "seed1" / "coarse_model.safetensors").is_file()
    assert second["coarse"]["image_scores"] == first["coarse"]["image_scores"]
    assert second["retrain"]["auroc"] == first["retrain"]["auroc"]
    assert second["config"]["method"] == "finetune" and second["seed"] == 1
    assert second["unlearned"]["image_scores"] != first["unlearned"]["image_scores"]
    table = (tmp_path / "summary.md").read_text()
    assert "| neggrad-seg |" in table and "95% t interval of the mean" in table
    assert "minus neggrad-seg" in table and "minus fine_oracle" in table
    assert "conflicting AUROC" in table and "band reliance" in table
    assert (tmp_path / "trajectory.png").is_file()


def test_runs_made_apart_merge_into_one_summary_over_all_their_seeds(tmp_path, capsys):
    base = RunConfig(
        data="synthetic", synth_n=24, image_size=32, epochs=1, steps=2, quiet=True,
        saliency_images=1, fine_fraction=0.25,
    )  # fmt: skip
    for seed in (0, 1):
        seeds.seeds(base, [seed], ["neggrad-seg"], tmp_path / f"seed-{seed}")
    args = [
        "bench",
        "merge",
        "--runs",
        str(tmp_path / "seed-0"),
        "--runs",
        str(tmp_path / "seed-1"),
    ]
    assert main([*args, "--out", str(tmp_path / "merged")]) == 0
    merged = json.loads((tmp_path / "merged" / "summary.json").read_text())
    apart = [json.loads((tmp_path / f"seed-{s}" / "summary.json").read_text()) for s in (0, 1)]
    assert merged["seeds"] == [0, 1]
    for name in ("coarse", "neggrad-seg"):
        rows = [apart[0]["runs"][name][0], apart[1]["runs"][name][0]]
        assert merged["runs"][name] == rows
        dice = [row["dice"] for row in rows]
        assert merged["summary"][name]["dice"]["mean"] == pytest.approx(sum(dice) / 2)
        assert merged["summary"][name]["dice"]["std"] == pytest.approx(
            abs(dice[0] - dice[1]) / 2**0.5
        )
    assert "| neggrad-seg |" in (tmp_path / "merged" / "summary.md").read_text()
    # The same seed twice, or runs of other settings, are refused with a reason.
    assert main([*args[:3], str(tmp_path / "seed-0"), "--runs", str(tmp_path / "seed-0")]) == 2
    assert "share a seed" in capsys.readouterr().err
    seeds.seeds(base, [2], ["finetune"], tmp_path / "other")
    assert main([*args[:3], str(tmp_path / "seed-0"), "--runs", str(tmp_path / "other")]) == 2
    assert "other methods or settings" in capsys.readouterr().err


def test_bench_command(tmp_path, capsys):
    assert (
        main(
            ["bench", "cache", "--n", "6", "--image-size", "48", "--epochs", "1", "--device", "cpu"]
        )
        == 0
    )
    assert '"speedup"' in capsys.readouterr().out


def test_the_curve_plot_skips_what_a_test_split_cannot_measure(tmp_path):
    # A test split without a conflicting group: that column is NaN for every model. The plot
    # once failed on it (log x-axis with no data) after a 20-minute benchmark.
    import math

    epsilons = [1.0, 3.0]
    names = [*experiment.STATES, "neggrad-seg"]
    names += [f"{n}@{e:g}" for n in ("gradient-clipping", "model-clipping") for e in epsilons]
    stats = {k: {"mean": 0.5, "std": 0.1} for k in curve.CURVE_KEYS}
    stats["conflicting_auroc"] = {"mean": math.nan, "std": math.nan}
    path = curve.curve_plot({n: stats for n in names}, epsilons, tmp_path / "curve.png")
    assert path.stat().st_size > 0


def test_seed_summaries_give_the_interval_of_the_mean_and_paired_differences():
    from scipy import stats

    from shortcut_unlearning.bench.tables import _mean_interval, paired_differences

    values = [0.61, 0.55, 0.70, 0.58, 0.66]
    got = _mean_interval(values)
    low, high = stats.t.interval(0.95, 4, loc=np.mean(values), scale=stats.sem(values))
    assert got["n"] == 5 and np.isclose(got["ci_low"], low) and np.isclose(got["ci_high"], high)
    assert np.isnan(_mean_interval([0.5])["ci_low"])  # one seed has no interval

    def rows(wga):
        return [
            {"worst_group_auroc": w, "dice": 0.9, "malignant_share": 0.5, "band_reliance": 0.01}
            for w in wga
        ]

    runs = {"neggrad-seg": rows([0.3, 0.4, 0.5]), "relearn": rows([0.5, 0.5, 0.8])}
    diff = paired_differences(runs)["relearn"]["neggrad-seg"]["worst_group_auroc"]
    assert np.isclose(diff["mean"], 0.2) and diff["n"] == 3
    # paired: the interval of the per-seed differences (0.2, 0.1, 0.3), not of the two means
    assert np.isclose(diff["ci_high"] - diff["mean"], stats.t.ppf(0.975, 2) * 0.1 / np.sqrt(3))
    assert "neggrad-seg" not in paired_differences({"relearn": runs["relearn"]})


def test_the_data_matrix_moves_one_factor_at_a_time(tmp_path, monkeypatch, capsys):
    base = RunConfig(data="synthetic", synth_n=40, image_size=48, quiet=True)
    variants = data_matrix.data_variants(base)
    names = [name for name, _ in variants]
    assert names[0] == "base" and len(names) == len(set(names)) == 11
    for name, config in variants[1:]:  # each moves its own factor and nothing else
        moved = {k for k, v in vars(config).items() if v != getattr(base, k)}
        assert moved == {name.split("=")[0]}
    ran = []

    def fake_seeds(config, seed_list, methods, out):  # the runs themselves: the seeds test above
        ran.append((config, out.name))
        row = {key: {"mean": 0.5, "std": 0.1, "ci_low": 0.4, "ci_high": 0.6, "n": 2}
               for key in data_matrix.DATA_KEYS}  # fmt: skip
        return {"summary": {"coarse": row, "retrain": row, "neggrad-seg": row}}

    monkeypatch.setattr(data_matrix, "seeds", fake_seeds)
    args = ["bench", "data", "--synth-n", "40", "--image-size", "48", "--seeds", "0,1"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    assert [folder for _, folder in ran] == [name.replace("=", "-") for name in names]
    result = json.loads((tmp_path / "summary.json").read_text())
    forgotten = {row["setting"]: row["artefacts_forgotten"] for row in result["settings"]}
    # The base setting's forget set holds every artefact pixel; the others hold less or none.
    assert forgotten["base"] == forgotten["coarse=bbox"] == forgotten["fine_fraction=0.01"] == 1
    assert forgotten["synth_placement=corner"] == forgotten["synth_placement=outside"] == 0
    assert 0 < forgotten["synth_placement=crossing"] < 1
    assert 0.8 < forgotten["coarse=outline"] <= 1 and forgotten["refine_jitter=2"] < 1
    assert forgotten["refine_missed=0.5"] == pytest.approx(0.5, abs=0.05)
    table = (tmp_path / "summary.md").read_text()
    assert "| synth_placement=outside | neggrad-seg | 0.500 [0.400, 0.600] |" in table
    assert "| retrain |" not in table and table in capsys.readouterr().out


def test_each_benchmark_has_its_own_flags_and_defaults(capsys):
    from shortcut_unlearning.cli import build_parser

    parser = build_parser()

    def parsed(*argv):
        return vars(parser.parse_args(["bench", *argv]))

    # --n is the images a benchmark generates, with that benchmark's default
    assert parsed("cache")["n"] == 64 and parsed("gpu")["n"] == 512
    gpu = parsed("gpu")
    assert (gpu["steps"], gpu["batch_size"], gpu["repeats"], gpu["seed"]) == (60, 32, 3, 0)
    removal = parsed("removal")
    assert (removal["max_steps"], removal["s_global_images"]) == (200, 1000)
    assert "steps" not in removal  # not RunConfig.steps: removal gives NegGrad-Seg its own
    assert parsed("seeds")["data"] == parsed("removal")["data"] == "synthetic"
    assert vars(parser.parse_args(["run"]))["data"] == "sample"  # bench's default stays there
    assert parsed("open", "--data", "some/folder")["working_size"] == 1024
    for argv, flag in (
        (["cache", "--seeds", "0"], "--seeds"),
        (["seeds", "--n", "3"], "--n"),
        (["gpu", "--methods", "finetune"], "--methods"),
        (["merge", "--epsilons", "1"], "--epsilons"),
        (["removal", "--n", "10"], "--n"),
    ):
        assert main(["bench", *argv]) == 2
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    assert main(["bench", "open"]) == 2
    assert "--data" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        main(["bench", "gpu", "--help"])
    assert done.value.code == 0
    shown = capsys.readouterr().out
    assert "usage: shortcut-unlearning bench gpu" in shown and "--batch-size" in shown
    assert "(default: 512)" in shown and "--methods" not in shown
