"""JSON from untrusted files: read with a size cap, and typed reads of the fields.

Checkpoints, adapters, prompt caches and data sets all carry JSON that a stranger may have
written.  A `null`, an array or a string where an object or a number belongs must become a
typed error that names the file and the key, never a bare TypeError deep in the code that
uses the value.  Every reader of such JSON goes through here.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import ConfigError, ModelFileError

_MISSING = object()

# JSON's own names for the types, as a user reading the file sees them.
_KINDS = {dict: "an object", list: "an array", str: "a string", bool: "true or false",
          int: "an integer", float: "a number", type(None): "null"}


def json_type(value: Any) -> str:
    """How JSON names a decoded value's type ("an object", "null", ...), for messages."""
    return _KINDS.get(type(value), type(value).__name__)


def read_json(path: str | os.PathLike, max_bytes: int, error: type[ModelFileError] = ConfigError) -> Any:
    """The decoded contents of a JSON file no larger than `max_bytes`, or `error` naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise error(path, f"is {size} bytes, more than the {max_bytes} such a file can need")
        text = path.read_bytes().decode("utf-8")
        return json.loads(text)
    except FileNotFoundError as e:
        raise error(path, "missing") from e
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(path, f"not valid JSON: {e}") from e
    except ValueError as e:  # an integer of more digits than Python converts (4300)
        raise error(path, f"not usable JSON: {e}") from e
    except RecursionError as e:
        raise error(path, "nested too deeply") from e
    except OSError as e:
        raise error(path, f"cannot be read: {e}") from e


def expect(value: Any, kind: type | tuple[type, ...], path, key: str,
           error: type[ModelFileError] = ConfigError) -> Any:
    """`value` if it is of `kind` (JSON's kinds: dict, list, str, int, float, bool), else `error`.

    An integer is a number (`float` accepts 3); true/false is never a number.
    """
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        wanted = " or ".join(_KINDS[k] for k in kinds)
        raise error(path, f"{key!r} must be {wanted}, found {json_type(value)}")
    return value


def field(obj: dict, key: str, kind: type | tuple[type, ...], path, default: Any = _MISSING,
          error: type[ModelFileError] = ConfigError, where: str = "") -> Any:
    """`obj[key]` checked to be of `kind`; `default` when absent (absent and no default: an error).

    `where` prefixes the key in messages for nested objects (`"text_config."`).
    An explicit `null` is not "absent": it fails the type check unless `kind` admits None.
    """
    if key not in obj:
        if default is _MISSING:
            raise error(path, f"{where + key!r} is missing")
        return default
    return expect(obj[key], kind, path, where + key, error)


def number_in(value: Any, kind: type, path, key: str, low: float | None = None, high: float | None = None,
              error: type[ModelFileError] = ConfigError, above: float | None = None) -> Any:
    """`value` if it is a finite number of `kind` (int or float) in [low, high] (and > `above`), else `error`.

    Sizes and scales from a file are bounded before anything is allocated or computed
    with them; NaN and infinity (which Python's JSON reader accepts) are never meaningful.
    """
    expect(value, kind, path, key, error)
    if isinstance(value, float) and not math.isfinite(value):
        raise error(path, f"{key!r} must be a finite number, found {value!r}")
    wanted = [f"> {above}" if above is not None else "", f">= {low}" if low is not None else "",
              f"<= {high}" if high is not None else ""]
    if ((above is not None and not value > above) or (low is not None and value < low)
            or (high is not None and value > high)):
        raise error(path, f"{key!r} must be {' and '.join(w for w in wanted if w)}, found {value!r}")
    return value


def all_finite(value: Any, path, error: type[ModelFileError] = ConfigError) -> Any:
    """`value` if no number anywhere inside it is NaN or infinite, else `error` naming the key.

    Python's reader takes NaN and Infinity, and turns a decimal too large for a float into
    infinity; no JSON writer can put them back, and no setting means them.
    """
    stack = [(value, "")]
    while stack:  # not recursive: the reader already allowed nesting near the recursion limit
        v, key = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise error(path, f"{key or 'the file'!r} holds {v!r}, not a finite number")
        if isinstance(v, dict):
            stack.extend((item, f"{key}.{k}" if key else k) for k, item in v.items())
        elif isinstance(v, list):
            stack.extend((item, f"{key}[{i}]") for i, item in enumerate(v))
    return value
