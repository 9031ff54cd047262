"""The powered benchmark (issue 9, item 6): five seeds, a reversed and a balanced test split,
bootstrap intervals, and the refined fraction from 1 to 50 %.

    nice python -m benchmarks.powered --out /tmp/powered --seeds 0,1,2,3,4
    python -m benchmarks.powered --out /tmp/powered --report-only      # tables and plot again

Per seed: the "dev" variant of benchmarks/make_dev_isic.py written with that seed (480
images: about 320 training, 160 in the reversed test split, plus 240 in a balanced test split
whose artefacts are independent of the label) and read at 64 px through the ISIC reader with
the trap-set CSVs. One coarse model, one fine-mask oracle and one retrain (on the 10 %
refinement) per seed, shared by every method and fraction. Refinements are nested (the 5 %
images are among the 10 %). At each refined fraction NegGrad-Seg (the paper's, context term
off), NegGrad-Seg with the context term (docs/method.md section 10) and fine-tune unlearn from
the same coarse model with their defaults. Every state is measured by evaluation.evaluate on
both test splits: AUROC with a bootstrap 95 % interval, AUROC by group with intervals,
worst-group and conflicting-group AUROC, class-aware Dice, band reliance with its interval,
S_global. Groups are those of the spurious artefacts (aligned / conflicting per artefact and
for any of them); the nuisance flags (hair, ruler, ...) are left out of them.

Files in OUT: seed<N>.json per finished seed (a rerun skips those), summary.json, summary.md
and fraction.png. Data folders go to OUT/data (outside the repository).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from shortcut_unlearning import evaluation, experiment
from shortcut_unlearning.bench.tables import table_head
from shortcut_unlearning.data.folders import read_folder
from shortcut_unlearning.experiment import RunConfig
from shortcut_unlearning.model import resolve_device
from shortcut_unlearning.unlearning import make_operator

from . import make_dev_isic

FRACTIONS = (0.01, 0.05, 0.10, 0.25, 0.50)
MAIN_FRACTION = 0.10
# name -> (operator, options): the paper's NegGrad-Seg, ours with the context term, fine-tune.
METHODS = {
    "neggrad-seg (paper)": ("neggrad-seg", {"context": "off"}),
    "neggrad-seg + context": ("neggrad-seg", {"context": "blind+consistent"}),
    "finetune": ("finetune", {"context": "off"}),
}
BASELINES = ("coarse", "fine_oracle", "retrain")
METHOD_COLOURS = dict(zip(METHODS, ("tab:blue", "tab:orange", "tab:brown"), strict=True))
SPLITS = ("balanced", "reversed")
# Per-image lists left out of the stored records (they are most of their size).
DROP = ("image_scores", "scores_inpainted")


def lean(record: dict) -> dict:
    """A JSON-ready record without the per-image lists."""
    out = {}
    for key, value in record.items():
        if key in DROP:
            continue
        out[key] = lean(value) if isinstance(value, dict) else value
    return out


def evalsets(folder: Path, size: int, spurious: tuple[str, ...], prepared):
    """The reversed and balanced test splits as EvalSets, grouped by the spurious artefacts."""
    traps = folder / "trap_sets"
    train = replace(prepared.train, spurious=spurious)
    reversed_ = replace(prepared.test, spurious=spurious)
    labels = [traps / "isic_annotated_train1.csv", traps / "isic_annotated_test_balanced1.csv"]
    balanced = read_folder(folder, image_size=size, labels=labels).split("test")
    balanced = replace(balanced, spurious=spurious)
    return {
        name: evaluation.EvalSet.from_lesion_set(
            data, groups=experiment.evaluation_groups(data, train)
        )
        for name, data in (("balanced", balanced), ("reversed", reversed_))
    }


def refinement(prepared, order: np.ndarray, fraction: float):
    """`prepared` with the first `fraction` of the seeded order of training images refined
    (exactly: their fine masks)."""
    count = max(1, round(fraction * len(order)))
    refined = np.sort(order[:count])
    split = experiment.refinement_split(prepared.train, prepared.coarse, refined)
    return replace(prepared, refined=refined, split=split)


def run_seed(
    seed: int,
    data_dir: Path,
    size: int,
    epochs: int,
    n: int = 480,
    balanced: int = 240,
    fractions: tuple[float, ...] = FRACTIONS,
    methods: tuple[str, ...] = tuple(METHODS),
    device: str = "cpu",
) -> dict:
    """Everything of one seed: data (`n` training and reversed-test images, `balanced`
    balanced-test images), the shared models, every method at every fraction."""
    clock = time.perf_counter()
    folder = data_dir / f"dev{seed}-n{n}-b{balanced}"
    if not (folder / "generator.json").is_file():
        make_dev_isic.write_folder(folder, "dev", n=n, balanced=balanced, seed=seed, overwrite=True)
    card = json.loads((folder / "generator.json").read_text())
    traps = folder / "trap_sets"
    config = RunConfig(
        data=str(folder),
        labels=[str(traps / "isic_annotated_train1.csv"), str(traps / "isic_annotated_test1.csv")],
        image_size=size,
        seed=seed,
        epochs=epochs,
        quiet=True,
        device=device,
    )
    device = resolve_device(device)
    prepared = experiment.prepare_data(config)
    sets = evalsets(folder, size, tuple(card["generator"]["spurious"]), prepared)
    order = np.random.default_rng(seed).permutation(len(prepared.train))
    main = refinement(prepared, order, MAIN_FRACTION)
    start = experiment.train_or_load(config, main, device)
    baselines = experiment.train_baselines(config, main, device)
    models = {"coarse": start.model, **{k: v.model for k, v in baselines.items()}}
    seconds = {"coarse": start.seconds, **{k: v.seconds for k, v in baselines.items()}}
    evaluated = {
        name: {split: evaluation.evaluate(model, sets[split], seed) for split in SPLITS}
        for name, model in models.items()
    }
    records = {
        name: {split: lean(asdict(evaluated[name][split])) for split in SPLITS}
        | {"train_s": seconds[name], "training": model.config.provenance.get("training")}
        for name, model in models.items()
    }
    runs = []
    for fraction in fractions:
        refined = refinement(prepared, order, fraction)
        for method in methods:
            name, options = METHODS[method]
            operator = make_operator(name, seed=seed, **options)
            outcome, unlearn_s = experiment.unlearn(
                replace(config, method=name), operator, start.model, refined
            )
            start_of = evaluated["coarse"]
            after = {
                s: evaluation.evaluate(outcome.model, sets[s], seed, start_of[s]) for s in SPLITS
            }
            runs.append(
                {
                    "method": method,
                    "fraction": fraction,
                    "refined_images": len(refined.refined),
                    "collapsed": outcome.collapsed,
                    "unlearn_s": unlearn_s,
                    **{split: lean(asdict(record)) for split, record in after.items()},
                }
            )
    groups = {
        split: {name: int(members.sum()) for name, members in sets[split].groups.items()}
        for split in SPLITS
    }
    return {
        "seed": seed,
        "settings": {
            "image_size": size,
            "epochs": epochs,
            "n": n,
            "balanced": balanced,
            "fractions": list(fractions),
            "methods": list(methods),
            "device": str(device),
        },
        "data": card,
        "n_train": len(prepared.train),
        "n_test": {split: len(sets[split]) for split in SPLITS},
        "group_sizes": groups,
        "baselines": records,
        "runs": runs,
        "seconds": time.perf_counter() - clock,
    }


# --- the report -------------------------------------------------------------------------------

COLUMNS = (
    ("worst_group_auroc", "worst-group AUROC"),
    ("conflicting_auroc", "conflicting AUROC"),
    ("auroc", "AUROC"),
    ("dice", "Dice"),
    ("dice_benign", "Dice benign"),
    ("dice_malignant", "Dice malignant"),
    ("band_reliance", "band reliance"),
    ("s_global", "S_global (nats/px)"),
)


# What the context term (item 4) must move: band reliance down, conflicting AUROC up, Dice kept.
CONTEXT_KEYS = ("band_reliance", "conflicting_auroc", "worst_group_auroc", "dice")


def numbers(record: dict) -> dict:
    """The summary's numbers of one evaluate() record, with the intervals where they exist."""
    by_group = record.get("auroc_by_group_ci") or {}
    worst = record.get("worst_group")
    conflicting = record.get("conflicting_group")
    band = record.get("band_reliance") or {}
    dice = record.get("dice_by_class") or {}
    ci = record.get("auroc_ci") or {}

    def interval(item):
        return [item.get("ci_low", np.nan), item.get("ci_high", np.nan)] if item else [np.nan] * 2

    return {
        "worst_group_auroc": record["worst_group_auroc"],
        "worst_group_auroc_ci": interval(by_group.get(worst)),
        "conflicting_auroc": record["conflicting_auroc"],
        "conflicting_auroc_ci": interval(by_group.get(conflicting)),
        "auroc": record["auroc"],
        "auroc_ci": interval(ci),
        "dice": record["dice"],
        "dice_benign": dice.get("benign", np.nan),
        "dice_malignant": dice.get("malignant", np.nan),
        "band_reliance": band.get("value", np.nan),
        "band_reliance_ci": interval(band),
        "s_global": (record.get("s_global") or {}).get("value", np.nan),
    }


