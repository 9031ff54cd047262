"""`bench seeds`: every method on the same coarse model per seed, with both baselines."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from .. import distributed, experiment, figures
from ..evaluation import Evaluation
from ..experiment import RunConfig
from ..model import resolve_device
from .tables import markdown, mean_std, paired_differences, plain_config, write_summary


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
        operators[method] = method_config(base, method)
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
            setting = configs[method]
            timings = {"data_s": prepared.seconds, "coarse_train_s": start.seconds}
            timings |= {f"{k}_train_s": v.seconds for k, v in baselines.items()}
            report, saved, picture = experiment.report_run(
                setting,
                experiment.build_operator(setting),
                prepared,
                states,
                done[method],
                evaluated,
                device,
                timings,
            )
            experiment.write_run(setting.out, report, saved, picture)
            outcome = done[method].outcome
            unlearned = Evaluation.from_json(report["unlearned"])
            row = _row(unlearned, timings["unlearn_s"], outcome.collapsed)
            rows.setdefault(method, []).append({**row, "steps": outcome.steps})
            if seed == seed_list[0]:
                trajectories[method] = experiment.trajectory(outcome)
    if not main:
        return {}
    summary = {name: mean_std(values) for name, values in rows.items()}
    figures.trajectory_plot(
        trajectories,
        out / "trajectory.png",
        f"Probe metrics over unlearning steps, seed {seed_list[0]} "
        "(shaded: noisy phase of the certified operators)",
    )
    result = {
        "seeds": seed_list,
        "methods": methods,
        "config": plain_config(base),
        "summary": summary,
        "paired": paired_differences(rows),
        "runs": rows,
    }
    return write_summary(out, result, markdown(summary, result["paired"]))


def _folder(method: str) -> str:
    for old, new in (("/", "-"), ("@", "-eps"), (":", "-"), ("=", "-"), ("+", "-")):
        method = method.replace(old, new)
    return method


def method_config(base: RunConfig, method: str) -> RunConfig:
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
    """An operator option's value from its text: true or false, a number where it reads as
    one, else the text."""
    if text in ("true", "false"):
        return text == "true"
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
