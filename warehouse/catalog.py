"""The DuckDB catalog: generated from schema.sql, queries/*.sql and the manifests.

It holds views and macros only. Views list the committed parts explicitly (never a
glob), so a run is visible exactly when its manifest is committed. The file is
written next to the old one and renamed over it, so a reader never sees a
half-built catalog, and it is written in an old storage version that the DuckDB
shell from PyPI (duckdb-cli) opens. The macros, which no warehouse changes, are bound
once per version of schema.sql, queries/*.sql and DuckDB into a base catalog in
whq's cache folder, which each build copies (_base).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import stat
import tempfile
import threading
from pathlib import Path, PurePosixPath

import duckdb

from . import metadata, schema
from .errors import CorruptPart, WarehouseError
from .faults import fault
from .layout import FORMAT_VERSION, Layout
from .user_cache import cache_dir

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
    select = ", ".join(
        f"NULL::{c.type} AS {_ident(c.name)}"
        if c.name in absent
        else f"part.{_ident(c.name)}::{c.type} AS {_ident(c.name)}"
        for c in table.columns
    )
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
    described = con.execute(
        f"DESCRIBE SELECT * FROM read_parquet([{listing}], hive_partitioning = true, union_by_name = true)"
    )
    return {row[0] for row in described.fetchall()}


def committed_manifests(layout: Layout) -> list[dict]:
    """Every committed run's manifest, shape-checked (DamagedMetadata names `whq repair` for a bad one)."""
    if not layout.runs_dir.exists():
        return []
    manifests = []
    for path in sorted(layout.runs_dir.glob("*.json")):
        if path.exists():  # a run deleted since the listing is no longer committed
            manifests.append(metadata.manifest(layout, path))
    return manifests


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


def build(layout: Layout, skip: set[str] | None = None, *, changed: tuple[str, set[str]] | None = None) -> None:
    """(Re)generate whq.duckdb, leaving out quarantined runs. Call with the commit lock held.

    `changed` = (fingerprint, tables): a commit that changed only the parts of `tables`, made
    while the catalog was current with `fingerprint`. The catalog is then copied and only those
    views replaced (each view costs a few milliseconds to bind and comment); a catalog with
    another fingerprint is built whole."""
    skip = metadata.quarantine(layout) if skip is None else skip
    files: dict[str, list[str]] = {t: [] for t in schema.tables()}
    for manifest in committed_manifests(layout):
        if manifest["run_id"] in skip:
            continue
        for part in manifest["parts"]:
            files.setdefault(part["table"], []).append(str(layout.part_path(part["path"])))

    metadata.catalog_file(layout)
    # Under the commit lock every temporary catalog is one a killed process left behind.
    for stale in layout.root.glob(f".{layout.catalog.name}.*.tmp*"):
        stale.unlink(missing_ok=True)
    tmp = layout.catalog.with_name(f".{layout.catalog.name}.{os.getpid()}.tmp")
    try:
        _write(layout, tmp, files, changed)
        fault("catalog.built")
        os.replace(tmp, layout.catalog)
    except (duckdb.Error, OSError) as err:
        if isinstance(err, duckdb.Error) and not _write_failure(err, tmp):
            raise
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err).splitlines()[0][:200]
        raise WarehouseError(
            f"cannot write the catalog {layout.catalog}: {reason}; free disk space or fix permissions, "
            f"then run `whq repair {layout.root}` (no committed run is lost)"
        ) from None
    finally:
        _remove(tmp)


def _remove(tmp: Path) -> None:
    """A temporary catalog and the WAL DuckDB may have left beside it."""
    for leftover in (tmp, tmp.with_name(tmp.name + ".wal")):
        leftover.unlink(missing_ok=True)


def _write_failure(err: duckdb.Error, tmp: Path) -> bool:
    """Did DuckDB fail to write the new catalog (a full disk, a read-only folder)? Measured on a
    full tmpfs: an IOException or a failed commit, the latter naming the file or its WAL."""
    return isinstance(err, (duckdb.IOException, duckdb.TransactionException)) or tmp.name in str(err)


class _OlderParts(Exception):
    """A view could not bind: its parts were written before a column of schema.sql existed."""

    def __init__(self, table: schema.Table):
        self.table = table


def _write(layout: Layout, tmp: Path, files: dict[str, list[str]], changed: tuple[str, set[str]] | None) -> None:
    """The catalog's views, info view and macros, written into the new file `tmp` in one transaction
    (one commit, where each statement on its own would write and sync the file)."""
    con = duckdb.connect()
    layout.prepare(con)
    try:
        bind_macros, only = _start(con, layout, tmp, changed)
        absent: dict[str, frozenset[str]] = {}
        while True:
            con.execute("BEGIN TRANSACTION")
            try:
                if bind_macros:
                    _bind_macros(con)
                _create(con, layout, tmp, files, absent, only)
                break
            except _OlderParts as older:  # a failed statement ends the transaction: begin again, knowing more
                con.execute("ROLLBACK")
                table = older.table
                absent[table.name] = frozenset(c.name for c in table.columns) - _stored_columns(con, files[table.name])
        con.execute("COMMIT")
        con.execute("USE memory")
        con.execute("DETACH whq_catalog")
    finally:
        con.close()


