"""Benchmarks behind `shortcut-unlearning bench`: ratios and spreads measured in one run."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field, JsonValue, Strict

from .. import distributed, experiment, figures
from .. import masks as masklib
from ..data.synthetic import PLACEMENTS, generate
from ..evaluation import Evaluation
from ..experiment import RunConfig
from ..files import write_figure, write_json, write_text
from ..model import Model, ModelConfig, resolve_device
from ..progress import drive
from ..schemas import Seed, Text, read_json, validate
from ..training import TrainConfig, train


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
    from ..data.folders import default_workers
    from ..data.working import folder_cache, open_working
    from ..settings import cache_folder

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

    from ..refinement import Refinement

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

    Under torchrun every rank trains and unlearns its part of each batch; rank 0 alone
    evaluates, writes and returns the result, the others return {}.
    """
    out, main = Path(out), distributed.is_main()
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
        prepared = experiment.refine_ranked(prepared, config, start.model)
        baselines = experiment.train_baselines(config, prepared, device)
        for method in methods if not main else ():  # the other ranks: their part of unlearning
            part = replace(operators[method], seed=seed)
            experiment.unlearn(part, experiment.build_operator(part), start.model, prepared)
        if not main:
            continue
        configs = {
            method: replace(
                operators[method], seed=seed, out=str(out / f"seed{seed}" / _folder(method))
            )
            for method in methods
        }
        done = {  # every method unlearns before the test split is read
            method: experiment.unlearn_stage(
                configs[method], experiment.build_operator(configs[method]), prepared, start
            )
            for method in methods
        }
        states = {"coarse": start.model, **{k: v.model for k, v in baselines.items()}}
        evaluated = experiment.evaluate_states(states, prepared.evalset, seed)
        seconds = {"coarse": start.seconds, **{k: v.seconds for k, v in baselines.items()}}
        for state, record in evaluated.items():
            rows.setdefault(state, []).append(_row(record, seconds[state]))
        start.model.save(out / f"seed{seed}" / "coarse_model")
        for method in methods:
            method_config = configs[method]
            timings = {"data_s": prepared.seconds, "coarse_train_s": start.seconds}
            timings |= {f"{k}_train_s": v.seconds for k, v in baselines.items()}
            report, saved, picture = experiment.report_run(
                method_config,
                experiment.build_operator(method_config),
                prepared,
                states,
                done[method],
                evaluated,
                device,
                timings,
            )
            experiment.write_run(method_config.out, report, saved, picture)
            outcome = done[method].outcome
            unlearned = Evaluation.from_json(report["unlearned"])
            row = _row(unlearned, timings["unlearn_s"], outcome.collapsed)
            rows.setdefault(method, []).append({**row, "steps": outcome.steps})
            if seed == seed_list[0]:
                trajectories[method] = experiment.trajectory(outcome)
    if not main:
        return {}
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
        "paired": paired_differences(rows),
        "runs": rows,
    }
    return _write_summary(out, result, markdown(summary, result["paired"]))


def _folder(method: str) -> str:
    for old, new in (("/", "-"), ("@", "-eps"), (":", "-"), ("=", "-"), ("+", "-")):
        method = method.replace(old, new)
    return method


def _method_config(base: RunConfig, method: str) -> RunConfig:
    """The run settings of "name", "name/scope", "name@eps" or "name/scope@eps", each with
    operator options after colons: "relearn:start=kept:retain_images=refined"."""
    spec, *extra = method.split(":")
    spec, _, epsilon = spec.partition("@")
    name, _, scope = spec.partition("/")
    options = {**base.operator_options, **({"epsilon": float(epsilon)} if epsilon else {})}
    for item in extra:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"operator option {item!r} in {method!r} is not key=value")
        options[key] = _option_value(text)
    return replace(base, method=name, scope=scope or None, operator_options=options)


