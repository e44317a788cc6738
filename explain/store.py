"""The model-call cache and the atomic commit of explanations and scores into their run.

While `whq explain`/`whq score` runs, every answered call is appended to a journal,
journal/<run>.explain-<batch>/calls.jsonl, which no query reads: nothing of the batch is visible.
Each line reaches the OS at once (a killed process loses no answered call); the file is fsynced at
most every SYNC_EVERY_S, on a thread of its own (the calls never wait for the disk, whose flushes
took from 1 to 100 ms here), and at the end, so a power cut can cost the last fraction of a second
of calls, which resume asks again, instead of a disk flush per call.
At the end one commit, under the warehouse's commit lock, writes the batch's parts into the run's
folders, rewrites the run's manifest to list them (one atomic rename: the rows appear all at once)
and rebuilds the catalog; the journal's calls become the batch's model_calls part. A batch
committed again (the same recipe) replaces its earlier parts, so a rerun leaves the same rows.
Because the parts belong to the run's manifest, `whq check` verifies them and deleting the run
removes them. Killed before the rename, a batch leaves only the journal (resume answers its calls
from it) and perhaps unlisted parts, which `whq gc` removes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import shutil
import threading
import time
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from warehouse import catalog, metadata
from warehouse.errors import RunExists, UnknownRun, WarehouseError
from warehouse.locks import locked, try_lock
from warehouse.parts import side_by_side, to_arrow, write_bytes_atomic, write_part

from .llm import Answer, Request, canonical_json

PART_PREFIX = "explain-"
SYNC_EVERY_S = 0.25  # the longest a journal line waits for its fsync (see the module docstring)


def check_writable(wh) -> None:
    """Explanations, scores and imports commit into the run's own folders: a URL root (s3://) is read in
    place only, so refuse it before any work rather than write into its local shadow."""
    from warehouse.remote import refuse_url

    refuse_url(wh.root)


def journal_dir(wh, run: str, batch: str) -> Path:
    return wh.layout.journal_dir(f"{run}.explain-{batch}")


class CallCache:
    """Answers by request hash: the committed model_calls of every run, then this batch's journal."""

    def __init__(self, wh, run: str, batch: str, *, resume: bool, keys: list[str]):
        """`keys`: the request hashes the command will ask for; only their committed answers are read
        (model_calls holds every run's calls, and grows with each command)."""
        check_writable(wh)
        self.folder = journal_dir(wh, run, batch)
        self.path = self.folder / "calls.jsonl"
        if self.folder.exists() and not resume:
            raise RunExists(
                f"an earlier `whq explain`/`whq score` of this recipe on run {run!r} was interrupted: finish it with "
                f"the same command and --resume (its calls are cached), or discard it with `whq gc {wh.root} --interrupted`"
            )
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise self._unwritable(err) from None
        self._lock_fd = try_lock(self.folder / "lock")
        if self._lock_fd is None:
            raise RunExists(f"this recipe is being run on run {run!r} by another process right now; wait for it")
        self._lock = threading.Lock()
        self.answers: dict[str, Answer] = {}
        for key, payload, p_tok, c_tok, latency in wh.sql(
            "SELECT request_hash, response, prompt_tokens, completion_tokens, latency_s FROM model_calls "
            "WHERE request_hash IN (SELECT unnest(?::VARCHAR[]))",
            [sorted(set(keys))],
        ).fetchall():
            self.answers[key] = Answer.from_json(
                payload, prompt_tokens=p_tok, completion_tokens=c_tok, latency_s=latency, cached=True
            )
        self.new: list[dict] = []
        self._journal = None  # calls.jsonl, opened at the first new answer and kept open
        self._synced = -SYNC_EVERY_S  # when the journal's last fsync began (time.monotonic)
        self._syncer: ThreadPoolExecutor | None = None
        self._sync: Future | None = None
        if self.path.exists():
            # a command killed after its commit, before it removed the journal: those calls are committed
            committed = set(self.answers)
            good = 0  # the bytes of the journal's whole lines
            # split at "\n" only: a document's text may hold other line breaks (U+2028) that JSON keeps
            journal = self.path.read_bytes()
            for line in journal.split(b"\n")[:-1]:  # the piece after the last newline is torn, or empty
                try:
                    record = json.loads(line.decode(errors="replace"))
                    answer = Answer.from_body(
                        record["response"],
                        prompt_tokens=record["prompt_tokens"],
                        completion_tokens=record["completion_tokens"],
                        latency_s=record["latency_s"],
                    )
                except (ValueError, TypeError, KeyError):
                    break  # a torn last line: that call is asked again
                # the texts put wrote, again: the same JSON of the same values
                good += len(line) + 1
                if record["request_hash"] in committed:
                    continue
                record.update(request=canonical_json(record["request"]), response=answer.to_json())
                self._remember(record, answer)
            # cut the torn line off: the calls appended next would otherwise extend it, and a second
            # resume would stop there and ask them all again
            if good < len(journal):
                os.truncate(self.path, good)

    def _remember(self, record: dict, answer: Answer) -> None:
        self.new.append(record)
        self.answers[record["request_hash"]] = dataclasses.replace(answer, cached=True)

    def get(self, key: str) -> Answer | None:
        with self._lock:
            return self.answers.get(key)

    def put(self, key: str, request: Request, answer: Answer) -> None:
        record = {
            "request_hash": key,
            "model": request.model,
            "prompt_tokens": answer.prompt_tokens,
            "completion_tokens": answer.completion_tokens,
            "latency_s": answer.latency_s,
            "created_at": dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(),
        }
        request_text, response_text = request.canonical(), answer.to_json()
        # The request and the response are JSON texts: the line holds them as JSON values, not as
        # strings (escaping them again cost as much as encoding the answer).
        fields = json.dumps(record, ensure_ascii=False)[:-1]
        line = f'{fields}, "request": {request_text}, "response": {response_text}}}\n'
        record.update(request=request_text, response=response_text)
        with self._lock:
            try:
                if self._journal is None:
                    self._journal = open(self.path, "a")
                self._journal.write(line)
                self._journal.flush()
            except OSError as err:
                raise self._unwritable(err) from None
            if time.monotonic() - self._synced >= SYNC_EVERY_S and (self._sync is None or self._sync.done()):
                if self._syncer is None:
                    self._syncer = ThreadPoolExecutor(1, thread_name_prefix="whq-journal-sync")
                self._sync = self._syncer.submit(os.fsync, self._journal.fileno())
                self._synced = time.monotonic()
            self._remember(record, answer)

    def calls_table(self) -> pa.Table | None:
        if not self.new:
            return None
        columns = {
            "request_hash": [r["request_hash"] for r in self.new],
            "model": [r["model"] for r in self.new],
            "request": [r["request"] for r in self.new],
            "response": [r["response"] for r in self.new],
            "prompt_tokens": [r["prompt_tokens"] for r in self.new],
            "completion_tokens": [r["completion_tokens"] for r in self.new],
            "latency_s": [r["latency_s"] for r in self.new],
            "created_at": [dt.datetime.fromisoformat(r["created_at"]) for r in self.new],
        }
        return to_arrow("model_calls", columns, None)

    def _unwritable(self, err: OSError) -> WarehouseError:
        return WarehouseError(
            f"cannot write the call journal {self.path}: {err.strerror or err}; free disk space or fix permissions, "
            f"then rerun the same command with --resume (the calls answered so far are kept)"
        )

    def close(self) -> None:
        try:
            if self._syncer is not None:
                self._syncer.shutdown(wait=True)
            if self._journal is not None:
                if self._sync is not None:
                    self._sync.result()  # a failed flush of the disk is an error here, not lost on its thread
                os.fsync(self._journal.fileno())
        except OSError as err:
            raise self._unwritable(err) from None
        finally:
            self._syncer = self._sync = None
            if self._journal is not None:
                # after a failed write the buffer still holds the torn line, which resume asks again
                with contextlib.suppress(OSError):
                    self._journal.close()
                self._journal = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)
                self._lock_fd = None

    def discard(self) -> None:
        """After the commit: the journal's calls are in model_calls now."""
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)


