"""Fine-mask training at 3 seeds (200 synthetic images, 64 px): cross-entropy alone against
cross-entropy + soft Dice, both with validation, early stopping and class-aware selection.

Run from the repository root:
    python benchmarks/convergence.py > benchmarks/results/convergence.jsonl
"""

import json
import time
import warnings

from shortcut_unlearning import metrics
from shortcut_unlearning.data.synthetic import generate
from shortcut_unlearning.model import Model, ModelConfig
from shortcut_unlearning.progress import drive
from shortcut_unlearning.training import TrainConfig, train

warnings.simplefilter("ignore")
for seed in (0, 1, 2):
    data = generate(n=200, size=64, seed=seed)
    tr, te = data.split("train"), data.split("test")
    for name, w in (("ce", 0.0), ("ce+dice", 1.0)):
        m = Model(ModelConfig(image_size=64, seed=seed))
        t = time.time()
        drive(
            train(m, tr.images, tr.masks, TrainConfig(epochs=20, seed=seed, dice_weight=w)),
            quiet=True,
        )
        p = m.probabilities(te.images)
        rec = m.config.provenance["training"]
        print(
            json.dumps(
                {
                    "seed": seed,
                    "loss": name,
                    "test_dice": round(metrics.dice(p, te.masks), 3),
                    "test_dice_by_class": {
                        k: round(v, 3) for k, v in metrics.dice_by_class(p, te.masks).items()
                    },
                    "val_dice": round(rec["val_dice"], 3),
                    "val_class_dice": round(rec["val_class_dice"], 3),
                    "best_epoch": rec["best_epoch"],
                    "epochs_run": rec["epochs_run"],
                    "converged": rec["converged"],
                    "seconds": round(time.time() - t),
                }
            ),
            flush=True,
        )