def rows_of(results: list[dict], split: str, fraction: float = MAIN_FRACTION) -> dict:
    """Model state or method -> per-seed numbers on `split` (methods at `fraction`)."""
    rows: dict[str, list[dict]] = {}
    for result in results:
        for name in BASELINES:
            entry = numbers(result["baselines"][name][split]) | {"seed": result["seed"]}
            rows.setdefault(name, []).append(entry)
        for run in result["runs"]:
            if np.isclose(run["fraction"], fraction):
                entry = numbers(run[split]) | {
                    "collapsed": run["collapsed"],
                    "seed": result["seed"],
                }
                rows.setdefault(run["method"], []).append(entry)
    return rows


def _mean_sd(values) -> tuple[float, float]:
    values = np.asarray(values, float)
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else np.nan


def table(rows: dict) -> str:
    """Mean ± sd over seeds, with the mean of the per-seed 95 % bootstrap intervals."""
    head = ["model", *(title for _, title in COLUMNS), "collapsed"]
    lines = table_head(head)
    for name, per_seed in rows.items():
        cells = [name]
        for key, _ in COLUMNS:
            mean, sd = _mean_sd([r[key] for r in per_seed])
            if key == "s_global":
                cells.append(f"{mean:.2e} ± {sd:.1e}")
                continue
            text = f"{mean:.3f} ± {sd:.3f}"
            if f"{key}_ci" in per_seed[0]:
                low, high = np.nanmean([r[f"{key}_ci"] for r in per_seed], axis=0)
                text += f" [{low:.3f}, {high:.3f}]"
            cells.append(text)
        collapsed = [r.get("collapsed", False) for r in per_seed]
        cells.append(f"{sum(collapsed)}/{len(collapsed)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(rows: dict, a: str, b: str, key: str) -> dict:
    """b minus a per seed (the seeds both ran), its mean, sd and 95 % t-interval over seeds."""
    from scipy import stats

    first = {r["seed"]: r[key] for r in rows[a]}
    diff = np.array([r[key] - first[r["seed"]] for r in rows[b] if r["seed"] in first])
    mean, sd = _mean_sd(diff)
    half = stats.t.ppf(0.975, len(diff) - 1) * sd / np.sqrt(len(diff)) if len(diff) > 1 else np.nan
    return {"per_seed": diff.tolist(), "mean": mean, "sd": sd, "ci": [mean - half, mean + half]}


def gap_closed(rows: dict, method: str, key: str = "worst_group_auroc") -> dict:
    """Share of the coarse -> fine-oracle gap a method closes: ratio of the mean gains, and
    per seed (over the seeds the method ran)."""
    seeds = [r["seed"] for r in rows[method]]

    def values(name):
        by_seed = {r["seed"]: r[key] for r in rows[name]}
        return np.array([by_seed[seed] for seed in seeds])

    coarse, fine, mine = values("coarse"), values("fine_oracle"), values(method)
    return {
        "of_means": float((mine - coarse).mean() / (fine - coarse).mean()),
        "per_seed": ((mine - coarse) / (fine - coarse)).tolist(),
    }


def fractions_of(results: list[dict]) -> list[float]:
    """The refined fractions any seed ran (a smaller run may sweep them at fewer seeds)."""
    return sorted({run["fraction"] for result in results for run in result["runs"]})


def _cell(mean: float, sd: float) -> str:
    return f"{mean:.3f} ± {sd:.3f}" if np.isfinite(sd) else f"{mean:.3f}"


def fraction_table(results: list[dict], split: str) -> tuple[str, dict]:
    """Worst-group and conflicting AUROC and band reliance against the refined fraction."""
    curves = {}
    for method in METHODS:
        for fraction in fractions_of(results):
            matching = [
                run
                for result in results
                for run in result["runs"]
                if run["method"] == method and np.isclose(run["fraction"], fraction)
            ]
            if not matching:
                continue
            per_seed = [numbers(run[split]) for run in matching]
            curves.setdefault(method, {})[fraction] = {
                key: _mean_sd([r[key] for r in per_seed])
                for key in ("worst_group_auroc", "conflicting_auroc", "band_reliance", "dice")
            } | {
                "seeds": len(matching),
                "images": sorted({run["refined_images"] for run in matching}),
            }
    head = [
        "method",
        "refined",
        "images",
        "seeds",
        "worst-group AUROC",
        "conflicting AUROC",
        "band reliance",
        "Dice",
    ]
    lines = table_head(head)
    for method, by_fraction in curves.items():
        for fraction, stats in by_fraction.items():
            images = "/".join(map(str, stats["images"]))
            cells = [method, f"{fraction:.0%}", images, str(stats["seeds"])] + [
                _cell(*stats[k])
                for k in ("worst_group_auroc", "conflicting_auroc", "band_reliance", "dice")
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), curves


def fraction_plot(results: list[dict], curves: dict, split: str, path: Path) -> Path:
    """Two panels over the refined fraction: conflicting AUROC and band reliance, with the
    coarse model and the fine oracle as bands (mean ± sd) and retrain at 10 % as a point."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 3)
    chosen = fractions_of(results)
    fractions = np.array(chosen) * 100
    baseline = {
        name: {
            key: _mean_sd([numbers(r["baselines"][name][split])[key] for r in results])
            for key in ("worst_group_auroc", "conflicting_auroc", "band_reliance")
        }
        for name in BASELINES
    }
    colours = {"coarse": "tab:red", "fine_oracle": "tab:green", "retrain": "tab:purple"}
    keys = (
        ("worst_group_auroc", "worst-group AUROC"),
        ("conflicting_auroc", "conflicting-group AUROC"),
        ("band_reliance", "band reliance (mean |score change|)"),
    )
    for ax, (key, title) in zip(axes, keys, strict=True):
        for name in ("coarse", "fine_oracle"):
            mean, sd = baseline[name][key]
            ax.axhline(mean, color=colours[name], lw=1, label=name)
            ax.axhspan(mean - sd, mean + sd, color=colours[name], alpha=0.12)
        mean, sd = baseline["retrain"][key]
        ax.errorbar([10], [mean], [sd], fmt="s", color=colours["retrain"], label="retrain (10 %)")
        for method, by_fraction in curves.items():
            ran = [f for f in chosen if f in by_fraction]
            means = [by_fraction[f][key][0] for f in ran]
            sds = np.nan_to_num([by_fraction[f][key][1] for f in ran])
            ax.errorbar(
                np.array(ran) * 100,
                means,
                sds,
                marker="o",
                capsize=3,
                label=method,
                color=METHOD_COLOURS.get(method),
            )
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
        ax.set_xlabel("refined training images (%)")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle(
        f"{split} test split, {len(results)} seeds (mean ± sd over the seeds that ran each point)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def report(results: list[dict], out: Path) -> dict:
    """summary.md, summary.json and fraction.png from the finished seeds."""
    text, summary = [], {"seeds": [r["seed"] for r in results]}
    for split in SPLITS:
        rows = rows_of(results, split)
        fractions, curves = fraction_table(results, split)
        answer = paired(rows, "coarse", "fine_oracle", "worst_group_auroc")
        answer_conflicting = paired(rows, "coarse", "fine_oracle", "conflicting_auroc")
        closed = {m: gap_closed(rows, m) for m in METHODS if m in rows}
        paper, ours = "neggrad-seg (paper)", "neggrad-seg + context"
        context = (
            {key: paired(rows, paper, ours, key) for key in CONTEXT_KEYS}
            if paper in rows and ours in rows
            else {}
        )
        summary[split] = {
            "fine_minus_coarse_worst_group": answer,
            "fine_minus_coarse_conflicting": answer_conflicting,
            "gap_closed_worst_group": closed,
            "context_minus_paper": context,
            "fractions": {m: {str(f): v for f, v in c.items()} for m, c in curves.items()},
        }
        text += [
            f"## {split} test split ({MAIN_FRACTION:.0%} refined)",
            "",
            table(rows),
            "",
            f"Fine oracle minus coarse, worst-group AUROC: {answer['mean']:+.3f} "
            f"(95 % t-interval over seeds [{answer['ci'][0]:+.3f}, {answer['ci'][1]:+.3f}]; "
            f"per seed {', '.join(f'{d:+.3f}' for d in answer['per_seed'])}); conflicting "
            f"AUROC: {answer_conflicting['mean']:+.3f} [{answer_conflicting['ci'][0]:+.3f}, "
            f"{answer_conflicting['ci'][1]:+.3f}].",
            "",
            "Share of the worst-group gap closed (ratio of mean gains; per seed): "
            + "; ".join(
                f"{m} {c['of_means']:.0%} ({', '.join(f'{v:.0%}' for v in c['per_seed'])})"
                for m, c in closed.items()
            ),
            "",
            *(
                [
                    "NegGrad-Seg with the context term minus without, per seed (mean; 95 % "
                    "t-interval over seeds): "
                    + "; ".join(
                        f"{key} {d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] "
                        f"({', '.join(f'{v:+.4f}' for v in d['per_seed'])})"
                        for key, d in context.items()
                    ),
                    "",
                ]
                if context
                else []
            ),
            fractions,
            "",
        ]
        fraction_plot(results, curves, split, out / f"fraction_{split}.png")
    sizes = {
        split: {
            "min_group": min(min(r["group_sizes"][split].values()) for r in results),
            "n_test": [r["n_test"][split] for r in results],
        }
        for split in SPLITS
    }
    summary["group_sizes"] = sizes
    settings = [r.get("settings") for r in results]
    summary["settings"] = settings
    smallest = min(v["min_group"] for v in sizes.values())
    powered = smallest >= 100 and len(results) >= 5
    summary["powered"] = powered
    text = [
        *(f"Seed {r['seed']}: {r.get('settings')}." for r in results),
        "Smallest test group: "
        + ", ".join(f"{split} split {sizes[split]['min_group']}" for split in SPLITS)
        + " images; "
        + (
            "the power target (at least 100 images per group, 5 seeds) is met."
            if powered
            else "BELOW the power target (at least 100 images per group, 5 seeds)."
        ),
        "",
        *text,
    ]
    summary["seconds"] = [r["seconds"] for r in results]
    (out / "summary.md").write_text("\n".join(text) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--n", type=int, default=480, help="training + reversed-test images")
    parser.add_argument("--balanced", type=int, default=240, help="balanced-test images")
    parser.add_argument(
        "--fractions",
        default=",".join(f"{f:g}" for f in FRACTIONS),
        help=f"refined fractions; must include {MAIN_FRACTION:g} (the retrain baseline's)",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHODS),
        help="methods to run, comma-separated from the list in METHODS; 'none': baselines only",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="where the data folders go (OUT/data)"
    )
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda, auto ...: where models train and unlearn"
    )
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args(argv)
    fractions = tuple(float(f) for f in args.fractions.split(","))
    methods = () if args.methods == "none" else tuple(args.methods.split(","))
    if unknown := sorted(set(methods) - set(METHODS)):
        parser.error(f"--methods: unknown {unknown}; choose from {list(METHODS)}")
    if not any(np.isclose(f, MAIN_FRACTION) for f in fractions):
        parser.error(f"--fractions must include {MAIN_FRACTION:g}")
    warnings.simplefilter("ignore", UserWarning)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for seed in seeds:
        path = args.out / f"seed{seed}.json"
        if not path.is_file() and not args.report_only:
            result = run_seed(
                seed,
                args.data_dir or args.out / "data",
                args.image_size,
                args.epochs,
                args.n,
                args.balanced,
                fractions,
                methods,
                args.device,
            )
            path.write_text(json.dumps(result, indent=1, default=float) + "\n")
            print(f"seed {seed} done in {result['seconds']:.0f} s", flush=True)
        if path.is_file():
            results.append(json.loads(path.read_text()))
    if results:
        report(results, args.out)
        print((args.out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
