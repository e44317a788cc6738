"""Run the `whq` CLI in-process, through its real error boundary (warehouse.cli.main)."""

from __future__ import annotations

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