def _option_value(text: str):
    """An operator option's value from its text: a number where it reads as one."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _row(record: Evaluation, seconds: float, collapsed: bool = False) -> dict:
    band = record.band_reliance or {}
    s_global = record.s_global or {}
    by_class = record.dice_by_class  # empty without masks
    return {
        "worst_group_auroc": record.worst_group_auroc,
        "conflicting_auroc": record.conflicting_auroc,
        "auroc": record.auroc,
        "dice": record.dice,
        "dice_benign": by_class.get("benign", float("nan")),
        "dice_malignant": by_class.get("malignant", float("nan")),
        "malignant_share": record.malignant_share,
        "band_reliance": band.get("value", float("nan")),
        "s_global": s_global.get("value", float("nan")),
        "s_global_excess": s_global.get("excess", float("nan")),
        "counterfactual_drop": record.counterfactual_drop,
        "wall_s": seconds,
        "collapsed": float(collapsed),
    }


def _mean_std(values: list[dict]) -> dict:
    """Per column: mean, standard deviation and the 95% t interval of the mean over the runs
    (seeds)."""
    return {key: _mean_interval([v[key] for v in values]) for key in values[0]}


def _mean_interval(values) -> dict:
    """Mean, sd and the 95% Student t interval of the mean of independent runs; NaN runs
    (a measure a run could not take) are left out and counted in n."""
    from scipy.stats import t

    values = np.asarray(values, float)
    values = values[np.isfinite(values)]
    n = len(values)
    mean = float(values.mean()) if n else float("nan")
    std = float(values.std(ddof=1)) if n > 1 else float("nan")
    half = float(t.ppf(0.975, n - 1) * std / np.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci_low": mean - half, "ci_high": mean + half, "n": n}


PAIRED_REFERENCES = ("neggrad-seg", "fine_oracle")
PAIRED_KEYS = ("worst_group_auroc", "dice", "malignant_share", "band_reliance")


def paired_differences(runs: dict[str, list[dict]]) -> dict:
    """Each method minus each reference (PAIRED_REFERENCES), seed by seed: the mean difference
    and its 95% t interval, per PAIRED_KEYS. Rows of one seed stand at the same position."""
    out = {}
    for reference in (r for r in PAIRED_REFERENCES if r in runs):
        theirs = runs[reference]
        for name, mine in runs.items():
            if name == reference or len(mine) != len(theirs):
                continue
            out.setdefault(name, {})[reference] = {
                key: _mean_interval([a[key] - b[key] for a, b in zip(mine, theirs, strict=True)])
                for key in PAIRED_KEYS
            }
    return out


def _plain_config(config: RunConfig) -> dict:
    return {k: v for k, v in vars(config).items() if k not in ("out", "quiet")}


def markdown(summary: dict, paired: dict | None = None) -> str:
    """One row per model state or method: the mean over seeds with the 95% interval of the
    mean; then each method's paired difference from NegGrad-Seg and the fine-mask oracle."""
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
    lines = table_head(head)
    for name, stats in summary.items():
        cells = [name]
        for key in (*COLUMNS, "wall_s"):
            digits = ".2e" if key.startswith("s_global") else ".0f" if key == "wall_s" else ".3f"
            cells.append(_interval_cell(stats[key], digits))
        cells.append(f"{stats['collapsed']['mean']:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    n = max(stats["worst_group_auroc"].get("n", 0) for stats in summary.values())
    lines.append(f"\nMean over {n} seeds [95% t interval of the mean].")
    for reference, rows in _by_reference(paired or {}).items():
        lines += ["", f"Paired by seed, minus {reference}:", ""]
        lines += table_head(["model", *PAIRED_KEYS])
        for name, diffs in rows.items():
            cells = [_interval_cell(diffs[key], "+.3f") for key in PAIRED_KEYS]
            lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def _interval_cell(stats: dict, digits: str) -> str:
    mean = format(stats["mean"], digits)
    if "ci_low" not in stats or not np.isfinite(stats["ci_low"]):
        return mean if "std" not in stats else f"{mean} ± {format(stats['std'], digits)}"
    return f"{mean} [{format(stats['ci_low'], digits)}, {format(stats['ci_high'], digits)}]"


def _by_reference(paired: dict) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for name, references in paired.items():
        for reference, diffs in references.items():
            out.setdefault(reference, {})[name] = diffs
    return out


# --- data that do not flatter the method -------------------------------------------------------
# The factors `data_matrix` varies one at a time, each at these levels (docs/method.md, "Data
# that do not flatter the method"); the base setting is the run's flags (by default dilated
# masks, artefacts in the band, exact refinements, 10 % refined).
DATA_FACTORS = (
    ("coarse", masklib.COARSE_METHODS),
    ("synth_placement", PLACEMENTS),
    ("refine_jitter", (0, 2)),
    ("refine_missed", (0.0, 0.5)),
    ("fine_fraction", (0.1, 0.05, 0.02, 0.01)),
)
DATA_KEYS = ("worst_group_auroc", "dice", "band_reliance", "s_global", "malignant_share")


def data_variants(base: RunConfig) -> list[tuple[str, RunConfig]]:
    """The base setting, then each factor of DATA_FACTORS moved alone to each other level."""
    variants = [("base", base)]
    for name, levels in DATA_FACTORS:
        variants += [
            (
                f"{name}={level:g}" if isinstance(level, float) else f"{name}={level}",
                replace(base, **{name: level}),
            )
            for level in levels
            if level != getattr(base, name)
        ]
    return variants


def data_matrix(base: RunConfig, seed_list: list[int], methods: list[str], out: Path | str) -> dict:
    """`seeds` once per setting of data_variants, each in a folder of its own, and one table.

    Beside the metrics, each setting records how much of the shortcut its forget set holds:
    the share of the refined training images' spurious artefact pixels the refinements
    forget (1 in the base setting by construction). Written after every setting: a stopped
    benchmark keeps what it measured."""
    out = Path(out)
    rows, result = [], {}
    for name, config in data_variants(base):
        folder = name.replace("=", "-")
        summary = seeds(config, seed_list, methods, out / folder)["summary"]
        forgotten = [_artefacts_forgotten(replace(config, seed=seed)) for seed in seed_list]
        rows.append(
            {
                "setting": name,
                "folder": folder,
                "artefacts_forgotten": float(np.mean(forgotten)),
                "summary": summary,
            }
        )
        result = {
            "seeds": seed_list,
            "methods": methods,
            "config": _plain_config(base),
            "factors": {k: list(v) for k, v in DATA_FACTORS},
            "settings": rows,
        }
        _write_summary(out, result, data_markdown(rows))
    return result


def _artefacts_forgotten(config: RunConfig) -> float:
    """Share of the refined images' spurious artefact pixels in the forget set (nan where the
    images are not chosen before training, or carry no artefact)."""
    prepared = experiment.prepare_data(config)
    if prepared.split is None or prepared.train.artefacts is None:
        return float("nan")
    spurious = prepared.train.artefact_mask()[prepared.refined]
    forget = prepared.split.forget[prepared.refined]
    return float((spurious & forget).sum() / spurious.sum()) if spurious.any() else float("nan")


def data_markdown(rows: list[dict]) -> str:
    """One row per setting and model: the mean over seeds of DATA_KEYS [95% t interval]."""
    head = [
        "setting",
        "model",
        "worst-group AUROC",
        "Dice",
        "band reliance",
        "S_global (nats/px)",
        "malignant share",
        "artefact pixels forgotten",
    ]
    lines = table_head(head)
    for row in rows:
        for model, stats in row["summary"].items():
            if model in ("retrain", "retrain_band_ignored"):
                continue
            cells = [row["setting"], model]
            for key in DATA_KEYS:
                cells.append(_interval_cell(stats[key], ".2e" if key == "s_global" else ".3f"))
            cells.append(f"{row['artefacts_forgotten']:.0%}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the privacy-utility curve -----------------------------------------------------------------
CURVE_REFERENCES = ("neggrad-seg",)  # unlearning without a certificate, beside the curve
CURVE_KEYS = ("worst_group_auroc", "conflicting_auroc", "dice", "s_global", "band_reliance")


def curve_methods(epsilons) -> list[str]:
    from ..unlearning import CERTIFIED

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
    if not result:  # a rank other than 0 under torchrun: rank 0 writes
        return result
    result["epsilons"] = [float(e) for e in epsilons]
    write_json(out / "summary.json", result, replace=True)
    curve_plot(result["summary"], result["epsilons"], out / "curve.png")
    return result


# A measure of one run in a summary: a number, or null (NaN: a measure the run could not take).
Measure = Annotated[float, Strict()] | None


@dataclass(frozen=True)
class BenchSummary:
    """The part of a `bench seeds` or `bench curve` summary.json that `bench merge` reads;
    its other keys (the summary and paired differences) are computed again."""

    seeds: list[Seed]
    methods: list[Text]
    config: dict[str, JsonValue]
    runs: dict[str, list[dict[str, Measure]]]  # per model state or method, one row per seed
    epsilons: list[Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]] | None = None

    def __post_init__(self):
        needed = {*COLUMNS, *PAIRED_KEYS, *CURVE_KEYS, "wall_s", "collapsed"}
        for name, rows in self.runs.items():
            if len(rows) != len(self.seeds):
                raise ValueError(
                    f"runs.{name} holds {len(rows)} rows for {len(self.seeds)} seeds; "
                    "it should hold one row per seed"
                )
            lacking = sorted(needed - set().union(*map(set, rows))) if rows else []
            if lacking or any(set(row) != set(rows[0]) for row in rows):
                raise ValueError(
                    f"runs.{name} rows should each hold the measures {sorted(needed)}"
                    + (f" (they lack {lacking})" if lacking else " (they differ in their keys)")
                )

    def rows(self, name: str) -> list[dict[str, float]]:
        """The rows of `name`, null measures as NaN."""
        return [{k: np.nan if v is None else v for k, v in row.items()} for row in self.runs[name]]


def read_summary(path: Path) -> BenchSummary:
    """A bench summary.json checked against BenchSummary; InputError names the file and each
    field that is wrong."""
    fix = "give the --out folders of `bench seeds` or `bench curve` runs"
    return validate(BenchSummary, read_json(path, fix), path, fix)


def merge(folders: list[Path | str], out: Path | str) -> dict:
    """One summary of `seeds` or `curve` runs made apart, each over seeds of its own (for
    example two processes side by side): their per-seed rows pooled, mean and std taken again,
    the curve drawn again when they are curves. Runs with other methods or settings (the device
    aside), or sharing a seed, are refused."""
    folders = [Path(f) for f in folders]
    results = []
    for folder in folders:
        path = folder / "summary.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: give the --out folders of bench runs")
        results.append(read_summary(path))
    first = results[0]

    def settings(result: BenchSummary):
        config = {k: v for k, v in result.config.items() if k not in ("device", "seed")}
        return result.methods, config, result.epsilons, sorted(result.runs)

    for folder, result in zip(folders[1:], results[1:], strict=True):
        if settings(result) != settings(first):
            raise ValueError(
                f"{folder} was run with other methods or settings than {folders[0]}; "
                "only runs of the same command over other seeds merge"
            )
    seed_list = [seed for result in results for seed in result.seeds]
    if len(set(seed_list)) < len(seed_list):
        raise ValueError(f"the runs share a seed ({seed_list}): each seed must come from one run")
    runs = {name: [row for r in results for row in r.rows(name)] for name in first.runs}
    summary = {name: _mean_std(rows) for name, rows in runs.items()}
    paired = paired_differences(runs)
    result = {"seeds": seed_list, "methods": first.methods, "config": first.config}
    result |= {"summary": summary, "paired": paired, "runs": runs}
    if first.epsilons is not None:
        result["epsilons"] = first.epsilons
    result["merged_from"] = [str(folder) for folder in folders]
    out = Path(out)
    _write_summary(out, result, markdown(summary, paired))
    if "epsilons" in result:
        curve_plot(summary, result["epsilons"], out / "curve.png")
    return result


