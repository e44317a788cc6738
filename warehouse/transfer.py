"""`whq push` and `whq pull`: copy committed runs between a local warehouse and a URL root.

Both keep the commit discipline of a local write: a run's parts are copied first, each
verified by size and checksum, and its manifest (byte for byte the source's) goes last, so
a run appears at the destination only once it is complete. Interrupted, either leaves only
parts no manifest names (invisible to every reader); the rerun skips the parts already
there and verified, and copies the rest.

    push: part PUTs in batches, each read and checked against the manifest while the one before it is
          uploaded, verified on arrival by the CRC32 the server answers (else its ETag, the MD5), then
          runs/<id>.json in one PUT
    pull: parts fetched in concurrent batches (the library's own `cat`), each checked in memory against
          the manifest's sha256, written under tmp/ and fsynced by a pool of threads, then renamed
          into data/ while the next batch arrives; the folders fsynced for the renames,
          then the manifest renamed into runs/ under the commit lock; the catalog is built once, at
          the end

Kill points (warehouse/faults.py's WHQ_FAULT) of the tests, besides those of the local
writes a pull goes through (part.*, commit.locked, manifest.*):
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import metadata
from .core import Warehouse, create
from .core import open as open_warehouse
from .errors import BadInput, CorruptPart, DamagedMetadata, RunExists, WarehouseError
from .faults import fault
from .layout import FORMAT_VERSION
from .locks import try_lock
from .names import check_name
from .output import enclosing_warehouse, refusal
from .parts import install_atomic, make_durable, side_by_side, write_tmp
from .remote import Remote, RemoteWarehouse
from .runwriter import commit_manifest

KILL_POINTS = {
    "push.part": "push: a part uploaded and verified, before the next",
    "push.parts": "push: every part of a run uploaded, before its manifest",
    "push.manifest": "push: a run's manifest uploaded (the run is visible there), before the next run",
    "pull.part": "pull: a part written and verified, before the next",
}
__doc__ += "".join(f"\n    {point:<14} {what}" for point, what in KILL_POINTS.items()) + "\n"

# A push uploads batches of parts concurrently (fsspec's gather) of at most this many bytes and parts,
# two in memory at once (one uploading, the next being read): enough to hide the round trips of small
# parts, and a bound on the memory held.
BATCH_BYTES = 64 << 20
BATCH_PARTS = 256
# A pull fetches batches of parts this large, each while the one before it is checked and written (by
# PULL_THREADS threads), synced and renamed: small enough that most of that work overlaps the transfers.
PULL_BATCH_BYTES = 32 << 20
PULL_BATCH_PARTS = 64
PULL_THREADS = 4
PULL_AHEAD = 2  # batches fetched (or being fetched) ahead of the one being checked

Progress = Callable[[int], None]


@dataclass
class Transfer:
    """What a push or pull did: runs copied, runs already there, parts and bytes moved and skipped."""

    copied: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    skipped_quarantined: list[str] = field(default_factory=list)
    parts: int = 0
    bytes: int = 0
    parts_present: int = 0

    def line(self, verb: str, where: str) -> str:
        text = (
            f"{verb} {len(self.copied)} run(s) ({self.parts} parts, {self.bytes / 1e6:.1f} MB) {where}; "
            f"{len(self.present)} already there"
        )
        if self.parts_present:
            text += f", {self.parts_present} part(s) of an interrupted copy reused"
        if self.skipped_quarantined:
            text += f"; left out quarantined run(s) {', '.join(self.skipped_quarantined)} (`whq repair` first)"
        return text


def _parse(payload: bytes, run_id: str, where: str) -> dict:
    try:
        return metadata.check_manifest(json.loads(payload.decode("utf-8")), run_id)
    except (ValueError, UnicodeDecodeError, RecursionError) as what:
        raise DamagedMetadata(
            f"the manifest of run {run_id!r} at {where} is damaged ({what}): delete it there"
        ) from None


def _check_format(remote: Remote, marker: bytes) -> None:
    try:
        version = json.loads(marker)["format_version"]
    except (ValueError, KeyError, TypeError):
        raise DamagedMetadata(f"{remote.url_of('whq.json')} is damaged: delete it, then push again") from None
    if version != FORMAT_VERSION:
        raise WarehouseError(
            f"{remote.url} holds a warehouse of format version {version}, this whq writes {FORMAT_VERSION}: "
            f"push to another prefix, or upgrade whq"
        )


def _conflict(run_id: str, source: str, destination: str) -> WarehouseError:
    return RunExists(
        f"run {run_id!r} at {destination} differs from the one in {source}: delete it at the destination "
        f"(or push to another prefix); nothing was copied"
    )


def push(wh: Warehouse, url: str, *, endpoint_url: str | None = None, progress: Progress | None = None) -> Transfer:
    """Copy the committed runs of local `wh` that `url` lacks (quarantined runs stay behind)."""
    if isinstance(wh, RemoteWarehouse):
        raise WarehouseError(f"whq push copies a local warehouse, and {wh.root} is a URL: `whq pull` it first")
    remote = Remote(url, endpoint_url)
    if remote.local:  # a file:// destination is a new warehouse folder, never one inside a warehouse
        inside = enclosing_warehouse(Path(remote.path).parent)
        if inside is not None:
            raise BadInput(refusal("whq", url, inside, "push to a folder outside it"))
    marker = remote.read("whq.json")
    if marker is None:
        remote.write("whq.json", wh.layout.marker.read_bytes())
    else:
        _check_format(remote, marker)
    there = remote.manifests()
    done, todo = Transfer(), []
    quarantined = wh.quarantined()
    for run_id in wh.run_ids():
        if run_id in quarantined:
            done.skipped_quarantined.append(run_id)
            continue
        payload = wh.layout.manifest(run_id).read_bytes()
        if run_id in there:
            if there[run_id] != payload:
                raise _conflict(run_id, str(wh.root), remote.url)
            done.present.append(run_id)
        else:
            todo.append((run_id, payload, wh.manifest(run_id)))
    if not todo:
        return done
    listed = remote.listing("data")

    def read_verified(part: dict) -> tuple[dict, bytes]:
        """The part's bytes, refused when they do not match the manifest."""
        try:
            payload = wh.layout.part_path(part["path"]).read_bytes()
        except OSError as err:
            raise CorruptPart(
                f"cannot read part {part['path']} ({err.strerror or err}): check it with `whq check {wh.root}`"
            ) from None
        if len(payload) != part["bytes"] or hashlib.sha256(payload).hexdigest() != part["sha256"]:
            raise CorruptPart(
                f"part {part['path']} does not match its manifest: find the damage with `whq check {wh.root}` "
                f"and `whq repair` it before pushing"
            )
        return part, payload

    for run_id, payload, manifest in todo:
        # Each batch is read and checked while the one before it is uploaded.
        for _, loaded in _ahead(lambda batch: side_by_side(read_verified, batch), _batches(manifest["parts"]), 1):
            _push_batch(remote, loaded, listed, progress, done)
        fault("push.parts")
        remote.write(f"runs/{run_id}.json", payload)
        fault("push.manifest")
        done.copied.append(run_id)
        done.parts += len(manifest["parts"])
        done.bytes += sum(p["bytes"] for p in manifest["parts"])
    return done


