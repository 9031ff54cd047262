"""A disk cache of a dataset folder's images decoded at the working resolution, per image.

An entry holds one image's arrays (image, fine mask, coarse mask at its working extent) as plain
.npy files, never pickles. Its key is made of what it was decoded from: each source file's path,
size and modification time, the label, the extent, the coarse-mask rule and this format's
version. A changed file therefore gives a new key and its old entry is never read; opening the
folder deletes the entries no current key names. Each file is written under a temporary name and
renamed, so a crash leaves no half entry, and an entry that does not load with the expected shape
and type is deleted and decoded again. Flipped bits inside an intact file are not detected.

Entries of one folder at one working resolution live in <root>/folders/<hash of the folder's
path>/<resolution>/, beside a folder.txt naming the dataset folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import time
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ..files import write_npy, write_text

FORMAT_VERSION = 1
RESERVE_BYTES = 1 << 30  # the cache never fills a disk past its last GiB
STALE_TEMPORARY_S = 3600  # a temporary file this old was left by a process that died


class FolderCache:
    """Entries of one dataset folder at one working resolution, under `root`."""

    def __init__(self, root: Path | str, folder: Path | str, resolution: str):
        folder = Path(folder).resolve()
        digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
        self.slot = Path(root) / "folders" / digest / resolution
        self.slot.mkdir(parents=True, exist_ok=True)
        label = self.slot.parent / "folder.txt"
        if not label.is_file():
            write_text(label, f"{folder}\n", replace=True)
        self.writable = True

    @staticmethod
    def key(*parts) -> str:
        """The key of an entry made from `parts` (JSON-able: paths, sizes, times, numbers)."""
        text = json.dumps([FORMAT_VERSION, *parts], default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: str, kind: str) -> Path:
        return self.slot / f"{key}.{kind}.npy"

    def load(self, key: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray] | None:
        """The entry's arrays (memory-mapped, read-only), or None when it is missing or damaged
        (a damaged entry is deleted, with a warning)."""
        arrays = {}
        for kind, shape in shapes.items():
            file = self.path(key, kind)
            try:
                array = np.load(file, mmap_mode="r", allow_pickle=False)
            except FileNotFoundError:
                return None
            except (OSError, ValueError, EOFError) as error:
                self._drop_damaged(key, shapes, f"{file.name} does not load: {error}")
                return None
            if array.shape != tuple(shape) or array.dtype != np.uint8:
                self._drop_damaged(
                    key, shapes, f"{file.name} holds {array.dtype} {array.shape}, not {shape}"
                )
                return None
            arrays[kind] = array
        return arrays

    def save(self, key: str, arrays: dict[str, np.ndarray]) -> None:
        """Write an entry, each file atomically. A full or read-only disk turns the cache off
        for this open, with a warning; it never stops the reading."""
        if not self.writable:
            return
        try:
            for kind, array in arrays.items():
                write_npy(self.path(key, kind), array)
        except OSError as error:
            self.writable = False
            warnings.warn(
                f"cannot write the cache in {self.slot} ({error}); reading without it. Free "
                "space there or set SHORTCUT_UNLEARNING_CACHE to a folder on another disk",
                stacklevel=2,
            )

    def prune(self, keys: Iterable[str]) -> set[str]:
        """Delete entries no key in `keys` names and temporary files left by dead processes;
        returns the names of the files kept."""
        keep, kept, now = set(keys), set(), time.time()
        for file in self.slot.iterdir():
            stale = file.name.endswith(".npy") and file.name.split(".", 1)[0] not in keep
            with contextlib.suppress(OSError):
                orphan = file.suffix == ".tmp" and now - file.stat().st_mtime > STALE_TEMPORARY_S
                if stale or orphan:
                    file.unlink()
                    continue
            kept.add(file.name)
        return kept

    def make_room(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit with RESERVE_BYTES to spare; if not, the cache stays
        read-only for this open, with a warning."""
        free = shutil.disk_usage(self.slot).free
        if free - nbytes >= RESERVE_BYTES:
            return True
        self.writable = False
        warnings.warn(
            f"the cache of this folder needs {nbytes / 2**30:.1f} GiB but {self.slot} has "
            f"{free / 2**30:.1f} GiB free; reading without caching. Set "
            "SHORTCUT_UNLEARNING_CACHE to a folder on a disk with more room",
            stacklevel=2,
        )
        return False

    def clear(self) -> None:
        """Delete every entry of this folder at this resolution."""
        shutil.rmtree(self.slot, ignore_errors=True)
        self.slot.mkdir(parents=True, exist_ok=True)

    def _drop_damaged(self, key: str, shapes, why: str) -> None:
        for kind in shapes:
            with contextlib.suppress(OSError):
                self.path(key, kind).unlink()
        warnings.warn(f"a cache entry was damaged ({why}); decoding it again", stacklevel=3)
