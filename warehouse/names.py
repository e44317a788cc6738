"""The one check for every name that reaches a path or a SQL string.

Run ids and site names become single path components (runs/<id>.json, journal/<id>/,
tmp/<id>.rank-<n>/, data/<table>/run_id=<id>/site=<site>/) and are quoted into SQL
text, so they follow a grammar that is a safe component by construction:

    1 to 128 characters from A-Z a-z 0-9 . _ -, the first a letter or digit;
    no '..'; no '.rank-' (a tmp/ entry names its writer with it);
    not ending in a suffix the layout gives its own files (RESERVED_SUFFIXES, any case).

Dataset and role labels are data: stored in a column and passed to SQL as literals or
parameters, never as paths. Any text of 1 to 256 characters is allowed, except control,
format and line-separator characters (they would break the one-line messages and the
SQL a message suggests).
"""

from __future__ import annotations

import re
import unicodedata

from .errors import BadInput

# re.fullmatch, not match with '$': '$' also matches before a final newline.
_GRAMMAR = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
# Suffixes of the layout's own files: manifests and the marker (.json), journals (.jsonl),
# manifests set aside (.damaged), temporaries (.tmp, .wal), locks, rank markers, parts, the catalog.
RESERVED_SUFFIXES = (".json", ".jsonl", ".damaged", ".tmp", ".wal", ".lock", ".done", ".parquet", ".duckdb")
RANK_SEPARATOR = ".rank-"
MAX_LABEL = 256


def name_problem(name: object) -> str | None:
    """Why `name` is not a valid run id or site name (None when it is)."""
    if not isinstance(name, str) or not _GRAMMAR.fullmatch(name):
        return "use letters, digits, '.', '_' or '-' (at most 128 characters, starting with a letter or digit)"
    if ".." in name:
        return "'..' is not allowed in a name (names become folder names): pick another name"
    if RANK_SEPARATOR in name:
        return f"'{RANK_SEPARATOR}' is reserved for whq's temporary folders: pick another name"
    suffix = next((s for s in RESERVED_SUFFIXES if name.lower().endswith(s)), None)
    if suffix:
        return f"the suffix '{suffix}' is reserved for whq's own files: pick another name"
    return None


def is_valid_name(name: object) -> bool:
    return name_problem(name) is None


def check_name(kind: str, name: object) -> str:
    """`name` if it is a valid run id or site name; BadInput naming the rule otherwise."""
    problem = name_problem(name)
    if problem:
        raise BadInput(f"invalid {kind} {name!r}: {problem}")
    return name


def check_label(kind: str, label: object) -> str:
    """`label` if it is a valid dataset or role label; BadInput otherwise."""
    if (
        not isinstance(label, str)
        or not 1 <= len(label) <= MAX_LABEL
        or not label.strip()
        or any(unicodedata.category(c)[0] == "C" or unicodedata.category(c) in ("Zl", "Zp") for c in label)
    ):
        raise BadInput(f"invalid {kind} {label!r}: use text of 1 to {MAX_LABEL} characters without control characters")
    return label