def _start(con, layout: Layout, tmp: Path, changed: tuple[str, set[str]] | None) -> tuple[bool, set[str] | None]:
    """Attach `tmp` as whq_catalog, a copy of what the build starts from, and say (whether the macros
    must be bound, the tables whose views must be replaced, None for all): the current catalog when
    it still has the fingerprint of `changed`, else the base catalog, else an empty file."""
    attach = f"ATTACH {quote(str(tmp))} AS whq_catalog (STORAGE_VERSION '{STORAGE_VERSION}')"
    if changed is not None and layout.catalog.is_file():
        shutil.copyfile(layout.catalog, tmp)
        try:
            con.execute(attach)
            row = con.execute(f"SELECT root, fingerprint FROM whq_catalog.{INFO_VIEW}").fetchone()
            if row == (str(layout.root), changed[0]):
                con.execute("USE whq_catalog")
                return False, set(changed[1])
            con.execute("DETACH whq_catalog")
        except duckdb.Error:
            with contextlib.suppress(duckdb.Error):
                con.execute("DETACH whq_catalog")
        _remove(tmp)
    base = _base()
    if base is not None:
        shutil.copyfile(base, tmp)
    con.execute(attach)
    con.execute("USE whq_catalog")
    return base is None, None


def _bind_macros(con) -> None:
    """The views of schema.sql over no parts, and the macros of queries/*.sql created over them.

    DuckDB binds a macro when it is created (most of a build's time), and binding one over a view of
    parts would read every part's footer (union_by_name): over these empty views of the same columns
    it reads none, and _create then replaces each view by the one over its parts."""
    for table in schema.tables().values():
        con.execute(f"CREATE VIEW {_ident(table.name)} AS {view_sql(table, [])}")
    for path in macro_files():
        con.execute(path.read_text())


def _base() -> Path | None:
    """A catalog of _bind_macros alone, which no warehouse changes, built once per content of schema.sql,
    queries/*.sql and DuckDB's version, in whq's cache folder: every build copies it. None when that folder
    is not this user's or others may write in it (they could change what every catalog holds), or it
    cannot be written: the build then binds the macros itself."""
    digest = hashlib.sha256(f"{duckdb.__version__}\n{STORAGE_VERSION}\n".encode())
    for path in [schema.SCHEMA_SQL.resolve(), *macro_files()]:
        digest.update(f"{path.name}\n{len(path.read_bytes())}\n".encode() + path.read_bytes())
    folder = cache_dir()
    base = folder / f"catalog-base-{digest.hexdigest()[:16]}.duckdb"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
            return None
        if base.is_file():
            return base
        tmp = folder / f".{base.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            con = duckdb.connect()
            try:
                con.execute(f"ATTACH {quote(str(tmp))} AS whq_catalog (STORAGE_VERSION '{STORAGE_VERSION}')")
                con.execute("USE whq_catalog")
                con.execute("BEGIN TRANSACTION")
                _bind_macros(con)
                con.execute("COMMIT")
                con.execute("USE memory")
                con.execute("DETACH whq_catalog")
            finally:
                con.close()
            os.replace(tmp, base)  # whole or absent: a concurrent build copies one or the other
        finally:
            _remove(tmp)
        return base
    except (OSError, duckdb.Error):
        return None


def _create(
    con,
    layout: Layout,
    tmp: Path,
    files: dict[str, list[str]],
    absent: dict[str, frozenset[str]],
    only: set[str] | None,
) -> None:
    """Each view over its parts (those of `only` when it names some), with schema.sql's comments, and the
    info view (the macros are there already)."""
    for table in schema.tables().values():
        if only is None or table.name in only:
            _replace_view(con, layout, tmp, table, files[table.name], absent)
    fault("catalog.views")
    con.execute(
        f"CREATE OR REPLACE VIEW {INFO_VIEW} AS SELECT {quote(str(layout.root))} AS root, "
        f"{FORMAT_VERSION} AS format_version, {quote(fingerprint(layout))} AS fingerprint"
    )
    con.execute(
        f"COMMENT ON VIEW {INFO_VIEW} IS 'Where this catalog was built and from what: any whq command rebuilds it when stale.'"
    )


