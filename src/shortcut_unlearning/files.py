"""Files and folders written safely: never through a link, never half-written, and a folder
replaced only when this tool wrote it.

Every file the package writes goes through write_bytes (or write_text, write_png, write_npy
and write_figure, built on it):

- a new file is created exclusively (O_CREAT | O_EXCL | O_NOFOLLOW), which fails on any
  existing name, a link included, so nothing is ever written at a link's target;
- a replacement (replace=True) is written under a temporary name in the same folder and renamed
  over the old file: a killed process leaves the old file or the new one, never half of one. An
  existing link is refused, never followed.

A set of files (a run, a dataset) is written into a staging folder beside its target and moved
into place once complete (staged_folder). Each such folder holds MARKER, naming the tool and
the kind of folder; --overwrite replaces only a folder that holds the marker of its kind, so a
user's own folder is never deleted.
"""

from __future__ import annotations

import io
import json
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

FORMAT = "shortcut-unlearning"
MARKER = "shortcut-unlearning.json"  # in every run and dataset folder the tool writes
INCOMPLETE = "INCOMPLETE"  # in a staging folder until its set is complete
# Room a set needs besides what its writer counts (checkpoints): pictures, metrics and slack.
EXTRA_BYTES = 32 * 2**20
_CREATE = (
    os.O_WRONLY
    | os.O_CREAT
    | os.O_EXCL
    | getattr(os, "O_NOFOLLOW", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


class OutputError(ValueError):
    """An output that cannot be written as asked; the message says what to do."""


def refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise OutputError(
            f"{path} is a link (to {os.readlink(path)}); this tool never writes through a link: "
            "remove the link or write to another folder"
        )


def write_bytes(path: Path | str, data: bytes, *, replace: bool = False) -> Path:
    """Write `data` to `path`: created exclusively, or with `replace` written beside it and
    renamed over it. A link at `path` is refused either way; without `replace` so is any
    existing file."""
    return write_files({Path(path): data}, replace=replace)[0]


def write_files(contents: dict[Path, bytes], *, replace: bool = False) -> list[Path]:
    """Several files written as write_bytes writes one. With `replace` every file is written
    under a temporary name before any is renamed into place, so a failed write (a full disk)
    leaves all the old files, and a model's weights never go without their config."""
    paths = [Path(path) for path in contents]
    for path in paths:
        refuse_link(path)
    if not replace:
        for path, data in zip(paths, contents.values(), strict=True):
            _create(path, data)
        return paths
    staged = []
    try:
        for path, data in zip(paths, contents.values(), strict=True):
            staged.append(_create_temporary(path, data))
        for temporary, path in zip(staged, paths, strict=True):
            os.replace(temporary, path)  # replaces a name, never writes through one
    finally:
        for temporary in staged:
            temporary.unlink(missing_ok=True)  # those not renamed: a failure midway
    return paths


def _create_temporary(path: Path, data: bytes) -> Path:
    """A new file beside `path`, named after it, holding `data`."""
    while True:
        temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            _create(temporary, data)
            return temporary
        except FileExistsError:
            continue  # a name another writer holds: draw again


def _create(path: Path, data: bytes) -> None:
    """A new file holding `data`; FileExistsError (OutputError for a link) when the name is
    taken. A failed write removes the file it created."""
    try:
        handle = os.open(path, _CREATE, 0o666)  # the umask decides who may read it
    except FileExistsError:
        refuse_link(path)
        raise
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def write_text(path: Path | str, text: str, *, replace: bool = False) -> Path:
    """write_bytes of `text` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"), replace=replace)


def write_json(path: Path | str, value, *, replace: bool = False, default=None) -> Path:
    """write_text of `value` as indented JSON with a final newline."""
    return write_text(path, json.dumps(value, indent=2, default=default) + "\n", replace=replace)


def write_png(path: Path | str, image, *, replace: bool = False) -> Path:
    """write_bytes of a PIL image (or uint8 pixels) encoded as PNG."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return write_bytes(path, buffer.getvalue(), replace=replace)


def write_npy(path: Path | str, array: np.ndarray, *, replace: bool = True) -> Path:
    """write_bytes of np.save's bytes (never a pickle)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return write_bytes(path, buffer.getvalue(), replace=replace)


def write_figure(fig, path: Path | str, *, dpi: int = 110, replace: bool = True) -> Path:
    """write_bytes of a matplotlib figure saved as PNG."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_bytes(path, buffer.getvalue(), replace=replace)


def check_targets(paths, replace: bool = False, hint: str = "write elsewhere") -> None:
    """Refuse, before anything is written, a link among `paths`, a folder, and without
    `replace` an existing file; `hint` says what to do about an existing one."""
    for path in map(Path, paths):
        refuse_link(path)
        if path.is_dir():
            raise OutputError(f"{path} is a folder; remove it or {hint}")
        if path.exists() and not replace:
            raise OutputError(f"{path} already exists; {hint}")


def make_folder(path: Path | str) -> Path:
    """`path` as a folder, made with its parents when missing; a link there is refused, so
    the files written in it stay where they are named."""
    path = Path(path)
    refuse_link(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------------------------
# Sets of files: staged, marked, moved into place


def parent_ready(target: Path) -> Path:
    """The folder `target` is written in, created if need be; OutputError if it cannot be."""
    parent = Path(os.path.abspath(target)).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise OutputError(
            f"cannot create the folder {parent}: part of that path is a file; choose another --out"
        ) from err
    except OSError as err:
        raise OutputError(
            f"cannot create the folder {parent} ({err.strerror}); choose a writable --out"
        ) from err
    return parent


def check_room(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"only {free / 2**20:.0f} MiB are free in {folder} but the output needs about "
            f"{needed / 2**20:.0f} MiB; free some space or choose another --out"
        )


def marked_kind(folder: Path) -> str | None:
    """The kind ("run", "dataset") that `folder`'s MARKER names, or None without a valid one."""
    marker = folder / MARKER
    if marker.is_symlink() or not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        return None
    kind = info.get("folder")
    return kind if isinstance(kind, str) else None


def check_run_folder(out: Path | str, overwrite: bool = False, kind: str = "run") -> None:
    """Refuse a folder for a set of `kind` that names a file or a link, or that holds
    something, unless `overwrite` is given and it is an earlier set of that kind (its MARKER):
    nothing else is ever replaced."""
    out = Path(out)
    if out.is_symlink():
        raise OutputError(
            f"--out {out} is a link (to {os.readlink(out)}); name the folder itself, not a link"
        )
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; name a folder for the {kind}'s files")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return
    listing = f"{', '.join(held[:3])}{', ...' if len(held) > 3 else ''}"
    ours = marked_kind(out) == kind
    if not overwrite:
        earlier = f"already holds an earlier {kind}" if ours else "is not empty"
        raise OutputError(
            f"--out {out} {earlier} (it holds {listing}); choose a new folder or pass "
            f"--overwrite (overwrite=True) to replace the earlier {kind}"
        )
    if not ours:
        raise OutputError(
            f"--out {out} holds {listing} but no {MARKER} naming it a {kind} folder this tool "
            f"wrote, so it is not an earlier {kind}'s folder and --overwrite will not replace it "
            "(that would delete everything in it); choose another folder, or delete it yourself "
            "if it is an earlier result of a version that wrote no marker"
        )


@contextmanager
def staged_folder(
    out: Path | str, overwrite: bool = False, needed_bytes: int = 0, kind: str = "run"
) -> Iterator[Path]:
    """A staging folder to write a set of `kind` into; moved to `out` when the block completes.

    `out` is checked first (see check_run_folder), then the staging folder is made beside it,
    which proves the place writable, and the free space is checked against `needed_bytes`.
    """
    check_run_folder(out, overwrite, kind)
    out = Path(os.path.abspath(out))  # "." and "a/.." become names that can be renamed
    parent = parent_ready(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{out.name}.incomplete-", dir=parent))
    except OSError as err:
        raise OutputError(
            f"cannot write in {parent} ({err.strerror}); choose a writable --out"
        ) from err
    write_text(
        stage / INCOMPLETE, f"This {kind} into {out} did not finish; nothing here is used.\n"
    )
    write_json(stage / MARKER, {"format": FORMAT, "folder": kind, "version": 1})
    try:
        check_room(parent, needed_bytes + EXTRA_BYTES)
        yield stage
    except BaseException:
        if {p.name for p in stage.iterdir()} == {INCOMPLETE, MARKER}:
            shutil.rmtree(stage)  # nothing worth keeping
        raise
    (stage / INCOMPLETE).unlink()
    _move_into_place(stage, out)


def _move_into_place(stage: Path, out: Path) -> None:
    """Rename `stage` to `out`; an existing `out` (empty, or replaced by --overwrite) goes."""
    if not out.exists():
        stage.rename(out)
        return
    old = Path(tempfile.mkdtemp(prefix=f"{out.name}.replaced-", dir=stage.parent))
    old.rmdir()
    out.rename(old)  # until the next line, the earlier set is kept under this name
    stage.rename(out)
    shutil.rmtree(old)
