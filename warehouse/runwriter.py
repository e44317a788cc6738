"""Writing one run: shards of parts, a journal for resume, and the final commit.

A run is written as a sequence of shards. Each shard's parts are renamed into data/
and then recorded by one appended journal line (fsynced); the shard's resume state
(running aggregates) is saved beside it. A reader sees nothing of the run until
`commit()` writes the manifest, which lists every part, and regenerates the catalog.

After a crash, `RunWriter(..., resume=True)` keeps the journalled shards, deletes
parts that no journal line names, and hands back the saved state, so the caller
continues from the next shard and ends with exactly the rows of an uninterrupted run.
Each rank of a multi-process ingest journals separately; rank 0 commits.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from . import catalog, jsonio, metadata, schema
from .errors import BadInput, DamagedMetadata, RunExists, WarehouseError
from .faults import fault
from .layout import FORMAT_VERSION, Layout
from .locks import locked, try_lock
from .names import check_name
from .parts import PartInfo, side_by_side, write_bytes_atomic, write_part

VOLATILE_CONFIG_KEYS = {"resume", "progress", "started_at"}


def _stable(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in VOLATILE_CONFIG_KEYS}


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


class RunWriter:
    def __init__(
        self, layout: Layout, run_id: str, config: dict, *, resume: bool = False, rank: int = 0, world_size: int = 1
    ):
        self.layout = layout
        self.run_id = check_name("run id", run_id)
        self.rank, self.world_size = rank, world_size
        self.config = config
        if layout.manifest(run_id).exists():
            raise RunExists(
                f"run {run_id!r} is already committed: choose another --run-id, or delete it with `whq runs {layout.root} --delete {run_id}`"
            )
        self.journal_dir = layout.journal_dir(run_id)
        self.journal = self.journal_dir / f"rank-{rank}.jsonl"
        self.state_dir = self.journal_dir / "state" / f"rank-{rank}"
        self.tmp_dir = layout.tmp_dir / f"{run_id}.rank-{rank}"
        self._lock_fd = try_lock(self.journal_dir / f"rank-{rank}.lock")
        if self._lock_fd is None:
            raise RunExists(
                f"run {run_id!r} (rank {rank}) is being written by another process right now; wait for it or pick another --run-id"
            )
        self._check_config(resume)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        (self.journal_dir / f"rank-{rank}.done").unlink(missing_ok=True)
        self.shards = read_journal(self.journal, self.run_id)
        self._delete_unjournalled_parts()
        if resume:
            fault("resume.cleaned")

    # -- start / resume -------------------------------------------------
    def _check_config(self, resume: bool) -> None:
        saved = self.journal_dir / "config.json"
        if saved.exists():
            # Other ranks start after rank 0 has checked (and written) the config: they follow it.
            if not resume and self.rank == 0:
                self.close()
                raise RunExists(
                    f"run {self.run_id!r} was interrupted before it committed: finish it with "
                    f"`whq ingest ... --run-id {self.run_id} --resume`, or discard it with `whq gc {self.layout.root} --interrupted`"
                )
            try:
                previous = metadata.journal_config(self.layout, saved)
            except WarehouseError:
                self.close()
                raise
            self.started_at = dt.datetime.fromisoformat(previous["started_at"])
            if _canonical(_stable(previous)) != _canonical(_stable(self.config)):
                changed = sorted(
                    k
                    for k in set(previous) | set(self.config)
                    if k not in VOLATILE_CONFIG_KEYS and _canonical(previous.get(k)) != _canonical(self.config.get(k))
                )
                self.close()
                raise BadInput(
                    f"--resume needs the same arguments as the interrupted run; these differ: {', '.join(changed)}"
                )
        else:
            # --resume with nothing to resume starts the run: a pre-empted job can always be relaunched with it.
            self.started_at = dt.datetime.now(dt.UTC)
            self.config["started_at"] = self.started_at.isoformat()
            if self.rank == 0:
                payload = _canonical(self.config).encode()
                write_bytes_atomic(payload, saved, self.tmp_dir, "config")

    def _journalled_paths(self) -> set[str]:
        return {p["path"] for s in self.shards for p in s["parts"]}

    def _delete_unjournalled_parts(self) -> None:
        keep = self._journalled_paths()
        prefix = f"part-{self.rank}-"
        for run_dir in self.layout.run_data_dirs(self.run_id):
            for path in run_dir.rglob(f"{prefix}*.parquet"):
                if self.layout.relative(path) not in keep:
                    path.unlink()
        if self.state_dir.exists():
            current = set(self.shards[-1]["state"].values()) if self.shards else set()
            for path in self.state_dir.iterdir():
                if path.name not in current:
                    path.unlink()

    @property
    def completed_shards(self) -> int:
        return len(self.shards)

    def shard_info(self) -> list[dict]:
        return [s["info"] for s in self.shards]

    def state(self, name: str) -> pa.Table | None:
        """The resume state saved with the last completed shard."""
        if not self.shards or name not in self.shards[-1]["state"]:
            return None
        return self._read_state(self.state_dir / self.shards[-1]["state"][name])

    # -- writing ----------------------------------------------------------
    def _part_path(self, table: str, site, layer, seq: str) -> Path:
        tbl = schema.table(table)
        if "site" in tbl.partitions:
            folder = self.layout.partition_dir(table, self.run_id, site, layer)
        else:
            folder = self.layout.partition_dir(table, self.run_id)
        return folder / f"part-{self.rank}-{seq}.parquet"

    def _write(self, parts, seq: str, what: str = "part") -> list[PartInfo]:
        jobs = []
        counters: dict[Path, int] = {}
        for table, site, layer, data in parts:
            if data.num_rows == 0:
                continue
            base = self._part_path(table, site, layer, seq)
            n = counters.get(base, 0)
            counters[base] = n + 1
            final = base if n == 0 else base.with_name(f"{base.stem}-{n}.parquet")
            jobs.append((self.layout.root, self.tmp_dir, final, table, data, site, layer, what))
        return side_by_side(lambda job: write_part(*job), jobs)

    def commit_shard(self, parts, state: dict[str, pa.Table] | None = None, info: dict | None = None) -> None:
        """parts: iterable of (table, site|None, layer|None, pyarrow.Table)."""
        index = len(self.shards)
        written = self._write(parts, f"{index:06d}")
        fault("shard.parts")
        saved = {}
        for name, table in (state or {}).items():
            filename = f"{index:06d}-{name}.parquet"
            sink = pa.BufferOutputStream()
            # No dictionaries: state values (sums, sample keys, example windows) rarely repeat, and
            # building them took two thirds of the write of examples' windows.
            pq.write_table(table, sink, compression="zstd", use_dictionary=False)
            write_bytes_atomic(sink.getvalue().to_pybytes(), self.state_dir / filename, self.tmp_dir, "state")
            saved[name] = filename
        record = {"shard": index, "parts": [p.to_json() for p in written], "state": saved, "info": info or {}}
        line = jsonio.dumps(record) + "\n"
        # The line is the shard's commit point: a crash mid-write leaves a torn last line, which a
        # resume reads as "this shard did not complete" (metadata.journal_record). It is written
        # in two halves only so the fault point shard.journal_torn can stop the process between
        # them and the crash tests (tests/test_faults.py) can prove exactly that.
        with open(self.journal, "a") as fh:
            fh.write(line[: len(line) // 2])
            fh.flush()
            fault("shard.journal_torn")
            fh.write(line[len(line) // 2 :])
            fh.flush()
            os.fsync(fh.fileno())
        fault("shard.journalled")
        self.shards.append(record)
        if self.shards[:-1]:
            for old in self.shards[-2]["state"].values():
                if old not in saved.values():
                    (self.state_dir / old).unlink(missing_ok=True)

    def finish_rank(self) -> None:
        """Ranks other than 0 mark themselves done; rank 0 then commits all."""
        (self.journal_dir / f"rank-{self.rank}.done").write_text(str(len(self.shards)))

    def rank_shards(self, rank: int) -> list[dict]:
        """The journalled shards of one rank (this writer's own, or another rank's from its journal)."""
        if rank == self.rank:
            return self.shards
        return read_journal(self.journal_dir / f"rank-{rank}.jsonl", self.run_id)

    def rank_state(self, rank: int, name: str) -> pa.Table | None:
        """The resume state another rank saved with its last shard (rank 0 merges them at commit)."""
        shards = self.rank_shards(rank)
        if not shards or name not in shards[-1]["state"]:
            return None
        return self._read_state(self.journal_dir / "state" / f"rank-{rank}" / shards[-1]["state"][name])

    def _read_state(self, path: Path) -> pa.Table:
        try:
            return pq.read_table(path)
        except (pa.ArrowException, OSError) as err:  # running totals cannot be redone shard by shard
            raise DamagedMetadata(
                f"resume state {path} is unreadable ({str(err).splitlines()[0][:120]}): discard the interrupted run "
                f"with `whq gc {self.layout.root} --interrupted`, then ingest it again"
            ) from None

    def run_shard_info(self) -> list[dict]:
        """Shard info of every rank (call on rank 0 once the ranks have finished)."""
        return [s["info"] for r in range(self.world_size) for s in self.rank_shards(r)]

    def wait_for_ranks(self, timeout: float = 3600.0) -> None:
        self._wait_for_ranks(timeout)

    def _wait_for_ranks(self, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        pending = [r for r in range(1, self.world_size)]
        while pending:
            pending = [r for r in pending if not (self.journal_dir / f"rank-{r}.done").exists()]
            if pending and time.monotonic() > deadline:
                raise WarehouseError(f"ranks {pending} of run {self.run_id!r} did not finish; rerun them with --resume")
            if pending:
                time.sleep(0.1)
        return [s for r in range(self.world_size) for s in self.rank_shards(r)]

    def commit(self, final_parts, created_at: dt.datetime, *, wait_timeout: float = 3600.0) -> dict:
        """Write run-level parts, the manifest, and regenerate the catalog (rank 0)."""
        assert self.rank == 0, "only rank 0 commits"
        records = self._wait_for_ranks(wait_timeout)
        fault("commit.ranks")
        # Final parts of an earlier, interrupted commit are not journalled: replace them.
        for run_dir in self.layout.run_data_dirs(self.run_id):
            for path in run_dir.rglob("part-*-final*.parquet"):
                path.unlink()
        final = self._write(final_parts, "final", "final")
        fault("commit.final_parts")
        parts = [p for r in records for p in r["parts"]] + [p.to_json() for p in final]
        manifest = {
            "format_version": FORMAT_VERSION,
            "run_id": self.run_id,
            "created_at": created_at.isoformat(),
            "committed_at": dt.datetime.now(dt.UTC).isoformat(),
            "world_size": self.world_size,
            "config": self.config,
            "parts": parts,
            "rows": _rows_by_table(parts),
        }
        commit_manifest(self.layout, self.run_id, jsonio.dumps(manifest, indent=1).encode(), self.tmp_dir)
        fault("commit.catalog")
        self.close()
        shutil.rmtree(self.journal_dir, ignore_errors=True)
        fault("commit.cleanup")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        return manifest

    def discard(self) -> None:
        """Forget a run that journalled nothing (it failed on bad input): no interrupted run remains."""
        if self.rank == 0 and not self.shards:
            shutil.rmtree(self.journal_dir, ignore_errors=True)
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.close()

    def close(self) -> None:
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def commit_manifest(
    layout: Layout, run_id: str, payload: bytes, tmp_dir: Path, *, rebuild_catalog: bool = True
) -> None:
    """Make a run visible in one step: its manifest renamed into runs/ under the commit lock, then the
    catalog rebuilt (an ingest's commit, and `whq pull` of a run whose parts are in place).

    rebuild_catalog=False leaves the catalog stale, which the next open rebuilds: for a writer that
    commits several runs and opens the warehouse once at the end (`whq pull`)."""
    with locked(layout.commit_lock):
        fault("commit.locked")
        write_bytes_atomic(payload, layout.manifest(run_id), tmp_dir, "manifest")
        if rebuild_catalog:
            catalog.build(layout)


def committed_with_same_config(layout: Layout, run_id: str, config: dict) -> dict | None:
    """The manifest of `run_id` if it is committed with these arguments (a resumed job that had
    committed before it was killed), None if not committed; RunExists if committed differently."""
    path = layout.manifest(run_id)
    if not path.exists():
        return None
    manifest = metadata.manifest(layout, path)
    if _canonical(_stable(manifest["config"])) != _canonical(_stable(config)):
        raise RunExists(
            f"run {run_id!r} is already committed with other arguments: choose another --run-id, "
            f"or delete it with `whq runs {layout.root} --delete {run_id}`"
        )
    return manifest


def _rows_by_table(parts: list[dict]) -> dict[str, int]:
    rows: dict[str, int] = {}
    for part in parts:
        rows[part["table"]] = rows.get(part["table"], 0) + part["rows"]
    return rows


def write_run(layout: Layout, run_id: str, parts, config: dict | None = None) -> dict:
    """Commit a whole run from in-memory tables in one shard (imports, fixtures, benchmarks).

    parts: iterable of (table, site|None, layer|None, pyarrow.Table) with the
    stored columns of schema.sql (partition keys come from the tuple).
    """
    writer = RunWriter(layout, run_id, config or {"source": "write_run"})
    writer.commit_shard(parts)
    return writer.commit([], dt.datetime.now(dt.UTC))


def read_journal(journal: Path, run_id: str) -> list[dict]:
    """The shards a rank's journal records as complete, in order, up to the first torn, out-of-order
    or damaged line (metadata.journal_record): that shard and the ones after it are redone."""
    if not journal.exists():
        return []
    shards = []
    for line in journal.read_text(errors="replace").splitlines():
        record = metadata.journal_record(line, len(shards), run_id)
        if record is None:
            break
        shards.append(record)
    return shards