def curve_plot(summary: dict, epsilons: list[float], path: Path) -> Path:
    """Mean ± std over seeds against epsilon, one line per certified operator; the coarse
    model, NegGrad-Seg and the baselines as horizontal lines (their spread shaded)."""
    from matplotlib.figure import Figure

    from ..unlearning import CERTIFIED

    titles = {
        "worst_group_auroc": "worst-group AUROC",
        "conflicting_auroc": "conflicting-group AUROC",
        "dice": "Dice (fine masks)",
        "s_global": "S_global (nats/px)",
        "band_reliance": "band reliance",
    }
    fig = Figure(figsize=(15, 3.4))
    axes = fig.subplots(1, len(CURVE_KEYS))
    references = [m for m in (*experiment.STATES, *CURVE_REFERENCES) if m in summary]
    colours = _palette(len(CERTIFIED) + len(references))
    for ax, key in zip(axes, CURVE_KEYS, strict=True):
        for name, colour in zip(CERTIFIED, colours, strict=False):
            stats = [summary.get(f"{name}@{e:g}", {}).get(key) for e in epsilons]
            if not all(stats) or not np.isfinite([v["mean"] for v in stats]).any():
                continue  # not measured (e.g. no conflicting group in this test split)
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
            if not np.isfinite(mean):
                continue
            ax.axhline(mean, color=colour, linestyle="--", linewidth=1, label=name)
            if np.isfinite(std):
                ax.axhspan(mean - std, mean + std, color=colour, alpha=0.08)
        ax.set_xscale("log")
        ax.set_xlim(min(epsilons) / 1.5, max(epsilons) * 1.5)  # also when nothing was drawn
        ax.set_xticks(epsilons, [f"{e:g}" for e in epsilons])
        ax.set_xlabel("epsilon (delta 1e-5)")
        ax.set_title(titles[key], fontsize=9)
    axes[0].legend(fontsize=7)
    fig.suptitle("Privacy-utility curve: mean ± std over seeds", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_figure(fig, path)


def _palette(n: int) -> list:
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


# --- Which image to refine next (docs/method.md, same title) ----------------------------------

RANKING_FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2)
# Per run; the first four are the ones whose share needed is reported.
RANKING_COLUMNS = (
    "band_reliance",
    "s_global",
    "conflicting_auroc",
    "worst_group_auroc",
    "auroc",
    "dice",
    "s_global_benign",
    "s_global_malignant",
)
LOWER_IS_BETTER = ("band_reliance", "s_global", "s_global_benign", "s_global_malignant")


