"""`bench data`: `bench seeds` on data that do not flatter the method, one factor moved at a
time (docs/method.md, "Data that do not flatter the method")."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from .. import experiment
from .. import masks as masklib
from ..data.synthetic import PLACEMENTS
from ..experiment import RunConfig
from .seeds import seeds
from .tables import interval_cell, plain_config, table_head, write_summary

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
            "config": plain_config(base),
            "factors": {k: list(v) for k, v in DATA_FACTORS},
            "settings": rows,
        }
        write_summary(out, result, data_markdown(rows))
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
                cells.append(interval_cell(stats[key], ".2e" if key == "s_global" else ".3f"))
            cells.append(f"{row['artefacts_forgotten']:.0%}")
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