def _push_batch(remote: Remote, loaded: list[tuple[dict, bytes]], listed: dict, progress, done: Transfer) -> None:
    """PUT the parts of one batch that are not at the destination already, each verified on arrival."""
    present = {
        part["path"]
        for part, data in loaded
        if part["path"] in listed and remote.same_object(part["path"], listed[part["path"]], data, part["sha256"])
    }
    answers = remote.write_many({p["path"]: data for p, data in loaded if p["path"] not in present})
    for part, data in loaded:
        if part["path"] in answers and not remote.arrived(part["path"], answers[part["path"]], data, part["sha256"]):
            raise WarehouseError(
                f"part {part['path']} did not arrive intact at {remote.url}: push again (verified parts are kept)"
            )
        if progress:
            progress(len(data))
        fault("push.part")
    done.parts_present += len(present)


def _ahead(load: Callable, batches: list[list[dict]], depth: int) -> Iterator[tuple[list[dict], object]]:
    """(batch, load(batch)) for each batch in order, with up to `depth` batches loaded ahead on a thread of
    their own while the caller works on the one before."""
    with ThreadPoolExecutor(1, thread_name_prefix="whq-transfer-ahead") as loader:
        pending = deque(loader.submit(load, batch) for batch in batches[:depth])
        for number, batch in enumerate(batches):
            loaded = pending.popleft().result()
            if number + depth < len(batches):
                pending.append(loader.submit(load, batches[number + depth]))
            yield batch, loaded


def _batches(parts: list[dict], max_bytes: int = BATCH_BYTES, max_parts: int = BATCH_PARTS) -> list[list[dict]]:
    """The parts in batches copied concurrently, each at most max_bytes (or one larger part) and max_parts."""
    batches: list[list[dict]] = [[]]
    size = 0
    for part in parts:
        if batches[-1] and (size + part["bytes"] > max_bytes or len(batches[-1]) >= max_parts):
            batches.append([])
            size = 0
        batches[-1].append(part)
        size += part["bytes"]
    return [batch for batch in batches if batch]


