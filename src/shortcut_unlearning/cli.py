"""The `shortcut-unlearning` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _synth(args) -> None:
    from .data.folders import write_project
    from .data.synthetic import SynthConfig, generate
    from .figures import synthetic_grid

    config = SynthConfig(
        n=args.n, size=args.size, seed=args.seed, p=args.p, spurious=tuple(args.spurious.split(","))
    )
    data = generate(config)
    write_project(
        data, args.out, metadata={"generator": _jsonable(config)}, overwrite=args.overwrite
    )
    print(f"wrote {len(data)} images to {args.out}")
    print(shortcut_summary(data))
    if args.preview:
        print(f"picture: {synthetic_grid(data, args.preview)}")


def _demo(args) -> None:
    import os

    from .napari import _demo

    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ValueError("no display: run the demo under Xvfb (`make demo` does) or on a desktop")
    if not args.headless:
        _demo.interactive()
        return
    done = _demo.scripted(Path(args.out), steps=args.steps)
    print(done["result"])
    print(f"screenshot: {done['screenshot']}\nexported run: {done['export']}")
    _headless_report(Path(args.out))


def _headless_report(out: Path) -> None:
    """The sample, its planted shortcut, and the pipeline's report on it."""
    from .data.folders import read_folder
    from .experiment import RunConfig, run, table
    from .figures import synthetic_grid
    from .resources import SAMPLE_MODEL, SAMPLE_SET, sample_data_dir

    data = read_folder(sample_data_dir() / SAMPLE_SET)
    print(f"sample data: {len(data)} images at {data.image_size[0]} px")
    print(shortcut_summary(data))
    print(f"picture: {synthetic_grid(data, out / 'synthetic.png')}")
    model = sample_data_dir() / SAMPLE_MODEL
    report = run(RunConfig(data="sample", model=str(model), out=str(out / "run"), quiet=True))
    print(f"the pipeline on the sample ({model.name}, NegGrad-Seg, 10 % refined masks):")
    print(table(report))
    print(f"report: {out / 'run'}")


def _config(args, **overrides):
    """A RunConfig from the parsed flags that share its field names."""
    from dataclasses import fields

    from .experiment import RunConfig

    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    return RunConfig(**{**given, "out": str(args.out), **overrides})


def _run(args) -> None:
    from .experiment import run, table

    refined = args.refined.split(",") if args.refined else None
    privacy = {"epsilon": args.epsilon, "delta": args.delta}  # make_operator checks them
    report = run(_config(args, refined=refined, operator_options=privacy))
    print(table(report))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")


def _train(args) -> None:
    from . import masks as masklib
    from .experiment import load_data, train_model

    config = _config(args)
    train_set = load_data(config).split("train")
    if args.masks == "coarse":
        targets = masklib.coarse_masks(train_set.masks, args.coarse, args.coarse_margin)
        kind = f"coarse ({args.coarse} {args.coarse_margin:g})"
    else:
        targets, kind = train_set.masks, "fine"
    model = train_model(train_set.images, targets, config, args.device, kind)
    print(f"model: {model.save(args.out)} (trained on {len(train_set)} images, {kind} masks)")


def _bench(args) -> None:
    import json

    from . import benchmarks

    if args.what in ("stall", "overlay"):  # need a display: run under xvfb-run
        from .napari import _bench

        measure = _bench.event_loop_stall if args.what == "stall" else _bench.overlay_update
        print(json.dumps(measure(), indent=2))
        return
    if args.what == "cache":
        result = benchmarks.cache_speedup(
            n=args.n,
            size=args.image_size,
            epochs=args.epochs,
            encoder=args.encoder,
            device=args.device,
        )
        print(json.dumps(result, indent=2))
        return
    seeds = [int(s) for s in args.seeds.split(",")]
    result = benchmarks.seeds(_config(args, quiet=True), seeds, args.methods.split(","), args.out)
    print(benchmarks.markdown(result["summary"]))
    print(f"written: {Path(args.out) / 'summary.md'}")


def shortcut_summary(data) -> str:
    """Per split, how often each spurious artefact appears with each label."""
    lines = ["artefact     split  P(artefact|malignant)  P(artefact|benign)"]
    for name in data.spurious:
        for split in ("train", "test"):
            pick = data.splits == split
            mal, ben = pick & (data.labels == 1), pick & (data.labels == 0)
            p_mal = data.flags[name][mal].mean() if mal.any() else float("nan")
            p_ben = data.flags[name][ben].mean() if ben.any() else float("nan")
            lines.append(f"{name:<12} {split:<6} {p_mal:>21.2f}  {p_ben:>18.2f}")
    return "\n".join(lines)


