"""Development sets in the official ISIC 2018 Task 1 layout, rendered from the synthetic generator.

    python -m benchmarks.make_dev_isic --variant dev --out /tmp/isic-dev
    python -m benchmarks.make_dev_isic --variant check --out /tmp/isic-check   # evaluate only

Two variants, rendered differently on purpose: "dev" is the one to look at while developing,
"check" (another artefact mix, image sizes, colour rendering, JPEG quality and seed) is only
evaluated on at the end, to see that nothing was tuned to "dev". They were made to resemble
the maintainers' set kept aside, where the fine-mask oracle is more robust than the coarse
model. On "dev" at 64 px and 322 training images it is (benchmarks/BENCHMARKS.md, "The
fine-mask oracle against the coarse model, five seeds": fine oracle minus coarse, worst-group
AUROC +0.066, 95 % interval over 5 seeds [+0.005, +0.126]); at 32 px and about 100 training
images it was not (benchmarks/HISTORY.md, "The powered benchmark run small"). "check" was read
once (benchmarks/BENCHMARKS.md, "The default method, on a set whose coarse
model follows the artefact").

The folder (refused inside this repository) holds:

    ISIC2018_Task1-2_Training_Input/ISIC_<7 digits>.jpg            JPEG, sizes vary per image
    ISIC2018_Task1_Training_GroundTruth/ISIC_<7 digits>_segmentation.png   0/255
    isic_bias.csv          Bissoto et al.'s artefact annotation of every image: ';' separated,
                           an unnamed index column first, image names ending in .png (the
                           files are .jpg), label and label_string last
    trap_sets/isic_annotated_train1.csv           the trap set's training images
    trap_sets/isic_annotated_test1.csv            its test images, the shortcut reversed
    trap_sets/isic_annotated_test_balanced1.csv   a test set whose artefacts are independent
                                                  of the label (each group about half)
    generator.json         the generator settings, the rendering and the counts

The trap-set CSVs are ',' separated with an index column and an extra vasc column, as
Bissoto's are. All images sit in the Training folders, as in Bissoto's trap sets, whose
splits come from the CSV names: run with
`--labels DIR/trap_sets/isic_annotated_train1.csv --labels DIR/trap_sets/isic_annotated_test1.csv`.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .make_isic_folder import INPUT, TRUTH, writable_folder  # the same layout and checks

FLAGS = ("dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches")

# Generator settings and rendering of each variant. The generator renders square images at
# `render` px; each is then resized to its own height and width (aspect width / height drawn
# from `aspect`), restyled (gamma, per-channel gains, blur) and saved as a JPEG.
VARIANTS = {
    "dev": {
        "generator": {
            "spurious": ("ink", "patches"),
            "artefact_scale": 2.0,
            "artefact_count": 2,
            "band_zone": "outer",
            "test_fraction": 0.33,
        },
        "render": 128,
        "height": (96, 192),
        "aspect": (1.0, 1.4),
        "gamma": (1.0, 1.0),
        "gains": (1.0, 1.0),
        "blur": 0.0,
        "quality": (88, 95),
        "seed_offset": 1000,
    },
    "check": {
        "generator": {
            "spurious": ("patches", "gel_bubble"),
            "artefact_scale": 1.6,
            "artefact_count": 3,
            "band_zone": "outer",
            "test_fraction": 0.33,
        },
        "render": 96,
        "height": (140, 300),
        "aspect": (1.2, 1.5),
        "gamma": (0.85, 1.15),
        "gains": (0.92, 1.08),
        "blur": 0.6,
        "quality": (70, 85),
        "seed_offset": 2000,
    },
}


def restyle(image: np.ndarray, size: tuple[int, int], style: dict, rng) -> Image.Image:
    """The rendered image at (height, width), with the variant's colour rendering."""
    pixels = image.astype(np.float32) / 255
    gamma = rng.uniform(*style["gamma"])
    gains = rng.uniform(*style["gains"], 3).astype(np.float32)
    pixels = np.clip(pixels**gamma * gains, 0, 1)
    out = Image.fromarray((pixels * 255).round().astype(np.uint8))
    out = out.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    if style["blur"]:
        out = out.filter(ImageFilter.GaussianBlur(style["blur"] * size[0] / style["render"]))
    return out


