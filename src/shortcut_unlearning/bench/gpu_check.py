"""`shortcut-unlearning bench gpu`: every CUDA path once, and the loops' speed in one run.

Runs on whatever device it is given: on a GPU machine through `benchmarks/gpu.sh`, on a CPU at
small sizes (a test does). Writes gpu_check.json and gpu_check.md into its output folder.

- bare: the anchor's loop stripped of ours (Adam steps on tensors already on the device, no
  data movement, validation or metrics), for the anchor model (smp's default U-Net,
  every layer trained) and for our default model (small decoder, decoder scope), each variant
  with cuDNN's autotuner off and on: what a loop can gain from bf16 and the cache on this card;
- speed: training (`training.train`) and unlearning (NegGrad-Seg through `Operator.run`) as
  users run them, from uint8 arrays in host memory (moving them to the device, the feature
  cache, validation or the probe included), each in three variants: plain fp32 (no autocast,
  NCHW memory, the encoder run at every step), bf16 autocast with channels-last, and
  decoder-only on cached encoder features; images per second, and the ratio to plain fp32
  measured in the same run (variants interleaved, each repeated);
- host waits (CUDA only): torch's sync debug mode counts the synchronising calls in the
  steps that neither validate nor probe;
- every operator of the registry, saliency by each method, the full evaluator (S_global
  report included) and the probe on the device model, with peak memory and what is still
  reserved after each run;
- the widget's job (`Workbench.execute`) in a worker thread while the main thread reads each
  event's loss as the widget does; with napari and a display, also the widget in a viewer.
"""

from __future__ import annotations

import os
import platform
import queue
import tempfile
import threading
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .. import evaluation, experiment, saliency
from ..experiment import RunConfig
from ..files import write_json, write_text
from ..model import Model, ModelConfig, resolve_device
from ..progress import drive
from ..retain import retain_set
from ..settings import OperatorSettings
from ..training import TrainConfig, train, validation_split
from ..unlearning import OPERATORS, NegGradSeg, make_operator, unlearning_job

VARIANTS = {  # name: (fast paths, cached encoder features)
    "plain fp32": (False, False),
    "bf16 + channels-last": (True, False),
    "cached decoder-only": (True, True),
}
BASELINE = "plain fp32"


@dataclass(frozen=True)
class CheckConfig:
    images: int = 512  # synthetic images generated; about 70 % train, the rest test
    size: int = 256
    batch_size: int = 32
    epochs: int = 3  # training epochs per timed run
    steps: int = 60  # unlearning steps per timed run
    repeats: int = 3
    encoder: str = "resnet18"
    device: str = "auto"
    seed: int = 0


def run_check(config: CheckConfig, out: Path | str) -> dict:
    """Run the check and write gpu_check.json and gpu_check.md into `out`."""
    device = resolve_device(config.device)
    clock = time.perf_counter()
    prepared = experiment.prepare_data(
        RunConfig(
            data="synthetic",
            synth_n=config.images,
            image_size=config.size,
            seed=config.seed,
            encoder=config.encoder,
            probe_images=min(32, config.images),
        )
    )
    report = {
        "environment": environment(device),
        "config": asdict(config),
        "data_s": time.perf_counter() - clock,
        "train_images": len(prepared.train),
        "refined_images": len(prepared.refined),
    }
    sections = {
        "bare": lambda: bare_steps(config, device, config.steps, max(2, config.steps // 4)),
        "speed": lambda: speed_table(config, device, prepared),
        "host_waits": lambda: host_waits(config, device, prepared, model),
        "operators": lambda: operator_runs(config, device, prepared, model),
        "saliency": lambda: saliency_runs(model, prepared),
        "evaluation": lambda: evaluation_run(model, prepared, config.seed),
        "widget": lambda: widget_job(config, device, prepared, model),
    }
    model, report["failed"] = None, []
    for name, section in sections.items():
        # A failing path is recorded and the rest still run; the files are rewritten after
        # every section, so a check stopped by a time limit leaves what it measured.
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # convergence, certificates: not the point
                report[name] = section()
        except Exception:
            report[name] = {"error": traceback.format_exc(limit=-3)}
            report["failed"].append(name)
        if name == "speed" and name not in report["failed"]:
            report["speed"], model = report["speed"]
        report["check_s"] = time.perf_counter() - clock
        write_report(report, out)
    return report


def write_report(report: dict, out: Path | str) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "gpu_check.json", report, replace=True, default=float)
    write_text(out / "gpu_check.md", markdown(report) + "\n", replace=True)


def environment(device: torch.device) -> dict:
    """The machine and software a check ran on."""
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
    }
    if device.type == "cuda":
        info |= {
            "gpu": torch.cuda.get_device_name(device),
            "gpu_memory_gib": torch.cuda.get_device_properties(device).total_memory / 2**30,
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_tf32": torch.backends.cudnn.allow_tf32,  # fp32 convolutions may use TF32
            "matmul_tf32": torch.backends.cuda.matmul.allow_tf32,
        }
    return info


