"""The one JSON writer: every JSON text whq writes (files, `--format json`, pages) is strict JSON.

Python's json writes NaN and infinities as the tokens NaN, Infinity and -Infinity, which are
not JSON: a strict parser (JavaScript's JSON.parse, jq, Go, Rust's serde) refuses the whole
file. whq writes them as null, the one JSON value that says "no number" (docs/output-format.md):
a statistic of a unit that never fired, an unbounded range. Values JSON has no type for are
written as text: dates and times in ISO 8601, Decimals, bytes as hex, anything else as str().

JSON embedded in an HTML <script> element is written by script_json, which also escapes
'<', '>' and '&', so no label or text can end the element early ('</script>') or open a
comment ('<!--'), whatever it holds.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
from collections.abc import Mapping
from pathlib import Path

_HTML_UNSAFE = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def plain(value: object) -> object:
    """`value` as the types JSON holds: non-finite floats become None, other types text or lists."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {_key(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value).hex()
    if isinstance(value, decimal.Decimal):
        return str(value) if value.is_finite() else None
    tolist = getattr(value, "tolist", None)  # numpy scalars and arrays, Arrow and Polars values
    if callable(tolist):
        return plain(tolist())
    return str(value)


def _key(key: object) -> str:
    return key if isinstance(key, str) else json.dumps(plain(key)).strip('"')


def dumps(
    value: object, *, indent: int | None = None, sort_keys: bool = False, compact: bool = False, ascii: bool = True
) -> str:
    """Strict JSON text of `value` (see the module docstring for what is converted); `ascii`: escape
    every non-ASCII character, else write it as UTF-8 text (control characters are escaped either way)."""
    separators = (",", ":") if compact else None
    return json.dumps(
        plain(value), indent=indent, sort_keys=sort_keys, separators=separators, allow_nan=False, ensure_ascii=ascii
    )


def write(path: str | Path, value: object, *, indent: int | None = None, sort_keys: bool = False) -> Path:
    """Write `value` as strict JSON (UTF-8, one final newline) to `path`."""
    path = Path(path)
    path.write_text(dumps(value, indent=indent, sort_keys=sort_keys) + "\n", encoding="utf-8")
    return path


def script_json(value: object) -> str:
    """Strict JSON safe inside an HTML <script> element: no '<', '>', '&' or line separators in the text."""
    text = dumps(value)
    for char, escaped in _HTML_UNSAFE.items():
        text = text.replace(char, escaped)
    return text
