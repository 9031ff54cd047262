"""The measures of relearn's stability rule (results/relearn_stability_dev0w/decision.txt).

Reads `bench seeds` summaries whose methods are relearn variants run twice per coarse model
(the second draw named with ":seed=1000"), and prints per variant: the mean distance of the
malignant share from the coarse model's, the mean swing of the share between the two draws,
and the worst-group AUROC and Dice paired with the control's runs, each pooled over every
summary (the rule's numbers) and per summary as a 95 % t interval of the mean over seeds of
the draw-averaged value.

    python benchmarks/relearn_stability.py RUN_DILATE/summary.json RUN_BBOX/summary.json \
        --control relearn --out rows.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from shortcut_unlearning.bench.tables import _mean_interval as mean_interval
from shortcut_unlearning.bench.tables import interval_cell

SECOND = ":seed=1000"


def measures(runs: dict[str, list[dict]], variant: str, control: str) -> dict[str, np.ndarray]:
    """(seeds, 2) arrays per measure: one column per draw."""

    def draws(name: str, key: str) -> np.ndarray:
        return np.array(
            [[row[key] for row in runs[name]], [row[key] for row in runs[name + SECOND]]]
        ).T

    coarse = np.array([row["malignant_share"] for row in runs["coarse"]])[:, None]
    share = draws(variant, "malignant_share")
    return {
        "balance": np.abs(share - coarse),
        "swing": np.abs(share[:, :1] - share[:, 1:]).repeat(2, axis=1),
        "wg": draws(variant, "worst_group_auroc") - draws(control, "worst_group_auroc"),
        "dice": draws(variant, "dice") - draws(control, "dice"),
        "collapsed": draws(variant, "collapsed").astype(float),
        "within_10_points": (np.abs(share - coarse) <= 0.10).astype(float),
        "share": share,
        "worst_group_auroc": draws(variant, "worst_group_auroc"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("summaries", nargs="+", type=Path)
    parser.add_argument("--control", default="relearn")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    summaries = {path.parent.name: json.loads(path.read_text()) for path in args.summaries}
    variants = [m for m in next(iter(summaries.values()))["methods"] if not m.endswith(SECOND)]
    out: dict = {}
    for variant in variants:
        per = {name: measures(s["runs"], variant, args.control) for name, s in summaries.items()}
        pooled = {
            key: float(np.mean(np.concatenate([p[key].ravel() for p in per.values()])))
            for key in ("balance", "swing", "wg", "dice", "collapsed", "within_10_points")
        }
        pooled["collapsed"] *= sum(p["collapsed"].size for p in per.values())
        pooled["within_10_points"] *= sum(p["within_10_points"].size for p in per.values())
        intervals = {
            name: {key: mean_interval(p[key].mean(axis=1)) for key in p if key != "collapsed"}
            for name, p in per.items()
        }
        rows = {name: {k: v.tolist() for k, v in p.items()} for name, p in per.items()}
        out[variant] = {"pooled": pooled, "intervals": intervals, "rows": rows}
        print(
            f"{variant}: balance {pooled['balance']:.3f}  swing {pooled['swing']:.3f}  "
            f"wg {pooled['wg']:+.3f}  dice {pooled['dice']:+.3f}  "
            f"collapsed {pooled['collapsed']:.0f}  "
            f"within 10 points {pooled['within_10_points']:.0f}"
        )
        for name, stats in intervals.items():
            cells = "  ".join(
                f"{key} {interval_cell(stats[key], '+.3f')}" for key in ("balance", "swing", "wg")
            )
            print(f"    {name}: {cells}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
