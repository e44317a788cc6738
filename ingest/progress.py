"""A rich progress line for ingest: documents, tokens, and their rates."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.text import Text


class _Rates(ProgressColumn):
    def __init__(self, owner: IngestProgress):
        super().__init__()
        self.owner = owner

    def render(self, task) -> Text:
        elapsed = max(time.perf_counter() - self.owner.started, 1e-9)
        return Text(
            f"{self.owner.docs:,} docs ({self.owner.docs / elapsed:,.1f}/s)  "
            f"{self.owner.tokens:,} tokens ({self.owner.tokens / elapsed:,.0f}/s)"
        )


class IngestProgress:
    def __init__(self, enabled: bool, run_id: str):
        self.enabled, self.run_id = enabled, run_id
        self.docs = self.tokens = 0
        self.started = time.perf_counter()
        self._progress = None

    def __enter__(self):
        if self.enabled:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn(f"ingest {self.run_id}"),
                _Rates(self),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._progress.start()
            self._task = self._progress.add_task("ingest", total=None)
        return self

    def advance(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if self._progress is not None:
            self._progress.update(self._task, advance=docs)

    def __exit__(self, *exc):
        if self._progress is not None:
            self._progress.stop()
