"""The Warehouse: open/init a folder, query it with DuckDB, read it with Polars."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import duckdb

from . import catalog, jsonio, metadata, schema
from .errors import NotAWarehouse, QueryError, UnknownRun, WarehouseError, sql_error
from .faults import fault
from .layout import FORMAT_VERSION, Layout
from .locks import locked, try_lock
from .names import is_valid_name
from .output import check_new_warehouse, not_a_warehouse


def init(path: str | Path) -> Warehouse:
    """Create an empty warehouse at `path` (idempotent on an existing one, and safe when several
    processes, e.g. the ranks of one ingest, create it at once)."""
    return open(create(path).root)


def create(path: str | Path) -> Layout:
    """The folders and marker of a warehouse at `path`, without opening it: no catalog is built, for
    a writer that fills the warehouse first and opens it once at the end (`whq pull`)."""
    from .remote import refuse_url

    refuse_url(path)
    layout = Layout(path)
    if layout.root.exists() and not layout.root.is_dir():
        raise NotAWarehouse(f"{layout.root} is a file: pick a folder path for the warehouse")
    if not layout.marker.exists():
        check_new_warehouse(layout.root)
    try:
        layout.root.mkdir(parents=True, exist_ok=True)
        if not layout.marker.exists():
            if any(not e.name.startswith(_MARKER_TMP) for e in layout.root.iterdir()):
                raise NotAWarehouse(
                    f"{layout.root} is a non-empty folder that is not a whq warehouse: pick an empty or new folder"
                )
            write_marker(layout)
        # The marker is in place before anything else, so a concurrent init never sees a
        # non-empty folder without it.
        for folder in (layout.runs_dir, layout.data_dir, layout.tmp_dir):
            folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WarehouseError(
            f"cannot create a warehouse at {layout.root}: {err.strerror}; check the path and its permissions"
        ) from None
    return layout


_MARKER_TMP = ".whq.json."


def write_marker(layout: Layout) -> None:
    """Write the format marker atomically (readers never see it half-written)."""
    tmp = layout.root / f"{_MARKER_TMP}{os.getpid()}.tmp"
    tmp.write_text(jsonio.dumps({"format_version": FORMAT_VERSION, "tool": "whq"}) + "\n")
    os.replace(tmp, layout.marker)


_GUARDED_LOCK = threading.Lock()


def open(path: str | Path) -> Warehouse:  # noqa: A001 - mirrors duckdb.connect / sqlite-utils style
    """Open an existing warehouse; regenerates its catalog if it is stale or was moved.
    A URL (s3://bucket/prefix) opens a read-only warehouse in place (warehouse/remote.py)."""
    from .remote import RemoteWarehouse, is_url

    return RemoteWarehouse(path) if is_url(path) else Warehouse(path)


def open_or_init(path: str | Path) -> Warehouse:
    """Open the warehouse at `path`, creating it first when the folder holds none (what an ingest wants)."""
    from .remote import refuse_url

    refuse_url(path)
    return open(path) if Layout(path).marker.exists() else init(path)


class Warehouse:
    def __init__(self, path: str | Path):
        self.layout = Layout(path)
        if not self.layout.marker.exists() and not self.layout.marker.is_symlink():
            raise not_a_warehouse(self.layout.root, path)
        metadata.format_version(self.layout)
        self._sweep()
        self.refresh()

    @property
    def root(self) -> Path:
        return self.layout.root

    # -- catalog ------------------------------------------------------------
    def refresh(self, force: bool = False) -> None:
        """Regenerate whq.duckdb when runs were committed, macros changed or the folder moved; the next query
        reads it (the connections to the catalog copied before are closed: another process may have rebuilt it)."""
        self.close()
        if force or not catalog.is_current(self.layout):
            if self.layout.catalog.is_file() and not os.access(self.layout.root, os.W_OK):
                return  # a read-only warehouse is read with the catalog it has
            with locked(self.layout.commit_lock):
                catalog.build(self.layout)

    def _sweep(self) -> None:
        """Remove tmp/ entries no live process owns, and journals of committed runs.

        Best effort: what cannot be locked or removed (a read-only warehouse) stays as it is.
        """
        if self.layout.tmp_dir.is_dir():
            for entry in self.layout.tmp_dir.iterdir():
                run_id, sep, rank = entry.name.partition(".rank-")
                if sep and is_valid_name(run_id):
                    owner = self.layout.journal_dir(run_id) / f"rank-{rank}.lock"  # a writer's own folder
                    if not owner.exists():
                        owner = None
                else:  # temporaries of repair and delete are written under the commit lock
                    owner = self.layout.commit_lock
                try:
                    fd = try_lock(owner) if owner else None
                except WarehouseError:
                    return
                if owner and fd is None:
                    continue  # a live process owns it
                try:
                    shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)
                except OSError:
                    return
                finally:
                    if fd is not None:
                        os.close(fd)
                fault("open.sweep")
        if self.layout.journal_root.is_dir():
            for entry in self.layout.journal_root.iterdir():
                if is_valid_name(entry.name) and self.layout.manifest(entry.name).exists():
                    shutil.rmtree(entry, ignore_errors=True)

    def quarantined(self) -> set[str]:
        return metadata.quarantine(self.layout)

    # -- runs -----------------------------------------------------------------
    def run_ids(self) -> list[str]:
        return [m["run_id"] for m in catalog.committed_manifests(self.layout)]

    def manifest(self, run_id: str) -> dict:
        path = self.layout.manifest(run_id)  # checks the name
        if not path.exists():
            known = ", ".join(self.run_ids()) or "none yet"
            raise UnknownRun(
                f"no committed run {run_id!r} in {self.root} (runs: {known}); list them with `whq runs {self.root}`"
            )
        return metadata.manifest(self.layout, path)

    def files(self, table: str | None, run_id: str | None = None) -> list[Path]:
        """Absolute paths of the committed parts of `table` (None: of every table), optionally of one run."""
        tables = set(schema.tables()) if table is None else {schema.table(table).name}
        manifests = [self.manifest(run_id)] if run_id else catalog.committed_manifests(self.layout)
        skip = self.quarantined()
        return [
            self.layout.part_path(p["path"])
            for m in manifests
            if m["run_id"] not in skip
            for p in m["parts"]
            if p["table"] in tables
        ]

    # -- queries --------------------------------------------------------------
    def connect(self, *, guarded: bool = False, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
        """A read-only connection to the catalog; `guarded` for untrusted SQL (see sql(read_only=True)),
        with DuckDB's memory_limit set to `memory_limit` (its default when None)."""
        if not guarded:
            return catalog.connect(self.layout)
        # DuckDB's own wall behind safesql: the committed parts are the only files it may open
        # (a COPY cannot write even onto them: it writes a temporary file first), nothing spills
        # to disk (the default temp directory, `.tmp` under the working directory, would be an
        # allowed path), no extension may be installed or loaded, and the settings are locked
        # against SET. The catalog is attached to a private in-memory instance, because
        # connections to one file share one instance and its (then locked) settings.
        con = duckdb.connect(":memory:")
        self.layout.prepare(con)
        with catalog.private_copy(self.layout) as name:  # never lock whq.duckdb against the stock shell
            con.execute(f"ATTACH {catalog.quote(name)} AS whq_catalog (READ_ONLY)")
        con.execute("USE whq_catalog")
        con.execute("SET temp_directory = ''")
        catalog.keep_footers(con)
        if memory_limit is not None:
            con.execute("SET memory_limit = ?", [memory_limit])
        parts = self.layout.opened_as([str(path) for path in self.files(None)])
        con.execute("SET allowed_paths = ?", [parts])
        for setting in (
            "enable_external_access = false",
            "autoinstall_known_extensions = false",
            "autoload_known_extensions = false",
            "lock_configuration = true",
        ):
            con.execute(f"SET {setting}")
        return con

    def guarded_connection(self, memory_limit: str) -> duckdb.DuckDBPyConnection:
        """The guarded connection for this memory limit, opened once and kept (queries run on its cursors)."""
        with _GUARDED_LOCK:  # threads of one server share it
            cons = self.__dict__.setdefault("_guarded_cons", {})
            if memory_limit not in cons:
                try:
                    cons[memory_limit] = self.connect(guarded=True, memory_limit=memory_limit)
                except duckdb.Error as err:
                    raise sql_error(err) from None
            return cons[memory_limit]

    def name_resolving_macros(self) -> frozenset[str]:
        """The catalog macros that look an argument up as a table (safesql checks what they are given), read once."""
        if "_name_macros" not in self.__dict__:
            from .safesql import name_resolving_macros

            with self.connect() as con:
                self._name_macros = name_resolving_macros(con)
        return self._name_macros

    def sql(self, query: str, params=None, *, read_only: bool = False, limits=None):
        """Run SQL against the catalog; returns a DuckDB relation (or None for statements).

        read_only=True is for untrusted SQL: it runs through safesql.run_read_only (two walls,
        bounded by `limits`, a safesql.SqlLimits), and the relation holds its materialized rows;
        more rows than limits.max_rows is an error here (run_read_only returns them cut).
        """
        if read_only:
            from .safesql import SqlLimits, run_read_only

            limits = limits or SqlLimits()
            result = run_read_only(self, query, limits, params)
            if result.truncated:
                raise QueryError(
                    f"the query returned more than {limits.max_rows:,} rows: add a LIMIT, "
                    f"or raise max_rows (--max-rows)"
                )
            if not result.frame.width:
                return None
            return self.guarded_connection(limits.memory_limit).from_arrow(result.frame.to_arrow())
        con = getattr(self, "_con", None)
        if con is None:
            con = self._con = self.connect()
        try:
            return con.sql(query, params=params)
        except duckdb.Error as err:
            raise sql_error(err) from None

    def pl(self, query: str, params=None):
        """Run SQL and return a polars DataFrame."""
        rel = self.sql(query, params)
        try:
            return rel.pl()
        except duckdb.Error as err:
            raise sql_error(err) from None

    def close(self) -> None:
        if hasattr(self, "_con"):
            self._con.close()
            del self._con
        for con in self.__dict__.pop("_guarded_cons", {}).values():
            con.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        return f"<whq warehouse {self.root} runs={len(self.run_ids())}>"
