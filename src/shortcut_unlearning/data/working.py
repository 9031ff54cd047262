"""A dataset folder as the clinician edits it: every image at its working resolution, fast.

`open_working(path, longest)` lists the folder (labels, ids, files, and every file's size from
its header, nothing decoded), then gives each image, its fine mask and its coarse mask at the
image's *working extent*: its own size, shrunk (aspect kept) only when its longer side exceeds
`longest` (stack.working_extent). The images lie at the top left of one letterboxed canvas, as
stack.ImageStack expects. Coarse masks come from the folder's coarse/ when it has one (see
data.folders: checked for size and values, with a warning for ground-truth lesion pixels they
leave out), else are derived from the fine masks at the working resolution, the margin a
fraction of each image's shorter side.

Images decode in a thread pool, and each image's arrays are cached on disk (data.cache) so the
next open reads them instead. With lazy=True the arrays are dask arrays whose chunks (one image
each) decode or read the cache when first looked at, so napari opens thousands of images at
once; eager and lazy give the same pixels.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import masks as masklib
from ..settings import cache_folder
from ..stack import NEAREST, canvas_shape, resize, working_extent
from .cache import FolderCache
from .folders import (
    COARSE_FOLDER,
    MIN_SIDE,
    FolderError,
    Listing,
    _size_mismatch,
    coarse_file,
    decode_item,
    image_size_on_disk,
    in_order,
    list_folder,
    read_coarse,
)

DEFAULT_WORKING_SIZE = 1024  # a 1024 x 768 ISIC image opens unchanged
WORKING_SIZE_ENV = "SHORTCUT_UNLEARNING_WORKING_SIZE"  # the napari reader's choice
LAZY_ENV = "SHORTCUT_UNLEARNING_LAZY"  # auto (default), 1 or 0
LAZY_ABOVE_BYTES = 1 << 30  # auto: lazy when the three arrays would take more memory than this
KINDS = ("image", "fine", "coarse")
RECENT = 8  # images kept decoded in memory: the layers of the image on screen share them


@dataclass
class WorkingSet:
    """A folder's images, fine and coarse masks on one canvas at the working resolution."""

    ids: list[str]
    labels: np.ndarray  # (N,) 0 benign, 1 malignant
    splits: np.ndarray  # (N,) train, val or test
    original_sizes: list[tuple[int, int]]  # (height, width) on disk
    extents: list[tuple[int, int]]  # (height, width) of image i on the canvas, at its top left
    source: str
    coarse_source: str  # where the coarse masks come from, in words
    images: object  # (N, H, W, 3) uint8: numpy, or dask when lazy
    fine: object  # (N, H, W) uint8 classes
    coarse: object  # (N, H, W) uint8 classes
    folder: Path
    reader: _Reader | None = None  # what decodes and caches, for counts and a full pass

    def __len__(self) -> int:
        return len(self.ids)

    def metadata(self) -> dict:
        """What the napari layers carry (the plugin and the mask writer read it)."""
        return {
            "ids": list(self.ids),
            "original_sizes": [list(size) for size in self.original_sizes],
            "labels": [int(label) for label in self.labels],
            "extents": [list(extent) for extent in self.extents],
            "source": self.source,
            "splits": [str(split) for split in self.splits],
            "coarse": self.coarse_source,
            "folder": str(self.folder),
        }

    def warm(self, workers: int | None = None) -> None:
        """Decode (or read from the cache) every image once, in parallel, and read its bytes,
        keeping nothing: fills the cache, as a first Refine on a lazily opened folder does."""
        for arrays in in_order(self.reader.arrays, range(len(self)), workers):
            for array in arrays.values():
                np.array(array)  # a cached entry is memory-mapped: this reads it


def parse_working_size(text: str) -> int | None:
    """A working resolution as written by a user: the longer side in pixels, or "original"."""
    text = text.strip().lower()
    if text in ("original", "full", "none"):
        return None
    if not text.isdigit() or int(text) < MIN_SIDE:
        raise ValueError(
            f"working size {text!r}: give the longer side in pixels (a whole number of at least "
            f"{MIN_SIDE}, e.g. 1024) or 'original'"
        )
    return int(text)


