"""Output folders and checkpoints that are never half-written and never mixed with older ones.

A run is written into a staging folder beside its --out folder, named `<out>.incomplete-<random>`
and holding an INCOMPLETE marker; the folder is moved into place only when the run completes
(metrics.json is its last file). A run that is killed or fails leaves its staging folder (with
the marker, so nothing reads it as finished) when it holds anything worth keeping, such as a
trained coarse model; an empty one is removed. --overwrite replaces only an earlier run's folder
(one with a metrics.json), as a whole. Both kinds of output are checked before any work: a file
where a folder is expected, an earlier result without --overwrite, a folder that cannot be
written or a disk without room for the checkpoints fail at once.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import segmentation_models_pytorch as smp
import torch

from .model import Model, ModelConfig, check_encoder, checkpoint_paths

INCOMPLETE = "INCOMPLETE"
# Room a run needs besides its checkpoints: pictures, metrics and slack.
EXTRA_BYTES = 32 * 2**20


class OutputError(ValueError):
    """An output that cannot be written as asked; the message says what to do."""


def _parent_ready(target: Path) -> Path:
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


def _check_room(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OutputError(
            f"only {free / 2**20:.0f} MiB are free in {folder} but the output needs about "
            f"{needed / 2**20:.0f} MiB; free some space or choose another --out"
        )


def check_run_folder(out: Path | str, overwrite: bool = False) -> None:
    """Refuse a run folder that names a file, or that holds something unless `overwrite`
    is given and it holds an earlier run (its metrics.json): nothing else is ever replaced."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; name a folder for the run's results")
    held = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if not held:
        return
    listing = f"{', '.join(held[:3])}{', ...' if len(held) > 3 else ''}"
    if not overwrite:
        raise OutputError(
            f"--out {out} is not empty (it holds {listing}); choose a new folder or pass "
            "--overwrite to replace the earlier run"
        )
    if "metrics.json" not in held:
        raise OutputError(
            f"--out {out} holds {listing} but no metrics.json, so it is not an earlier run's "
            "folder and --overwrite will not replace it; choose another folder"
        )


@contextmanager
def staged_folder(
    out: Path | str, overwrite: bool = False, needed_bytes: int = 0
) -> Iterator[Path]:
    """A staging folder to write a run into; moved to `out` when the block completes.

    `out` is checked first (see check_run_folder), then the staging folder is made beside it,
    which proves the place writable, and the free space is checked against `needed_bytes`.
    """
    check_run_folder(out, overwrite)
    out = Path(os.path.abspath(out))  # "." and "a/.." become names that can be renamed
    parent = _parent_ready(out)
    try:
        stage = Path(tempfile.mkdtemp(prefix=f"{out.name}.incomplete-", dir=parent))
    except OSError as err:
        raise OutputError(
            f"cannot write in {parent} ({err.strerror}); choose a writable --out"
        ) from err
    (stage / INCOMPLETE).write_text(
        f"This run into {out} did not finish; nothing here is a result.\n"
    )
    try:
        _check_room(parent, needed_bytes + EXTRA_BYTES)
        yield stage
    except BaseException:
        if {p.name for p in stage.iterdir()} == {INCOMPLETE}:
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
    out.rename(old)  # until the next line, the earlier run is kept under this name
    stage.rename(out)
    shutil.rmtree(old)


def check_checkpoint_target(path: Path | str, overwrite: bool = False, needed_bytes: int = 0):
    """Refuse before training a checkpoint path that exists (unless `overwrite`), is a
    folder, or lies where nothing can be written; returns (weights, config) paths."""
    if Path(path).is_dir():
        raise OutputError(f"--out {path} is a folder; name the checkpoint, e.g. {path}/model")
    weights, sidecar = checkpoint_paths(path)
    for target in (weights, sidecar):
        if target.is_dir():
            raise OutputError(f"{target} is a folder; name a checkpoint file with --out")
        if target.exists() and not overwrite:
            raise OutputError(
                f"{target} already exists; choose another --out or pass --overwrite to replace it"
            )
    parent = _parent_ready(weights)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write in {parent} (permission denied); choose another --out")
    _check_room(parent, needed_bytes)
    return weights, sidecar


def save_checkpoint(model: Model, path: Path | str) -> Path:
    """model.save(path) written beside the target first and then renamed into place, so a
    failed write never leaves a checkpoint whose weights and config disagree."""
    weights, sidecar = checkpoint_paths(path)
    with tempfile.TemporaryDirectory(prefix=f".{weights.stem}.", dir=weights.parent) as tmp:
        staged, staged_sidecar = checkpoint_paths(model.save(Path(tmp) / weights.stem))
        os.replace(staged, weights)
        os.replace(staged_sidecar, sidecar)
    return weights


def checkpoint_bytes(config: ModelConfig) -> int:
    """Bytes a checkpoint of a model with `config` takes on disk (its weights; the JSON is
    small), counted on torch's meta device without allocating them."""
    check_encoder(config.encoder)
    with torch.device("meta"):
        net = smp.Unet(
            config.encoder,
            encoder_weights=None,
            classes=config.classes,
            decoder_channels=config.decoder_channels,
        )
    return sum(t.numel() * t.element_size() for t in net.state_dict().values())
