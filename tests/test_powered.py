"""The powered benchmark's report (benchmarks/powered.py) on hand-made records: the seeds are
matched when some ran fewer methods or fractions, and the numbers come out as put in."""

import json

import numpy as np
import pytest

from benchmarks import powered as powered_module


@pytest.fixture(scope="module")
def powered():
    return powered_module


def record(worst: float, band: float = 0.01) -> dict:
    """The parts of an evaluation.evaluate record that the report reads."""
    group = {"value": worst, "ci_low": worst - 0.1, "ci_high": worst + 0.1}
    return {
        "worst_group_auroc": worst,
        "worst_group": "any:conflicting",
        "conflicting_auroc": worst,
        "conflicting_group": "any:conflicting",
        "auroc_by_group_ci": {"any:conflicting": group},
        "auroc": worst,
        "auroc_ci": group,
        "dice": 0.8,
        "dice_by_class": {"benign": 0.7, "malignant": 0.75},
        "band_reliance": {"value": band, "ci_low": band / 2, "ci_high": band * 2},
        "s_global": {"value": 1e-3},
    }


def result(seed: int, coarse: float, fine: float, runs: dict, groups: int = 50) -> dict:
    both = lambda value: {split: record(value) for split in ("balanced", "reversed")}  # noqa: E731
    return {
        "seed": seed,
        "settings": {"image_size": 32},
        "n_test": {"balanced": 2 * groups, "reversed": 2 * groups},
        "group_sizes": {
            s: {"any:aligned": groups, "any:conflicting": groups} for s in ("balanced", "reversed")
        },
        "baselines": {"coarse": both(coarse), "fine_oracle": both(fine), "retrain": both(coarse)},
        "runs": [
            {"method": m, "fraction": f, "refined_images": round(100 * f), "collapsed": False}
            | both(value)
            for (m, f), value in runs.items()
        ],
        "seconds": 1.0,
    }


def test_report_matches_seeds_and_reports_the_fine_minus_coarse_gap(powered, tmp_path):
    paper = "neggrad-seg (paper)"
    results = [
        result(0, 0.5, 0.7, {(paper, 0.1): 0.6, (paper, 0.5): 0.7}),
        result(1, 0.4, 0.8, {(paper, 0.1): 0.5}),
        result(2, 0.6, 0.6, {}),  # baselines only
    ]
    summary = powered.report(results, tmp_path)
    gap = summary["reversed"]["fine_minus_coarse_worst_group"]
    np.testing.assert_allclose(gap["per_seed"], [0.2, 0.4, 0.0])
    assert gap["mean"] == pytest.approx(0.2)
    # The method ran at seeds 0 and 1 only: gains 0.1 and 0.1 over gaps 0.2 and 0.4.
    closed = summary["reversed"]["gap_closed_worst_group"][paper]
    assert closed["of_means"] == pytest.approx(0.1 / 0.3)
    np.testing.assert_allclose(closed["per_seed"], [0.5, 0.25])
    curve = summary["reversed"]["fractions"][paper]
    assert curve["0.1"]["seeds"] == 2 and curve["0.5"]["seeds"] == 1
    assert curve["0.5"]["worst_group_auroc"][0] == pytest.approx(0.7)
    assert summary["powered"] is False  # 50 images a group, 3 seeds
    assert "BELOW the power target" in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "fraction_reversed.png").stat().st_size > 0
    json.loads((tmp_path / "summary.json").read_text())


def test_powered_when_groups_and_seeds_reach_the_target(powered, tmp_path):
    results = [result(s, 0.5, 0.6, {}, groups=100) for s in range(5)]
    assert powered.report(results, tmp_path)["powered"] is True


def test_context_effect_is_paired_by_seed(powered, tmp_path):
    paper, ours = "neggrad-seg (paper)", "neggrad-seg + context"
    results = [
        result(0, 0.5, 0.7, {(paper, 0.1): 0.6, (ours, 0.1): 0.65}),
        result(1, 0.4, 0.8, {(paper, 0.1): 0.5, (ours, 0.1): 0.45}),
        result(2, 0.6, 0.6, {(paper, 0.1): 0.5}),  # no context run: left out of the pairs
    ]
    effect = powered.report(results, tmp_path)["balanced"]["context_minus_paper"]
    np.testing.assert_allclose(effect["conflicting_auroc"]["per_seed"], [0.05, -0.05])
    assert effect["dice"]["mean"] == pytest.approx(0)