def pull(url: str, root, *, endpoint_url: str | None = None, progress: Progress | None = None) -> Transfer:
    """Copy the runs committed at `url` that local warehouse `root` lacks (created when absent)."""
    remote = Remote(url, endpoint_url)
    marker = remote.read("whq.json")
    if marker is None:
        raise WarehouseError(f"{remote.url} is not a whq warehouse (no whq.json): check the URL")
    _check_format(remote, marker)
    there = remote.manifests()
    # Created (or checked) without opening: the catalog is built once, by the open at the end.
    layout = create(root)
    metadata.format_version(layout)
    done, todo = Transfer(), []
    for run_id, payload in sorted(there.items()):
        check_name("run id", run_id)
        local = layout.manifest(run_id)
        if local.exists():
            if local.read_bytes() != payload:
                raise _conflict(run_id, remote.url, str(layout.root))
            done.present.append(run_id)
        else:
            todo.append((run_id, payload, _parse(payload, run_id, remote.url)))
    for run_id, payload, manifest in todo:
        _pull_run(remote, layout, run_id, payload, manifest, done, progress)
    open_warehouse(layout.root).close()
    return done


def _pull_run(remote: Remote, layout, run_id: str, payload: bytes, manifest: dict, done: Transfer, progress) -> None:
    # A pull writes as rank 0 of the run would: under its rank lock and in its tmp folder, so the
    # warehouse's sweep and gc leave a live pull's files alone and an ingest of the same id is refused.
    journal = layout.journal_dir(run_id)
    lock = try_lock(journal / "rank-0.lock")
    if lock is None:
        raise RunExists(f"run {run_id!r} is being written into {layout.root} right now; wait for it, then pull again")
    tmp_dir = layout.tmp_dir / f"{run_id}.rank-0"
    try:
        if (journal / "config.json").exists():
            raise RunExists(
                f"run {run_id!r} has an interrupted ingest in {layout.root}: resume it, or discard it with "
                f"`whq gc {layout.root} --interrupted`, then pull again"
            )

        def check(part: dict, data: bytes | None) -> Path:
            """Check a fetched part against the manifest, then write it under tmp/ and fsync it."""
            if data is None or len(data) != part["bytes"] or hashlib.sha256(data).hexdigest() != part["sha256"]:
                raise not_there(part)
            tmp = write_tmp(data, layout.part_path(part["path"]), tmp_dir, "part", "pull again")
            durable([tmp])
            return tmp

        def not_there(part: dict) -> CorruptPart:
            return CorruptPart(
                f"part {part['path']} at {remote.url} is missing or does not match its manifest: "
                f"push run {run_id!r} there again; nothing of it was committed here"
            )

        def durable(paths: list[Path]) -> None:
            try:
                make_durable(paths)
            except OSError as err:
                raise WarehouseError(
                    f"cannot sync the parts pulled into {layout.root}: {err.strerror or err}; "
                    f"free disk space or fix permissions, then pull again"
                ) from None

        def download(batch: list[dict]) -> list[bytes | None]:
            found = remote.read_many([part["path"] for part in batch])
            return [found[part["path"]] for part in batch]

        tmp_dir.mkdir(parents=True, exist_ok=True)
        wanted = []
        for part, reused in zip(
            manifest["parts"], side_by_side(lambda part: _verified_copy(part, layout), manifest["parts"])
        ):
            if reused:  # an interrupted pull's verified copy
                done.parts_present += 1
                if progress:
                    progress(part["bytes"])
            else:
                wanted.append(part)
        # The parts come in batches, each fetched with the library's own concurrent GETs while the batch
        # before it is checked, written and fsynced by a pool of threads, then renamed into data/.
        batches = _batches(wanted, PULL_BATCH_BYTES, PULL_BATCH_PARTS)
        with ThreadPoolExecutor(PULL_THREADS, thread_name_prefix="whq-pull") as checker:
            for batch, fetched in _ahead(download, batches, PULL_AHEAD):
                tmps = list(checker.map(check, batch, fetched))
                for part, tmp in zip(batch, tmps):
                    install_atomic(
                        tmp, layout.part_path(part["path"]), "part", "pull again", sync_file=False, sync_folder=False
                    )
                    fault("pull.part")
                    if progress:
                        progress(part["bytes"])
            # The renames (and the folders of reused parts) on disk before the manifest names the parts: the
            # folders' fsyncs side by side, as each waits for the disk's cache flush (one by one: ~3 ms each).
            folders = sorted({layout.part_path(part["path"]).parent for part in manifest["parts"]})
            list(checker.map(lambda folder: durable([folder]), folders))
        commit_manifest(layout, run_id, payload, tmp_dir, rebuild_catalog=False)
    finally:
        os.close(lock)
    shutil.rmtree(journal, ignore_errors=True)
    shutil.rmtree(tmp_dir, ignore_errors=True)
    done.copied.append(run_id)
    done.parts += len(manifest["parts"])
    done.bytes += sum(p["bytes"] for p in manifest["parts"])


def _verified_copy(part: dict, layout) -> bool:
    """Is the part already in data/, whole (an interrupted pull's copy)?"""
    final = layout.part_path(part["path"])
    if not (final.is_file() and final.stat().st_size == part["bytes"]):
        return False
    return hashlib.sha256(final.read_bytes()).hexdigest() == part["sha256"]