def working_size_from_env(default: int | None = DEFAULT_WORKING_SIZE) -> int | None:
    """The working resolution chosen in SHORTCUT_UNLEARNING_WORKING_SIZE (see
    parse_working_size), else `default`."""
    text = os.environ.get(WORKING_SIZE_ENV, "")
    if not text.strip():
        return default
    try:
        return parse_working_size(text)
    except ValueError as error:
        raise ValueError(f"{WORKING_SIZE_ENV}: {error}") from None


def folder_cache(path: Path | str, longest: int | None, root: Path | None) -> FolderCache:
    """The cache entries of the folder at `path` opened at working resolution `longest`."""
    resolution = "original" if longest is None else f"longest-{longest}"
    return FolderCache(root, path, resolution)


def lazy_from_env() -> bool | None:
    """SHORTCUT_UNLEARNING_LAZY: 1 (always lazy), 0 (never), else None (by size)."""
    text = os.environ.get(LAZY_ENV, "auto").strip().lower()
    return {"1": True, "yes": True, "true": True, "0": False, "no": False, "false": False}.get(text)


def open_working(
    path: Path | str,
    longest: int | None = DEFAULT_WORKING_SIZE,
    *,
    labels=None,
    lazy: bool | None = False,
    cache: bool | Path | str = True,
    workers: int | None = None,
    coarse_method: str = masklib.DEFAULT_COARSE_METHOD,
    coarse_margin: float = masklib.DEFAULT_COARSE_MARGIN,
) -> WorkingSet:
    """Open a project or ISIC 2018 folder at the working resolution (see the module).

    `longest`: the longer side in pixels above which an image is shrunk (None: never).
    `lazy`: dask arrays (True), numpy arrays decoded now (False), or lazy only when the arrays
    would take more than LAZY_ABOVE_BYTES (None). `cache`: True (the user cache folder,
    settings.cache_folder), a folder, or False. `workers`: decoding threads (default: cores).
    """
    if longest is not None and (not isinstance(longest, int) or longest < MIN_SIDE):
        raise ValueError(f"longest must be None or a whole number >= {MIN_SIDE}, got {longest!r}")
    listing = list_folder(path, labels)
    reader = _Reader(listing, longest, coarse_method, coarse_margin, workers)
    reader.open_cache(cache_folder() if cache is True else (Path(cache) if cache else None))
    n, (height, width) = len(listing.items), reader.shape
    if lazy is None:
        lazy = n * height * width * (3 + 1 + 1) > LAZY_ABOVE_BYTES
    if lazy:
        reader.warn_each = True
        arrays = {kind: reader.dask(kind) for kind in KINDS}
    else:
        arrays = reader.fill(workers)
    items = listing.items
    return WorkingSet(
        ids=listing.ids,
        labels=np.array([item.label for item in items], np.int64),
        splits=np.array([item.split for item in items]),
        original_sizes=reader.sizes,
        extents=reader.extents,
        source=listing.source,
        coarse_source=reader.coarse_source,
        images=arrays["image"],
        fine=arrays["fine"],
        coarse=arrays["coarse"],
        folder=Path(path),
        reader=reader,
    )


