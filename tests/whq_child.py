"""Run `whq` in a real child process, forked from a server that has torch and transformers imported.

The crash tests kill dozens of ingests; a fresh interpreter costs seconds of imports
each time, a fork from the preloaded server a few milliseconds. The child is an
ordinary process: it reaches the fault point named in WHQ_FAULT and SIGKILLs itself.
"""

from __future__ import annotations

import multiprocessing
import os
import sys

PRELOAD = [
    "torch",
    "transformers",
    "transformers.models.bert.modeling_bert",
    "warehouse.cli",
    "ingest.pipeline",
    "ingest.reductions",
    "ingest.finalize",
    "ingest.models",
    "ingest.writer",
    "ingest.hooks",
    "ingest.progress",
    "tests.whq_child",
    # imported on the way by every ingest: half a second a child when left to it
    "pandas",
    "pyarrow.dataset",
    "pydantic",
    "rich.progress",
    "transformers.convert_slow_tokenizer",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen3.modeling_qwen3",
]

_context = None


def _main(argv: list[str], env: dict, log: str) -> None:
    import torch

    torch.set_num_threads(1)  # several children share two cores
    os.environ.pop("WHQ_FAULT", None)
    os.environ.update(env)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.argv = ["whq", *argv]
    from warehouse.cli import main

    main()


def start(argv: list[str], log: str, env: dict | None = None):
    """Start `whq argv` in a forked child and return the running multiprocessing.Process."""
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    child = _context.Process(target=_main, args=([str(a) for a in argv], env or {}, str(log)))
    child.start()
    return child


def run(argv: list[str], log: str, env: dict | None = None, timeout: float = 300) -> int:
    """Run `whq argv` in a forked child; returns its exit code (-9 when it was SIGKILLed)."""
    return join(start(argv, log, env), timeout, f"whq {' '.join(map(str, argv))}")


def join(child, timeout: float = 300, what: str = "whq child") -> int:
    """Wait for a started child; kill it and raise TimeoutError if it outlives `timeout`."""
    child.join(timeout)
    if child.exitcode is None:
        child.kill()
        child.join()
        raise TimeoutError(f"{what} did not finish in {timeout} s")
    return child.exitcode
