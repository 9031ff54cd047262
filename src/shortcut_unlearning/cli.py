"""The `shortcut-unlearning` command line."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

from . import flags
from .flags import (
    PLACEMENT_HELP,
    UsageError,
    config_from,
    run_flags,
    seed_flag,
)

# Failures a user can act on: their message says what is wrong and what to do, so the command
# prints it on one line and exits 2 (so do a full or read-only disk and running out of memory).
# Any other exception is a bug: one line names it and the log file that holds its traceback,
# and the command exits 1 (main, _unexpected).
EXPECTED_ERRORS = (
    ValueError,  # FolderError, MaskError, OutputError, UsageError and every checked setting
    FloatingPointError,  # training or unlearning diverged
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors reach main() instead of exiting with the usage text.
    `build`, if given, adds its arguments when it first parses: `bench` takes its subcommands
    from the harness (shortcut_unlearning.bench), which no other command loads."""

    def __init__(self, *args, build=None, **kwargs):
        super().__init__(*args, **kwargs)
        self._build = build

    def parse_known_args(self, args=None, namespace=None):
        if self._build is not None:
            build, self._build = self._build, None
            build(self)
        return super().parse_known_args(args, namespace)

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def _bench_commands(parser: argparse.ArgumentParser) -> None:
    from .bench.cli import add_commands

    add_commands(parser)


