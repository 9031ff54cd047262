"""`bench ranking`: which image to refine next; refinement orders against the share of refined
training images."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import experiment
from ..evaluation import Evaluation
from ..experiment import RunConfig
from ..files import write_figure
from ..model import resolve_device
from ..progress import drive
from .tables import plain_config, table_head, write_summary

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


def _write_ranking(out, base, seed_list, orders, fractions, reference, runs, precision) -> dict:
    result = {
        "seeds": seed_list,
        "orders": list(orders),
        "fractions": list(fractions),
        "reference": reference,
        "config": plain_config(base),
        **_ranking_summary(runs, orders, fractions, reference),
        "precision": precision,
        "runs": runs,
    }
    ranking_plot(result, out / "ranking.png")
    return write_summary(out, result, ranking_markdown(result))


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
