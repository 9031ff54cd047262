"""`bench curve`: the privacy-utility curve of the certified operators, beside NegGrad-Seg and
the baselines."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import experiment
from ..experiment import RunConfig
from ..files import write_figure, write_json
from .seeds import seeds

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
