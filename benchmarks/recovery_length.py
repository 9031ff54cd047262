"""The certified operators' recovery length (issue 10, item 5): eps 1, delta 1e-5, recovery of
100 against 400 steps, NegGrad-Seg and the coarse model beside them, per seed.

    python -m benchmarks.recovery_length --out /tmp/recovery --seeds 0,1,2                # dev set
    python -m benchmarks.recovery_length --out /tmp/recovery-synth --dataset synthetic   # generator

dev: the `dev` variant of benchmarks/make_dev_isic.py (as benchmarks/powered.py writes it, 64
px, 10 % refined, evaluated on the balanced test split); synthetic: 240 generated images at 64
px (the reversed test split). Each certified run draws fresh noise, so a rerun differs.
Writes OUT/rows.json and OUT/summary.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from shortcut_unlearning import evaluation, experiment
from shortcut_unlearning.bench.tables import table_head
from shortcut_unlearning.evaluation import Evaluation
from shortcut_unlearning.experiment import RunConfig
from shortcut_unlearning.model import resolve_device

from . import make_dev_isic, powered  # the dev set's folders, refinement and test splits

KEYS = ("worst_group_auroc", "conflicting_auroc", "auroc", "dice", "band_reliance")


def settings(steps: list[int]) -> dict[str, tuple[str, dict]]:
    out = {"neggrad-seg": ("neggrad-seg", {})}
    for name, short in (("gradient-clipping", "gc"), ("model-clipping", "mc")):
        for n in steps:
            out[f"{short}@1 recovery {n}"] = (name, {"epsilon": 1.0, "finetune_steps": n})
    return out


def _values(record: Evaluation) -> dict:
    picked = {k: getattr(record, k) for k in KEYS}
    return {k: (v.get("value") if isinstance(v, dict) else v) for k, v in picked.items()}


def prepared_seed(dataset: str, seed: int, data_dir: Path):
    """(config, prepared with 10 % refined, the test set evaluated on)."""
    if dataset == "synthetic":
        config = RunConfig(
            data="synthetic", synth_n=240, image_size=64, epochs=15, seed=seed, quiet=True
        )
        prepared = experiment.prepare_data(config)
        return config, prepared, prepared.evalset
    folder = data_dir / f"dev{seed}-n480-b240"
    if not (folder / "generator.json").is_file():
        make_dev_isic.write_folder(folder, "dev", n=480, balanced=240, seed=seed)
    card = json.loads((folder / "generator.json").read_text())
    traps = folder / "trap_sets"
    labels = [str(traps / f"isic_annotated_{split}1.csv") for split in ("train", "test")]
    config = RunConfig(
        data=str(folder), labels=labels, image_size=64, epochs=20, seed=seed, quiet=True
    )
    prepared = experiment.prepare_data(config)
    sets = powered.evalsets(folder, 64, tuple(card["generator"]["spurious"]), prepared)
    order = np.random.default_rng(seed).permutation(len(prepared.train))
    return config, powered.refinement(prepared, order, 0.10), sets["balanced"]


def run(dataset: str, seeds: list[int], steps: list[int], out: Path) -> list[dict]:
    rows = []
    for seed in seeds:
        config, prepared, evalset = prepared_seed(dataset, seed, out / "data")
        config = replace(config, device="cpu")
        start = experiment.train_or_load(config, prepared, resolve_device("cpu"))
        record = evaluation.evaluate(start.model, evalset, seed)
        rows.append({"seed": seed, "setting": "coarse", **_values(record)})
        for name, (method, options) in settings(steps).items():
            method_config = replace(config, method=method, operator_options=options)
            operator = experiment.build_operator(method_config)
            clock = time.perf_counter()
            outcome, _ = experiment.unlearn(method_config, operator, start.model, prepared)
            record = evaluation.evaluate(outcome.model, evalset, seed)
            rows.append(
                {
                    "seed": seed,
                    "setting": name,
                    "steps": outcome.steps,
                    "collapsed": bool(outcome.collapsed),
                    "seconds": time.perf_counter() - clock,
                    **_values(record),
                }
            )
            print(rows[-1], flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    names = list(dict.fromkeys(row["setting"] for row in rows))
    seeds = sorted({row["seed"] for row in rows})
    lines = table_head(
        ["setting", *(f"seed {s}: WGA / Dice" for s in seeds), "mean WGA", "mean Dice"]
    )
    for name in names:
        mine = {row["seed"]: row for row in rows if row["setting"] == name}
        cells = [f"{mine[s]['worst_group_auroc']:.3f} / {mine[s]['dice']:.3f}" for s in seeds]
        wga = np.mean([mine[s]["worst_group_auroc"] for s in seeds])
        dice = np.mean([mine[s]["dice"] for s in seeds])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {wga:.3f} | {dice:.3f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--dataset", choices=("dev", "synthetic"), default="dev")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", default="100,400", help="recovery lengths to compare")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = run(args.dataset, seeds, [int(s) for s in args.steps.split(",")], args.out)
    (args.out / "rows.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "summary.md").write_text(summary(rows) + "\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
