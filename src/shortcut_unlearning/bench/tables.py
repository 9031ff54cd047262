"""What every bench over seeds reports: per column the mean over seeds with its interval, the
paired differences against the references, and the markdown tables and summary files."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..experiment import RunConfig
from ..files import write_json, write_text

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


def mean_std(values: list[dict]) -> dict:
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


def plain_config(config: RunConfig) -> dict:
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
            cells.append(interval_cell(stats[key], digits))
        cells.append(f"{stats['collapsed']['mean']:.0%}")
        lines.append("| " + " | ".join(cells) + " |")
    n = max(stats["worst_group_auroc"].get("n", 0) for stats in summary.values())
    lines.append(f"\nMean over {n} seeds [95% t interval of the mean].")
    for reference, rows in _by_reference(paired or {}).items():
        lines += ["", f"Paired by seed, minus {reference}:", ""]
        lines += table_head(["model", *PAIRED_KEYS])
        for name, diffs in rows.items():
            cells = [interval_cell(diffs[key], "+.3f") for key in PAIRED_KEYS]
            lines.append("| " + " | ".join([name, *cells]) + " |")
    return "\n".join(lines)


def interval_cell(stats: dict, digits: str) -> str:
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


def table_head(columns) -> list[str]:
    """The first two lines of a markdown table with these column names."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def write_summary(out: Path, result: dict, table: str) -> dict:
    """summary.json and summary.md of a benchmark in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "summary.json", result, replace=True)
    write_text(out / "summary.md", table + "\n", replace=True)
    return result
