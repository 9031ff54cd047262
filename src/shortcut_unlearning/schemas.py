"""What the files the tool reads must hold, checked on read (core: no Qt, no torch).

Each file has one schema: a stdlib dataclass or TypedDict whose field types carry their ranges
(Annotated with pydantic's Field and Strict), validated with pydantic's TypeAdapter. A file
that breaks its schema raises InputError, whose one-line message names the file and, for each
violation, the field and what it should be. JSON is read by read_json, which refuses a file
too large or nested too deep before parsing it, and names the file when it is not JSON.

Types are strict: an int field takes no float or bool (128.0 and true are refused), a text
field no number, and floats must be finite. The schemas themselves live beside their readers
(model.ModelConfig, data.folders.DatasetInfo, bench.merge.BenchSummary, settings.OperatorSettings).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from pydantic import Field, Strict, TypeAdapter, ValidationError

# JSON files the tool reads are small (the shipped checkpoint's sidecar is 2 kB); a far larger
# one is not ours and is refused before it is parsed.
MAX_JSON_BYTES = 16 * 2**20
# The shipped checkpoint's sidecar nests 6 levels (its provenance); 64 leaves room for a user's
# own metadata and stays far below the depth where parsing or validating recursion fails.
MAX_DEPTH = 64
# Seeds are 32-bit: numpy's legacy RandomState and scikit-learn's random_state take no more,
# and torch overflows on far larger ones ("Overflow when unpacking long long").
MAX_SEED = 2**32 - 1
# Most numbers in the tool's files are counts, sizes or seeds: a whole number below this.
MAX_COUNT = 2**31 - 1

Count = Annotated[int, Strict(), Field(ge=0, le=MAX_COUNT)]
Whole = Annotated[int, Strict(), Field(ge=1, le=MAX_COUNT)]
Seed = Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)]
Float = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # ints are taken as floats
Share = Annotated[float, Strict(), Field(ge=0, le=1, allow_inf_nan=False)]
Text = Annotated[str, Strict()]
Flag = Annotated[bool, Strict()]
# The parts of the U-Net an operator or training updates (model.SCOPE_MODULES).
Scope = Literal["decoder", "head", "all"]

T = TypeVar("T")


class InputError(ValueError):
    """A file the tool reads that does not hold what it should; the message names the file,
    what is wrong and what to do."""


def read_json(path: Path | str, hint: str, error: type[InputError] = InputError) -> Any:
    """The JSON value in the file at `path`, once it is at most MAX_JSON_BYTES of UTF-8 text
    nested at most MAX_DEPTH deep; `error` (an InputError) naming the file otherwise (`hint`
    says what to do). A missing file raises FileNotFoundError."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise error(
            f"{path} is {size / 2**20:.0f} MiB, but the JSON files this tool reads are at most "
            f"{MAX_JSON_BYTES // 2**20} MiB; {hint}"
        )
    text = decode_text(path.read_bytes(), path, hint, error)
    depth = nesting_depth(text)
    if depth > MAX_DEPTH:
        raise error(
            f"{path} nests {depth} levels deep, but the JSON files this tool reads nest at most "
            f"{MAX_DEPTH}; {hint}"
        )
    try:
        return json.loads(text)
    except json.JSONDecodeError as broken:
        raise error(
            f"{path} is not valid JSON ({broken.msg} at line {broken.lineno} column "
            f"{broken.colno}); {hint}"
        ) from broken
    except RecursionError as deep:  # unreachable below MAX_DEPTH; kept as the last guard
        raise error(f"{path} nests too deep to read; {hint}") from deep


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def nesting_depth(text: str) -> int:
    """How deep the arrays and objects of a JSON text nest, counted without parsing it
    (brackets inside strings aside), so no recursion ever runs on a hostile file."""
    codes = np.frombuffer(_STRING.sub("", text).encode("utf-8"), np.uint8)
    steps = _BRACKET_STEP[codes]
    steps = steps[steps != 0]
    return int(np.cumsum(steps, dtype=np.int64).max(initial=0))