def bissoto_rows(data, numbers, index, sep: str, vasc: bool) -> list[str]:
    """Rows in Bissoto's annotation format for the images at `index`."""
    rows = []
    for k, i in enumerate(index):
        flags = [int(data.flags[name][i]) for name in FLAGS] + ([0] if vasc else [])
        label = int(data.labels[i])
        name = f"ISIC_{numbers[i]:07d}.png"  # their CSV names .png files; the images are .jpg
        rows.append(sep.join(map(str, [k, name, *flags, label, ("benign", "malignant")[label]])))
    return rows


def write_folder(
    out: Path | str,
    variant: str = "dev",
    n: int = 480,
    balanced: int = 240,
    seed: int = 0,
    overwrite: bool = False,
    class_signal: float | None = None,
) -> Path:
    """Write the variant's folder and return it (see the module docstring)."""
    from shortcut_unlearning.data.synthetic import SynthConfig, generate

    out = writable_folder(out, overwrite)
    style = VARIANTS[variant]
    config = SynthConfig(
        n=n,
        size=style["render"],
        seed=style["seed_offset"] + seed,
        balanced_test=balanced,
        **style["generator"],
        **({} if class_signal is None else {"class_signal": class_signal}),
    )
    data = generate(config)
    rng = np.random.default_rng([style["seed_offset"], seed])
    # ISIC numbers in a shuffled order, so a file's number says nothing about its split.
    numbers = 24306 + rng.permutation(len(data)) * 3
    (out / INPUT).mkdir(parents=True, exist_ok=True)
    (out / TRUTH).mkdir(parents=True, exist_ok=True)
    sizes = []
    for i in range(len(data)):
        height = int(rng.integers(*style["height"], endpoint=True))
        width = round(height * rng.uniform(*style["aspect"]))
        name = f"ISIC_{numbers[i]:07d}"
        picture = restyle(data.images[i], (height, width), style, rng)
        picture.save(out / INPUT / f"{name}.jpg", quality=int(rng.integers(*style["quality"])))
        lesion = Image.fromarray(np.where(data.masks[i] != 0, 255, 0).astype(np.uint8))
        lesion.resize((width, height), Image.Resampling.NEAREST).save(
            out / TRUTH / f"{name}_segmentation.png"
        )
        sizes.append((height, width))
    header = ["", "image", *FLAGS, "label", "label_string"]
    everything = bissoto_rows(data, numbers, range(len(data)), ";", vasc=False)
    (out / "isic_bias.csv").write_text("\n".join([";".join(header), *everything]) + "\n")
    traps = out / "trap_sets"
    traps.mkdir(exist_ok=True)
    trap_header = ",".join(["", "image", *FLAGS, "vasc", "label", "label_string"])
    files = {"train": "train1", "test": "test1", "test_balanced": "test_balanced1"}
    for split, stem in files.items():
        index = np.flatnonzero(data.splits == split)
        rows = bissoto_rows(data, numbers, index, ",", vasc=True)
        (traps / f"isic_annotated_{stem}.csv").write_text("\n".join([trap_header, *rows]) + "\n")
    counts = {split: int((data.splits == split).sum()) for split in files}
    card = {
        "variant": variant,
        "generator": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "rendering": {k: v for k, v in style.items() if k != "generator"},
        "counts": counts,
        "sizes": {
            "height": [min(h for h, _ in sizes), max(h for h, _ in sizes)],
            "width": [min(w for _, w in sizes), max(w for _, w in sizes)],
        },
    }
    (out / "generator.json").write_text(json.dumps(card, indent=2) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (not in git)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="dev")
    parser.add_argument("--n", type=int, default=480, help="train + reversed test images")
    parser.add_argument("--balanced", type=int, default=240, help="balanced test images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument(
        "--class-signal",
        type=float,
        help="distance between the class means of the lesion's severity (generator default 0.5);"
        " lower it for a set whose coarse model leans on the artefact more than on the lesion",
    )
    args = parser.parse_args(argv)
    out = write_folder(
        args.out, args.variant, args.n, args.balanced, args.seed, args.overwrite, args.class_signal
    )
    counts = json.loads((out / "generator.json").read_text())["counts"]
    print(f"wrote {args.variant} variant to {out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