def _finish(device: torch.device) -> float:
    """perf_counter once the device has done all queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


class _Clock:
    """Wall seconds of a block, the device's queued work included, and this process's CPU
    seconds (on a CPU shared with other jobs the two part ways)."""

    def __init__(self, device: torch.device):
        self.device, self.wall, self.cpu = device, 0.0, 0.0

    def __enter__(self):
        self.wall, self.cpu = _finish(self.device), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = _finish(self.device) - self.wall, time.process_time() - self.cpu


def _model(config: CheckConfig, device, fast: bool, base: ModelConfig | None = None) -> Model:
    base = base or ModelConfig()
    model = Model(
        replace(base, encoder=config.encoder, image_size=config.size, seed=config.seed), device
    )
    model.use_fast_paths(fast)
    return model


BARE_MODELS = {
    "anchor (smp default decoder, all layers trained)": ModelConfig(
        decoder_channels=(256, 128, 64, 32, 16), scope="all"
    ),
    "ours (small decoder, decoder scope)": ModelConfig(),
}


def bare_steps(config: CheckConfig, device, steps: int, warmup: int) -> list[dict]:
    """Images per second of bare Adam steps on random device tensors, per model, variant and
    cuDNN autotuner setting; the ratio is to the same model's plain fp32 without autotuning."""
    batch, size = config.batch_size, config.size
    generator = torch.Generator(device).manual_seed(config.seed)
    shape = (batch, size, size, 3)
    images = torch.randint(0, 256, shape, generator=generator, device=device, dtype=torch.uint8)
    targets = torch.randint(0, 3, (batch, size, size), generator=generator, device=device)
    rows = []
    for label, base in BARE_MODELS.items():
        plain = None
        for name, (fast, cache) in VARIANTS.items():
            if cache and base.scope == "all":
                continue  # nothing frozen to cache
            for autotune in (False, True):
                model = _model(config, device, fast, base)
                torch.backends.cudnn.benchmark = autotune
                seconds = _bare_seconds(model, images, targets, cache, steps, warmup)
                rate = steps * batch / seconds
                plain = plain or rate
                rows.append(
                    {
                        "model": label,
                        "variant": name,
                        "cudnn_autotune": autotune,
                        "images_per_s": rate,
                        "ratio_to_plain_fp32": rate / plain,
                    }
                )
    torch.backends.cudnn.benchmark = False
    return rows


