"""The settings of an unlearning operator (shared by `run`, the Workbench and the plugin's
remembered settings) and where the plugin's files live (user folders, no Qt).

SHORTCUT_UNLEARNING_HOME moves them all (tests use it); otherwise the platform's user config,
data and cache folders are used. SHORTCUT_UNLEARNING_CACHE moves the cache of decoded dataset
folders alone (it grows to several GB for a full ISIC set), or turns it off with "off".
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import platformdirs
from pydantic import AfterValidator, Field, Strict

from .files import write_json
from .schemas import InputError, Scope, Seed, Whole, read_json, validate

if TYPE_CHECKING:
    from .unlearning import Operator

APP = "shortcut-unlearning"


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


def use_scripted_home() -> None:
    """Scripted GUI runs keep their settings and autosaves in a folder of their own, so the
    user's next session neither restores a demo's edits nor inherits a benchmark's steps."""
    import tempfile

    if not os.environ.get("SHORTCUT_UNLEARNING_HOME"):
        os.environ["SHORTCUT_UNLEARNING_HOME"] = tempfile.mkdtemp(prefix="shortcut-unlearning-")


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


@dataclass(frozen=True)
class OperatorSettings:
    """An unlearning operator as a person chooses it, and the device it runs on.

    Its defaults are the operators' (unlearning/ reads them from here), and `steps_field` is
    the rule for which steps setting a method reads: the plugin remembers both apart. The field
    types are the schema of the plugin's settings file (widget.json), checked on read.
    """

    method: Annotated[str, Strict(), AfterValidator(_operator)] = "relearn"
    scope: Scope | None = "decoder"  # None: the model's
    epsilon: Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)] = 1.0
    delta: Annotated[float, Strict(), Field(gt=0, lt=1)] = 1e-5
    steps: Whole = 60
    # The operators that end in a relearning: at most this many steps, stopped on held-out
    # images (for the certified ones, the noise-free recovery: finetune_steps).
    relearn_steps: Whole = 400
    device: Annotated[str, Strict(), AfterValidator(_device)] = "auto"
    seed: Seed = 0
    # The project's context term (docs/method.md, "The context term"); off: the paper's.
    context: Annotated[str, Strict(), AfterValidator(_context_term)] = "off"

    @staticmethod
    def steps_field(method: str) -> str:
        """The field that holds the steps of operator `method` (imports the registry)."""
        from .unlearning import RELEARNING

        return "relearn_steps" if method in RELEARNING else "steps"

    def with_steps(self, steps: int) -> OperatorSettings:
        """These settings with `steps` in the field the method reads."""
        return replace(self, **{self.steps_field(self.method): steps})

    def operator(self, **options) -> Operator:
        """The operator these settings name (unlearning.make_operator); `options` are further
        fields of the operator and override these settings."""
        from .unlearning import CERTIFIED, make_operator

        chosen = {"seed": self.seed, "scope": self.scope, "context": self.context}
        if self.method in CERTIFIED:
            chosen |= {"epsilon": self.epsilon, "delta": self.delta}
        steps = getattr(self, self.steps_field(self.method))
        return make_operator(self.method, **{"steps": steps, **chosen, **options})


def load_settings() -> OperatorSettings:
    """The saved settings over the defaults. A value that breaks the OperatorSettings schema,
    or a file that is not a JSON object, is dropped with a warning naming the file and the
    field; the plugin then starts from the defaults for those."""
    path = settings_file()
    if not path.is_file():
        return OperatorSettings()
    fix = "those parameters start from their defaults; set them again in the dock"
    saved = None
    try:
        saved = read_json(path, fix)
        if not isinstance(saved, dict):
            raise InputError(f"{path} should hold a JSON object; {fix}")
        return validate(OperatorSettings, saved, path, fix)
    except InputError as error:
        warnings.warn(str(error), stacklevel=2)
        kept = _valid_part(saved) if isinstance(saved, dict) else {}
    except OSError as error:
        warnings.warn(f"cannot read {path} ({error.strerror}); {fix}", stacklevel=2)
        kept = {}
    return replace(OperatorSettings(), **kept)


def _valid_part(saved: dict) -> dict:
    """The entries of `saved` that keep the OperatorSettings schema one by one."""
    kept = {}
    for key in {f.name for f in fields(OperatorSettings)} & set(saved):
        try:
            kept[key] = getattr(validate(OperatorSettings, {key: saved[key]}, "", ""), key)
        except InputError:
            continue
    return kept


def save_settings(settings: OperatorSettings) -> Path:
    path = settings_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, asdict(settings), replace=True)
    return path
