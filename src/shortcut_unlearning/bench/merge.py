"""`bench merge`: one summary of `bench seeds` or `bench curve` runs made apart."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field, JsonValue, Strict

from ..schemas import Seed, Text, read_json, validate
from .curve import CURVE_KEYS, curve_plot
from .tables import COLUMNS, PAIRED_KEYS, markdown, mean_std, paired_differences, write_summary

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
    summary = {name: mean_std(rows) for name, rows in runs.items()}
    paired = paired_differences(runs)
    result = {"seeds": seed_list, "methods": first.methods, "config": first.config}
    result |= {"summary": summary, "paired": paired, "runs": runs}
    if first.epsilons is not None:
        result["epsilons"] = first.epsilons
    result["merged_from"] = [str(folder) for folder in folders]
    out = Path(out)
    write_summary(out, result, markdown(summary, paired))
    if "epsilons" in result:
        curve_plot(summary, result["epsilons"], out / "curve.png")
    return result
