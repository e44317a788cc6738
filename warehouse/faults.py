"""Fault injection for the crash-safety tests: die or fail at a named point.

    WHQ_FAULT=<point>[:<nth>][:<action>]     e.g. WHQ_FAULT=shard.journalled:2

The nth time this process reaches `point` (default the first), it performs
`action`: `kill` (default: SIGKILL itself, as a pre-empted job dies), or raise
`enospc` (disk full), `eacces` (permission denied) or `erofs` (read-only file
system) as the OSError a real disk would give. Unset, `fault()` is one dict
lookup. The points, in the order an ingest reaches them, are listed in POINTS.
"""

from __future__ import annotations

import errno
import os
import signal

POINTS = {
    "config.partial": "writing the run's config.json, half the bytes written",
    "config.renamed": "config.json in place, nothing else of the run written",
    "resume.cleaned": "resume: journal read, unjournalled parts deleted, before any new shard",
    "part.partial": "writing a part: half its bytes in tmp/",
    "part.synced": "a part fsynced in tmp/, before its rename into data/",
    "part.renamed": "a part renamed into data/, before its directory is synced",
    "shard.parts": "all parts of a shard in data/, before its resume state",
    "state.partial": "writing a shard's resume state, half the bytes written",
    "state.renamed": "resume state in place, before the journal line",
    "shard.journal_torn": "half of the shard's journal line written and fsynced",
    "shard.journalled": "the shard's journal line fsynced (the shard is durable)",
    "commit.ranks": "every rank finished, before the run-level (final) parts",
    "final.partial": "writing a run-level part, half its bytes written",
    "final.renamed": "a run-level part renamed into data/",
    "commit.final_parts": "all run-level parts written, before taking the commit lock",
    "commit.locked": "holding the commit lock, before the manifest",
    "manifest.partial": "writing the manifest, half the bytes in tmp/",
    "manifest.synced": "manifest fsynced in tmp/, before its rename into runs/",
    "manifest.renamed": "manifest in runs/ (the run is committed), before the catalog",
    "catalog.views": "rebuilding the catalog: views written to its temporary file, before the macros",
    "catalog.built": "new catalog complete beside the old one, before the rename",
    "commit.catalog": "catalog renamed into place, before the journal is removed",
    "commit.cleanup": "journal removed, before tmp/ is removed",
    "open.sweep": "opening the warehouse: one stale tmp/ entry swept, before the rest",
}

_ERRORS = {"enospc": errno.ENOSPC, "eacces": errno.EACCES, "erofs": errno.EROFS}
_counts: dict[str, int] = {}


def fault(point: str) -> None:
    """Die (or raise an OSError) here if WHQ_FAULT names this point and visit."""
    spec = os.environ.get("WHQ_FAULT")
    if not spec:
        return
    name, _, rest = spec.partition(":")
    if name != point:
        return
    nth, _, action = rest.partition(":")
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] != int(nth or 1):
        return
    if action in _ERRORS:
        code = _ERRORS[action]
        raise OSError(code, os.strerror(code))
    os.kill(os.getpid(), signal.SIGKILL)
