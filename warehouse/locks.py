"""Advisory file locks (flock): released by the kernel when the holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from .errors import WarehouseError


@contextlib.contextmanager
def locked(path: Path, *, timeout: float = 600.0, what: str = "the warehouse"):
    """Hold an exclusive lock on `path` for the block; wait up to `timeout` seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise WarehouseError(f"cannot lock {path}: {err.strerror}; check the folder's permissions") from None
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WarehouseError(f"timed out waiting for the lock on {what} ({path}); is another whq process stuck?") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """Take the lock without waiting; return the fd to keep it, or None if held elsewhere."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
