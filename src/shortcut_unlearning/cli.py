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
    from .data.folders import read_folder
    from .figures import synthetic_grid
    from .resources import SAMPLE_SET, sample_data_dir

    # The pipeline and the napari plugin are not built yet: the demo shows the data and its
    # planted shortcut.
    folder = sample_data_dir() / SAMPLE_SET
    data = read_folder(folder)
    print(f"sample data: {folder} ({len(data)} images, {data.image_size[0]} px)")
    print(shortcut_summary(data))
    print(f"picture: {synthetic_grid(data, Path(args.out) / 'synthetic.png')}")


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
    synth.add_argument("--n", type=int, default=200, help="number of images")
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

    demo = sub.add_parser("demo", help="show the sample data and its planted shortcut")
    demo.add_argument("--out", type=Path, default=Path("out/demo"))
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