def refinement_order(
    base: RunConfig,
    seed_list: list[int],
    out: Path | str,
    fractions=RANKING_FRACTIONS,
    orders=("ranked", "random"),
    reference: float = 0.1,
) -> dict:
    """Refinement orders against the share of refined training images, per seed.

    One coarse model per seed serves every order and fraction; each (order, fraction) unlearns
    it with base.method at its defaults. An order is "random", "ranked" (the default ranking,
    as `run --refine-order ranked` picks) or "ranked/METHOD" (another ranking.METHODS score;
    "+alternate" after it interleaves the classes). Besides the test metrics of every run,
    `precision` records, for every ranking method, how many of its picks hold a planted
    spurious artefact in their band: read off the hidden annotation, for evaluation only.
    """
    out = Path(out)
    for order in orders:
        parse_order(order)  # a bad order fails before any training
    runs, precision, result = [], [], {}
    for seed in seed_list:
        config = replace(base, seed=seed, refined=None, refine_order=None)
        seed_runs, seed_precision = _orders_on_one_seed(config, orders, fractions)
        runs += seed_runs
        precision += seed_precision
        # Written after every seed: a stopped benchmark keeps what it measured.
        result = _write_ranking(out, base, seed_list, orders, fractions, reference, runs, precision)
    return result


