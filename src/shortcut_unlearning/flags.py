"""The command line's flags and their argparse types, shared by the commands of cli.py and
the benchmarks' subcommands (bench/cli.py)."""

from __future__ import annotations

import argparse


class UsageError(ValueError):
    """A command line that cannot be parsed or holds a value outside its range."""


def whole(low: int, high: int | None = None, why: str = ""):
    """An argparse type: a whole number >= low (and <= high, for the reason `why`)."""
    span = f">= {low}" if high is None else f"from {low} to {high}{why}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, got {text!r:.40}")
        return value

    return parse


def seed_number(text: str) -> int:
    """An argparse type: a seed, a whole number that fits 32 bits (schemas.MAX_SEED)."""
    from .schemas import MAX_SEED

    return whole(0, MAX_SEED, " (seeds are 32-bit)")(text)


def side(low: int):
    """An argparse type: an image side in pixels, from `low` to model.MAX_IMAGE_SIZE."""
    from .model import MAX_IMAGE_SIZE

    return whole(low, MAX_IMAGE_SIZE, " (larger images do not fit in memory)")


def number(low: float, high: float, low_open: bool = False, high_open: bool = False):
    """An argparse type: a float in the interval between low and high."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):  # nan fails both
            raise argparse.ArgumentTypeError(f"must lie in {interval}, got {text!r}")
        return value

    return parse


def device(text: str) -> str:
    """auto, cpu, mps, cuda or cuda:N; whether it is present is checked before any work."""
    kind, _, index = text.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (
        index and not (kind == "cuda" and index.isdigit())
    ):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def encoder(text: str) -> str:
    from .model import check_encoder

    try:
        return check_encoder(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from err


def ids(text: str) -> list[str]:
    """A comma-separated list of image ids, none of them empty, none repeated."""
    ids = [i.strip() for i in text.split(",")]
    if not all(ids):
        raise argparse.ArgumentTypeError(
            f"needs comma-separated image ids, got {text!r}; leave --refined out to refine a "
            "random --fine-fraction of the training images"
        )
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(
            f"names {', '.join(map(repr, repeated))} more than once; name each image once"
        )
    return ids


class Noted(argparse.Action):
    """Stores the value and notes that the flag was given (in args.given), so a default can
    be told from the same value given on purpose."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        namespace.given = {*getattr(namespace, "given", ()), self.dest}


def config_from(args, **overrides):
    """A RunConfig from the parsed flags that share its field names."""
    from dataclasses import fields

    from .experiment import RunConfig

    given = {f.name: getattr(args, f.name) for f in fields(RunConfig) if hasattr(args, f.name)}
    return RunConfig(**{**given, "out": str(args.out), **overrides})


def training_flags() -> argparse.ArgumentParser:
    """The flags of the model a command trains: run, train and the benches that train."""
    from .experiment import RunConfig
    from .model import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE

    defaults = RunConfig()
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--image-size",
        type=side(MIN_IMAGE_SIZE),
        default=defaults.image_size,
        help=f"working size in pixels ({MIN_IMAGE_SIZE} to {MAX_IMAGE_SIZE}: the U-Net halves "
        "it five times)",
    )
    flags.add_argument(
        "--epochs",
        type=whole(1),
        default=defaults.epochs,
        help="training epochs (>= 1; to start from a trained model use run --model)",
    )
    flags.add_argument(
        "--encoder",
        type=encoder,
        action=Noted,
        default=defaults.encoder,
        help="the U-Net's encoder (with run --model: the checkpoint's, which it must match)",
    )
    flags.add_argument(
        "--device", type=device, default=defaults.device, help="auto, cuda, cuda:N, mps or cpu"
    )
    return flags


def seed_flag() -> argparse.ArgumentParser:
    """--seed, for the commands that run with one seed."""
    flags = argparse.ArgumentParser(add_help=False)
    flags.add_argument(
        "--seed",
        type=seed_number,
        default=0,
        help="seed of the data, the models and the unlearning: the same seed on the same "
        "number of threads gives the same run, but for the certified operators, whose noise "
        "is drawn from fresh OS entropy",
    )
    return flags


