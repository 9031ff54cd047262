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

import errno
import glob
import io
import json
import math
import os
import secrets
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from .schemas import InputError, read_json

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
    leaves all the old files, and a model's weights never go without their config. A full or
    read-only disk raises DiskError naming the file and what it still holds."""
    paths = [Path(path) for path in contents]
    for path in paths:
        refuse_link(path)
    if not replace:
        for path, data in zip(paths, contents.values(), strict=True):
            with _disk_errors(path, replace):
                _create(path, data)
        return paths
    staged = []
    try:
        for path, data in zip(paths, contents.values(), strict=True):
            with _disk_errors(path, replace):
                staged.append(_create_temporary(path, data))
        for temporary, path in zip(staged, paths, strict=True):
            os.replace(temporary, path)  # replaces a name, never writes through one
    finally:
        for temporary in staged:
            temporary.unlink(missing_ok=True)  # those not renamed: a failure midway
    return paths


class DiskError(OutputError, OSError):
    """A write refused by the disk: full, over quota or read-only. The message says which file
    and what was kept. An OSError too, so callers that carry on without a file they could not
    write (the folder cache, the plugin's autosave) still catch it."""


# What a disk says when it cannot take a file; the error names no file when write() fails.
DISK_ERRNOS = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}
DISK_ERRNOS[errno.EROFS] = "the file system is read-only"
DISK_ERRNOS[errno.EFBIG] = "the file is larger than the file system allows"


def disk_trouble(error: BaseException) -> str | None:
    """What a disk error says in words (see DISK_ERRNOS), or None for any other error."""
    return DISK_ERRNOS.get(getattr(error, "errno", None)) if isinstance(error, OSError) else None


@contextmanager
def _disk_errors(path: Path, replace: bool) -> Iterator[None]:
    try:
        yield
    except OSError as error:
        trouble = disk_trouble(error)
        if trouble is None:
            raise
        kept = "keeps its earlier content" if replace and path.exists() else "was not written"
        raise DiskError(
            f"cannot write {path}: {trouble} ({error.strerror}); {path.name} {kept}; free some "
            "space or write elsewhere"
        ) from error


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
    """write_text of `value` as indented JSON with a final newline; `default` turns other
    objects into JSON values. NaN and infinities are written as null (bare NaN is not JSON
    and strict parsers refuse it), and the text is checked to be strict JSON."""
    text = json.dumps(json_ready(value, default), indent=2, allow_nan=False)
    return write_text(path, text + "\n", replace=replace)


def json_ready(value, default=None):
    """`value` with every non-finite float replaced by None, tuples and numpy arrays as lists,
    numpy numbers as numbers and other objects passed through `default` (TypeError without
    one), ready for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or isinstance(value, str | int):
        return value
    if isinstance(value, dict):
        return {key: json_ready(item, default) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(item, default) for item in value]
    if isinstance(value, np.generic | np.ndarray):
        return json_ready(value.tolist(), default)
    if default is None:
        raise TypeError(f"{type(value).__name__} {value!r:.80} is not a JSON value")
    return json_ready(default(value), default)


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
        info = read_json(marker, "")
    except (OSError, InputError):
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
    Staging folders of earlier attempts older than a day are cleaned up (stale_stages). A full
    or read-only disk raises DiskError saying what was kept.
    """
    check_run_folder(out, overwrite, kind)
    out = Path(os.path.abspath(out))  # "." and "a/.." become names that can be renamed
    parent = parent_ready(out)
    stale_stages(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{out.name}.incomplete-", dir=parent))
    except OSError as err:
        raise OutputError(
            f"cannot write in {parent} ({err.strerror}); choose a writable --out"
        ) from err
    try:
        stage.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700; the umask decides
        write_text(
            stage / INCOMPLETE, f"This {kind} into {out} did not finish; nothing here is used.\n"
        )
        write_json(stage / MARKER, {"format": FORMAT, "folder": kind, "version": 1})
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    try:
        check_room(parent, needed_bytes + EXTRA_BYTES)
        yield stage
    except BaseException as error:
        held = _held(stage)
        if not held:
            shutil.rmtree(stage, ignore_errors=True)  # nothing worth keeping
        trouble = disk_trouble(error) or disk_trouble(error.__cause__)
        if trouble is None:
            raise
        kept = (
            f"the unfinished {kind} in {stage} (it holds {_listing(held)})"
            if held
            else f"nothing of this {kind}"
        )
        earlier = f"the earlier {kind} in {out} is unchanged" if out.exists() else "--out is empty"
        raise DiskError(
            f"the {kind} stopped: {_first_clause(error)}; kept: {kept}; {earlier}; free some "
            "space or choose another --out, and run again"
        ) from error
    (stage / INCOMPLETE).unlink()
    _move_into_place(stage, out)


def _held(stage: Path) -> list[str]:
    """What a staging folder holds beside its own marks."""
    try:
        return sorted(p.name for p in stage.iterdir() if p.name not in (INCOMPLETE, MARKER))
    except OSError:
        return []


def _listing(names: list[str]) -> str:
    return ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")


def _first_clause(error: BaseException) -> str:
    """A DiskError's message up to its advice; any other error's one line."""
    text = " ".join(str(error).split())
    return text.split("; free some space")[0] if isinstance(error, DiskError) else text


def current_umask() -> int:
    """The process's umask (read by setting it and setting it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


STALE_SECONDS = 24 * 3600  # a staging folder this old belongs to a run that is long gone


def stale_stages(out: Path | str) -> list[Path]:
    """Staging folders of earlier attempts at `out` (ours: marked INCOMPLETE and MARKER)
    untouched for STALE_SECONDS. Those holding no checkpoint are removed; those holding one
    (a trained coarse model to reuse with --model) are kept and named in a warning. Returns
    the ones kept."""
    out = Path(os.path.abspath(out))
    now, kept = time.time(), []
    for stage in sorted(out.parent.glob(f"{glob.escape(out.name)}.incomplete-*")):
        marked = not stage.is_symlink() and (stage / INCOMPLETE).is_file()
        if not marked or marked_kind(stage) is None:
            continue
        try:
            age = now - stage.stat().st_mtime
        except OSError:
            continue
        if age < STALE_SECONDS:
            continue
        if any(stage.glob("*.safetensors")):
            kept.append(stage)
        else:
            shutil.rmtree(stage, ignore_errors=True)
    if kept:
        warnings.warn(
            f"{len(kept)} unfinished earlier attempt(s) at {out} older than a day hold a trained "
            f"model: {', '.join(map(str, kept))}; reuse one with --model "
            "<folder>/coarse_model.safetensors or delete them",
            stacklevel=3,
        )
    return kept


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
