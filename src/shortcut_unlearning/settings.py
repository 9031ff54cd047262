"""The plugin's remembered parameters and where its files live (user folders, no Qt).

SHORTCUT_UNLEARNING_HOME moves them all (tests use it); otherwise the platform's user config,
data and cache folders are used. SHORTCUT_UNLEARNING_CACHE moves the cache of decoded dataset
folders alone (it grows to several GB for a full ISIC set), or turns it off with "off".
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import platformdirs

from .files import write_text

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


def exports_folder() -> Path:
    """Where the plugin offers to export runs: the user data folder, never the package."""
    return _home("data") / "exports"


def load_settings() -> dict:
    """The saved parameters over the defaults; unknown keys and wrong types are dropped."""
    try:
        saved = json.loads(settings_file().read_text())
    except (OSError, ValueError):
        return dict(DEFAULTS)
    if not isinstance(saved, dict):
        return dict(DEFAULTS)
    # Text stays text and numbers stay numbers; anything else is a damaged file's leftover.
    kept = {
        k: v
        for k, v in saved.items()
        if k in DEFAULTS
        and isinstance(v, str) == isinstance(DEFAULTS[k], str)
        and isinstance(v, str | int | float)
        and not isinstance(v, bool)
    }
    return {**DEFAULTS, **kept}


def save_settings(values: dict) -> Path:
    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = {k: values[k] for k in DEFAULTS if k in values}
    write_text(path, json.dumps(kept, indent=2), replace=True)
    return path
