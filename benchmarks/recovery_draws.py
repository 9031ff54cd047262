"""The certified-utility criterion over many noise draws: each certified operator at its defaults
(eps 1, delta 1e-5, 400 recovery steps) against NegGrad-Seg and the coarse model, per seed and
draw (benchmarks/BENCHMARKS.md, "Certified recovery with the Dice term, over noise draws").

    python benchmarks/recovery_draws.py --out OUT --seeds 0,1,2 --draws 4 [--device cuda]

The data are those of benchmarks/HISTORY.md, "The certified-utility criterion on synthetic
data, one noise draw per seed": 480 generated images at 64 px, 10 % refined, a
balanced test split of 240 (artefacts independent of the label). A run passes when its Dice
is within 0.05 of NegGrad-Seg's, its worst-group AUROC at most 0.02 below the coarse model's
and it did not collapse. Draw k of seed s seeds the noise with 1000 s + k, so a rerun repeats
it (a real run draws from OS entropy). `--variants` runs the operators with other recovery
settings beside the defaults ("current"), e.g. "no-dice" (cross-entropy alone). Writes
OUT/rows-<seeds>.jsonl (a row per run, as it ends) and OUT/summary.md (of every rows file in
OUT).
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
from shortcut_unlearning.evaluation import Evaluation
from shortcut_unlearning.experiment import RunConfig
from shortcut_unlearning.model import resolve_device

OPERATORS = ("gradient-clipping", "model-clipping")


# Settings compared with --variants: the defaults, and each change the recovery has had.
VARIANTS = {
    "current": {},
    "no-dice": {"finetune_dice_weight": 0.0},  # recovery on cross-entropy alone
}


def _values(record: Evaluation, outcome=None) -> dict:
    out = {k: getattr(record, k) for k in ("worst_group_auroc", "dice", "malignant_share")}
    if outcome is not None:
        out |= {"collapsed": bool(outcome.collapsed), "steps": outcome.steps}
        out["stopped"] = (outcome.stopping or {}).get("reason")
    return out


def run_seed(seed: int, draws: int, variants: list[str], device: str, sink: Path) -> list[dict]:
    """The runs of one seed, each row appended to `sink` as it ends (a killed run keeps them)."""
    config = RunConfig(
        data="synthetic", synth_n=480, synth_balanced=240, test_split="test_balanced",
        image_size=64, epochs=20, seed=seed, device=device, quiet=True,
    )  # fmt: skip
    prepared = experiment.prepare_data(config)
    start = experiment.train_or_load(config, prepared, resolve_device(device))
    prepared = experiment.refine_ranked(prepared, config, start.model)
    evalset = prepared.evalset
    coarse = evaluation.evaluate(start.model, evalset, seed)
    rows = [{"seed": seed, "setting": "coarse", **_values(coarse)}]
    with sink.open("a") as f:
        f.write(json.dumps(rows[0]) + "\n")

    def unlearn(setting, method, options, draw=None, variant=None):
        method_config = replace(config, method=method, operator_options=options)
        clock = time.perf_counter()
        outcome, _ = experiment.unlearn(
            method_config, experiment.build_operator(method_config), start.model, prepared
        )
        record = evaluation.evaluate(outcome.model, evalset, seed)
        rows.append(
            {"seed": seed, "setting": setting, "draw": draw, "variant": variant,
             "seconds": time.perf_counter() - clock, **_values(record, outcome)}
        )  # fmt: skip
        with sink.open("a") as f:
            f.write(json.dumps(rows[-1]) + "\n")

    unlearn("neggrad-seg", "neggrad-seg", {})
    for variant in variants:
        for method in OPERATORS:
            for draw in range(draws):
                options = {"noise_seed": 1000 * seed + draw, **VARIANTS[variant]}
                unlearn(method, method, options, draw, variant)
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """Each certified run with its seed's references and whether it meets the criterion."""
    refs = {(r["seed"], r["setting"]): r for r in rows if r.get("draw") is None}
    out = []
    for row in rows:
        if row.get("draw") is None:
            continue
        coarse, neggrad = refs[(row["seed"], "coarse")], refs[(row["seed"], "neggrad-seg")]
        wga_gap = row["worst_group_auroc"] - coarse["worst_group_auroc"]
        dice_gap = row["dice"] - neggrad["dice"]
        ok = wga_gap >= -0.02 and dice_gap >= -0.05 and not row["collapsed"]
        out.append({**row, "wga_vs_coarse": wga_gap, "dice_vs_neggrad": dice_gap, "meets": ok})
    return out


def summary(rows: list[dict]) -> str:
    judged = verdicts(rows)
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "| variant | operator | runs | meet the criterion | worst-group AUROC - coarse: mean "
        "[min, max] | Dice - NegGrad-Seg: min | malignant share [min, max] | collapsed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for variant in dict.fromkeys(r["variant"] for r in judged):
        for method in OPERATORS:
            mine = [r for r in judged if r["variant"] == variant and r["setting"] == method]
            if not mine:
                continue
            gap = np.array([r["wga_vs_coarse"] for r in mine])
            share = np.array([r["malignant_share"] for r in mine])
            lines.append(
                f"| {variant} | {method} | {len(mine)} | {sum(r['meets'] for r in mine)} | "
                f"{gap.mean():+.3f} [{gap.min():+.3f}, {gap.max():+.3f}] | "
                f"{min(r['dice_vs_neggrad'] for r in mine):+.3f} | "
                f"[{share.min():.2f}, {share.max():.2f}] | {sum(r['collapsed'] for r in mine)} |"
            )
    refs = {(r["seed"], r["setting"]): r for r in rows if r.get("draw") is None}
    lines += ["", "| seed | coarse WGA | NegGrad-Seg WGA / Dice |", "|---|---|---|"]
    for s in seeds:
        c, n = refs[(s, "coarse")], refs[(s, "neggrad-seg")]
        lines.append(
            f"| {s} | {c['worst_group_auroc']:.3f} | "
            f"{n['worst_group_auroc']:.3f} / {n['dice']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--variants", default="current", help=f"of {', '.join(VARIANTS)}")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--summarise", action="store_true", help="only rewrite summary.md")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore", UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        rows = [json.loads(line) for f in sorted(args.out.glob("rows*.jsonl")) for line in f.open()]
    else:
        sink = args.out / f"rows-{args.seeds.replace(',', '_')}.jsonl"
        sink.unlink(missing_ok=True)
        rows = []
        for seed in (int(s) for s in args.seeds.split(",")):
            rows += run_seed(seed, args.draws, args.variants.split(","), args.device, sink)
    (args.out / "summary.md").write_text(summary(rows) + "\n")
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