def run_flags() -> argparse.ArgumentParser:
    """The flags of `run`'s data and model, shared by run, train and the benches that compose
    run's stages."""
    from .data.synthetic import PLACEMENTS
    from .experiment import RunConfig
    from .masks import COARSE_METHODS

    defaults = RunConfig()
    flags = argparse.ArgumentParser(add_help=False, parents=[training_flags()])
    flags.add_argument(
        "--data",
        default=defaults.data,
        help="a dataset folder, 'sample' (shipped) or 'synthetic' (generated)",
    )
    flags.add_argument(
        "--labels",
        action="append",
        metavar="CSV",
        help="a labels CSV of an ISIC 2018 folder; repeat the flag for several files. A file "
        "name holding train, val or test assigns that split, as in Bissoto's "
        "isic_annotated_train1.csv (default: every *.csv in the folder)",
    )
    flags.add_argument(
        "--synth-n",
        type=whole(8),
        default=defaults.synth_n,
        help="images to generate with --data synthetic",
    )
    flags.add_argument(
        "--synth-balanced",
        type=whole(0),
        default=defaults.synth_balanced,
        help="with --data synthetic: images in a test_balanced split (artefacts independent "
        "of the label)",
    )
    flags.add_argument(
        "--test-split",
        default=defaults.test_split,
        help="split to evaluate on: test (falls back to val), test_balanced or val",
    )
    flags.add_argument(
        "--coarse",
        choices=COARSE_METHODS,
        default=defaults.coarse,
        help="coarse masks: the fine mask dilated, its bounding box, or a loose hand-drawn-like "
        "outline (a smooth random polygon around the lesion); each grown by --coarse-margin",
    )
    flags.add_argument(
        "--coarse-margin",
        type=number(0, 1, high_open=True),
        default=defaults.coarse_margin,
        help="dilation radius or box margin, as a fraction of the image size",
    )
    flags.add_argument(
        "--fine-fraction",
        type=number(0, 1, low_open=True),
        default=defaults.fine_fraction,
        help="share of training images that get refined masks",
    )
    flags.add_argument(
        "--synth-placement",
        choices=PLACEMENTS,
        default=defaults.synth_placement,
        help=f"with --data synthetic: {PLACEMENT_HELP}",
    )
    flags.add_argument(
        "--refine-jitter",
        type=whole(0),
        default=defaults.refine_jitter,
        metavar="PX",
        help="refinements as a person draws them: the fine mask's border moved in or out by up "
        "to PX pixels, smoothly, kept inside the coarse mask (default 0: exact)",
    )
    flags.add_argument(
        "--refine-missed",
        type=number(0, 1),
        default=defaults.refine_missed,
        metavar="SHARE",
        help="refinements as a person draws them: this share of the artefact pixels in the "
        "forget set left as lesion, in patches (needs artefact maps: synthetic data)",
    )
    flags.add_argument(
        "--encoder-weights",
        metavar="NAME",
        default=defaults.encoder_weights,
        help="start the frozen encoder from segmentation_models_pytorch's weights of this name, "
        "e.g. imagenet (downloaded once; needs the network)",
    )
    flags.add_argument(
        "--encoder-checkpoint",
        metavar="PATH",
        default=defaults.encoder_checkpoint,
        help="start the frozen encoder from an encoder checkpoint written by pretrain-encoder "
        "(PATH.safetensors with PATH.json); --encoder must name its encoder",
    )
    flags.add_argument(
        "--overwrite", action="store_true", help="replace an earlier result at --out"
    )
    return flags


PLACEMENT_HELP = (
    "where the spurious artefacts go: band (the dilation band, the default), corner (in the "
    "lesion's box outside the dilation band), crossing (a strip across the lesion), outside "
    "(near the lesion, outside every coarse mask kind)"
)