class _Reader:
    """Each image's arrays at its working extent: from memory, the cache, or decoded."""

    def __init__(self, listing: Listing, longest, coarse_method, coarse_margin, workers):
        self.listing, self.items = listing, listing.items
        self.rule = (coarse_method, coarse_margin)
        headers = list(in_order(self._header, self.items, workers))
        self.sizes = [size for size, _ in headers]
        self.coarse_files = [file for _, file in headers]
        self.extents = [working_extent(h, w, longest) for h, w in self.sizes]
        self.shape = canvas_shape(self.extents)
        self.longest = longest
        self.coarse_source = self._describe_coarse()
        self.cache: FolderCache | None = None
        self.keys = [self._key(i) for i in range(len(self.items))]
        self.decoded = self.from_cache = 0  # counts, for tests and the benchmark
        self.warn_each = False  # lazy: warn about each uncovered lesion when it is read
        self.outside: dict[int, int] = {}  # image -> ground-truth lesion pixels outside coarse
        self._recent: OrderedDict[int, dict] = OrderedDict()
        self._lock = threading.Lock()
        self._image_locks = [threading.Lock() for _ in range(64)]

    # -- listing ----------------------------------------------------------------------------
    def _header(self, item):
        """(height, width) of the image; its mask's and coarse mask's sizes checked against it."""
        size = image_size_on_disk(item.image)
        mask_size = image_size_on_disk(item.mask)
        if mask_size != size:
            raise FolderError(_size_mismatch(item, item.mask, mask_size, size))
        coarse = coarse_file(self.listing.folder, item.id)
        if coarse is not None and image_size_on_disk(coarse) != size:
            read_coarse(coarse, item.id, item.label, size)  # raises with the sizes
        return size, coarse

    def _describe_coarse(self) -> str:
        given = sum(file is not None for file in self.coarse_files)
        folder = self.listing.folder / COARSE_FOLDER
        if given == len(self.items):
            return f"drawn: {folder}"
        if given:
            pairs = zip(self.items, self.coarse_files, strict=True)
            missing = [item.id for item, file in pairs if file is None]
            raise FolderError(
                f"{folder} holds coarse masks for {given} of {len(self.items)} images; "
                f"{len(missing)} have none ({', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}). Add <id>.png for those, or move the "
                "folder away to derive every coarse mask from the ground truth"
            )
        method, margin = self.rule
        return f"derived: {method}, margin {margin:g} of each image's shorter side"

    def _key(self, i: int) -> str:
        item, files = self.items[i], [self.items[i].image, self.items[i].mask]
        files.append(self.coarse_files[i])
        stats = [_stat(file, self.listing.folder) for file in files]
        return FolderCache.key(item.id, item.label, self.extents[i], self.rule, stats)

    # -- cache ------------------------------------------------------------------------------
    def open_cache(self, root: Path | None) -> None:
        if root is None:
            return
        try:
            self.cache = folder_cache(self.listing.folder, self.longest, root)
            present = self.cache.prune(self.keys)
        except OSError as error:
            warnings.warn(
                f"cannot use the cache in {root} ({error}); reading without it", stacklevel=3
            )
            self.cache = None
            return
        entries = ({self.cache.path(key, kind).name for kind in KINDS} for key in self.keys)
        missing = [i for i, names in enumerate(entries) if not names <= present]
        self.cache.make_room(sum(5 * h * w for h, w in (self.extents[i] for i in missing)))

    # -- one image --------------------------------------------------------------------------
    def arrays(self, i: int) -> dict[str, np.ndarray]:
        """Image i's image, fine and coarse masks at its working extent."""
        with self._image_locks[i % len(self._image_locks)]:
            with self._lock:
                found = self._recent.get(i)
            if found is None:
                found = self._cached(i)
                if found is None:
                    found = self._decode(i)
                    if self.cache is not None:
                        self.cache.save(self.keys[i], found)
                self._check_cover(i, found)
                with self._lock:
                    self._recent[i] = found
                    while len(self._recent) > RECENT:
                        self._recent.popitem(last=False)
        return found

    def _cached(self, i: int):
        if self.cache is None:
            return None
        h, w = self.extents[i]
        shapes = {"image": (h, w, 3), "fine": (h, w), "coarse": (h, w)}
        found = self.cache.load(self.keys[i], shapes)
        if found is not None:
            with self._lock:
                self.from_cache += 1
        return found

    def _decode(self, i: int) -> dict[str, np.ndarray]:
        item, extent = self.items[i], self.extents[i]
        decoded = decode_item(item, extent)
        if decoded.original_size != self.sizes[i]:
            raise FolderError(
                f"{item.image} changed size while the folder was open; open the folder again"
            )
        file = self.coarse_files[i]
        if file is None:
            coarse = masklib.coarse_mask(decoded.mask, *self.rule)
        else:
            given = read_coarse(file, item.id, item.label, self.sizes[i])
            coarse = resize(given, extent, NEAREST)
        with self._lock:
            self.decoded += 1
        return {"image": decoded.image, "fine": decoded.mask, "coarse": coarse}

    def _check_cover(self, i: int, arrays: dict) -> None:
        """Count the ground-truth lesion pixels a drawn coarse mask leaves out."""
        if self.coarse_files[i] is None or i in self.outside:
            return
        count = int(np.count_nonzero((arrays["fine"] != 0) & (arrays["coarse"] == 0)))
        self.outside[i] = count
        if count and self.warn_each:
            warnings.warn(_cover_warning(self.listing, {i: count}), stacklevel=2)

    # -- all images -------------------------------------------------------------------------
    def fill(self, workers: int | None) -> dict[str, np.ndarray]:
        """Every image's arrays on numpy canvases, decoded in parallel."""
        n = len(self.items)
        canvases = {
            kind: np.zeros((n, *self.shape, *((3,) if kind == "image" else ())), np.uint8)
            for kind in KINDS
        }
        for i, arrays in enumerate(in_order(self.arrays, range(n), workers)):
            h, w = self.extents[i]
            for kind in KINDS:
                canvases[kind][i, :h, :w] = arrays[kind]
        uncovered = {i: c for i, c in self.outside.items() if c}
        if uncovered:
            warnings.warn(_cover_warning(self.listing, uncovered), stacklevel=3)
        return canvases

    def block(self, kind: str, index) -> np.ndarray:
        """The canvases of images `index` for one kind of array."""
        index = list(index)
        tail = (3,) if kind == "image" else ()
        out = np.zeros((len(index), *self.shape, *tail), np.uint8)
        workers = None if len(index) > 1 else 1
        for row, arrays in enumerate(in_order(self.arrays, index, workers)):
            h, w = self.extents[index[row]]
            out[row, :h, :w] = arrays[kind]
        return out

    def dask(self, kind: str):
        """A dask array of one kind, one image per chunk, read when first looked at."""
        import dask.array as da

        canvas = _LazyCanvas(self, kind)
        token = FolderCache.key(kind, self.keys, self.extents)[:16]
        return da.from_array(
            canvas,
            chunks=(1, *canvas.shape[1:]),
            name=f"shortcut-unlearning-{kind}-{token}",
            fancy=False,
            meta=np.empty((0,) * canvas.ndim, np.uint8),
        )


