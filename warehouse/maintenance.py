"""Integrity and housekeeping: check parts against manifests, repair, collect garbage, delete runs.

    check(wh)            every committed part vs its manifest: exists, bytes, row count, sha256, schema
    repair(root)         quarantine runs with bad parts (the others stay queryable), rebuild the catalog
    gc(wh)               remove orphan parts, stale temporaries and journals of committed or discarded runs
    delete_run(wh, run)  the manifest goes first (under the commit lock), then the data

The commit lock orders all of these against ingest commits: a run's manifest and its
journal never both vanish while gc decides what is an orphan.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import catalog, jsonio, metadata, schema
from .core import Warehouse, write_marker
from .errors import DamagedMetadata, NotAWarehouse, UnknownRun
from .layout import Layout
from .locks import locked, try_lock
from .names import check_name, is_valid_name
from .output import not_a_warehouse
from .parts import file_sha256, write_bytes_atomic
from .remote import refuse_url

DAMAGED_SUFFIX = ".damaged"


@dataclass
class Problem:
    run_id: str
    path: str  # relative to the warehouse root
    kind: str  # missing | corrupt | damaged (a metadata file: detail is its whole message)
    detail: str

    def line(self, root: Path) -> str:
        if self.kind == "damaged":
            return self.detail
        return (
            f"{self.kind} part {self.path} of run {self.run_id}: {self.detail}; "
            f"fix: `whq repair {root}` quarantines run {self.run_id} (others stay queryable), "
            f"then restore the file from a backup, re-ingest the run, or `whq runs {root} --delete {self.run_id}`"
        )


def _schema_ok(table: str, found) -> bool:
    """The part's columns are the table's, or the first of them: a part written before columns were
    appended to schema.sql (the catalog reads NULL in those)."""
    tbl = schema.table(table)
    return any(
        found.equals(pa.schema(list(tbl.arrow_schema(width))[: len(found)]), check_metadata=False)
        for width in (None, 1)
        if 0 < len(found) <= len(tbl.stored_columns)
    )


def verify_part(root: Path, run_id: str, part: dict, *, checksum: bool = True) -> Problem | None:
    """Compare one part file with its manifest entry; None when it matches."""
    path = root / part["path"]

    def problem(kind, detail):
        return Problem(run_id, part["path"], kind, detail)

    if not path.exists():
        return problem("missing", "the file is gone")
    size = path.stat().st_size
    if size != part["bytes"]:
        return problem("corrupt", f"{size} bytes, the manifest says {part['bytes']}")
    if checksum and file_sha256(path) != part["sha256"]:
        return problem("corrupt", "sha256 differs from the manifest")
    try:
        meta = pq.read_metadata(path)
        found = pq.read_schema(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        return problem("corrupt", f"not readable as Parquet ({str(err).splitlines()[0][:80]})")
    if meta.num_rows != part["rows"]:
        return problem("corrupt", f"{meta.num_rows} rows, the manifest says {part['rows']}")
    if not _schema_ok(part["table"], found):
        return problem("corrupt", f"columns {found.names} do not match table {part['table']} of schema.sql")
    return None


def check(wh: Warehouse | Layout, *, checksum: bool = True) -> tuple[list[Problem], dict]:
    """Verify every committed part (quarantined runs too) and every metadata file; returns (problems, found):
    found["runs"] and found["quarantined"] are run ids, found["parts"] the number of parts checked."""
    layout = wh.layout if isinstance(wh, Warehouse) else wh
    problems, parts, manifests = [], 0, []

    def damaged(run_id: str, path: Path, err: DamagedMetadata) -> None:
        problems.append(Problem(run_id, layout.relative(path), "damaged", str(err)))

    for check_file, path in ((metadata.format_version, layout.marker), (metadata.catalog_file, layout.catalog)):
        try:
            check_file(layout)
        except DamagedMetadata as err:
            damaged("", path, err)
    for path in sorted(layout.runs_dir.glob("*.json")) if layout.runs_dir.is_dir() else []:
        try:
            manifests.append(metadata.manifest(layout, path))
        except DamagedMetadata as err:
            if path.exists() or path.is_symlink():  # else deleted since the listing
                damaged(path.stem, path, err)
    try:
        quarantined = sorted(metadata.quarantine(layout))
    except DamagedMetadata as err:
        damaged("", layout.quarantine, err)
        quarantined = []
    for manifest in manifests:
        for part in manifest["parts"]:
            parts += 1
            found = verify_part(layout.root, manifest["run_id"], part, checksum=checksum)
            if found:
                problems.append(found)
    return problems, {"runs": [m["run_id"] for m in manifests], "parts": parts, "quarantined": quarantined}


def layout_of(root: str | Path) -> Layout:
    """The layout of an existing warehouse, without opening (or rebuilding) its catalog."""
    refuse_url(
        root, f"`whq pull {root} COPY` checks every part it copies against its manifest", "is not checked in place"
    )
    layout = Layout(root)
    if not layout.marker.exists():
        raise not_a_warehouse(layout.root, root)
    return layout


def _write_quarantine(layout: Layout, runs: set[str]) -> None:
    if runs:
        write_bytes_atomic(
            jsonio.dumps(sorted(runs)).encode(),
            layout.quarantine,
            layout.tmp_dir / "maintenance",
            "quarantine",
            retry=f"run `whq repair {layout.root}` again",
        )
    else:
        layout.quarantine.unlink(missing_ok=True)


def _set_aside(path: Path) -> str:
    """Rename a file (or folder) whq cannot read to <name>.damaged[-N], never over an earlier one."""
    target, n = path.with_name(path.name + DAMAGED_SUFFIX), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = path.with_name(f"{path.name}{DAMAGED_SUFFIX}-{n}")
    path.rename(target)
    return target.name


def _set_damaged_manifests_aside(layout: Layout) -> list[str]:
    actions = []
    for path in sorted(layout.runs_dir.glob("*.json")):
        try:
            metadata.manifest(layout, path)
        except DamagedMetadata as err:
            run = path.stem if path.stem.isprintable() else ascii(path.stem)  # the action stays one line
            actions.append(
                f"set the damaged manifest of run {run} aside as {ascii(_set_aside(path))[1:-1]} ({err.detail}); "
                f"its data is kept (re-ingest the run, or delete data/*/run_id={run})"
            )
    return actions


def _repair_metadata(layout: Layout) -> tuple[list[str], set[str]]:
    """Rewrite the marker, set aside what cannot be read; returns (actions, runs quarantined before)."""
    actions = []
    try:
        metadata.format_version(layout)  # a newer format (NotAWarehouse) is never rewritten
    except DamagedMetadata:
        if layout.marker.exists() and not layout.marker.is_file():
            _set_aside(layout.marker)
        write_marker(layout)
        actions.append(f"rewrote the damaged format marker {layout.marker.name}")
    actions += _set_damaged_manifests_aside(layout)
    try:
        metadata.catalog_file(layout)
    except DamagedMetadata:
        actions.append(f"set {layout.catalog.name}, which is not a file, aside as {_set_aside(layout.catalog)}")
    try:
        before = metadata.quarantine(layout)
    except DamagedMetadata as err:
        if layout.quarantine.exists() and not layout.quarantine.is_file():
            _set_aside(layout.quarantine)
        layout.quarantine.unlink(missing_ok=True)
        before = set()
        actions.append(f"dropped the damaged {layout.quarantine.name} ({err.detail}); every run is checked again")
    return actions, before


def repair(root: str | Path) -> list[str]:
    """Make the warehouse queryable again, whatever its metadata files hold; returns one line per action taken."""
    refuse_url(root)
    layout = Layout(root)
    if not layout.runs_dir.is_dir() or not layout.data_dir.is_dir():
        raise NotAWarehouse(f"{layout.root} is not a whq warehouse (no runs/ and data/): nothing to repair")
    with locked(layout.commit_lock):
        actions, before = _repair_metadata(layout)
    # Checked before the catalog is built: a damaged part would stop the build.
    problems, found = check(layout)
    bad = {p.run_id for p in problems if p.kind != "damaged"}
    committed = set(found["runs"])
    with locked(layout.commit_lock):
        _write_quarantine(layout, bad)
        catalog.build(layout)
    for run_id in sorted(bad - before):
        actions.append(f"quarantined run {run_id}: its parts are missing or corrupt, queries no longer see it")
    for run_id in sorted((before - bad) & committed):
        actions.append(f"released run {run_id} from quarantine: its parts verify again")
    actions.append("rebuilt the catalog")
    return actions


def _live(journal: Path) -> bool:
    """Does a process hold a rank lock of this run's journal folder (is it being written now)?"""
    for lock in journal.glob("rank-*.lock"):
        fd = try_lock(lock)
        if fd is None:
            return True
        os.close(fd)
    return False


