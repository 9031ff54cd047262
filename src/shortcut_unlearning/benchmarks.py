"""Benchmarks behind `shortcut-unlearning bench`: ratios and spreads measured in one run."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import experiment, figures
from . import masks as masklib
from .data.synthetic import generate
from .experiment import RunConfig
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
    "conflicting_auroc",
    "auroc",
    "dice",
    "dice_benign",
    "dice_malignant",
    "malignant_share",
    "band_reliance",
    "s_global",
    "s_global_excess",
    "counterfactual_drop",
)


def seeds(base: RunConfig, seed_list: list[int], methods: list[str], out: Path | str) -> dict:
    """Every method on the same coarse model per seed, with both baselines; mean and std.

    The stages of `experiment` are composed in memory: per seed the data are prepared, the
    coarse model and the baselines trained and evaluated once, then each method unlearns
    from the same coarse model. Files: seed<N>/coarse_model, seed<N>/<method>/ (metrics.json
    with the baselines' records, the unlearned model, saliency.png), summary.json, summary.md
    and trajectory.png. A method may name its unlearning scope after a slash: "model-clipping/head".
    """
    out = Path(out)
    device = resolve_device(base.device)
    operators = {}
    for method in methods:  # every setting checked before any training
        name, _, scope = method.partition("/")
        operators[method] = replace(base, method=name, scope=scope or None)
        experiment.build_operator(operators[method])
    rows: dict[str, list[dict]] = {}
    trajectories = {}
    for seed in seed_list:
        config = replace(base, seed=seed, baselines=True)
        prepared = experiment.prepare_data(config)
        start = experiment.train_or_load(config, prepared, device)
        baselines = experiment.train_baselines(config, prepared, device)
        states = {"coarse": start.model, **{k: v.model for k, v in baselines.items()}}
        evaluated = experiment.evaluate_states(states, prepared.evalset, seed)
        seconds = {"coarse": start.seconds, **{k: v.seconds for k, v in baselines.items()}}
        for state in STATES:
            rows.setdefault(state, []).append(_row(evaluated[state], seconds[state]))
        start.model.save(out / f"seed{seed}" / "coarse_model")
        for method in methods:
            method_config = replace(
                operators[method], seed=seed, out=str(out / f"seed{seed}" / _folder(method))
            )
            timings = {"data_s": prepared.seconds, "coarse_train_s": start.seconds}
            timings |= {f"{k}_train_s": v.seconds for k, v in baselines.items()}
            report, saved, picture, outcome = experiment.unlearn_and_report(
                method_config,
                experiment.build_operator(method_config),
                prepared,
                start,
                evaluated,
                device,
                timings,
            )
            experiment.write_run(method_config.out, report, saved, picture)
            rows.setdefault(method, []).append(_row(report["unlearned"], timings["unlearn_s"]))
            if seed == seed_list[0]:
                trajectories[method] = experiment.trajectory(outcome)
    summary = {name: _mean_std(values) for name, values in rows.items()}
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


def _folder(method: str) -> str:
    return method.replace("/", "-")


def _row(state: dict, seconds: float) -> dict:
    band = state.get("band_reliance") or {}
    s_global = state.get("s_global") or {}
    by_class = state.get("dice_by_class", {})
    return {
        "worst_group_auroc": state["worst_group_auroc"],
        "conflicting_auroc": state.get("conflicting_auroc", float("nan")),
        "auroc": state["auroc"],
        "dice": state["dice"],
        "dice_benign": by_class.get("benign", float("nan")),
        "dice_malignant": by_class.get("malignant", float("nan")),
        "malignant_share": state.get("malignant_share", float("nan")),
        "band_reliance": band.get("value", float("nan")),
        "s_global": s_global.get("value", float("nan")),
        "s_global_excess": s_global.get("excess", float("nan")),
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
        "conflicting AUROC",
        "AUROC",
        "Dice",
        "Dice benign",
        "Dice malignant",
        "malignant share",
        "band reliance",
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
            if key.startswith("s_global"):
                cells.append(f"{mean:.2e} ± {std:.1e}")
            elif key == "wall_s":
                cells.append(f"{mean:.0f} ± {std:.0f}")
            else:
                cells.append(f"{mean:.3f} ± {std:.3f}")
        cells.append(f"{stats['collapsed']['mean']:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
