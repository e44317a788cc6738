"""whq's cache folder for what is slow to build and the same every time: the fused kernel, the pages' script bundle."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def cache_dir() -> Path:
    """$WHQ_CACHE, else $XDG_CACHE_HOME/whq, else ~/.cache/whq."""
    if os.environ.get("WHQ_CACHE"):
        return Path(os.environ["WHQ_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "whq"


def cached_text(name: str, build) -> str:
    """The text cached under `name` (a name that changes with its inputs), built by `build()` and written
    atomically when missing; built without caching where the folder cannot be written."""
    path = cache_dir() / name
    try:
        return path.read_text()
    except OSError:
        pass
    text = build()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
            fh.write(text)
        os.replace(fh.name, path)
    except OSError:
        pass
    return text
