"""Advisory file locks (flock): released by the kernel when the holder dies."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from .errors import WarehouseError


def _open_lock_file(path: Path) -> int:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:  # a read-only warehouse, or one the user may not write
        raise WarehouseError(
            f"cannot lock {path}: {err.strerror}; the warehouse folder must be writable: "
            f"check its permissions and mount"
        ) from None


@contextlib.contextmanager
def locked(path: Path, *, timeout: float = 600.0, what: str = "the warehouse"):
    """Hold an exclusive lock on `path` for the block; wait up to `timeout` seconds."""
    fd = _open_lock_file(path)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise WarehouseError(
                        f"timed out waiting for the lock on {what} ({path}); is another whq process stuck?"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def try_lock(path: Path) -> int | None:
    """Take the lock without waiting; return the fd to keep it, or None if held elsewhere."""
    fd = _open_lock_file(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
