"""`bench cache` and `bench open`: training with cached features against the plain loop, and
opening a dataset folder, cold and cached, with the forget-set update per edit."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .. import masks as masklib
from ..data.synthetic import generate
from ..model import Model, ModelConfig, resolve_device
from ..progress import drive
from ..training import TrainConfig, train


def cache_speedup(
    n: int = 64, size: int = 128, epochs: int = 3, encoder: str = "resnet18", device: str = "auto"
) -> dict:
    """Training time of the plain loop and of the cached-feature loop on the same work.

    The cached time includes computing the cache. Both runs take the same steps (a test
    checks that their losses agree).
    """
    data = generate(n=n, size=size, seed=0)
    coarse = masklib.coarse_masks(data.masks)
    seconds = {}
    for cache in (False, True):
        model = Model(ModelConfig(encoder=encoder, image_size=size), device)
        config = TrainConfig(epochs=epochs, cache_features=cache)
        start = time.perf_counter()
        drive(train(model, data.images, coarse, config), quiet=True)
        seconds["cached" if cache else "plain"] = time.perf_counter() - start
    return {
        "plain_s": seconds["plain"],
        "cached_s": seconds["cached"],
        "speedup": seconds["plain"] / seconds["cached"],
        "images": n,
        "size": size,
        "epochs": epochs,
        "encoder": encoder,
        "device": str(resolve_device(device)),
    }


def open_times(
    data: Path | str,
    longest: int | None = 1024,
    edits: int = 20,
    overlay_images: tuple[int, ...] = (32, 256),
    serial_images: int = 32,
    workers: int | None = None,
) -> dict:
    """How long a dataset folder takes to open at the working resolution, cold and cached,
    and the forget-set update per edit on its images.

    cold: this folder's cache emptied first (the operating system's file cache is not); open
    = what napari waits for (a lazy open: listing and headers); all images = decoding (or
    reading) every image once, as the first Refine does. The overlay update is Refinement.sync
    on the edited image after a 40 x 40 erase with autosave, as the widget runs it after a
    stroke, on the first images of the folder, for each stack size in `overlay_images`.
    """
    from ..data.folders import default_workers
    from ..data.working import folder_cache, open_working
    from ..settings import cache_folder

    root = cache_folder()
    if root is None:
        raise ValueError("bench open measures the cache: unset SHORTCUT_UNLEARNING_CACHE=off")
    workers = workers or default_workers()
    folder_cache(data, longest, root).clear()
    result = {"folder": str(data), "working_size": longest or "original", "workers": workers}
    for state in ("cold", "cached"):
        start = time.perf_counter()
        opened = open_working(data, longest, lazy=True, workers=workers)
        opened_s = time.perf_counter() - start
        opened.warm(workers)
        all_s = time.perf_counter() - start - opened_s
        result[state] = {
            "open_s": opened_s,
            "all_images_s": all_s,
            "ms_per_image": 1000 * all_s / len(opened),
            "decoded": opened.reader.decoded,
            "from_cache": opened.reader.from_cache,
        }
    n, (height, width) = len(opened), opened.images.shape[1:3]
    cache = folder_cache(data, longest, root).slot
    result.update(
        images=n,
        canvas=[height, width],
        cache_gib=sum(f.stat().st_size for f in cache.glob("*.npy")) / 2**30,
        arrays_in_memory_gib=n * height * width * 5 / 2**30,  # eager: image, fine, coarse
    )
    serial = open_working(data, longest, lazy=True, cache=False)
    count = min(serial_images, n)
    start = time.perf_counter()
    for i in range(count):
        serial.reader.arrays(i)
    result["serial_ms_per_image"] = 1000 * (time.perf_counter() - start) / count
    result["overlay"] = [
        _overlay_per_edit(np.asarray(opened.coarse[:m]), edits)
        for m in sorted({min(m, n) for m in overlay_images})
    ]
    return result


def _overlay_per_edit(coarse: np.ndarray, edits: int) -> dict:
    """Refinement.sync (forget set and autosave of the edited image) after 40 x 40 erases."""
    import tempfile

    from ..refinement import Refinement

    refinement = Refinement(coarse)
    seconds = []
    with tempfile.TemporaryDirectory() as autosave:
        for edit in range(edits):
            i = edit % len(coarse)
            rows, cols = np.nonzero(coarse[i])
            if not len(rows):
                continue
            y, x = rows[(edit * 7919) % len(rows)], cols[(edit * 7919) % len(rows)]
            refinement.refined[i, max(y - 20, 0) : y + 20, max(x - 20, 0) : x + 20] = 0
            start = time.perf_counter()
            changed = refinement.sync({i}, autosave)
            seconds.append(time.perf_counter() - start)
            if changed != [i]:
                raise RuntimeError(f"the erase on image {i} changed {changed}: nothing timed")
    ms = np.array(seconds) * 1000
    return {
        "images": len(coarse),
        "plane": list(coarse.shape[1:]),
        "edits": len(ms),
        "median_ms": float(np.median(ms)),
        "max_ms": float(ms.max()),
    }
