"""`bench removal`: how long NegGrad-Seg takes to reach retraining's worst-group AUROC, and how
long S_global and its report take."""

from __future__ import annotations

import time

import numpy as np

from .. import experiment
from ..data.synthetic import generate
from ..experiment import RunConfig
from ..model import resolve_device
from ..progress import drive
from .tables import plain_config


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
        "config": plain_config(base),
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
