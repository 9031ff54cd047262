"""Benchmarks behind `shortcut-unlearning bench`: ratios and spreads measured in one run."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import figures
from . import masks as masklib
from .data.synthetic import generate
from .experiment import RunConfig, run
from .model import Model, ModelConfig, resolve_device
from .progress import drive
from .training import TrainConfig, train


def cache_speedup(
    n: int = 64, size: int = 128, epochs: int = 3, encoder: str = "resnet18", device: str = "auto"
) -> dict:
    """Training time of the plain loop and of the cached-feature loop on the same work.

    The cached time includes computing the cache. Both runs take the same steps (a test
    checks that their losses agree).
    """
    data = generate(n=n, size=size, seed=0)
    coarse = masklib.coarse_masks(data.masks)
    seconds = {}
    for cache in (False, True):
        model = Model(ModelConfig(encoder=encoder, image_size=size), device)
        config = TrainConfig(epochs=epochs, cache_features=cache)
        start = time.perf_counter()
        drive(train(model, data.images, coarse, config), quiet=True)
        seconds["cached" if cache else "plain"] = time.perf_counter() - start
    return {
        "plain_s": seconds["plain"],
        "cached_s": seconds["cached"],
        "speedup": seconds["plain"] / seconds["cached"],
        "images": n,
        "size": size,
        "epochs": epochs,
        "encoder": encoder,
        "device": str(resolve_device(device)),
    }


STATES = ("coarse", "retrain", "fine_oracle")
COLUMNS = (
    "worst_group_auroc",
    "auroc",
    "dice",
    "s_global",
    "s_global_excess",
    "counterfactual_drop",
)


def seeds(base: RunConfig, seed_list: list[int], methods: list[str], out: Path | str) -> dict:
    """Every method on the same coarse model per seed, with both baselines; mean and std.

    A method may name its unlearning scope after a slash: "model-clipping/head".
    """
    out = Path(out)
    rows: dict[str, list[dict]] = {}
    for seed in seed_list:
        first = None
        for method in methods:
            name, _, scope = method.partition("/")  # "gradient-clipping/head": another scope
            folder = out / f"seed{seed}" / method.replace("/", "-")
            config = replace(
                base,
                seed=seed,
                method=name,
                scope=scope or None,
                out=str(folder),
                baselines=first is None,
                model=first,
            )
            report = run(config)
            if first is None:
                first = str(Path(config.out) / "coarse_model.safetensors")
                for state in STATES:
                    seconds = report["timings"][
                        "coarse_train_s" if state == "coarse" else f"{state}_train_s"
                    ]
                    rows.setdefault(state, []).append(_row(report[state], seconds))
            rows.setdefault(method, []).append(
                _row(report["unlearned"], report["timings"]["unlearn_s"])
            )
    summary = {name: _mean_std(values) for name, values in rows.items()}
    first_seed = out / f"seed{seed_list[0]}"
    trajectories = {}
    for method in methods:
        report = json.loads((first_seed / method.replace("/", "-") / "metrics.json").read_text())
        start = {"step": 0, "phase": "start", **(report["unlearning"]["start_probe"] or {})}
        trajectories[method] = [start, *report["unlearning"]["trajectory"]]
    figures.trajectory_plot(
        trajectories,
        out / "trajectory.png",
        f"Probe metrics over unlearning steps, seed {seed_list[0]} "
        "(shaded: noisy phase of the certified operators)",
    )
    result = {
        "seeds": seed_list,
        "methods": methods,
        "config": _plain_config(base),
        "summary": summary,
        "runs": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary) + "\n")
    return result


def _row(state: dict, seconds: float) -> dict:
    return {
        "worst_group_auroc": state["worst_group_auroc"],
        "auroc": state["auroc"],
        "dice": state["dice"],
        "s_global": state["s_global"]["value"],
        "s_global_excess": state["s_global"]["excess"],
        "counterfactual_drop": state["counterfactual_drop"],
        "wall_s": seconds,
        "collapsed": float(state.get("collapsed", False)),
    }


def _mean_std(values: list[dict]) -> dict:
    return {
        key: {
            "mean": float(np.mean([v[key] for v in values])),
            "std": float(np.std([v[key] for v in values], ddof=1))
            if len(values) > 1
            else float("nan"),
        }
        for key in values[0]
    }


def _plain_config(config: RunConfig) -> dict:
    return {k: v for k, v in vars(config).items() if k not in ("out", "quiet")}


def markdown(summary: dict) -> str:
    """One row per model state or method: mean ± std over seeds."""
    head = [
        "model",
        "worst-group AUROC",
        "AUROC",
        "Dice",
        "S_global (nats/px)",
        "S_global - null",
        "counterfactual drop",
        "wall s",
        "collapsed",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, stats in summary.items():
        cells = [name]
        for key in (*COLUMNS, "wall_s"):
            mean, std = stats[key]["mean"], stats[key]["std"]
            cells.append(
                f"{mean:.2e} ± {std:.1e}"
                if key.startswith("s_global")
                else f"{mean:.3f} ± {std:.3f}"
                if key != "wall_s"
                else f"{mean:.0f} ± {std:.0f}"
            )
        cells.append(f"{stats['collapsed']['mean']:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
