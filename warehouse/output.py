"""The one check for every path a user names for whq to write (--out, --csv, SQL's COPY TO, ...).

A warehouse folder changes only through whq: a report written over runs/<id>.json would
replace a run's manifest, and the run would be gone. So nothing is written inside a
warehouse folder (any folder holding a whq.json marker, or one of the `roots` given) by a
user-named path: not by `whq report`, `whq export`, `whq nag`, nor trusted `whq sql`
(which alone may be let through with --allow-writes).

An output of the wrong kind is one line naming the fix, not an OSError: an existing folder
where a file is wanted, a file where a folder is wanted, a parent that is a file. A folder
output (a site export, a features export, CSVs) that already holds files whq did not write is
refused rather than silently overwritten: whq marks each folder it writes (output_folder) with EXPORT_MARKER,
and writes again only into an empty folder or one it marked.

Writing a file truncates it in place, so a link reaches whatever it leads to: a symlink or a
second hard link to runs/<id>.json, dropped into an export folder whq marked, would have the
export's index.html written over the manifest. whq makes no links, so an output file with
other hard links, or a link inside a folder it would write again, is refused.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path

from . import jsonio
from .errors import BadInput, NotAWarehouse
from .layout import MARKER

EXPORT_MARKER = ".whq-export"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")


def _resolved(text: str | Path) -> Path | None:
    try:
        return Path(os.path.expanduser(str(text))).resolve()
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL byte
        return None


def enclosing_warehouse(text: str | Path, roots: tuple[Path, ...] = ()) -> Path | None:
    """The warehouse folder that path `text` lies in (or is), None when it lies in none.

    A warehouse folder is one of `roots` or any folder holding the whq.json marker; the path
    is resolved as the OS would open it (symlinks followed, relative to the working folder).
    URLs and DuckDB's ':memory:' are no paths.
    """
    text = str(text)
    if not text or text == ":memory:" or _URL.match(text):
        return None
    path = _resolved(text)
    if path is None:
        return None
    resolved_roots = {r for r in (_resolved(root) for root in roots) if r is not None}
    for folder in (path, *path.parents):
        if folder in resolved_roots or (folder / MARKER).is_file():
            return folder
    return None


def refusal(who: str, text: str | Path, warehouse: Path, fix: str = "write elsewhere") -> str:
    """The one message for a write into a warehouse folder."""
    return f"{who} refuses writing {str(text)!r}, inside the warehouse {warehouse}: its files change only through whq; {fix}"


def _outside_warehouse(path: Path, option: str) -> None:
    warehouse = enclosing_warehouse(path)
    if warehouse is not None:
        raise BadInput(refusal("whq", path, warehouse, f"give {option} a path outside it"))


def check_new_warehouse(root: str | Path) -> None:
    """A new warehouse is a user-named output too: never inside another warehouse's folder."""
    warehouse = enclosing_warehouse(Path(root).resolve().parent)
    if warehouse is not None:
        raise BadInput(refusal("whq", root, warehouse, "create the new warehouse outside it"))


def _parent_problem(path: Path, option: str) -> None:
    """A parent of `path` that exists but is not a folder."""
    for parent in path.parents:
        try:
            info = parent.stat()
        except (FileNotFoundError, NotADirectoryError):  # missing, or below a file: look further up
            continue
        except OSError as err:
            raise BadInput(
                f"{option} {path}: {parent} cannot be opened ({err.strerror or err}): pick another path"
            ) from None
        if not stat.S_ISDIR(info.st_mode):
            raise BadInput(f"{option} {path}: {parent} is a file, not a folder: pick another path")
        return


def _existing_output(path: Path, option: str) -> os.stat_result | None:
    """The stat of output `path` once it is known to lie outside every warehouse under a folder
    (None: it does not exist yet, and whq creates it)."""
    _outside_warehouse(path, option)
    _parent_problem(path, option)
    try:
        return path.stat()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise BadInput(f"{option} {path} cannot be opened ({err.strerror or err}): pick another path") from None


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """`path` as a file whq may write (its missing parent folders are created by ensure_parent)."""
    path = Path(path)
    info = _existing_output(path, option)
    if info is None:
        return path
    if stat.S_ISDIR(info.st_mode):
        raise BadInput(f"{option} {path} is a folder: name a file in it, e.g. {path / 'out'}{path.suffix}")
    if not stat.S_ISREG(info.st_mode):
        raise BadInput(f"{option} {path} is not a regular file: name a file")
    if info.st_nlink > 1:
        raise BadInput(
            f"{option} {path} has {info.st_nlink} hard links, and writing it would change the file under its "
            "other names too: remove it first, or name another file"
        )
    return path


def _foreign_link(folder: Path) -> Path | None:
    """The first symlink, or file with other hard links, below `folder` (whq's exports make neither)."""
    for parent, dirs, files in os.walk(folder):
        for name in [*dirs, *files]:
            entry = Path(parent) / name
            info = entry.lstat()
            if stat.S_ISLNK(info.st_mode) or (stat.S_ISREG(info.st_mode) and info.st_nlink > 1):
                return entry
    return None


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """`path` as a folder whq may write into: new, empty, or written by whq before."""
    path = Path(path)
    info = _existing_output(path, option)
    if info is None:
        return path
    if not stat.S_ISDIR(info.st_mode):
        raise BadInput(f"{option} {path} is a file, not a folder: name a new or empty folder")
    if not (path / EXPORT_MARKER).is_file() and any(path.iterdir()):
        raise BadInput(
            f"{option} {path} holds files whq did not write: name a new or empty folder, or remove them first"
        )
    if (link := _foreign_link(path)) is not None:
        raise BadInput(
            f"{option} {path} holds {link}, a link whq did not make, and writing through it would change the "
            "file it leads to: remove it first, or name a new or empty folder"
        )
    return path


def ensure_parent(path: str | Path, option: str = "--out") -> Path:
    """Create the missing parent folders of output file `path` (checked by check_output_file)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise BadInput(
            f"{option} {path}: cannot create its folder ({err.strerror or err}): pick another path"
        ) from None
    return path


@contextlib.contextmanager
def output_folder(path: str | Path, what: str, option: str = "--out") -> Iterator[Path]:
    """Check folder `path` (check_output_folder), create it and mark it as whq's for the block.

    A block that fails in a folder it created leaves no empty folder behind.
    """
    path = check_output_folder(path, option)
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        jsonio.write(path / EXPORT_MARKER, {"tool": "whq", "what": what})
    except OSError as err:
        raise BadInput(f"{option} {path}: cannot write there ({err.strerror or err}): pick another path") from None
    try:
        yield path
    except BaseException:
        if created and [p.name for p in path.iterdir()] == [EXPORT_MARKER]:
            (path / EXPORT_MARKER).unlink()
            path.rmdir()
        raise


def not_a_warehouse(root: Path, given: str | Path) -> NotAWarehouse:
    """The error for a folder `given` (resolved: `root`) with no warehouse marker: inside a warehouse,
    name that warehouse (`whq init` there would be refused); elsewhere, how to create one."""
    inside = enclosing_warehouse(root)
    if inside is not None:
        return NotAWarehouse(f"{root} is inside the warehouse {inside}, not a warehouse itself: give {inside}")
    return NotAWarehouse(f"{root} is not a whq warehouse: create it with `whq init {given}`")
