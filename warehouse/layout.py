"""Where things live in a warehouse folder, and the names allowed there.

    <root>/whq.json                 format marker
    <root>/whq.duckdb               catalog: views + macros only, regenerated from manifests
    <root>/runs/<run_id>.json       one manifest per committed run
    <root>/data/<table>/run_id=<id>/[site=<s>/layer=<n>/]part-<rank>-<seq>.parquet
    <root>/journal/<run_id>/        progress of runs being written (resume state)
    <root>/tmp/                     parts being written; never read; swept when stale
    <root>/quarantine.json          runs left out of the views until repaired (`whq repair`)

Every path built from a run id or site name checks the name first (warehouse/names.py),
so no caller can reach outside its folder with one.
"""

from __future__ import annotations

from pathlib import Path

from .names import check_name

FORMAT_VERSION = 1
MARKER = "whq.json"
CATALOG = "whq.duckdb"


class Layout:
    # Options Polars needs to read the parts (credentials and endpoint of a remote root, warehouse/remote.py).
    storage_options: dict | None = None

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def part_path(self, rel: str) -> Path:
        """Where DuckDB and Polars read a committed part (`rel` as its manifest names it)."""
        return self.root / rel

    def opened_as(self, paths: list[str]) -> list[str]:
        """The names DuckDB opens these parts by (its allowed_paths for untrusted SQL)."""
        return paths

    def prepare(self, con) -> None:
        """Let DuckDB connection `con` read the parts (a remote root registers its filesystem)."""

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def catalog(self) -> Path:
        return self.root / CATALOG

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def tmp_dir(self) -> Path:
        return self.root / "tmp"

    @property
    def journal_root(self) -> Path:
        return self.root / "journal"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine.json"

    @property
    def commit_lock(self) -> Path:
        return self.root / ".commit.lock"

    def manifest(self, run_id: str) -> Path:
        return self.runs_dir / f"{check_name('run id', run_id)}.json"

    def journal_dir(self, run_id: str) -> Path:
        return self.journal_root / check_name("run id", run_id)

    def partition_dir(self, table: str, run_id: str, site: str | None = None, layer: int | None = None) -> Path:
        path = self.data_dir / table / f"run_id={check_name('run id', run_id)}"
        if site is not None:
            path = path / f"site={check_name('site', site)}" / f"layer={int(layer)}"
        return path

    def run_data_dirs(self, run_id: str):
        """Every data/<table>/run_id=<id> folder that exists for the run."""
        check_name("run id", run_id)
        if not self.data_dir.exists():
            return []
        return [d / f"run_id={run_id}" for d in sorted(self.data_dir.iterdir()) if (d / f"run_id={run_id}").exists()]

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix()
