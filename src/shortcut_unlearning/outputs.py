"""Output folders and checkpoints that are never half-written and never mixed with older ones.

A run is written into a staging folder beside its --out folder, named `<out>.incomplete-<random>`
and holding an INCOMPLETE file (files.staged_folder); the folder is moved into place only when the
run completes (metrics.json is its last file). A run that is killed or fails leaves its staging
folder (with INCOMPLETE, so nothing reads it as finished) when it holds anything worth keeping,
such as a trained coarse model; an empty one is removed. --overwrite replaces only an earlier
run's folder (one holding the marker files.MARKER that names it a run), as a whole. Both
kinds of output are checked before any work: a file where a folder is expected, an earlier
result without --overwrite, a folder that cannot be written or a disk without room for the
checkpoints fail at once.
"""

from __future__ import annotations

import os
from pathlib import Path

import segmentation_models_pytorch as smp
import torch

from .files import OutputError, check_room, parent_ready, staged_folder
from .model import Model, ModelConfig, check_encoder, checkpoint_paths

__all__ = ["OutputError", "check_checkpoint_target", "save_checkpoint", "staged_folder"]


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
    parent = parent_ready(weights)
    if not os.access(parent, os.W_OK | os.X_OK):
        read_only = hasattr(os, "statvfs") and os.statvfs(parent).f_flag & os.ST_RDONLY
        why = "the file system is read-only" if read_only else "permission denied"
        raise OutputError(f"cannot write in {parent} ({why}); choose another --out")
    check_room(parent, needed_bytes)
    return weights, sidecar


def save_checkpoint(model: Model, path: Path | str) -> Path:
    """model.save(path): both files written beside the target first and then renamed into
    place (files.write_files), so a failed write never leaves a checkpoint whose weights and
    config disagree."""
    return model.save(path)


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
