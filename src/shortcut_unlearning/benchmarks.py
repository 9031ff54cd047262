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


def open_times(
    data: Path | str,
    longest: int | None = 1024,
    edits: int = 20,
    overlay_images: tuple[int, ...] = (32, 256),
    serial_images: int = 32,
    workers: int | None = None,
) -> dict:
    """How long a dataset folder takes to open at the working resolution, cold and cached,
    and the forget-set update per edit on its images.

    cold: this folder's cache emptied first (the operating system's file cache is not); open
    = what napari waits for (a lazy open: listing and headers); all images = decoding (or
    reading) every image once, as the first Refine does. The overlay update is Refinement.sync
    on the edited image after a 40 x 40 erase with autosave, as the widget runs it after a
    stroke, on the first images of the folder, for each stack size in `overlay_images`.
    """
    from .data.folders import default_workers
    from .data.working import folder_cache, open_working
    from .settings import cache_folder

    root = cache_folder()
    if root is None:
        raise ValueError("bench open measures the cache: unset SHORTCUT_UNLEARNING_CACHE=off")
    workers = workers or default_workers()
    folder_cache(data, longest, root).clear()
    result = {"folder": str(data), "working_size": longest or "original", "workers": workers}
    for state in ("cold", "cached"):
        start = time.perf_counter()
        opened = open_working(data, longest, lazy=True, workers=workers)
        opened_s = time.perf_counter() - start
        opened.warm(workers)
        all_s = time.perf_counter() - start - opened_s
        result[state] = {
            "open_s": opened_s,
            "all_images_s": all_s,
            "ms_per_image": 1000 * all_s / len(opened),
            "decoded": opened.reader.decoded,
            "from_cache": opened.reader.from_cache,
        }
    n, (height, width) = len(opened), opened.images.shape[1:3]
    cache = folder_cache(data, longest, root).slot
    result.update(
        images=n,
        canvas=[height, width],
        cache_gib=sum(f.stat().st_size for f in cache.glob("*.npy")) / 2**30,
        arrays_in_memory_gib=n * height * width * 5 / 2**30,  # eager: image, fine, coarse
    )
    serial = open_working(data, longest, lazy=True, cache=False)
    count = min(serial_images, n)
    start = time.perf_counter()
    for i in range(count):
        serial.reader.arrays(i)
    result["serial_ms_per_image"] = 1000 * (time.perf_counter() - start) / count
    result["overlay"] = [
        _overlay_per_edit(np.asarray(opened.coarse[:m]), edits)
        for m in sorted({min(m, n) for m in overlay_images})
    ]
    return result


def _overlay_per_edit(coarse: np.ndarray, edits: int) -> dict:
    """Refinement.sync (forget set and autosave of the edited image) after 40 x 40 erases."""
    import tempfile

    from .refinement import Refinement

    refinement = Refinement(coarse)
    seconds = []
    with tempfile.TemporaryDirectory() as autosave:
        for edit in range(edits):
            i = edit % len(coarse)
            rows, cols = np.nonzero(coarse[i])
            if not len(rows):
                continue
            y, x = rows[(edit * 7919) % len(rows)], cols[(edit * 7919) % len(rows)]
            refinement.refined[i, max(y - 20, 0) : y + 20, max(x - 20, 0) : x + 20] = 0
            start = time.perf_counter()
            changed = refinement.sync({i}, autosave)
            seconds.append(time.perf_counter() - start)
            if changed != [i]:
                raise RuntimeError(f"the erase on image {i} changed {changed}: nothing timed")
    ms = np.array(seconds) * 1000
    return {
        "images": len(coarse),
        "plane": list(coarse.shape[1:]),
        "edits": len(ms),
        "median_ms": float(np.median(ms)),
        "max_ms": float(ms.max()),
    }


