"""Run the `whq` CLI in-process, through its real error boundary (warehouse.cli.main)."""

from __future__ import annotations

import contextlib
import io
import sys

from warehouse import cli


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `whq ARGS...`."""
    monkeypatch.setattr(sys, "argv", ["whq", *map(str, args)])
    try:
        cli.main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def run_whq(*args) -> tuple[int, str, str]:
    """The same without pytest fixtures (for hypothesis tests and module-scoped fixtures)."""
    out, err = io.StringIO(), io.StringIO()
    argv = sys.argv
    sys.argv = ["whq", *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli.main()
        code = 0
    except SystemExit as done:
        code = done.code or 0
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()
