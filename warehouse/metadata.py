"""Shape checks for every metadata file whq reads back from a warehouse folder.

Run manifests, the format marker, quarantine.json and a run's journal are JSON that
anything may have overwritten: `{}`, `null`, `{"parts": 5}`, garbage bytes, a folder
where the file belongs. Each is read here and checked by a small hand-written shape
check, so a bad one is one DamagedMetadata line naming the file and the fix, never a
KeyError inside a command. `whq repair` (warehouse/maintenance.py) recovers from any of
them: it sets aside what it cannot read and rebuilds the rest.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path, PurePosixPath

from . import schema
from .errors import DamagedMetadata, NotAWarehouse
from .layout import FORMAT_VERSION, Layout
from .names import is_valid_name

_SHA256 = re.compile(r"[0-9a-f]{64}")
_STATE_FILE = re.compile(r"[0-9]{6}-[A-Za-z0-9_.\-]+\.parquet")


class Shape(ValueError):
    """What is wrong with a file's content (becomes the detail of DamagedMetadata)."""


def read_json(path: Path):
    """The JSON value in `path`; Shape when it is not a readable UTF-8 JSON file."""
    if not path.is_file():
        raise Shape("not a file")
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise Shape("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise Shape(f"not JSON: {err.msg} at line {err.lineno}") from None
    except RecursionError:
        raise Shape("JSON nested too deeply") from None
    except OSError as err:
        raise Shape(f"unreadable: {err.strerror or err}") from None


def _field(record, key: str, kind, what: str):
    if not isinstance(record, dict):
        raise Shape(f"{what} is not a JSON object")
    value = record.get(key)
    # bool is an int subclass: a `true` count or version is as wrong as a string one.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise Shape(f"{what} has no valid {key!r}")
    return value


def check_part(part, run_id: str) -> dict:
    """One part entry of a manifest or journal line: its file lies in the run's own folder."""
    table = _field(part, "table", str, "a part")
    if table not in schema.tables():
        raise Shape(f"a part names unknown table {table!r}")
    path = PurePosixPath(_field(part, "path", str, "a part"))
    if (
        path.is_absolute()
        or ".." in path.parts
        or path.parts[:3] != ("data", table, f"run_id={run_id}")
        or path.suffix != ".parquet"
    ):
        raise Shape(f"part path {str(path)!r} is not a part of run {run_id!r}")
    for key in ("rows", "bytes"):
        if _field(part, key, int, "a part") < 0:
            raise Shape(f"a part has a negative {key!r}")
    if not _SHA256.fullmatch(_field(part, "sha256", str, "a part")):
        raise Shape("a part has no valid 'sha256'")
    return part


def check_manifest(manifest, run_id: str) -> dict:
    if _field(manifest, "run_id", str, "the manifest") != run_id:
        raise Shape(f"it names run {manifest['run_id']!r}, not {run_id!r}")
    _field(manifest, "config", dict, "the manifest")
    rows = _field(manifest, "rows", dict, "the manifest")
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in rows.values()):
        raise Shape("its 'rows' are not counts")
    for part in _field(manifest, "parts", list, "the manifest"):
        check_part(part, run_id)
    return manifest


def manifest(layout: Layout, path: Path) -> dict:
    """The manifest at runs/<run_id>.json, checked; DamagedMetadata naming `whq repair` otherwise."""
    try:
        if not is_valid_name(path.stem):
            raise Shape(f"{path.stem!r} is not a valid run id")
        return check_manifest(read_json(path), path.stem)
    except Shape as what:
        raise DamagedMetadata(
            f"manifest {path} is damaged ({what}): run `whq repair {layout.root}` to set it aside "
            f"(the other runs stay queryable)",
            str(what),
        ) from None


def quarantine(layout: Layout) -> set[str]:
    """The run ids in quarantine.json (none when it is absent)."""
    if not layout.quarantine.exists() and not layout.quarantine.is_symlink():
        return set()
    try:
        runs = read_json(layout.quarantine)
        if not isinstance(runs, list) or not all(is_valid_name(r) for r in runs):
            raise Shape("not a list of run ids")
    except Shape as what:
        raise DamagedMetadata(
            f"{layout.quarantine} is damaged ({what}): run `whq repair {layout.root}` to rebuild it "
            f"(repair checks every run again)",
            str(what),
        ) from None
    return set(runs)


def format_version(layout: Layout) -> int:
    """The marker's format version; NotAWarehouse when it is newer than this whq reads."""
    try:
        version = _field(read_json(layout.marker), "format_version", int, "the marker")
        if version < 1:
            raise Shape(f"format version {version} is not a version")
    except Shape as what:
        raise DamagedMetadata(
            f"{layout.marker} is damaged ({what}): restore it, or rewrite it with `whq repair {layout.root}`"
        ) from None
    if version > FORMAT_VERSION:
        raise NotAWarehouse(
            f"{layout.root} has format version {version}, newer than this whq reads "
            f"({FORMAT_VERSION}): upgrade whq (pip install -U whq)"
        )
    return version


def catalog_file(layout: Layout) -> None:
    """DamagedMetadata when something other than a file (a folder) sits where the catalog belongs."""
    if (layout.catalog.exists() or layout.catalog.is_symlink()) and not layout.catalog.is_file():
        raise DamagedMetadata(
            f"{layout.catalog} is not a file: move it away (whq regenerates the catalog), "
            f"or run `whq repair {layout.root}` to set it aside"
        )


def _interrupted(layout: Layout, path: Path, what) -> DamagedMetadata:
    return DamagedMetadata(
        f"{path} is damaged ({what}): discard the interrupted run with "
        f"`whq gc {layout.root} --interrupted`, then ingest it again"
    )


def journal_config(layout: Layout, path: Path) -> dict:
    """An interrupted run's saved config.json (the arguments --resume must repeat)."""
    try:
        config = read_json(path)
        dt.datetime.fromisoformat(_field(config, "started_at", str, "the saved config"))
    except ValueError as what:  # a Shape, or a start time that is not one
        raise _interrupted(layout, path, what) from None
    return config


def journal_record(line: str, shard: int, run_id: str) -> dict | None:
    """One journal line, or None when it is torn or not the next shard's record (the shard did not complete)."""
    try:
        record = json.loads(line)
        if _field(record, "shard", int, "a journal line") != shard:
            return None
        for part in _field(record, "parts", list, "a journal line"):
            check_part(part, run_id)
        state = _field(record, "state", dict, "a journal line")
        if not all(isinstance(f, str) and _STATE_FILE.fullmatch(f) and ".." not in f for f in state.values()):
            return None
        _field(record, "info", dict, "a journal line")
    except (ValueError, RecursionError):  # Shape is a ValueError, as is a torn line's JSONDecodeError
        return None
    return record
