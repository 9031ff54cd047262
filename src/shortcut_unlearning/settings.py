"""The plugin's remembered parameters and where its files live (user folders, no Qt).

SHORTCUT_UNLEARNING_HOME moves them all (tests use it); otherwise the platform's user config,
data and cache folders are used. SHORTCUT_UNLEARNING_CACHE moves the cache of decoded dataset
folders alone (it grows to several GB for a full ISIC set), or turns it off with "off".
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Annotated, Literal

import platformdirs
from pydantic import AfterValidator, ConfigDict, Field, Strict, with_config
from typing_extensions import TypedDict

from .files import write_json
from .schemas import InputError, Seed, Whole, read_json, validate

APP = "shortcut-unlearning"
DEFAULTS = {
    "method": "relearn",
    "scope": "decoder",
    "epsilon": 1.0,
    "delta": 1e-5,
    "steps": 60,
    "relearn_steps": 400,  # the certified methods' noise-free recovery (finetune_steps)
    "device": "auto",
    "seed": 0,
    "context": "off",  # the project's context term (docs/method.md section 10); off: the paper's
}


def _home(kind: str) -> Path:
    base = os.environ.get("SHORTCUT_UNLEARNING_HOME")
    if base:
        return Path(base) / kind
    if kind == "config":
        return Path(platformdirs.user_config_dir(APP))
    if kind == "cache":
        return Path(platformdirs.user_cache_dir(APP))
    if kind == "log":
        return Path(platformdirs.user_log_dir(APP))
    return Path(platformdirs.user_data_dir(APP))


def settings_file() -> Path:
    return _home("config") / "widget.json"


def autosave_folder() -> Path:
    """Where refined masks are autosaved, keyed by their coarse stack."""
    return _home("data") / "autosave"


def cache_folder() -> Path | None:
    """Where decoded dataset folders are cached (None: caching turned off)."""
    chosen = os.environ.get("SHORTCUT_UNLEARNING_CACHE", "")
    if chosen.lower() in ("off", "0", "no", "false"):
        return None
    return Path(chosen).expanduser() if chosen else _home("cache")


def log_folder() -> Path:
    """Where the command line writes the traceback of an unexpected error."""
    return _home("log")


def exports_folder() -> Path:
    """Where the plugin offers to export runs: the user data folder, never the package."""
    return _home("data") / "exports"


def _operator(name: str) -> str:
    from .unlearning import OPERATORS  # torch: imported when a settings file is read

    if name not in OPERATORS:
        raise ValueError(f"method {name!r} is not one of {sorted(OPERATORS)}")
    return name


def _context_term(name: str) -> str:
    from .unlearning.context import CONTEXT_TERMS

    if name not in CONTEXT_TERMS:
        raise ValueError(f"context {name!r} is not one of {list(CONTEXT_TERMS)}")
    return name


def _device(name: str) -> str:
    kind, _, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda", "mps") or (
        index and not (kind == "cuda" and index.isdigit())
    ):
        raise ValueError(f"device {name!r} is not auto, cpu, cuda, cuda:N or mps")
    return name


@with_config(ConfigDict(extra="ignore"))
class Settings(TypedDict, total=False):
    """The schema of the settings file (widget.json): each remembered parameter's type and
    range. A value that breaks it is dropped, with a warning, and its default used."""

    method: Annotated[str, Strict(), AfterValidator(_operator)]
    scope: Literal["decoder", "head", "all"]
    epsilon: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
    delta: Annotated[float, Strict(), Field(gt=0, lt=1)]
    steps: Whole
    relearn_steps: Whole
    device: Annotated[str, Strict(), AfterValidator(_device)]
    seed: Seed
    context: Annotated[str, Strict(), AfterValidator(_context_term)]


def load_settings() -> dict:
    """The saved parameters over the defaults. A value that breaks the Settings schema, or a
    file that is not a JSON object, is dropped with a warning naming the file and the field;
    the plugin then starts from the defaults for those."""
    path = settings_file()
    if not path.is_file():
        return dict(DEFAULTS)
    fix = "those parameters start from their defaults; set them again in the dock"
    saved = None
    try:
        saved = read_json(path, fix)
        if not isinstance(saved, dict):
            raise InputError(f"{path} should hold a JSON object; {fix}")
        kept = validate(Settings, saved, path, fix)
    except InputError as error:
        warnings.warn(str(error), stacklevel=2)
        kept = _valid_part(saved) if isinstance(saved, dict) else {}
    except OSError as error:
        warnings.warn(f"cannot read {path} ({error.strerror}); {fix}", stacklevel=2)
        kept = {}
    return {**DEFAULTS, **{k: v for k, v in kept.items() if k in DEFAULTS}}


def _valid_part(saved: dict) -> dict:
    """The entries of `saved` that keep the Settings schema one by one."""
    kept = {}
    for key, value in saved.items():
        try:
            kept.update(validate(Settings, {key: value}, "", ""))
        except InputError:
            continue
    return kept


def save_settings(values: dict) -> Path:
    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {k: values[k] for k in DEFAULTS if k in values}
    write_json(path, kept, replace=True)
    return path