def _orders_on_one_seed(config: RunConfig, orders, fractions) -> tuple[list[dict], list[dict]]:
    """Train the seed's coarse model, then unlearn it once per order and fraction, every model
    measured by the one evaluator on the seed's test split."""
    from .. import evaluation
    from ..unlearning import unlearning_job

    device = resolve_device(config.device)
    prepared = experiment.prepare_data(replace(config, refine_order="random"))
    train_set, coarse = prepared.train, prepared.coarse
    start = experiment.train_or_load(config, prepared, device)
    model = start.model

    def measure(m, seconds):
        return _ranking_row(evaluation.evaluate(m, prepared.evalset, seed=config.seed), seconds)

    head = {"seed": config.seed}
    runs = [
        {**head, "order": "coarse", "fraction": 0.0, "images": 0, **measure(model, start.seconds)}
    ]
    hidden = train_set.artefact_mask() & (coarse != 0) & (train_set.masks == 0)
    precision = _ranking_precision(model, train_set, coarse, hidden, fractions, config.seed)
    for order in orders:
        for fraction in fractions:
            setting = replace(config, fine_fraction=fraction)
            picks = _picks(order, train_set, setting, coarse, model)
            split = experiment.refinement_split(train_set, coarse, picks, config.annotator)
            operator = experiment.build_operator(config)
            clock = time.perf_counter()
            job = unlearning_job(
                operator, model, train_set.images, coarse, split, prepared.probe_set
            )
            outcome = drive(job, quiet=True)
            runs.append(
                {
                    **head,
                    "order": order,
                    "fraction": fraction,
                    "images": len(picks),
                    **measure(outcome.model, time.perf_counter() - clock),
                    "collapsed": float(outcome.collapsed),
                    "picks_with_artefact": float(hidden[picks].any(axis=(1, 2)).mean()),
                    "picks_malignant": float(train_set.labels[picks].mean()),
                    "refined_ids": [train_set.ids[i] for i in picks],
                }
            )
    return runs, precision


def parse_order(order: str) -> tuple[str, str | None, bool]:
    """(kind, ranking method or None, alternate) of an order name; ValueError if unknown."""
    from ..ranking import METHODS

    kind, _, how = order.partition("/")
    method = how.removesuffix("+alternate") or None
    if kind not in ("ranked", "random") or (how and (kind != "ranked" or method not in METHODS)):
        raise ValueError(
            f"order {order!r} is not one of random, ranked, ranked/METHOD[+alternate] with "
            f"METHOD from {', '.join(METHODS)}"
        )
    return kind, method, how.endswith("+alternate")


def _picks(order, train_set, config, coarse, model) -> np.ndarray:
    """The images `order` refines at config.fine_fraction."""
    from ..experiment import choose_refined
    from ..ranking import rank_images

    kind, method, alternate = parse_order(order)
    if method is None:
        return choose_refined(train_set, replace(config, refine_order=kind), coarse, model)
    count = max(1, round(config.fine_fraction * len(train_set)))
    ranked = rank_images(model, train_set.images, coarse, method=method, alternate=alternate)
    return ranked.top(count)


def _ranking_row(record: Evaluation, seconds: float) -> dict:
    band, s_global = record.band_reliance, record.s_global
    if s_global is None:
        raise ValueError("the ranking benchmark needs test images with masks and an S map")
    return {
        "band_reliance": band["value"] if band else float("nan"),
        "s_global": s_global["value"],
        "s_global_ci": [s_global["ci_low"], s_global["ci_high"]],
        "s_global_excess": s_global["excess"],
        "s_global_by_class": s_global["per_class"],
        "s_global_benign": s_global["per_class"][1],
        "s_global_malignant": s_global["per_class"][2],
        "conflicting_auroc": record.conflicting_auroc,
        "worst_group_auroc": record.worst_group_auroc,
        "auroc": record.auroc,
        "dice": record.dice,
        "counterfactual_drop": record.counterfactual_drop,
        "wall_s": seconds,
    }


def _ranking_precision(model, train_set, coarse, hidden, fractions, seed) -> list[dict]:
    """Per ranking method and fraction: the share of its picks with a planted artefact in
    the band, and the share of all such band pixels its picks cover (hidden annotation)."""
    from ..ranking import METHODS, rank_images

    has, total = hidden.any(axis=(1, 2)), hidden.sum()
    rows = [{"seed": seed, "method": "random (expected)", "seconds": 0.0}]
    for fraction in fractions:
        count = max(1, round(fraction * len(train_set)))
        rows[0][f"artefact@{fraction:g}"] = float(has.mean())
        rows[0][f"covered@{fraction:g}"] = count / len(train_set)
    for method in METHODS:
        for alternate in (False, True):
            clock = time.perf_counter()
            order = rank_images(model, train_set.images, coarse, method=method, alternate=alternate)
            row = {
                "seed": seed,
                "method": method + ("+alternate" if alternate else ""),
                "seconds": time.perf_counter() - clock,
            }
            for fraction in fractions:
                picks = order.top(max(1, round(fraction * len(train_set))))
                row[f"artefact@{fraction:g}"] = float(has[picks].mean())
                row[f"covered@{fraction:g}"] = float(hidden[picks].sum() / max(total, 1))
            rows.append(row)
    return rows


