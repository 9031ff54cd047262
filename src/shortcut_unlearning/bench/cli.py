"""`shortcut-unlearning bench BENCHMARK`: one subcommand per benchmark, each with its own flags.

cli.py adds these to its `bench` command when that command is parsed; each benchmark's module is
imported only when it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .. import flags
from ..flags import (
    UsageError,
    config_from,
    run_flags,
    seed_flag,
    training_flags,
)
from ..settings import use_scripted_home

OUT = Path("out/bench")


def add_commands(parser: argparse.ArgumentParser) -> None:
    """The benchmarks as subcommands of `parser`, the `bench` command's parser."""
    from .ranking import RANKING_FRACTIONS

    sub = parser.add_subparsers(dest="what", required=True, metavar="BENCHMARK")
    run, training = run_flags(), training_flags()
    run.set_defaults(data="synthetic")  # the benchmarks generate their data unless told
    seed, seeds, methods, out = seed_flag(), _seeds_flags(), _methods_flag(), _out_flag()

    def command(name: str, func, text: str, *parents) -> argparse.ArgumentParser:
        benchmark = sub.add_parser(
            name,
            parents=parents,
            help=text,
            description=text[0].upper() + text[1:] + ".",
            formatter_class=_WithDefaults,
        )
        benchmark.set_defaults(func=func)
        return benchmark

    def trains_as_run(name: str, func, text: str, *parents) -> argparse.ArgumentParser:
        """A benchmark that composes run's stages: run's data and model flags."""
        return command(name, func, text, run, *parents)

    trains_as_run(
        "seeds",
        _seeds,
        "every --methods on the same coarse model per seed, with both baselines; the mean "
        "over seeds with its interval (runs under torchrun)",
        seeds,
        methods,
        out,
    )
    trains_as_run(
        "data",
        _data,
        "bench seeds once per setting, moving one factor at a time away from the flags' "
        "setting (coarse mask kind, --synth-placement, refinement jitter and missed artefacts, "
        "refined share) into folders of their own, and one table",
        seeds,
        methods,
        out,
    )
    curve = trains_as_run(
        "curve",
        _curve,
        "the certified operators at each --epsilons beside NegGrad-Seg and the baselines "
        "(the privacy-utility curve)",
        seeds,
        out,
    )
    curve.add_argument(
        "--epsilons",
        type=_epsilon_list,
        default=[1.0, 3.0, 10.0, 30.0],
        help="the epsilons, e.g. 1,3,10,30 (delta 1e-5)",
    )
    ranking = trains_as_run(
        "ranking", _ranking, "refinement orders against the share of refined images", seeds, out
    )
    ranking.add_argument(
        "--fractions",
        type=_fraction_list,
        default=list(RANKING_FRACTIONS),
        help="shares of the training images to refine, e.g. 0.01,0.1",
    )
    ranking.add_argument(
        "--orders",
        type=_order_list,
        default=["ranked", "random"],
        help="random, ranked or ranked/METHOD[+alternate], comma-separated",
    )
    removal = trains_as_run(
        "removal",
        _removal,
        "times NegGrad-Seg to retraining's worst-group AUROC, and S_global on 256 px images",
        seed,
        out,
    )
    removal.add_argument(
        "--steps",
        dest="max_steps",
        metavar="STEPS",
        type=flags.whole(1),
        default=200,
        help="NegGrad-Seg's unlearning steps, at most",
    )
    removal.add_argument(
        "--s-global-images",
        type=flags.whole(1),
        metavar="N",
        default=1000,
        help="images on which S_global and its report are timed",
    )

    cache = command(
        "cache",
        _cache,
        "training with cached encoder features against the plain loop, on the same steps",
        training,
    )
    cache.add_argument("--n", type=flags.whole(1), default=64, help="synthetic images to train on")

    gpu = command(
        "gpu",
        _gpu,
        "every CUDA path once and the loops' speed ratios (benchmarks/gpu.sh)",
        training,
        seed,
        out,
    )
    gpu.add_argument("--n", type=flags.whole(1), default=512, help="synthetic images to train on")
    gpu.add_argument("--batch-size", type=flags.whole(1), default=32, help="training batch size")
    gpu.add_argument("--steps", type=flags.whole(1), default=60, help="unlearning steps per run")
    gpu.add_argument("--repeats", type=flags.whole(1), default=3, help="timed runs of each variant")

    opened = command(
        "open",
        _open,
        "opening --data DIR at --working-size, cold and cached, and the overlay per edit",
    )
    opened.add_argument(
        "--data",
        required=True,
        metavar="DIR",
        help="a dataset folder (benchmarks/make_isic_folder.py writes a full-size ISIC 2018 one)",
    )
    opened.add_argument(
        "--working-size",
        type=_working_size,
        default=1024,
        help="longer side in pixels above which images are shrunk, or 'original'",
    )
    opened.add_argument("--edits", type=flags.whole(1), default=20, help="edits to time")
    opened.add_argument(
        "--overlay-images",
        type=_whole_list,
        default=[32, 256],
        help="stack sizes (images) at which to time the overlay, e.g. 32,256",
    )

    merged = command("merge", _merge, "pool the seeds of seeds or curve runs made apart", out)
    merged.add_argument(
        "--runs",
        type=Path,
        action="append",
        default=[],
        metavar="DIR",
        help="the --out folder of a seeds or curve run; give it once per run",
    )

    for name, text in (
        ("stall", "the longest freeze of napari's event loop while the widget unlearns"),
        ("overlay", "the forget-set update per edit on an 8 x 1024 x 1024 stack in napari"),
        ("dock", "the time from the Plugins menu to the dock, and to the model loaded"),
    ):
        command(name, _widget, f"{text} (needs a display: run under xvfb-run)")


