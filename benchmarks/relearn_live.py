"""How long the plugin's run takes on the shipped sample, per method: the widget's own job
(Workbench.execute: measure before, unlearn, measure after) on the sample stack the plugin
opens, with 1 and 3 images refined to their fine masks, the dock's default settings.

    OMP_NUM_THREADS=2 python benchmarks/relearn_live.py --methods relearn,neggrad-seg \
        --out benchmarks/results/relearn_live.json

Prints and writes, per method and number of refined images, the run's seconds (of which the
unlearning loop), its steps and why it stopped, and the numbers the dock reads (S_global,
band reliance, Dice on the refined images, the malignant share, AUROC on the measured images).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from shortcut_unlearning.napari._io import sample_dermoscopy
from shortcut_unlearning.progress import drive
from shortcut_unlearning.resources import SAMPLE_MODEL, sample_data_dir
from shortcut_unlearning.settings import OperatorSettings
from shortcut_unlearning.workbench import Workbench


def one_run(method: str, refined: int, device: str) -> dict:
    (images, _, _), (coarse, coarse_kw, _), (fine, _, _) = sample_dermoscopy()
    bench = Workbench(
        sample_data_dir() / SAMPLE_MODEL, OperatorSettings(method=method, device=device)
    )
    bench.open(images, coarse, coarse_kw["metadata"])
    for i in range(refined):
        bench.refinement.refined[i][fine[i] == 0] = 0
    bench.refinement.sync()
    bench.current_model()  # loaded before the clock, as the dock loads it on open
    clock = time.perf_counter()
    record = drive(bench.execute(bench.plan()), quiet=True)
    seconds = time.perf_counter() - clock
    after, before = record.after, record.before
    return {
        "method": method,
        "refined_images": refined,
        "run_s": seconds,
        "steps": record.result.steps,
        "stopping": (record.result.stopping or {}).get("reason"),
        "collapsed": record.result.collapsed,
        **{
            f"{key}_{when}": value
            for when, views in (("before", before), ("after", after))
            for key, value in (
                ("s_global", views.metrics.s_global["value"]),
                ("band_reliance", (views.metrics.band_reliance or {}).get("value")),
                ("dice_refined", views.refined["dice"]),
                ("malignant_share", views.metrics.malignant_share),
                ("auroc", views.metrics.auroc),
            )
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--methods", default="relearn,neggrad-seg")
    parser.add_argument("--refined", default="1,3")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = [
        one_run(method, int(n), args.device)
        for method in args.methods.split(",")
        for n in args.refined.split(",")
    ]
    for row in rows:
        print(json.dumps(row, default=float))
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2, default=float) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