def _mean_ci(values) -> dict:
    """Mean and a 95% percentile bootstrap interval over the values (seeds)."""
    from scipy.stats import bootstrap

    values = np.asarray([v for v in values if np.isfinite(v)], float)
    if len(values) == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0}
    if len(values) < 2 or np.ptp(values) == 0:
        low = high = float(values.mean())
    else:
        ci = bootstrap(
            (values,), np.mean, method="percentile", n_resamples=2000, random_state=0
        ).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"mean": float(values.mean()), "low": low, "high": high, "n": len(values)}


def _reached(fractions, means, target, lower_better) -> dict:
    """The share of refined images at which a mean curve first reaches `target`, linearly
    interpolated between measured shares; 'at_most' when the first share already does, and
    'not_reached' when none does."""
    better = (lambda m: m <= target) if lower_better else (lambda m: m >= target)
    for j, (f, m) in enumerate(zip(fractions, means, strict=True)):
        if np.isfinite(m) and better(m):
            if j == 0:
                return {"fraction": f, "bound": "at_most"}
            f0, m0 = fractions[j - 1], means[j - 1]
            share = f0 + (target - m0) / (m - m0) * (f - f0) if m != m0 else f
            return {"fraction": float(share), "bound": "interpolated"}
    return {"fraction": fractions[-1], "bound": "not_reached"}


def _ranking_summary(runs, orders, fractions, reference) -> dict:
    cell = {}
    for order in orders:
        for f in fractions:
            rows = [r for r in runs if r["order"] == order and r["fraction"] == f]
            if rows:
                cell[(order, f)] = rows
    summary = {
        f"{order} {f:g}": {
            "order": order,
            "fraction": f,
            "images": rows[0]["images"],
            **{
                c: _mean_ci([r[c] for r in rows]) for c in (*RANKING_COLUMNS, "picks_with_artefact")
            },
        }
        for (order, f), rows in cell.items()
    }
    coarse = [r for r in runs if r["order"] == "coarse"]
    summary["coarse"] = {
        "order": "coarse",
        "fraction": 0.0,
        "images": 0,
        **{c: _mean_ci([r[c] for r in coarse]) for c in RANKING_COLUMNS},
    }
    paired, ratios = {}, {}
    for order in orders:
        for f in fractions if order != "random" else ():
            mine = {r["seed"]: r for r in cell.get((order, f), [])}
            theirs = {r["seed"]: r for r in cell.get(("random", f), [])}
            seeds = sorted(set(mine) & set(theirs))
            if seeds:
                paired[f"{order} - random {f:g}"] = {
                    c: _mean_ci([mine[s][c] - theirs[s][c] for s in seeds]) for c in RANKING_COLUMNS
                }
        if ("random", reference) not in cell:
            continue
        for c in RANKING_COLUMNS[:4]:
            target = summary[f"random {reference:g}"][c]["mean"]
            means = [
                summary.get(f"{order} {f:g}", {}).get(c, {}).get("mean", np.nan) for f in fractions
            ]
            got = _reached(list(fractions), means, target, c in LOWER_IS_BETTER)
            ratios[f"{order} {c}"] = {
                **got,
                "target": target,
                "ratio": got["fraction"] / reference,
            }
    return {"cells": summary, "paired": paired, "ratios": ratios}


def table_head(columns) -> list[str]:
    """The first two lines of a markdown table with these column names."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _write_summary(out: Path, result: dict, table: str) -> dict:
    """summary.json and summary.md of a benchmark in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", result, replace=True)
    write_text(out / "summary.md", table + "\n", replace=True)
    return result


def _write_ranking(out, base, seed_list, orders, fractions, reference, runs, precision) -> dict:
    result = {
        "seeds": seed_list,
        "orders": list(orders),
        "fractions": list(fractions),
        "reference": reference,
        "config": _plain_config(base),
        **_ranking_summary(runs, orders, fractions, reference),
        "precision": precision,
        "runs": runs,
    }
    ranking_plot(result, out / "ranking.png")
    return _write_summary(out, result, ranking_markdown(result))


