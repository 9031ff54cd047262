"""Write a synthetic dataset folder in the official ISIC 2018 Task 1 layout, for timing readers.

    python benchmarks/make_isic_folder.py --out /tmp/isic2594            # 2,594 x 1024 x 768
    python benchmarks/make_isic_folder.py --out /tmp/isic20 --n 20

Writes ISIC2018_Task1-2_Training_Input/ISIC_<7 digits>.jpg (JPEG quality 90),
ISIC2018_Task1_Training_GroundTruth/ISIC_<7 digits>_segmentation.png (0/255) and labels.csv
(image,label), the size and count of the ISIC 2018 Task 1 training set (2,594 images; the real
images vary in size, most are 1,000 px or larger). The content is synthetic: skin-toned
background with texture, one dark lesion with an irregular border, a random label. It is meant
for timing only: nothing is learned from it. The folder is refused inside this repository.
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

REPOSITORY = Path(__file__).resolve().parents[1]
INPUT = "ISIC2018_Task1-2_Training_Input"
TRUTH = "ISIC2018_Task1_Training_GroundTruth"


def lesion_image(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(RGB image, bool lesion) of one synthetic dermoscopy picture."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width].astype(np.float32)
    skin = rng.uniform([190, 130, 110], [235, 185, 160]).astype(np.float32)
    shade = 1 - 0.25 * (((rows / height - 0.5) ** 2 + (cols / width - 0.5) ** 2) * 2)
    centre = rng.uniform(0.35, 0.65, 2) * (height, width)
    axes = rng.uniform(0.12, 0.32, 2) * min(height, width)
    angle = np.arctan2(rows - centre[0], cols - centre[1])
    wobble = 1 + sum(
        rng.uniform(0, 0.08) * np.cos(k * angle + rng.uniform(0, 2 * np.pi)) for k in (3, 5, 7)
    )
    radius = np.hypot((rows - centre[0]) / axes[0], (cols - centre[1]) / axes[1])
    lesion = radius <= wobble
    image = skin * shade[..., None]
    brown = rng.uniform([70, 35, 20], [140, 90, 70]).astype(np.float32)
    weight = np.clip((wobble - radius) * 4, 0, 1)[..., None]  # a soft border
    image = image * (1 - weight) + brown * weight
    image += rng.normal(0, 7, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), lesion


def writable_folder(out: Path | str, overwrite: bool) -> Path:
    """`out` resolved; refused inside the repository, or holding something without
    `overwrite` (benchmarks/make_dev_isic.py checks its folders here too)."""
    out = Path(out).resolve()
    if out == REPOSITORY or REPOSITORY in out.parents:
        raise SystemExit(f"{out} is inside the repository; write the folder under /tmp")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SystemExit(f"{out} is not empty; choose an empty folder or pass --overwrite")
    return out


def write_folder(
    out: Path | str,
    n: int = 2594,
    size: tuple[int, int] = (768, 1024),
    seed: int = 0,
    workers: int = 2,
    overwrite: bool = False,
) -> Path:
    """Write the folder and return it; `size` is (height, width)."""
    out = writable_folder(out, overwrite)
    (out / INPUT).mkdir(parents=True, exist_ok=True)
    (out / TRUTH).mkdir(parents=True, exist_ok=True)
    labels = np.random.default_rng(seed).integers(0, 2, n)

    def one(i: int) -> None:
        image, lesion = lesion_image(*size, seed=seed * 1_000_003 + i)
        name = f"ISIC_{i:07d}"
        Image.fromarray(image).save(out / INPUT / f"{name}.jpg", quality=90)
        Image.fromarray(lesion.astype(np.uint8) * 255).save(
            out / TRUTH / f"{name}_segmentation.png"
        )

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, range(n)))
    rows = [f"ISIC_{i:07d},{int(label)}" for i, label in enumerate(labels)]
    (out / "labels.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (not in git)")
    parser.add_argument("--n", type=int, default=2594, help="number of images")
    parser.add_argument("--height", type=int, default=768)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="writing threads")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    out = write_folder(
        args.out, args.n, (args.height, args.width), args.seed, args.workers, args.overwrite
    )
    print(f"wrote {args.n} images of {args.height} x {args.width} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