class _WithDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """Help that names each flag's default where it has one and its text does not: each
    benchmark has its own."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or "default" in action.help:
            return action.help
        return super()._get_help_string(action)


def _seeds_flags() -> argparse.ArgumentParser:
    group = argparse.ArgumentParser(add_help=False)
    group.add_argument("--seeds", type=_seed_list, default=[0, 1, 2], help="e.g. 0,1,2")
    group.add_argument(
        "--steps",
        type=flags.whole(1),
        help="unlearning steps (default: the operator's; for the certified operators, the "
        "fine-tuning steps after the noisy phase)",
    )
    return group


def _methods_flag() -> argparse.ArgumentParser:
    from ..experiment import RunConfig
    from ..unlearning import OPERATORS

    group = argparse.ArgumentParser(add_help=False)
    group.add_argument(
        "--methods",
        type=_method_list,
        default=[RunConfig.method],
        help=f"comma-separated, from {', '.join(sorted(OPERATORS))}; NAME/head unlearns in "
        "the head scope, NAME@3 at eps 3, NAME:start=kept sets an operator option",
    )
    return group


def _out_flag() -> argparse.ArgumentParser:
    group = argparse.ArgumentParser(add_help=False)
    group.add_argument("--out", type=Path, default=OUT, help="folder to write")
    return group


def _seeds(args) -> None:
    from .seeds import seeds
    from .tables import markdown

    result = seeds(config_from(args, quiet=True), args.seeds, args.methods, args.out)
    if not result:  # a rank other than 0 under torchrun: rank 0 reports
        return
    print(markdown(result["summary"], result.get("paired")))
    print(f"written: {args.out / 'summary.md'}")


def _data(args) -> None:
    from .data_matrix import data_markdown, data_matrix

    result = data_matrix(config_from(args, quiet=True), args.seeds, args.methods, args.out)
    print(data_markdown(result["settings"]))
    print(f"written: {args.out / 'summary.md'}")


def _curve(args) -> None:
    from .curve import privacy_utility
    from .tables import markdown

    result = privacy_utility(config_from(args, quiet=True), args.seeds, args.epsilons, args.out)
    if not result:  # a rank other than 0 under torchrun: rank 0 reports
        return
    print(markdown(result["summary"], result.get("paired")))
    print(f"written: {args.out / 'summary.md'}, {args.out / 'curve.png'}")


def _ranking(args) -> None:
    from .ranking import ranking_markdown, refinement_order

    config = config_from(args, quiet=True)
    result = refinement_order(config, args.seeds, args.out, args.fractions, args.orders)
    print(ranking_markdown(result))
    print(f"written: {args.out / 'summary.md'}, {args.out / 'ranking.png'}")


def _removal(args) -> None:
    from ..files import write_json
    from .removal import s_global_times, time_to_removal

    result = {
        "removal": time_to_removal(config_from(args, quiet=True), args.max_steps),
        "s_global": s_global_times(n=args.s_global_images),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "removal.json", result, replace=True)
    print(json.dumps(result, indent=2))


def _cache(args) -> None:
    from .timings import cache_speedup

    result = cache_speedup(
        n=args.n, size=args.image_size, epochs=args.epochs, encoder=args.encoder, device=args.device
    )
    print(json.dumps(result, indent=2))


def _gpu(args) -> None:
    from .gpu_check import CheckConfig, markdown, run_check

    config = CheckConfig(
        images=args.n,
        size=args.image_size,
        batch_size=args.batch_size,
        epochs=args.epochs,
        steps=args.steps,
        repeats=args.repeats,
        encoder=args.encoder,
        device=args.device,
        seed=args.seed,
    )
    report = run_check(config, args.out)
    print(markdown(report))
    print(f"written: {args.out / 'gpu_check.json'} and gpu_check.md")
    if report["failed"]:
        raise SystemExit(f"bench gpu: these paths failed: {', '.join(report['failed'])}")


def _open(args) -> None:
    from .timings import open_times

    if args.data in ("synthetic", "sample"):
        raise UsageError(
            "bench open needs --data DIR, a dataset folder (benchmarks/make_isic_folder.py "
            "writes a full-size ISIC 2018 one)"
        )
    result = open_times(args.data, args.working_size, args.edits, tuple(args.overlay_images))
    print(json.dumps(result, indent=2))


def _merge(args) -> None:
    from .merge import merge
    from .tables import markdown

    if len(args.runs) < 2:
        raise UsageError("bench merge needs two or more --runs DIR (the runs' --out folders)")
    result = merge(args.runs, args.out)
    print(markdown(result["summary"], result.get("paired")))
    print(f"written: {args.out / 'summary.json'}, {args.out / 'summary.md'}")


def _widget(args) -> None:
    from . import widget  # napari and Qt: only these three benchmarks need them

    use_scripted_home()
    measure = {
        "stall": widget.event_loop_stall,
        "overlay": widget.overlay_update,
        "dock": widget.dock_open,
    }[args.what]
    print(json.dumps(measure(), indent=2))


def _working_size(text: str) -> int | None:
    from ..data.working import parse_working_size

    try:
        return parse_working_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _seed_list(text: str) -> list[int]:
    return [flags.seed_number(part.strip()) for part in text.split(",")]


def _whole_list(text: str) -> list[int]:
    return [flags.whole(1)(part.strip()) for part in text.split(",")]


def _epsilon_list(text: str) -> list[float]:
    parse = flags.number(0, float("inf"), low_open=True, high_open=True)
    return [parse(part.strip()) for part in text.split(",")]


def _fraction_list(text: str) -> list[float]:
    parse = flags.number(0, 1, low_open=True)
    return sorted({parse(part.strip()) for part in text.split(",")})


def _order_list(text: str) -> list[str]:
    from .ranking import parse_order

    orders = [o.strip() for o in text.split(",")]
    for order in orders:
        try:
            parse_order(order)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    return orders


def _method_list(text: str) -> list[str]:
    """Comma-separated operator names, each optionally with /SCOPE, @EPSILON and
    :OPTION=VALUE settings (seeds.method_config)."""
    from ..experiment import RunConfig, build_operator
    from .seeds import method_config

    methods = [m.strip() for m in text.split(",")]
    for method in methods:
        try:
            build_operator(method_config(RunConfig(), method))
        except (ValueError, TypeError) as error:
            raise argparse.ArgumentTypeError(
                f"{method!r} is not a method setting: {error}"
            ) from None
    return methods