def _replace_view(con, layout: Layout, tmp: Path, table: schema.Table, files: list[str], absent) -> None:
    """Replace `table`'s empty view by the one over its parts, with the comments of schema.sql."""
    # One call for the view and its comments: a call per statement cost more than the statements.
    statements = [
        f"CREATE OR REPLACE VIEW {_ident(table.name)} AS {view_sql(table, files, absent.get(table.name, frozenset()))}"
    ]
    if table.comment:
        statements.append(f"COMMENT ON VIEW {_ident(table.name)} IS {quote(table.comment)}")
    statements += [
        f"COMMENT ON COLUMN {_ident(table.name)}.{_ident(col.name)} IS {quote(col.comment)}"
        for col in table.columns
        if col.comment
    ]
    try:
        con.execute(";\n".join(statements))
    except duckdb.Error as err:  # a view binds to its parts: a damaged one stops the build
        if isinstance(err, duckdb.BinderException) and table.name not in absent:
            raise _OlderParts(table) from None  # parts older than a column: only then read their schemas
        raise _damaged(layout, tmp, err) from None


def _damaged(layout: Layout, tmp: Path, err: duckdb.Error) -> Exception:
    if tmp.name in str(err):
        return err  # writing the new file or its WAL failed (a full disk), not reading a part
    return CorruptPart(
        f"cannot build the catalog ({str(err).splitlines()[0][:200]}): find the bad part with "
        f"`whq check {layout.root}`, then `whq repair {layout.root}` quarantines its run"
    )


@contextlib.contextmanager
def private_copy(layout: Layout):
    """A copy of the catalog in the system's temp folder, removed when the block ends.

    A DuckDB connection locks its file, and the README's `duckdb wh/whq.duckdb` shell must
    open the catalog while a notebook holds the warehouse open: whq opens a copy (a few
    milliseconds; the file holds views and macros only). On POSIX a connection opened in
    the block keeps reading its copy after the name is removed.
    """
    try:
        folder = tempfile.mkdtemp(prefix="whq-catalog-")
    except OSError as err:
        raise WarehouseError(
            f"cannot copy the catalog to {tempfile.gettempdir()}: {err.strerror or err}; "
            f"free space there, or point TMPDIR at a writable folder"
        ) from None
    name = os.path.join(folder, layout.catalog.name)  # same file name: the database is still called `whq`
    try:
        try:
            shutil.copyfile(layout.catalog, name)
        except OSError as err:
            raise WarehouseError(
                f"cannot copy the catalog {layout.catalog} to {folder}: {err.strerror or err}; "
                f"free space there (or point TMPDIR at a writable folder), or rebuild the catalog "
                f"with `whq repair {layout.root}`"
            ) from None
        yield name
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def connect(layout: Layout) -> duckdb.DuckDBPyConnection:
    """A read-only connection to (a private copy of) the catalog; it never locks whq.duckdb."""
    with private_copy(layout) as name:
        con = duckdb.connect(name, read_only=True)
    layout.prepare(con)
    keep_footers(con)
    return con


# What a scope copies into memory, smallest tables first: up to SCOPE_COPY_CELLS values (rows x columns,
# ~8 bytes each in memory, where Parquet may hold them in far fewer) and SCOPE_COPY_BYTES of parts. At
# 100M token_neurons rows: a layer's stats, neighbours and logit lens, its explanations and the run's
# documents, ~20 MB of memory; not its histograms nor co-activations, tokens, token_neurons or examples.
SCOPE_COPY_CELLS = 2_000_000
SCOPE_COPY_BYTES = 8 << 20


# A run's tokens, which every layer's unit page reads (the examples' windows), are copied into memory
# once for all the scopes of the run (share, shared_copy), where their parts hold up to SHARED_TOKENS_BYTES:
# 7 MB at 100M token_neurons rows, a third of the largest unit page statement's time to scan.
SHARED = "whq_shared"
SHARED_TOKENS_BYTES = 16 << 20


def share(con) -> None:
    """Attach an in-memory database to `con`'s DuckDB instance, which every cursor of it sees: scope_views
    keeps there the copies the scopes of one run share (one per run, dropped by drop_shared)."""
    con.execute(f"ATTACH ':memory:' AS {SHARED} (READ_WRITE)")


def _shared_prefix(run: str) -> str:
    return "tokens_" + hashlib.sha256(run.encode()).hexdigest()[:16] + "_"


def drop_shared(con, run: str) -> None:
    """Drop the copies the scopes of `run` shared (share); none read them any more."""
    names = con.execute(
        "SELECT table_name FROM duckdb_tables() WHERE database_name = ? AND starts_with(table_name, ?)",
        [SHARED, _shared_prefix(run)],
    ).fetchall()
    for (name,) in names:
        con.execute(f"DROP TABLE IF EXISTS {SHARED}.{_ident(name)}")