def ranking_markdown(result: dict) -> str:
    """Tables of a refinement-order benchmark: metrics per order and share, paired
    differences against random order, the share each order needs, and ranking precision."""

    def fmt(stats, digits=3):
        if stats["n"] == 0:
            return "n/a"
        mean, low, high = (f"{stats[k]:.{digits}g}" for k in ("mean", "low", "high"))
        return f"{mean} [{low}, {high}]"

    cols = (
        "band_reliance",
        "s_global",
        "s_global_benign",
        "s_global_malignant",
        "conflicting_auroc",
        "worst_group_auroc",
        "dice",
    )
    head = [
        "order",
        "refined",
        "images",
        "band reliance",
        "S_global (nats/px)",
        "S_global benign",
        "S_global malignant",
        "conflicting AUROC",
        "worst-group AUROC",
        "Dice",
        "picks with artefact",
    ]
    lines = table_head(head)
    for cell in result["cells"].values():
        picks = fmt(cell["picks_with_artefact"], 2) if "picks_with_artefact" in cell else ""
        share = f"{cell['fraction']:.0%}" if cell["fraction"] else "none"
        lines.append(
            f"| {cell['order']} | {share} | {cell['images']} | "
            + " | ".join(fmt(cell[c]) for c in cols)
            + f" | {picks} |"
        )
    lines += ["", "Paired difference against random order (same seed, same coarse model):", ""]
    head = ["difference", *(c.replace("_", " ") for c in cols)]
    lines += table_head(head)
    for name, diff in result["paired"].items():
        lines.append(f"| {name} | " + " | ".join(fmt(diff[c]) for c in cols) + " |")
    reference = result["reference"]
    lines += [
        "",
        f"Share of refined images each order needs to reach random order's "
        f"{reference:.0%} mean (ratio = that share / {reference:.0%}):",
        "",
    ]
    lines += [
        f"| order and metric | random at {reference:.0%} | share needed | ratio |",
        "|---|---|---|---|",
    ]
    for name, r in result["ratios"].items():
        share = {"at_most": "<= ", "not_reached": "> ", "interpolated": ""}[r["bound"]]
        lines.append(
            f"| {name} | {r['target']:.3g} | {share}{r['fraction']:.1%} | {share}{r['ratio']:.2f} |"
        )
    fractions = result["fractions"]
    lines += [
        "",
        "Ranking precision on the training images (hidden annotation, evaluation "
        "only): share of the picks with a planted artefact in their band, mean over seeds; "
        f"last column: share of all such band pixels covered at {reference:.0%}.",
        "",
    ]
    head = ["method", *(f"{f:.0%}" for f in fractions), f"covered at {reference:.0%}", "seconds"]
    lines += table_head(head)
    methods = dict.fromkeys(r["method"] for r in result["precision"])
    for method in methods:
        rows = [r for r in result["precision"] if r["method"] == method]
        cells = [f"{np.mean([r[f'artefact@{f:g}'] for r in rows]):.2f}" for f in fractions]
        covered = np.mean([r[f"covered@{reference:g}"] for r in rows])
        seconds = np.mean([r["seconds"] for r in rows])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {covered:.2f} | {seconds:.1f} |")
    return "\n".join(lines)


def ranking_plot(result: dict, out: Path) -> Path:
    """Four panels against the share of refined images: mean over seeds and its interval."""
    from matplotlib.figure import Figure

    panels = (
        ("band_reliance", "band reliance (mean |score change|)"),
        ("s_global", "S_global (nats per pixel)"),
        ("conflicting_auroc", "AUROC, conflicting images"),
        ("worst_group_auroc", "worst-group AUROC"),
    )
    fig = Figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2).ravel()
    cells = result["cells"]
    for ax, (column, title) in zip(axes, panels, strict=True):
        for order in result["orders"]:
            rows = [c for c in cells.values() if c["order"] == order]
            x = [c["fraction"] for c in rows]
            mean = [c[column]["mean"] for c in rows]
            ax.plot(x, mean, marker="o", label=order)
            ax.fill_between(
                x, [c[column]["low"] for c in rows], [c[column]["high"] for c in rows], alpha=0.2
            )
        ax.axhline(
            cells["coarse"][column]["mean"], color="grey", ls="--", lw=1, label="coarse model"
        )
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xlim(min(result["fractions"]) / 1.3, max(result["fractions"]) * 1.3)
        ax.set_xticks(result["fractions"], [f"{f:.0%}" for f in result["fractions"]])
        ax.set_xlabel("refined training images")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"Refinement order, {len(result['seeds'])} seeds "
        "(mean and 95% bootstrap interval over seeds)",
        fontsize=11,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_figure(fig, out)