STATES = ("coarse", "retrain", "retrain_band_ignored", "fine_oracle")
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
    and trajectory.png. A method may name its unlearning scope after a slash: "model-clipping/head",
    and a certified one its epsilon after an at sign: "gradient-clipping@3".
    """
    out = Path(out)
    device = resolve_device(base.device)
    operators = {}
    for method in methods:  # every setting checked before any training
        operators[method] = _method_config(base, method)
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
            row = _row(report["unlearned"], timings["unlearn_s"])
            rows.setdefault(method, []).append({**row, "steps": outcome.steps})
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
    return method.replace("/", "-").replace("@", "-eps")


def _method_config(base: RunConfig, method: str) -> RunConfig:
    """The run settings of "name", "name/scope", "name@eps" or "name/scope@eps"."""
    spec, _, epsilon = method.partition("@")
    name, _, scope = spec.partition("/")
    options = {**base.operator_options, **({"epsilon": float(epsilon)} if epsilon else {})}
    return replace(base, method=name, scope=scope or None, operator_options=options)


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


# --- the privacy-utility curve -----------------------------------------------------------------
CURVE_REFERENCES = ("neggrad-seg",)  # unlearning without a certificate, beside the curve
CURVE_KEYS = ("worst_group_auroc", "conflicting_auroc", "dice", "s_global", "band_reliance")


def curve_methods(epsilons) -> list[str]:
    from .unlearning import CERTIFIED

    return [*CURVE_REFERENCES, *(f"{n}@{e:g}" for n in CERTIFIED for e in epsilons)]


def privacy_utility(base: RunConfig, seed_list: list[int], epsilons, out: Path | str) -> dict:
    """The privacy-utility curve: each certified operator at each epsilon (delta from the
    operator options, else its default 1e-5), beside NegGrad-Seg, the coarse model and the
    baselines (retrain, retrain with the band ignored, fine oracle), over seeds.

    `seeds` runs it: one coarse model and one set of baselines per seed, shared by every
    method. Adds curve.png (mean and spread over seeds against epsilon) and per run the
    recovery's steps (`steps`, in summary.json)."""
    out = Path(out)
    result = seeds(base, seed_list, curve_methods(epsilons), out)
    result["epsilons"] = [float(e) for e in epsilons]
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    curve_plot(result["summary"], result["epsilons"], out / "curve.png")
    return result


def curve_plot(summary: dict, epsilons: list[float], path: Path) -> Path:
    """Mean ± std over seeds against epsilon, one line per certified operator; the coarse
    model, NegGrad-Seg and the baselines as horizontal lines (their spread shaded)."""
    from matplotlib.figure import Figure

    from .unlearning import CERTIFIED

    titles = {
        "worst_group_auroc": "worst-group AUROC",
        "conflicting_auroc": "conflicting-group AUROC",
        "dice": "Dice (fine masks)",
        "s_global": "S_global (nats/px)",
        "band_reliance": "band reliance",
    }
    fig = Figure(figsize=(15, 3.4))
    axes = fig.subplots(1, len(CURVE_KEYS))
    references = [m for m in (*STATES, *CURVE_REFERENCES) if m in summary]
    colours = _palette(len(CERTIFIED) + len(references))
    for ax, key in zip(axes, CURVE_KEYS, strict=True):
        for name, colour in zip(CERTIFIED, colours, strict=False):
            stats = [summary.get(f"{name}@{e:g}", {}).get(key) for e in epsilons]
            if not all(stats):
                continue
            ax.errorbar(
                epsilons,
                [v["mean"] for v in stats],
                yerr=[v["std"] for v in stats],
                fmt="o-",
                color=colour,
                label=name,
                capsize=3,
                markersize=4,
            )
        for name, colour in zip(references, colours[len(CERTIFIED) :], strict=True):
            mean, std = summary[name][key]["mean"], summary[name][key]["std"]
            ax.axhline(mean, color=colour, linestyle="--", linewidth=1, label=name)
            if np.isfinite(std):
                ax.axhspan(mean - std, mean + std, color=colour, alpha=0.08)
        ax.set_xscale("log")
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.set_xlabel("epsilon (delta 1e-5)")
        ax.set_title(titles[key], fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Privacy-utility curve: mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def _palette(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]