def _create_over(con, statement: str, table: schema.Table, files: list[str]) -> None:
    try:
        con.execute(statement + view_sql(table, files))
    except duckdb.BinderException:  # parts older than a column: it reads NULL, as in the catalog's view
        absent = frozenset(c.name for c in table.columns) - _stored_columns(con, files)
        con.execute(statement + view_sql(table, files, absent))


def scope_views(con, layout: Layout, run: str, site: str, layer: int, shared=None) -> bool:
    """Shadow each table's view, on connection `con` (opened by `connect`), by a TEMP view of the same name
    over the parts of run `run` alone, and of `site` and `layer` alone for the tables partitioned by them;
    the smallest of them, up to SCOPE_COPY_CELLS values and SCOPE_COPY_BYTES of parts in all, by a TEMP
    table holding their rows.

    DuckDB looks temp objects up first, so the macros then bind over those few parts: binding views over
    every part of a table (union_by_name reads each footer) is most of a unit page's time, and a table in
    memory binds and reads faster still. On such a connection only statements that read that run, site
    and layer alone answer as on `con`'s catalog. False, creating nothing, when the warehouse is no longer
    the one `con`'s catalog was built from (its fingerprint; the run deleted or quarantined since): the
    parts listed now may not be those its views read.

    With `shared` (a lock; `share` attached its database on `con`'s instance), the run's tokens, where
    their parts hold up to SHARED_TOKENS_BYTES, are read from one copy in that database, made under the
    lock by the first scope of the run, named after the parts it holds and the catalog's fingerprint."""
    path = layout.manifest(run)
    try:
        manifest = metadata.manifest(layout, path) if path.exists() else None
        quarantined = metadata.quarantine(layout)
        now = fingerprint(layout)  # after the reads: a change made meanwhile shows here
    except (OSError, WarehouseError):
        return False
    built = con.execute(f"SELECT fingerprint FROM {INFO_VIEW}").fetchone()[0]
    if manifest is None or run in quarantined or now != built:
        return False
    files: dict[str, list[str]] = {name: [] for name in schema.tables()}
    size, rows = dict.fromkeys(schema.tables(), 0), dict.fromkeys(schema.tables(), 0)
    in_layer = (f"site={site}", f"layer={int(layer)}")
    for part in manifest["parts"]:  # partition folders as Layout.partition_dir names them, which the views read
        table = schema.table(part["table"])
        if len(table.partitions) == 1 or PurePosixPath(part["path"]).parts[3:5] == in_layer:
            files[table.name].append(str(layout.part_path(part["path"])))
            size[table.name] += part["bytes"]
            rows[table.name] += part["rows"]
    copied, cells, budget = set(), SCOPE_COPY_CELLS, SCOPE_COPY_BYTES
    for name in sorted((n for n in files if files[n]), key=lambda n: rows[n] * len(schema.table(n).columns)):
        values = rows[name] * len(schema.table(name).columns)
        if values > cells or size[name] > budget:
            break
        copied.add(name)
        cells, budget = cells - values, budget - size[name]
    tokens = files["tokens"]
    if shared is not None and "tokens" not in copied and tokens and size["tokens"] <= SHARED_TOKENS_BYTES:
        digest = hashlib.sha256("\0".join([built, *tokens]).encode()).hexdigest()[:16]
        name = f"{SHARED}.{_ident(_shared_prefix(run) + digest)}"
        with shared:  # one copy: a second scope of the run waits for the first's
            _create_over(con, f"CREATE TABLE IF NOT EXISTS {name} AS ", schema.table("tokens"), tokens)
        con.execute(f"CREATE OR REPLACE TEMP VIEW tokens AS SELECT * FROM {name}")
        del files["tokens"]
    for table in schema.tables().values():
        if table.name not in files:
            continue
        kind = "TABLE" if table.name in copied else "VIEW"
        _create_over(con, f"CREATE OR REPLACE TEMP {kind} {_ident(table.name)} AS ", table, files[table.name])
    return True


def keep_footers(con) -> None:
    """Keep the parts' Parquet footers in memory: every statement binds its views over all their parts
    (reading each footer, union_by_name), which otherwise costs more than running a unit's small queries
    (neuron_examples of a 10M-row run: 32 ms a query without, 6 ms with). Parts never change in place."""
    con.execute("SET GLOBAL parquet_metadata_cache = true")


def is_current(layout: Layout) -> bool:
    if not layout.catalog.is_file():
        return False
    try:
        con = connect(layout)
        try:
            row = con.execute(f"SELECT root, fingerprint FROM {INFO_VIEW}").fetchone()
        finally:
            con.close()
    except (duckdb.Error, WarehouseError):
        return False
    return row == (str(layout.root), fingerprint(layout))
