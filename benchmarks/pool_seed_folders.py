"""Pool the per-seed folders of `bench seeds` runs that were stopped or run apart.

A stopped `bench seeds` run writes no summary.json, but each finished seed leaves
seed<N>/<method>/metrics.json with the baselines' records beside the method's. This reads
those files, keeps the methods every seed has, and prints one table: per model the mean over
seeds with the 95 % t interval of the mean, and each model's worst-group AUROC minus the
reference method's, paired by seed. The rows are written to --out as JSON.

    python benchmarks/pool_seed_folders.py RUN/seed0 OTHER_RUN/seed1 ... --reference relearn \
        --out rows.json
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from shortcut_unlearning.bench.tables import _mean_interval as mean_interval
from shortcut_unlearning.bench.tables import interval_cell

BASELINES = ("coarse", "retrain", "retrain_band_ignored", "fine_oracle")
KEYS = ("worst_group_auroc", "auroc", "dice", "malignant_share", "band_reliance")


def record(evaluation: dict) -> dict[str, float]:
    band = evaluation.get("band_reliance") or {}
    values = {key: evaluation[key] for key in KEYS if key != "band_reliance"}
    return {**values, "band_reliance": band.get("value", float("nan"))}


def seed_rows(folder: Path) -> dict[str, dict[str, float]]:
    """Each model's record in one seed folder (the baselines read from the first method)."""
    methods = sorted(p for p in folder.iterdir() if (p / "metrics.json").is_file())
    if not methods:
        raise SystemExit(f"{folder} holds no <method>/metrics.json: give finished seed folders")
    reports = {p.name: json.loads((p / "metrics.json").read_text()) for p in methods}
    first = reports[methods[0].name]
    rows = {name: record(first[name]) for name in BASELINES if name in first}
    return rows | {name: record(report["unlearned"]) for name, report in reports.items()}


def interval(values, signed: bool = False) -> str:
    """The mean [95 % t interval of the mean], as the bench tables write it."""
    return interval_cell(mean_interval(values), "+.3f" if signed else ".3f")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", type=Path, help="seed<N> folders of bench seeds")
    parser.add_argument("--reference", default="relearn", help="the paired differences' base")
    parser.add_argument("--out", type=Path, help="write the per-seed rows here (JSON)")
    args = parser.parse_args(argv)
    seeds = {}
    for folder in args.folders:
        seed = int(re.fullmatch(r"seed(\d+)", folder.name)[1])
        if seed in seeds:
            raise SystemExit(f"seed {seed} is given twice")
        seeds[seed] = seed_rows(folder)
    order = sorted(seeds)
    models = [m for m in seeds[order[0]] if all(m in seeds[s] for s in order)]
    if args.reference not in models:
        raise SystemExit(f"--reference {args.reference} is not in every seed folder")
    print(f"seeds {order}; mean [95 % t interval of the mean]")
    print(
        "| model | wg AUROC | AUROC | Dice | malignant share | band reliance | wg minus "
        f"{args.reference}, paired |"
    )
    print("|---|---|---|---|---|---|---|")
    for model in models:
        cells = [interval([seeds[s][model][key] for s in order]) for key in KEYS]
        paired = "-"
        if model != args.reference:
            diffs = [
                seeds[s][model]["worst_group_auroc"] - seeds[s][args.reference]["worst_group_auroc"]
                for s in order
            ]
            paired = interval(diffs, signed=True)
        print(f"| {model} | {' | '.join(cells)} | {paired} |")
    if args.out:
        rows = {str(s): seeds[s] for s in order}
        args.out.write_text(json.dumps(rows, indent=1, allow_nan=False) + "\n")


if __name__ == "__main__":
    main()