def _bare_seconds(model: Model, images, targets, cache: bool, steps: int, warmup: int) -> float:
    optimiser = torch.optim.Adam(model.scoped_parameters(), lr=1e-3)
    x = model.to_input(images)
    with torch.no_grad(), model.autocast():
        cached = model.frozen_features(x) if cache else None

    def step():
        model.train_mode()
        with model.autocast():
            frozen = cached if cache else model.frozen_features(x)
            loss = torch.nn.functional.cross_entropy(model.scoped_forward(frozen).float(), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()

    for _ in range(warmup):
        step()
    with _Clock(model.device) as clock:
        for _ in range(steps):
            step()
    return clock.wall


def _train(config, device, prepared, fast, cache, images=None) -> tuple[Model, _Clock, int]:
    """One training run as users run it: (model, its clock, images trained on)."""
    images = len(prepared.train) if images is None else images
    model = _model(config, device, fast)
    settings = TrainConfig(
        epochs=config.epochs, batch_size=config.batch_size, cache_features=cache, seed=config.seed
    )
    job = train(model, prepared.train.images[:images], prepared.coarse[:images], settings)
    with _Clock(device) as clock:
        drive(job, quiet=True)
    fit, _ = validation_split(images, settings.val_fraction, settings.seed)
    return model, clock, len(fit) * model.config.provenance["training"]["epochs_run"]


def _job(operator, model: Model, prepared):
    """The unlearning job of `run` on the prepared data, with its probe."""
    data = (prepared.train.images, prepared.coarse, prepared.split, prepared.probe_set)
    return unlearning_job(operator, model, *data)


def _unlearn(config, device, prepared, start, fast, cache, steps=None) -> tuple[_Clock, int]:
    """One NegGrad-Seg run with its probe: (its clock, images through the scope)."""
    model = start.copy()
    model.use_fast_paths(fast)
    operator = NegGradSeg(
        steps=steps or config.steps,
        batch_size=config.batch_size,
        cache_features=cache,
        seed=config.seed,
    )
    with _Clock(device) as clock:
        drive(_job(operator, model, prepared), quiet=True)
    others = retain_set(prepared.split, prepared.coarse, operator.retain_images).others
    return clock, operator.steps * operator.batch_size * (2 if len(others) else 1)


def speed_table(config: CheckConfig, device, prepared) -> tuple[list[dict], Model]:
    """Images per second of each loop and variant, and the ratio to plain fp32 (the median
    over repeats of the ratio within a repeat); returns the rows and a model trained on the
    cached features, the start of the other checks."""
    small = min(len(prepared.train), 2 * config.batch_size)
    for fast, cache in VARIANTS.values():  # warm-up: kernels loaded and tuned, not timed
        model, _, _ = _train(replace(config, epochs=1), device, prepared, fast, cache, small)
        _unlearn(config, device, prepared, model, fast, cache, steps=2)
    runs: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (images/s, images/CPU s)
    trained = None
    for _ in range(config.repeats):  # interleaved, so drift hits every variant alike
        for name, (fast, cache) in VARIANTS.items():
            model, clock, images = _train(config, device, prepared, fast, cache)
            runs.setdefault(("training", name), []).append(
                (images / clock.wall, images / clock.cpu)
            )
            trained = trained or (model if cache else None)
        for name, (fast, cache) in VARIANTS.items():
            clock, images = _unlearn(config, device, prepared, trained, fast, cache)
            runs.setdefault(("unlearning", name), []).append(
                (images / clock.wall, images / clock.cpu)
            )
    rows = []
    for (loop, name), values in runs.items():
        rates, base = np.array(values), np.array(runs[loop, BASELINE])
        rows.append(
            {
                "loop": loop,
                "variant": name,
                "images_per_s": float(np.median(rates[:, 0])),
                "runs": rates[:, 0].tolist(),
                "ratio_to_plain_fp32": float(np.median(rates[:, 0] / base[:, 0])),
                "images_per_cpu_s": float(np.median(rates[:, 1])),
                "cpu_time_ratio_to_plain_fp32": float(np.median(rates[:, 1] / base[:, 1])),
                "fast_paths_apply": device.type == "cuda" or not VARIANTS[name][0],
            }
        )
    return rows, trained


def host_waits(config: CheckConfig, device, prepared, model: Model) -> dict | None:
    """Synchronising calls per step outside validation and probe steps (CUDA only), from
    torch's sync debug mode, for each loop with and without the feature cache."""
    if device.type != "cuda":
        return None
    jobs = {}
    for cache in (False, True):
        fresh = _model(config, device, True)
        settings = TrainConfig(
            epochs=1, batch_size=config.batch_size, cache_features=cache, val_fraction=0.15
        )
        jobs[f"training, cache {cache}"] = train(
            fresh, prepared.train.images, prepared.coarse, settings
        )
        operator = NegGradSeg(steps=12, batch_size=config.batch_size, cache_features=cache)
        jobs[f"unlearning, cache {cache}"] = _job(operator, model.copy(), prepared)
    return {name: _count_waits(job) for name, job in jobs.items()}


def _count_waits(job) -> dict:
    """Run a job under torch's sync debug mode; count the warnings each plain step raises."""
    per_step, messages = [], set()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            seen = 0
            for event in job:
                new = [str(w.message) for w in caught[seen:] if "synchroniz" in str(w.message)]
                seen = len(caught)
                # a plain step: not the first (it sets up), no validation or probe, not the last
                if 1 < event.step < event.total and event.metrics is None:
                    per_step.append(len(new))
                    messages.update(m.splitlines()[0][:160] for m in new)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {
        "plain_steps": len(per_step),
        "waits": int(sum(per_step)),
        "per_step": per_step[:20],
        "messages": sorted(messages)[:5],
    }


def _memory(device) -> dict:
    if device.type != "cuda":
        return {}
    return {
        "peak_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
        "reserved_after_gib": torch.cuda.memory_reserved(device) / 2**30,
    }


def operator_runs(config: CheckConfig, device, prepared, model: Model) -> list[dict]:
    """Every operator of the registry once from the trained model, with its probe."""
    rows = []
    for name in OPERATORS:
        operator = make_operator(
            name, steps=config.steps, batch_size=config.batch_size, seed=config.seed
        )
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with _Clock(device) as clock:
            result = drive(_job(operator, model, prepared), quiet=True)
        last = result.history[-1]
        rows.append(
            {
                "operator": name,
                "steps": result.steps,
                "seconds": clock.wall,
                "final_losses": dict(last.losses),
                "finite": bool(np.isfinite(list(last.losses.values())).all()),
                "probe_dice": (last.metrics or {}).get("dice"),
                "collapsed": result.collapsed,
                "model_device": str(result.model.device),
                **_memory(device),
            }
        )
    return rows


def saliency_runs(model: Model, prepared, images: int = 8) -> list[dict]:
    """Each saliency method on a few test images."""
    rows = []
    batch = prepared.evalset.images[:images]
    for method in saliency.METHODS:
        start = time.perf_counter()
        maps = saliency.saliency_maps(model, batch, method=method)
        rows.append(
            {
                "method": method,
                "seconds": time.perf_counter() - start,
                "shape": list(maps.shape),
                "finite": bool(np.isfinite(maps).all()),
                "nonzero": bool((maps > 0).any()),
            }
        )
    return rows


def evaluation_run(model: Model, prepared, seed: int, images: int = 64) -> dict:
    """The full evaluator on the first test images and the probe, on the device model:
    S_global runs on the host on the probabilities the model returns, so its time is part
    of these (the evaluator's inpainting too: about 0.2 s per 256 px image on a CPU core)."""
    evalset = prepared.evalset.select(np.arange(min(images, len(prepared.evalset))))
    start = time.perf_counter()
    record = evaluation.evaluate(model, evalset, seed)
    evaluated = time.perf_counter() - start
    start = time.perf_counter()
    probe = evaluation.probe(model, prepared.probe_set)
    return {
        "images": len(evalset),
        "evaluate_s": evaluated,
        "probe_s": time.perf_counter() - start,
        "probe_images": len(prepared.probe_set),
        "s_global": (record.s_global or {}).get("value"),
        "worst_group_auroc": record.worst_group_auroc,
        "dice": record.dice,
        "probe_dice": probe.get("dice"),
    }


def widget_job(config: CheckConfig, device, prepared, model: Model, images: int = 16) -> dict:
    """The widget's unlearning job on the device: in a viewer when napari and a display are
    there, else `Workbench.execute` in a worker thread read as the widget reads it."""
    if _has_viewer():
        return _widget_in_viewer(str(device), config.steps)
    from ..workbench import Workbench

    images = min(images, len(prepared.train))
    with tempfile.TemporaryDirectory() as folder:
        # the same method as in a viewer (_widget_in_viewer), its steps set exactly
        settings = OperatorSettings("neggrad-seg", steps=config.steps, device=str(device))
        bench = Workbench(model.save(Path(folder) / "start"), settings)
        data = prepared.train
        bench.open(data.images[:images], prepared.coarse[:images], {"labels": data.labels[:images]})
        for i in range(min(3, images)):
            bench.refinement.refined[i][data.masks[i] == 0] = 0
        bench.refinement.sync()
        plan = bench.plan()
        events: queue.Queue = queue.Queue()
        outcome: dict = {}

        def work():  # what napari's thread worker does with the job
            try:
                outcome["record"] = yield_into(bench.execute(plan), events)
            except Exception as error:  # reported, not raised: the check goes on
                outcome["error"] = repr(error)
            events.put(None)

        start = time.perf_counter()
        thread = threading.Thread(target=work, name="widget-worker")
        thread.start()
        curve = []
        while (event := events.get()) is not None:  # the UI thread's side
            curve.append(event.losses.get("total", np.nan))
        thread.join()
    record = outcome.get("record")
    return {
        "viewer": False,
        "why_no_viewer": "napari is not installed" if not _napari() else "no display",
        "seconds": time.perf_counter() - start,
        "events": len(curve),
        "losses_read": int(np.isfinite(curve).sum()),
        "error": outcome.get("error"),
        "model_device": str(record.model.device) if record else None,
        "usable": record.usable if record else None,
        "s_global_before_after": [
            record.before.metrics.s_global["value"],
            record.after.metrics.s_global["value"],
        ]
        if record and record.after
        else None,
    }


def yield_into(job, events: queue.Queue):
    """Put each event of a job into `events`; return its result."""
    while True:
        try:
            events.put(next(job))
        except StopIteration as done:
            return done.value


def _napari() -> bool:
    try:
        import napari  # noqa: F401
    except ImportError:
        return False
    return True


def _has_viewer() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and _napari()


def _widget_in_viewer(device: str, steps: int) -> dict:
    """The plugin's widget on the shipped sample, unlearning on `device` (needs a display)."""
    from ..napari._demo import erase_band, open_viewer
    from ..napari._driver import unlearn, wait_loaded

    viewer, widget = open_viewer(show=True)
    try:
        if not wait_loaded(widget, 300):
            return {"viewer": True, "error": "PyTorch and the model did not load"}
        widget.device.setCurrentText(device)
        widget.refine.click()
        erase_band(viewer, widget, range(3))
        widget.method.setCurrentIndex(widget.method.findData("neggrad-seg"))
        widget.steps.setValue(steps)
        start = time.perf_counter()
        outcome = unlearn(widget, 900)
        record = widget.bench.shown
        why = outcome.message if outcome else "the run did not finish"
        return {
            "viewer": True,
            "seconds": time.perf_counter() - start,
            "error": None if record is not None else why,
            "model_device": str(record.model.device) if record else None,
            "usable": record.usable if record else None,
            "curve_points": len(widget.tracker.curve.losses),
        }
    finally:
        viewer.close()


def markdown(report: dict) -> str:
    """The speed table, then one line per other path; a failed or missing section says so."""
    env, config = report["environment"], report["config"]
    where = env.get("gpu") or f"CPU ({env['cpu_cores']} cores, {env['torch_threads']} threads)"
    lines = [
        f"GPU check on {where}, torch {env['torch']}; {report['train_images']} training images "
        f"at {config['size']} px, batch {config['batch_size']}, {config['encoder']}; "
        f"{config['epochs']} epochs and {config['steps']} unlearning steps per run, median of "
        f"{config['repeats']} runs.",
        "",
    ]
    for name, lines_of in (
        ("bare", _bare_lines),
        ("speed", _speed_lines),
        ("host_waits", _waits_lines),
        ("operators", lambda rows: [_operator_line(row) for row in rows]),
        ("saliency", lambda rows: [_saliency_line(row) for row in rows]),
        ("evaluation", lambda ev: [_evaluation_line(ev)]),
        ("widget", lambda widget: [_widget_line(widget)]),
    ):
        if name not in report:
            lines.append(f"- {name}: not run")
        elif name in report["failed"]:
            lines.append(f"- {name}: FAILED\n\n```\n{report[name]['error']}```\n")
        else:
            lines += lines_of(report[name])
    failed = ", ".join(report["failed"]) or "none"
    total, data = report["check_s"], report["data_s"]
    lines.append(f"\nWhole check: {total:.0f} s (data {data:.0f} s); failed: {failed}.")
    return "\n".join(lines)


def _speed_lines(rows: list[dict]) -> list[str]:
    lines = [
        "| loop | variant | images/s | ratio to plain fp32 | ratio in process CPU time |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        note = "" if row["fast_paths_apply"] else " (no bf16 or channels-last on this device)"
        lines.append(
            f"| {row['loop']} | {row['variant']}{note} | {row['images_per_s']:.1f} | "
            f"{row['ratio_to_plain_fp32']:.2f} | {row['cpu_time_ratio_to_plain_fp32']:.2f} |"
        )
    return [*lines, ""]


def _bare_lines(rows: list[dict]) -> list[str]:
    lines = [
        "Bare steps on device tensors (no data movement, validation or metrics):",
        "",
        "| model | variant | cuDNN autotuner | images/s | ratio to plain fp32 |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['variant']} | {'on' if row['cudnn_autotune'] else 'off'} "
            f"| {row['images_per_s']:.1f} | {row['ratio_to_plain_fp32']:.2f} |"
        )
    return [*lines, ""]


def _waits_lines(waits: dict | None) -> list[str]:
    if waits is None:
        return ["- host waits per step: not counted (CUDA only)"]
    counted = ", ".join(f"{k}: {v['waits']} in {v['plain_steps']} steps" for k, v in waits.items())
    return [f"- host waits in plain steps (sync debug mode): {counted}"]


def _operator_line(row: dict) -> str:
    peak = f", peak {row['peak_allocated_gib']:.2f} GiB" if "peak_allocated_gib" in row else ""
    return (
        f"- operator {row['operator']}: {row['steps']} steps in {row['seconds']:.1f} s, "
        f"losses finite: {row['finite']}, collapsed: {row['collapsed']}{peak}"
    )


def _saliency_line(row: dict) -> str:
    return f"- saliency {row['method']}: {row['seconds']:.2f} s, finite: {row['finite']}"


def _evaluation_line(ev: dict) -> str:
    return (
        f"- evaluation of {ev['images']} test images: {ev['evaluate_s']:.1f} s "
        f"(S_global {ev['s_global']:.2e}); probe of {ev['probe_images']}: {ev['probe_s']:.2f} s"
    )


def _widget_line(widget: dict) -> str:
    how = (
        "in a napari viewer"
        if widget.get("viewer")
        else f"in a worker thread without a viewer ({widget.get('why_no_viewer')})"
    )
    return (
        f"- widget job {how}: {widget.get('seconds', float('nan')):.1f} s, model on "
        f"{widget.get('model_device')}, error: {widget.get('error')}"
    )
