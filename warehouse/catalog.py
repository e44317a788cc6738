"""The DuckDB catalog: generated from schema.sql, queries/*.sql and the manifests.

It holds views and macros only. Views list the committed parts explicitly (never a
glob), so a run is visible exactly when its manifest is committed. The file is
written next to the old one and renamed over it, so a reader never sees a
half-built catalog, and it is written in an old storage version that the DuckDB
shell from PyPI (duckdb-cli) opens.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

import duckdb

from . import schema
from .faults import fault
from .layout import FORMAT_VERSION, Layout

STORAGE_VERSION = "v1.0.0"
INFO_VIEW = "whq_info"


def macro_files() -> list[Path]:
    """queries/*.sql, found without importing the queries package (it imports us)."""
    spec = importlib.util.find_spec("queries")
    if spec is None or not spec.submodule_search_locations:
        return []
    folder = Path(list(spec.submodule_search_locations)[0])
    return sorted(folder.glob("*.sql"))


def quote(text: str) -> str:
    """`text` as a SQL string literal."""
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def view_sql(table: schema.Table, files: list[str], absent: frozenset[str] = frozenset()) -> str:
    """The view over `files`; columns in `absent` (appended to schema.sql after every file was written) read NULL."""
    # Columns are qualified: a macro parameter named like a column (site, layer, ...) is in
    # scope when DuckDB binds a view inside a macro, and an unqualified name would conflict.
    select = ", ".join(f"NULL::{c.type} AS {_ident(c.name)}" if c.name in absent else
                       f"part.{_ident(c.name)}::{c.type} AS {_ident(c.name)}" for c in table.columns)
    if not files:
        nulls = ", ".join(f"NULL::{c.type} AS {_ident(c.name)}" for c in table.columns)
        return f"SELECT {nulls} WHERE false"
    hive = ", ".join(f"{quote(k)}: {HIVE_TYPE}" for k, HIVE_TYPE in schema.HIVE_TYPES.items() if k in table.partitions)
    listing = ", ".join(quote(f) for f in files)
    return (
        f"SELECT {select} FROM read_parquet([{listing}], hive_partitioning = true, "
        f"hive_types = {{{hive}}}, union_by_name = true) AS part"
    )


def _stored_columns(con, files: list[str]) -> set[str]:
    """Every column name in the files, partition keys included."""
    listing = ", ".join(quote(f) for f in files)
    described = con.execute(f"DESCRIBE SELECT * FROM read_parquet([{listing}], hive_partitioning = true, union_by_name = true)")
    return {row[0] for row in described.fetchall()}


def committed_manifests(layout: Layout) -> list[dict]:
    if not layout.runs_dir.exists():
        return []
    manifests = []
    for path in sorted(layout.runs_dir.glob("*.json")):
        try:
            manifests.append(json.loads(path.read_text()))
        except ValueError:
            from .errors import CorruptPart

            raise CorruptPart(f"manifest {path} is damaged: run `whq repair {layout.root}` to set it aside "
                              f"(the other runs stay queryable)") from None
    return manifests


def quarantined(layout: Layout) -> set[str]:
    """Runs that `whq repair` took out of the views because a part is missing or corrupt."""
    path = layout.quarantine
    return set(json.loads(path.read_text())) if path.exists() else set()


def fingerprint(layout: Layout) -> str:
    """Changes whenever the root moves, a manifest, the quarantine or a macro file changes."""
    digest = hashlib.sha256(str(layout.root).encode())
    runs = sorted(layout.runs_dir.glob("*.json")) if layout.runs_dir.exists() else []
    for path in runs + ([layout.quarantine] if layout.quarantine.exists() else []):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    for path in [schema.SCHEMA_SQL.resolve(), *macro_files()]:
        digest.update(f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()}".encode())
    return digest.hexdigest()[:16]


def build(layout: Layout, skip: set[str] | None = None) -> None:
    """(Re)generate whq.duckdb, leaving out quarantined runs. Call with the commit lock held."""
    skip = quarantined(layout) if skip is None else skip
    files: dict[str, list[str]] = {t: [] for t in schema.tables()}
    for manifest in committed_manifests(layout):
        if manifest["run_id"] in skip:
            continue
        for part in manifest["parts"]:
            files.setdefault(part["table"], []).append(str(layout.root / part["path"]))

    # Under the commit lock every temporary catalog is one a killed process left behind.
    for stale in layout.root.glob(f".{layout.catalog.name}.*.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = layout.catalog.with_name(f".{layout.catalog.name}.{os.getpid()}.tmp")
    con = duckdb.connect()
    try:
        con.execute(f"ATTACH {quote(str(tmp))} AS whq_catalog (STORAGE_VERSION '{STORAGE_VERSION}')")
        con.execute("USE whq_catalog")
        for table in schema.tables().values():
            try:
                try:
                    con.execute(f"CREATE VIEW {_ident(table.name)} AS {view_sql(table, files[table.name])}")
                except duckdb.BinderException:  # parts older than a column: only then read their schemas
                    absent = frozenset(c.name for c in table.columns) - _stored_columns(con, files[table.name])
                    con.execute(f"CREATE VIEW {_ident(table.name)} AS {view_sql(table, files[table.name], absent)}")
            except duckdb.Error as err:  # a view binds to its parts: a damaged one stops the build
                from .errors import CorruptPart

                raise CorruptPart(f"cannot build the catalog ({str(err).splitlines()[0][:200]}): find the bad part with "
                                  f"`whq check {layout.root}`, then `whq repair {layout.root}` quarantines its run") from None
            if table.comment:
                con.execute(f"COMMENT ON VIEW {_ident(table.name)} IS {quote(table.comment)}")
            for col in table.columns:
                if col.comment:
                    con.execute(f"COMMENT ON COLUMN {_ident(table.name)}.{_ident(col.name)} IS {quote(col.comment)}")
        fault("catalog.views")
        con.execute(
            f"CREATE VIEW {INFO_VIEW} AS SELECT {quote(str(layout.root))} AS root, "
            f"{FORMAT_VERSION} AS format_version, {quote(fingerprint(layout))} AS fingerprint"
        )
        con.execute(f"COMMENT ON VIEW {INFO_VIEW} IS 'Where this catalog was built and from what: any whq command rebuilds it when stale.'")
        for path in macro_files():
            con.execute(path.read_text())
        con.execute("USE memory")
        con.execute("DETACH whq_catalog")
    finally:
        con.close()
    fault("catalog.built")
    os.replace(tmp, layout.catalog)
    tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)


def is_current(layout: Layout) -> bool:
    if not layout.catalog.exists():
        return False
    try:
        con = duckdb.connect(str(layout.catalog), read_only=True)
        try:
            row = con.execute(f"SELECT root, fingerprint FROM {INFO_VIEW}").fetchone()
        finally:
            con.close()
    except duckdb.Error:
        return False
    return row == (str(layout.root), fingerprint(layout))