_BRACKET_STEP = np.zeros(256, np.int8)
_BRACKET_STEP[[ord("["), ord("{")]] = 1
_BRACKET_STEP[[ord("]"), ord("}")]] = -1


def decode_text(
    data: bytes, path: Path | str, hint: str, error: type[InputError] = InputError
) -> str:
    """`data` as UTF-8 text (a leading byte-order mark dropped); `error` naming the file, the
    line and the byte otherwise."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as wrong:
        line = data[: wrong.start].count(b"\n") + 1
        byte = data[wrong.start]
        raise error(
            f"{path} is not UTF-8 text: byte 0x{byte:02x} on line {line} is not UTF-8 (the file "
            "is perhaps Latin-1 or Windows-1252, as some spreadsheet programs save CSV); save "
            f"it as UTF-8 (in Excel: 'CSV UTF-8'); {hint}"
        ) from wrong


def check_header(
    info: Any,
    path: Path | str,
    fmt: str,
    version: int,
    what: str,
    fix: str,
    error: type[InputError] = InputError,
) -> dict:
    """`info` once it is a JSON object naming format `fmt` at `version`; else `error` saying
    the file is not `what`, or to update the tool for a newer version (`fix` otherwise)."""
    if not isinstance(info, dict) or info.get("format") != fmt:
        raise error(f"{path} is not {what} (a JSON object with format {fmt!r}); {fix}")
    found = info.get("version")
    if found != version or type(found) is not int:
        newer = type(found) is int and found > version
        raise error(
            f"{path} has version {found!r}, but this tool reads version {version}; "
            + ("update shortcut-unlearning" if newer else fix)
        )
    return info


@cache
def _adapter(schema) -> TypeAdapter:
    return TypeAdapter(schema)


def validate(
    schema: type[T],
    value: Any,
    source: Path | str,
    hint: str,
    row: bool = False,
    error: type[InputError] = InputError,
) -> T:
    """`value` as a `schema` record, once it keeps the schema; else `error` (an InputError)
    whose message names `source` (the file, or a file and line) and each violation on one
    line. With `row` the value is a CSV row: fields are named as columns, a missing cell as a
    short row."""
    try:
        return _adapter(schema).validate_python(value)
    except ValidationError as broken:
        raise error(f"{source}: {violations(broken, row)}; {hint}") from None


def violations(error: ValidationError, row: bool = False, shown: int = 6) -> str:
    """Each violation of `error` as 'field should be ... (it is ...)', joined by '; '."""
    found = [_violation(e, row) for e in error.errors(include_url=False)]
    more = len(found) - shown
    return "; ".join(found[:shown]) + (f"; and {more} more" if more > 0 else "")


def _violation(error: dict, row: bool) -> str:
    path = [str(part) for part in error["loc"] if not _is_variant(part)]
    field = (f"column {path[-1]!r}" if row else ".".join(path)) if path else "the whole"
    kind, message, value = error["type"], error["msg"], error.get("input")
    if kind in ("missing", "missing_keyword_argument", "missing_argument"):
        return f"{field} is missing"
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"{field} is not a known field"
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
        return message if not path or message.startswith(path[-1]) else f"{field}: {message}"
    for pydantic_words, ours in PLAIN_WORDS:
        message = message.replace(pydantic_words, ours)
    shown = "nothing: the row is short" if row and value is None else _shown(value)
    message = message.removeprefix("Input ").removeprefix("String ")
    return f"{field} {message} (it is {shown})"


def _is_variant(part) -> bool:
    """Pydantic names the member of a union it tried in the location; the user needs none."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def _shown(value) -> str:
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Pydantic's words for JSON's types, in JSON's words.
PLAIN_WORDS = (
    ("a valid dictionary", "a JSON object"),
    ("a dictionary or an instance of", "a JSON object describing a"),
    ("a valid list", "a JSON list"),
    ("a valid tuple", "a JSON list"),
    ("a valid integer", "a whole number"),
    ("a valid number", "a number"),
    ("a valid string", "text"),
    ("a valid boolean", "true or false"),
)