def _jsonable(config) -> dict:
    from dataclasses import asdict

    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shortcut-unlearning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write synthetic dermoscopy with planted shortcuts")
    synth.add_argument("--out", required=True, type=Path, help="folder to write")
    synth.add_argument("--n", type=int, default=600, help="number of images")
    synth.add_argument("--size", type=int, default=128, help="image side in pixels")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--p",
        type=float,
        default=0.9,
        help="P(spurious artefact | malignant) in train; reversed in test",
    )
    synth.add_argument(
        "--spurious", default="ink,patches", help="comma-separated artefacts planted as shortcuts"
    )
    synth.add_argument("--preview", type=Path, help="also write a PNG grid of examples")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing set")
    synth.set_defaults(func=_synth)

    from .experiment import RunConfig
    from .unlearning import OPERATORS

    defaults = RunConfig()
    # Flags that run, train and bench share: the data and the model to train.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--data",
        default=defaults.data,
        help="a dataset folder, 'sample' (shipped) or 'synthetic' (generated)",
    )
    common.add_argument(
        "--synth-n",
        type=int,
        default=defaults.synth_n,
        help="images to generate with --data synthetic",
    )
    common.add_argument(
        "--synth-balanced",
        type=int,
        default=defaults.synth_balanced,
        help="with --data synthetic: images in a test_balanced split (artefacts independent "
        "of the label)",
    )
    common.add_argument(
        "--test-split",
        default=defaults.test_split,
        help="split to evaluate on: test (falls back to val), test_balanced or val",
    )
    common.add_argument("--image-size", type=int, default=defaults.image_size)
    common.add_argument("--coarse", choices=("dilate", "bbox"), default=defaults.coarse)
    common.add_argument(
        "--coarse-margin",
        type=float,
        default=defaults.coarse_margin,
        help="dilation radius or box margin, as a fraction of the image size",
    )
    common.add_argument(
        "--fine-fraction",
        type=float,
        default=defaults.fine_fraction,
        help="share of training images that get refined masks",
    )
    common.add_argument("--epochs", type=int, default=defaults.epochs)
    common.add_argument("--encoder", default=defaults.encoder)
    common.add_argument("--seed", type=int, default=defaults.seed)
    common.add_argument("--device", default=defaults.device, help="auto, cuda, mps or cpu")

    run = sub.add_parser(
        "run", parents=[common], help="train on coarse masks, unlearn, evaluate, report"
    )
    run.add_argument("--refined", help="comma-separated ids to refine instead")
    run.add_argument("--method", choices=sorted(OPERATORS), default=defaults.method)
    run.add_argument(
        "--steps",
        type=int,
        help="unlearning steps (default: the operator's; for "
        "the certified operators, the fine-tuning steps after the noisy phase)",
    )
    run.add_argument("--epsilon", type=float, help="certified operators: epsilon (default 1)")
    run.add_argument("--delta", type=float, help="certified operators: delta (default 1e-5)")
    run.add_argument(
        "--scope",
        choices=("decoder", "head", "all"),
        help="parameters to unlearn in (default: the model's scope)",
    )
    run.add_argument(
        "--accept-collapse",
        action="store_true",
        help="keep the unlearned model even if it collapsed",
    )
    run.add_argument("--model", help="start from this checkpoint instead of training")
    run.add_argument(
        "--baselines",
        action="store_true",
        help="also train retrain-from-scratch and the fine-mask oracle",
    )
    run.add_argument("--out", type=Path, default=Path(defaults.out))
    run.set_defaults(func=_run)

    fit = sub.add_parser(
        "train", parents=[common], help="train a model on coarse or fine masks and save it"
    )
    fit.add_argument("--masks", choices=("coarse", "fine"), default="coarse")
    fit.add_argument("--out", type=Path, required=True, help="checkpoint path (.safetensors)")
    fit.set_defaults(func=_train)

    bench = sub.add_parser(
        "bench", parents=[common], help="benchmarks: cache speed-up, methods over seeds"
    )
    bench.add_argument(
        "what",
        choices=("cache", "seeds", "stall", "overlay"),
        help="stall and overlay measure the napari widget (need a display)",
    )
    bench.add_argument("--n", type=int, default=64, help="images for the cache benchmark")
    bench.add_argument("--seeds", default="0,1,2")
    bench.add_argument(
        "--methods",
        default=defaults.method,
        help=f"comma-separated, from {', '.join(sorted(OPERATORS))}; "
        "NAME/head unlearns in the head scope",
    )
    bench.add_argument("--out", type=Path, default=Path("out/bench"))
    bench.set_defaults(func=_bench, data="synthetic")

    demo = sub.add_parser(
        "demo",
        help="napari with the sample and the widget (headless: "
        "drives the workflow and saves a screenshot and the metrics)",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument(
        "--headless", action="store_true", help="drive the workflow and exit, even with a display"
    )
    demo.add_argument("--steps", type=int, default=40, help="unlearning steps of the demo run")
    demo.set_defaults(func=_demo)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
