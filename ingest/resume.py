"""`--resume` is tied to the content of its input, not only to its arguments.

The run's config records each data file's sha256 (sources.scan). A resumed run whose
file was edited since it started would commit a run that mixes both versions, even when
the edit kept the file's size: refuse it with the file named.
"""

from __future__ import annotations

import json
from pathlib import Path

from warehouse.errors import BadInput
from warehouse.layout import Layout, check_name


def refuse_changed_data(layout: Layout, run_id: str, paths: list[Path], data: list[dict]) -> None:
    """BadInput if a data file of the interrupted run `run_id` no longer has the content it started with."""
    saved = layout.journal_dir(check_name("run id", run_id)) / "config.json"
    try:
        previous = json.loads(saved.read_text()).get("data")
    except (OSError, ValueError, AttributeError):
        return  # nothing to resume, or a damaged journal: the run writer decides
    if not isinstance(previous, list):
        return
    recorded = {entry.get("path"): entry.get("sha256") for entry in previous if isinstance(entry, dict)}
    for path, entry in zip(paths, data):
        if entry["path"] in recorded and recorded[entry["path"]] != entry["sha256"]:
            raise BadInput(
                f"data file {path} changed since run {run_id!r} started (its sha256 differs), so resuming "
                f"would mix both versions: restore the file and --resume, or start a new --run-id"
            )