def _keep_rows(path: Path, redone: set[tuple]) -> pa.Table:
    """An earlier part's rows that this commit does not write anew."""
    data = pq.read_table(path)
    ids = data.column("explanation_id").to_pylist()
    scorers = data.column("scorer").to_pylist() if "scorer" in data.column_names else [None] * len(ids)
    keep = [(i, s) not in redone for i, s in zip(ids, scorers)]
    return data.filter(pa.array(keep, pa.bool_()))


def commit(
    wh, run: str, batch: str, parts: list[tuple[str, str | None, int | None, pa.Table]], redone: set[tuple]
) -> int:
    """Add `parts` (table, site, layer, rows) to the committed run `run` in one step. The batch's
    earlier rows for the same (explanation_id, scorer) pairs are replaced (so a rerun leaves the same
    rows), its other earlier rows kept; returns the number of parts written."""
    layout = wh.layout
    token = uuid.uuid4().hex[:8]
    counters: dict[Path, int] = {}
    with locked(layout.commit_lock):
        if not layout.manifest(run).exists():
            raise UnknownRun(f"run {run!r} was deleted while this command ran: nothing was committed")
        manifest = metadata.manifest(layout, layout.manifest(run))
        replaced = [
            p
            for p in manifest["parts"]
            if p["table"] != "model_calls" and Path(p["path"]).name.startswith(f"{PART_PREFIX}{batch}-")
        ]
        carried = []
        for part in replaced:
            kept = _keep_rows(layout.root / part["path"], redone)
            if kept.num_rows:
                site_layer = [
                    seg.partition("=")[2] for seg in Path(part["path"]).parts if seg.startswith(("site=", "layer="))
                ]
                site, layer = (site_layer[0], int(site_layer[1])) if site_layer else (None, None)
                carried.append((part["table"], site, layer, kept))
        jobs = []
        for table, site, layer, data in [*parts, *carried]:
            if data is None or data.num_rows == 0:
                continue
            folder = (
                layout.partition_dir(table, run, site, layer) if site is not None else layout.partition_dir(table, run)
            )
            n = counters[folder / table] = counters.get(folder / table, 0) + 1
            jobs.append((folder / f"{PART_PREFIX}{batch}-{token}-{n}.parquet", table, data, site, layer))
        # side by side: encoding and each part's fsyncs (5-50 ms each here) overlap
        infos = side_by_side(lambda job: write_part(layout.root, layout.tmp_dir / f"explain-{batch}", *job), jobs)
        written = [info.to_json() for info in infos]
        if not written and not replaced:
            return 0
        kept = [p for p in manifest["parts"] if p not in replaced]
        manifest["parts"] = kept + written
        rows: dict[str, int] = {}
        for part in manifest["parts"]:
            rows[part["table"]] = rows.get(part["table"], 0) + part["rows"]
        manifest["rows"] = rows
        before = catalog.fingerprint(layout)
        write_bytes_atomic(
            json.dumps(manifest, indent=1, default=str).encode(),
            layout.manifest(run),
            layout.tmp_dir / f"explain-{batch}",
            "manifest",
        )
        tables = {part["table"] for part in [*written, *replaced]}
        catalog.build(layout, changed=(before, tables))
        for part in replaced:
            (layout.root / part["path"]).unlink(missing_ok=True)
        shutil.rmtree(layout.tmp_dir / f"explain-{batch}", ignore_errors=True)
    wh.close()
    return len(written)