def gc(wh: Warehouse, *, interrupted: bool = False, dry_run: bool = False) -> list[str]:
    """Remove what no committed run needs; returns the removed paths (relative to the root).

    Parts of runs being written, or interrupted and resumable, are kept unless
    `interrupted` discards the interrupted (not live) ones.
    """
    refuse_url(wh.root)
    layout, removed = wh.layout, []

    def remove(path: Path) -> None:
        removed.append(layout.relative(path) if path.exists() else str(path))
        if not dry_run:
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)

    with locked(layout.commit_lock):
        files = sorted(layout.data_dir.rglob("*")) if layout.data_dir.exists() else []
        manifests = catalog.committed_manifests(layout)
        listed = {p["path"] for m in manifests for p in m["parts"]}
        committed = {m["run_id"] for m in manifests}
        damaged = {
            p.name.partition(".json" + DAMAGED_SUFFIX)[0] for p in layout.runs_dir.glob(f"*.json{DAMAGED_SUFFIX}*")
        }
        journals = {d.name for d in layout.journal_root.iterdir()} if layout.journal_root.is_dir() else set()
        for run_id in sorted(journals):
            if run_id in committed:
                remove(layout.journal_root / run_id)
            elif interrupted and not _live(layout.journal_root / run_id):
                remove(layout.journal_root / run_id)
                journals.discard(run_id)
        keep = (journals - committed) | damaged
        for path in files:
            if not path.is_file():
                continue
            rel = layout.relative(path)
            run_id = next((seg[len("run_id=") :] for seg in Path(rel).parts if seg.startswith("run_id=")), None)
            if rel not in listed and run_id not in keep:
                remove(path)
        for stale in layout.root.glob(f".{layout.catalog.name}.*.tmp*"):
            remove(stale)
        for entry in sorted(layout.tmp_dir.iterdir()) if layout.tmp_dir.exists() else []:
            run_id, sep, _ = entry.name.partition(".rank-")
            if not (sep and is_valid_name(run_id) and _live(layout.journal_root / run_id)):
                remove(entry)
        if not dry_run:
            for folder in sorted((p for p in files if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
                if folder.exists() and not any(folder.iterdir()):
                    folder.rmdir()
    return removed


def delete_run(wh: Warehouse, run_id: str) -> None:
    """Remove a committed run: invisible first (manifest out, catalog rebuilt), then its data. A URL root is
    refused: its runs are read in place, and only its local shadow would lose the run (for this process)."""
    refuse_url(wh.root)
    check_name("run id", run_id)
    layout = wh.layout
    wh.close()
    with locked(layout.commit_lock):
        manifest = layout.manifest(run_id)
        if not manifest.exists():
            known = ", ".join(wh.run_ids()) or "none yet"
            raise UnknownRun(
                f"no committed run {run_id!r} in {layout.root} (runs: {known}); list them with `whq runs {layout.root}`"
            )
        parked = layout.tmp_dir / f"deleted-{uuid.uuid4().hex}.json"
        layout.tmp_dir.mkdir(parents=True, exist_ok=True)
        manifest.rename(parked)  # atomic: from here on the run is not committed
        quarantine = wh.quarantined()
        if run_id in quarantine:
            _write_quarantine(layout, quarantine - {run_id})
        catalog.build(layout)
        for folder in layout.run_data_dirs(run_id):
            shutil.rmtree(folder, ignore_errors=True)
        parked.unlink(missing_ok=True)
