"""Python's garbage collector around a long command's loop."""

from __future__ import annotations

import contextlib
import gc


@contextlib.contextmanager
def loaded_exempt():
    """Exempt what is loaded when the block starts (modules, a model) from Python's garbage collector
    until it ends: a full collection walks every tracked object (some 400,000 once torch and transformers
    are imported), and one walking them all took 0.9 s of a 32-unit explain plan and 0.1 s of a capture."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
