"""Where the shipped sample data lives: inside the package when installed from a wheel,
at the repository's top level in a checkout or editable install."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SAMPLE_SET = "synthetic"
SAMPLE_MODEL = "coarse_model.safetensors"


def sample_data_dir() -> Path:
    """The sample_data folder; raises FileNotFoundError saying how to regenerate it."""
    for candidate in (PACKAGE_DIR / "sample_data", PACKAGE_DIR.parents[1] / "sample_data"):
        if (candidate / SAMPLE_SET).is_dir():
            return candidate
    raise FileNotFoundError(
        "sample data not found beside the package or in the repository; regenerate it with "
        "`shortcut-unlearning synth --out sample_data/synthetic --n 48 --size 128 --seed 0`"
    )