def time_to_removal(base: RunConfig, steps: int = 200, probe_every: int = 5) -> dict:
    """In one run: how long NegGrad-Seg takes to reach retraining's worst-group AUROC, and
    how long retraining takes.

    The data are prepared and the coarse model trained as `run` does; retrain-from-scratch
    on the corrected masks (refined where refined) is trained and timed, and its worst-group
    AUROC on the validation images (held out of training) is the target. NegGrad-Seg then
    unlearns from the coarse model for at most `steps` steps, the validation images measured
    every `probe_every` steps; the time to the target counts unlearning only (the measuring is
    subtracted) and the run stops there. The test split is read once, at the end: the
    worst-group AUROC of the coarse model, retraining and the stopped model.
    """
    from .. import evaluation, metrics
    from ..progress import Cancel
    from ..unlearning import NegGradSeg, unlearning_job

    device = resolve_device(base.device)
    prepared = experiment.prepare_data(base)
    coarse = experiment.train_or_load(base, prepared, device)
    val = prepared.val
    checked = None if val is None else (val.images, prepared.coarse_of(val, base))
    clock = time.perf_counter()
    retrain = experiment.train_model(
        prepared.train.images, prepared.split.targets, base, device, "corrected", checked
    )
    retrain_s = time.perf_counter() - clock
    if prepared.probe_set is None or prepared.probe_set.labels is None:
        raise ValueError("time to removal needs labelled validation images; use more images")

    def worst_group(model, evalset) -> float:
        probs = model.probabilities(evalset.images)
        return metrics.worst_group_auroc(
            metrics.auroc_by_group(probs, evalset.labels, evalset.groups)
        )

    target = worst_group(retrain, prepared.probe_set)
    cancel, probes, stopped = Cancel(), [], []  # (entered, seconds, worst-group AUROC)

    def probe(model) -> dict:
        entered = time.perf_counter()
        record = {"worst_group_auroc": worst_group(model, prepared.probe_set)}
        record |= evaluation.probe(model, prepared.probe_set)  # the collapse check's Dice
        probes.append((entered, time.perf_counter() - entered, record["worst_group_auroc"]))
        if len(probes) > 1 and record["worst_group_auroc"] >= target:
            stopped.append(model.copy())
            cancel.set()
        return record

    operator = NegGradSeg(steps=steps, probe_every=probe_every, seed=base.seed)
    data = (prepared.train.images, prepared.coarse, prepared.split)
    job = unlearning_job(operator, coarse.model, *data, probe, cancel)
    begin = time.perf_counter()
    drive(job, quiet=True)
    curve, measuring = [], 0.0
    for i, (entered, seconds, value) in enumerate(probes):
        step = min(i * probe_every, steps)
        curve.append({"step": step, "unlearning_s": entered - begin - measuring, "wga": value})
        measuring += seconds
    reached = next((row for row in curve[1:] if row["wga"] >= target), None)
    test = {
        "coarse": coarse.model,
        "retrain": retrain,
        **({"stopped": stopped[0]} if stopped else {}),
    }
    return {
        "test_worst_group_auroc": {k: worst_group(m, prepared.evalset) for k, m in test.items()},
        "target_worst_group_auroc": target,
        "coarse_worst_group_auroc": curve[0]["wga"],
        "retrain_s": retrain_s,
        "coarse_train_s": coarse.seconds,
        "reached": reached is not None,
        "steps_to_target": reached["step"] if reached else None,
        "unlearning_s_to_target": reached["unlearning_s"] if reached else None,
        "ratio_to_retrain": reached["unlearning_s"] / retrain_s if reached else None,
        "best_worst_group_auroc": max(row["wga"] for row in curve[1:]),
        "curve": curve,
        "device": str(device),
        "config": _plain_config(base),
        "max_steps": steps,
        "probe_every": probe_every,
    }


def s_global_times(n: int = 1000, size: int = 256, distinct: int = 50, seed: int = 0) -> dict:
    """Seconds of metrics.s_global and metrics.s_global_report (200 bootstrap draws, 100
    permutations) on n images of size x size, with S the planted artefacts (sparse) and with
    S the dilation band (dense, as for data without artefact masks).

    `distinct` synthetic images are generated and repeated up to n (the time depends on the
    sizes and on how many pixels S covers, not on the pictures); the probabilities are those
    of a model that calls the artefacts malignant with probability about 0.7, plus noise.
    """
    from .. import metrics
    from ..evaluation import EvalSet

    data = generate(n=min(distinct, n), size=size, seed=seed, test_fraction=0.0)
    evalset = EvalSet.from_lesion_set(data)
    labels, spurious, band = (
        np.resize(a, (n, *a.shape[1:])) for a in (data.masks, evalset.spurious, evalset.band)
    )
    rng = np.random.default_rng(seed)
    probs = 0.3 * rng.dirichlet(np.ones(3), size=labels.shape).astype(np.float32)
    called = np.where(spurious, 2, labels)[..., None]
    np.put_along_axis(probs, called, np.take_along_axis(probs, called, -1) + 0.7, axis=-1)
    probs = np.ascontiguousarray(probs.transpose(0, 3, 1, 2))
    result = {"images": n, "size": size, "distinct_images": min(distinct, n)}
    for name, s_map in (("artefacts", spurious), ("band", band)):
        start = time.perf_counter()
        value = metrics.s_global(probs, s_map, labels)
        point_s = time.perf_counter() - start
        start = time.perf_counter()
        report = metrics.s_global_report(probs, s_map, labels)
        result[name] = {
            "s_coverage": float(s_map.mean()),
            "s_global_s": point_s,
            "report_s": time.perf_counter() - start,
            "value": value,
            "null_mean": report["null_mean"],
        }
    return result