class _LazyCanvas:
    """An array-like over _Reader.block that dask slices one image at a time."""

    dtype = np.dtype(np.uint8)

    def __init__(self, reader: _Reader, kind: str):
        self.reader, self.kind = reader, kind
        tail = (3,) if kind == "image" else ()
        self.shape = (len(reader.items), *reader.shape, *tail)
        self.ndim = len(self.shape)

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        everything = np.arange(self.shape[0])
        if first is Ellipsis:
            return self.reader.block(self.kind, everything)[key]
        if isinstance(first, int | np.integer):
            return self.reader.block(self.kind, [everything[first]])[(0, *rest)]
        return self.reader.block(self.kind, everything[first])[(slice(None), *rest)]


def _stat(file: Path | None, folder: Path):
    """What identifies a file's content cheaply: its place in the folder, size and mtime."""
    if file is None:
        return None
    found = file.stat()
    return [file.relative_to(folder).as_posix(), found.st_size, found.st_mtime_ns]


def _cover_warning(listing: Listing, uncovered: dict[int, int]) -> str:
    named = [f"{listing.items[i].id} ({count} px)" for i, count in sorted(uncovered.items())]
    return (
        f"{len(uncovered)} coarse mask(s) in {listing.folder / COARSE_FOLDER} leave ground-truth "
        f"lesion pixels outside: {', '.join(named[:5])}{', ...' if len(named) > 5 else ''}. A "
        "refinement can only erase, so those pixels stay missed: redraw these coarse masks to "
        "cover the whole lesion"
    )