def _synth(args) -> None:
    from .data.folders import write_project
    from .data.synthetic import SynthConfig, generate
    from .figures import synthetic_grid
    from .files import check_run_folder, check_targets

    # Both outputs are checked before any image is generated.
    check_run_folder(args.out, args.overwrite, kind="dataset")
    if args.preview:
        if args.preview.suffix.lower() != ".png":
            raise UsageError(f"--preview {args.preview} must name a .png file, e.g. grid.png")
        check_targets([args.preview], args.overwrite, "choose another --preview or --overwrite")
    config = SynthConfig(
        n=args.n,
        size=args.size,
        seed=args.seed,
        p=args.p,
        spurious=tuple(args.spurious.split(",")),
        placement=args.placement,
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
    from importlib import import_module

    for package in ("qtpy", "napari"):
        try:
            import_module(package)
        except ImportError as error:
            raise ValueError(
                f"the demo needs napari and Qt ({package} cannot be imported: {error}); install "
                "the plugin's extra: pip install 'shortcut-unlearning[gui]' (`make demo` does)"
            ) from error
    from .napari import _demo

    if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        raise ValueError("no display: run the demo under Xvfb (`make demo` does) or on a desktop")
    if args.screenshots or args.headless:
        from .settings import use_scripted_home

        use_scripted_home()
    if args.screenshots:
        for shot in _demo.screenshots(Path(args.screenshots), steps=args.steps or 40):
            print(f"screenshot: {shot}")
        return
    if not args.headless:
        _demo.interactive()
        return
    done = _demo.scripted(Path(args.out), steps=args.steps)
    print(done["result"])
    shots = ", ".join(str(p) for p in done["screenshots"].values())
    print(f"screenshots: {shots}\nexported run: {done['export']}")
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
    # The demo's own run folder: a second demo replaces it.
    config = RunConfig(
        data="sample", model=str(model), out=str(out / "run"), quiet=True, overwrite=True
    )
    report = run(config)
    print(f"the pipeline on the sample ({model.name}, {config.method}, 10 % refined masks):")
    print(table(report))
    print(f"report: {out / 'run'}")


def _run_config(args):
    """The RunConfig of `run`: the flags, epsilon and delta among the operator's options.
    With --model the checkpoint's encoder is the run's; another --encoder is refused."""
    privacy = {"epsilon": args.epsilon, "delta": args.delta}  # make_operator checks them
    if args.model and "encoder" in getattr(args, "given", ()):
        from .model import read_config

        held = read_config(args.model).encoder
        if args.encoder != held:
            raise UsageError(
                f"--model {args.model} holds a {held} model but --encoder says {args.encoder}; "
                f"drop --encoder (the checkpoint's encoder is used) or pass --encoder {held}"
            )
    return config_from(args, operator_options={**privacy, "context": args.context})


def _expectation(config) -> str | None:
    """What a certified run should expect (the read-out signal-to-noise bound and the eps that
    would keep a chosen ratio), before any training; None for the other operators."""
    from .experiment import build_operator
    from .unlearning import CertifiedOperator

    operator = build_operator(config)
    return operator.expectation() if isinstance(operator, CertifiedOperator) else None


def _run(args) -> None:
    from .experiment import run, table

    config = _run_config(args)
    expectation = _expectation(config)
    if expectation:  # other ranks under torchrun print nothing (_join_processes)
        print(f"expect: {expectation}")
    report = run(config)
    if not report:  # a rank other than 0 under torchrun: rank 0 reports
        return
    print(table(report))
    print(f"metrics: {Path(args.out) / 'metrics.json'}")


def _train(args) -> None:
    from . import masks as masklib
    from . import outputs
    from .distributed import is_main
    from .experiment import check_encoder_settings, load_data, train_model, training_split
    from .model import ModelConfig, resolve_device

    config = config_from(args)
    # Everything that can fail without training fails first: the device, then the output.
    resolve_device(config.device)
    check_encoder_settings(config)
    size = outputs.checkpoint_bytes(ModelConfig(encoder=config.encoder))
    outputs.check_checkpoint_target(args.out, args.overwrite, 2 * size)  # old and new, briefly
    train_set = training_split(load_data(config))
    if args.masks == "coarse":
        targets = masklib.coarse_masks(train_set.masks, args.coarse, args.coarse_margin)
        kind = f"coarse ({args.coarse} {args.coarse_margin:g})"
    else:
        targets, kind = train_set.masks, "fine"
    model = train_model(train_set.images, targets, config, args.device, kind)
    if not is_main():  # under torchrun rank 0 alone writes the checkpoint
        return
    weights = outputs.save_checkpoint(model, args.out)
    print(f"model: {weights} (trained on {len(train_set)} images, {kind} masks)")


def _pretrain(args) -> None:
    from . import outputs
    from .model import ModelConfig, resolve_device
    from .pretrain import PretrainConfig, pretrain_encoder, save

    config = PretrainConfig(
        encoder=args.encoder,
        n=args.n,
        image_size=args.image_size,
        epochs=args.epochs,
        seed=args.seed,
        p=args.p,
        half=not args.float32,
    )
    device = resolve_device(args.device)
    outputs.check_checkpoint_target(
        args.out, args.overwrite, outputs.checkpoint_bytes(ModelConfig(encoder=args.encoder))
    )
    model = pretrain_encoder(config, device)
    weights = save(model, args.out, half=config.half)
    record = model.config.provenance["training"]
    print(
        f"encoder: {weights} ({config.encoder}, trained whole on the fine masks of {config.n} "
        f"synthetic images with p = {config.p:g}; no coarse labels; best validation Dice "
        f"{record['val_dice']:.3f} at epoch {record['best_epoch']})"
    )


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
    from .data.folders import MIN_SIDE
    from .data.synthetic import PLACEMENTS
    from .experiment import REFINE_ORDERS, RunConfig
    from .model import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, SCOPES
    from .unlearning import OPERATORS
    from .unlearning.context import CONTEXT_TERMS

    parser = _Parser(prog="shortcut-unlearning", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    synth = sub.add_parser("synth", help="write synthetic dermoscopy with planted shortcuts")
    synth.add_argument("--out", required=True, type=Path, help="folder to write")
    synth.add_argument("--n", type=flags.whole(1), default=600, help="number of images")
    synth.add_argument(
        "--size",
        type=flags.side(MIN_SIDE),
        default=128,
        help=f"image side in pixels ({MIN_SIDE} to {MAX_IMAGE_SIZE})",
    )
    synth.add_argument("--seed", type=flags.seed_number, default=0)
    synth.add_argument(
        "--p",
        type=flags.number(0, 1),
        default=0.9,
        help="P(spurious artefact | malignant) in train; reversed in test",
    )
    synth.add_argument(
        "--spurious", default="ink,patches", help="comma-separated artefacts planted as shortcuts"
    )
    synth.add_argument("--placement", choices=PLACEMENTS, default="band", help=PLACEMENT_HELP)
    synth.add_argument(
        "--preview", type=Path, help="also write a grid of examples to this .png file"
    )
    synth.add_argument(
        "--overwrite", action="store_true", help="replace a set this tool wrote, as a whole"
    )
    synth.set_defaults(func=_synth)

    defaults = RunConfig()
    common = run_flags()
    seed = seed_flag()

    run = sub.add_parser(
        "run", parents=[common, seed], help="train on coarse masks, unlearn, evaluate, report"
    )
    run.add_argument("--refined", type=flags.ids, help="comma-separated ids to refine instead")
    run.add_argument(
        "--refine-order",
        choices=REFINE_ORDERS,
        help="which images get refined: ranked (by the coarse model's ranking, see "
        "docs/method.md), random (seeded), given (the --refined ids); default: given with "
        "--refined, else random",
    )
    run.add_argument("--method", choices=sorted(OPERATORS), default=defaults.method)
    run.add_argument(
        "--steps",
        type=flags.whole(1),
        help="unlearning steps (default: the operator's; for "
        "the certified operators, the fine-tuning steps after the noisy phase)",
    )
    run.add_argument(
        "--epsilon",
        type=flags.number(0, float("inf"), low_open=True, high_open=True),
        help="certified operators: epsilon (default 1)",
    )
    run.add_argument(
        "--delta",
        type=flags.number(0, 1, low_open=True, high_open=True),
        help="certified operators: delta (default 1e-5)",
    )
    run.add_argument(
        "--scope",
        choices=SCOPES,
        help="parameters to unlearn in (default: the model's scope)",
    )
    run.add_argument(
        "--context",
        choices=CONTEXT_TERMS,
        default="off",
        help="the project's context term (docs/method.md, 'The context term'): the refined "
        "images' retain loss also on copies with their forget pixels inpainted (blind), "
        "predictions kept equal on both (consistent); off, the default, is the paper's method",
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
        help="also train retrain-from-scratch (corrected masks; coarse masks with the band "
        "ignored) and the fine-mask oracle",
    )
    run.add_argument(
        "--out",
        type=Path,
        default=Path(defaults.out),
        help="folder for the run (must be empty, or pass --overwrite)",
    )
    run.set_defaults(func=_run)

    fit = sub.add_parser(
        "train", parents=[common, seed], help="train a model on coarse or fine masks and save it"
    )
    fit.add_argument("--masks", choices=("coarse", "fine"), default="coarse")
    fit.add_argument(
        "--out",
        type=Path,
        required=True,
        help="checkpoint path: writes OUT.safetensors and OUT.json",
    )
    fit.set_defaults(func=_train)

    pre = sub.add_parser(
        "pretrain-encoder",
        help="train an encoder that never sees coarse labels (the fine masks of a synthetic "
        "set without a shortcut) and save it for --encoder-checkpoint",
    )
    pre.add_argument("--out", type=Path, required=True, help="writes OUT.safetensors and OUT.json")
    pre.add_argument("--encoder", type=flags.encoder, default="mobilenet_v2")
    pre.add_argument("--n", type=flags.whole(8), default=600, help="synthetic training images")
    pre.add_argument("--image-size", type=flags.side(MIN_IMAGE_SIZE), default=96)
    pre.add_argument("--epochs", type=flags.whole(1), default=30, help="at most (early stopping)")
    pre.add_argument("--seed", type=flags.seed_number, default=0)
    pre.add_argument(
        "--p",
        type=flags.number(0, 1),
        default=0.5,
        help="P(spurious artefact | malignant) of the pretraining set; 0.5: no shortcut",
    )
    pre.add_argument("--float32", action="store_true", help="store float32 (default float16)")
    pre.add_argument("--device", type=flags.device, default="auto")
    pre.add_argument("--overwrite", action="store_true", help="replace an existing checkpoint")
    pre.set_defaults(func=_pretrain)

    sub.add_parser(
        "bench",
        help="benchmarks and the GPU check (development tooling): bench BENCHMARK --help",
        description="Benchmarks and the GPU check; each BENCHMARK takes its own flags.",
        build=_bench_commands,
    )

    demo = sub.add_parser(
        "demo",
        help="napari with the sample and the widget (headless: "
        "drives the workflow and saves a screenshot and the metrics)",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
    demo.add_argument(
        "--headless", action="store_true", help="drive the workflow and exit, even with a display"
    )
    demo.add_argument(
        "--steps",
        type=flags.whole(1),
        help="unlearning steps of the demo run (default: the dock's, at most, for the method)",
    )
    demo.add_argument(
        "--screenshots",
        type=Path,
        help="write the README's pictures (1280 x 800 and 1600 x 1000) to this folder and exit",
    )
    demo.set_defaults(func=_demo)
    return parser


# What runs under torchrun with several processes (distributed.py); bench seeds composes the
# stages of run. The other benchmarks time one process, and the rest have nothing to share.
DISTRIBUTED = ("run", "train", "bench seeds")


def _join_processes(args) -> bool:
    """Under torchrun: join the process group (True when this call did); ranks other than 0
    print nothing and keep their warnings (the same as rank 0's) to themselves."""
    import os
    import warnings

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    command = " ".join([args.command, *([args.what] if args.command == "bench" else [])])
    if command not in DISTRIBUTED:
        raise UsageError(
            f"{command} runs in one process; under torchrun only {', '.join(DISTRIBUTED)} "
            "do (see docs/cluster.md, Many GPUs)"
        )
    from . import distributed

    joined = distributed.setup(args.device)
    if not distributed.is_main():
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (for the rest of the process)
        warnings.simplefilter("ignore")
    return joined


def main(argv=None) -> int:
    joined = False
    try:
        args = build_parser().parse_args(argv)
        joined = _join_processes(args)
        args.func(args)
    except EXPECTED_ERRORS as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        return 2
    except MemoryError:
        print(
            "error: out of memory; use a smaller --image-size or --size, or fewer images "
            "(--n, --synth-n), or a machine with more memory",
            file=sys.stderr,
        )
        return 2
    except Exception as err:
        from .files import disk_trouble

        if disk_trouble(err):  # a full or read-only disk outside the writers that say more
            print(f"error: {_one_line(err)}; free some space or write elsewhere", file=sys.stderr)
            return 2
        return _unexpected(err, sys.argv[1:] if argv is None else argv)
    finally:
        if joined:  # leave the process group this call joined
            from . import distributed

            distributed.teardown()
    return 0


def _unexpected(err: Exception, argv) -> int:
    """Say on one line that `err` is a bug and where its traceback is logged; exit code 1."""
    log = _crash_log(err, argv)
    where = f"its traceback is in {log}" if log else "its traceback follows"
    print(
        f"error: unexpected {type(err).__name__}: {_one_line(err)[:300]}; this is a bug in "
        f"shortcut-unlearning: {where} (please report it with that file)",
        file=sys.stderr,
    )
    if log is None:
        traceback.print_exception(err)
    return 1


def _crash_log(err: Exception, argv) -> Path | None:
    """A new log file holding the command line and the traceback of `err`, in the user log
    folder (settings.log_folder), else the temporary folder; None if neither takes it."""
    import os
    import tempfile
    import time

    from .files import OutputError, make_folder, write_text
    from .settings import log_folder

    text = f"shortcut-unlearning {' '.join(map(str, argv))}\n\n" + "".join(
        traceback.format_exception(err)
    )
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (log_folder(), Path(tempfile.gettempdir())):
        try:
            return write_text(make_folder(folder) / name, text)
        except (OSError, OutputError):
            continue
    return None


def _one_line(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror and err.filename:  # not "[Errno 13] ..."
        return f"{err.filename}: {err.strerror.lower()}"
    return " ".join(str(err).split())


if __name__ == "__main__":
    sys.exit(main())
