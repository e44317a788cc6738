"""Crash safety: `whq ingest` killed (SIGKILL) at many points, then resumed; disk full, permission denied, read-only.

Each scenario copies a warehouse holding one committed run ('base'), runs a real
`whq ingest` child process that SIGKILLs itself at a fault point (warehouse/faults.py),
optionally kills the `--resume` too, and then checks:

- the committed run 'base' is byte-for-byte unchanged (manifest and part checksums);
- no table shows a row of an uncommitted run (read straight from the catalog file);
- `--resume` completes and run 'r' has exactly the rows of an uninterrupted run
  (a content checksum over every table);
- tmp/, journal/ and temporary catalogs are swept, no orphan part is left and
  `whq check` verifies every part.

Scenarios run two at a time; the children are forked from a server with torch loaded.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import duckdb
import pytest

import warehouse
from ingest.pipeline import ingest
from warehouse import faults, maintenance

from . import whq_child
from .cli_runner import run_whq
from .conftest import FIXTURES, SAMPLE_TEXTS, write_jsonl
from .reference import content_checksum

MODEL = "config:llama-tiny"  # a random tiny Llama: the same code paths as a real model, in a fraction of the time
SITES = ["mlp.act:topk=4,examples=3", "mlp.up:nag=5", "resid.out:last"]
OPTIONS = dict(batch_size=4, max_length=32, shard_tokens=400, device="cpu")


def ingest_args(root: Path, data: Path, run_id: str = "r") -> list[str]:
    args = ["ingest", root, "--model", MODEL, "--data", data, "-q", "--run-id", run_id]
    for site in SITES:
        args += ["--site", site]
    for option, value in OPTIONS.items():  # the same options as the in-process reference runs
        args += [f"--{option.replace('_', '-')}", str(value)]
    return args


@dataclass(frozen=True)
class Scenario:
    kill: str  # WHQ_FAULT of the first ingest
    resume_kill: str | None = None  # WHQ_FAULT of a first --resume that is killed too
    what: str = ""

    @property
    def id(self) -> str:
        return self.kill + (f"+resume@{self.resume_kill}" if self.resume_kill else "")


SCENARIOS = [
    Scenario("config.partial", what="while writing the run's config"),
    Scenario("config.renamed", what="config written, no part yet"),
    Scenario("part.partial:1", what="while writing the first part"),
    Scenario("part.partial:9", what="while writing a part in the middle of a shard"),
    Scenario("part.synced:4", what="part fsynced in tmp/, before its rename"),
    Scenario("part.renamed:1", what="first part renamed into data/, before the journal"),
    Scenario("part.renamed:30", what="a part of the second shard renamed, before the journal"),
    Scenario("shard.parts:1", what="all parts of a shard renamed, before its state and journal"),
    Scenario("state.partial:1", what="while writing the resume state"),
    Scenario("state.renamed:2", what="state written, journal line not"),
    Scenario("shard.journal_torn:1", what="half a journal line on disk"),
    Scenario("shard.journal_torn:3", what="half the third journal line on disk"),
    Scenario("shard.journalled:1", what="first shard durable"),
    Scenario("shard.journalled:3", what="third shard durable"),
    Scenario("commit.ranks", what="every shard durable, before the run-level parts"),
    Scenario("final.partial:2", what="while writing a run-level part"),
    Scenario("final.renamed:3", what="some run-level parts renamed"),
    Scenario("commit.final_parts", what="run-level parts written, before the commit lock"),
    Scenario("commit.locked", what="holding the commit lock, before the manifest"),
    Scenario("manifest.partial", what="while writing the manifest"),
    Scenario("manifest.synced", what="manifest in tmp/, before its rename"),
    Scenario("manifest.renamed", what="committed, catalog not rebuilt yet"),
    Scenario("catalog.views:1", what="during the catalog rebuild of the commit"),
    Scenario("catalog.built:1", what="new catalog complete, before its rename"),
    Scenario("commit.catalog", what="catalog in place, journal not removed"),
    Scenario("commit.cleanup", what="journal removed, tmp/ not"),
    Scenario("shard.journalled:2", "resume.cleaned", "during resume, after its cleanup"),
    Scenario("part.renamed:5", "part.partial:3", "during resume, while it rewrites a part"),
    Scenario("shard.journalled:1", "shard.journalled:1", "during resume, after its first new shard"),
    Scenario("part.partial:1", "open.sweep", "during resume, while it sweeps the dead writer's tmp/"),
    Scenario("commit.locked", "manifest.synced", "during resume, in its commit"),
    Scenario("manifest.renamed", "catalog.views:1", "during resume, rebuilding the stale catalog on open"),
]


def committed_bytes(root: Path, run_id: str) -> str:
    """sha256 over the run's manifest and every part file it lists."""
    manifest = root / "runs" / f"{run_id}.json"
    digest = hashlib.sha256(manifest.read_bytes())
    for part in json.loads(manifest.read_text())["parts"]:
        digest.update((root / part["path"]).read_bytes())
    return digest.hexdigest()


def visible_runs(root: Path) -> dict[str, set[str]]:
    """Run ids per table, read from the catalog file as any reader would (no sweep, no rebuild)."""
    con = duckdb.connect(str(root / "whq.duckdb"), read_only=True)
    try:
        return {
            t: {r for (r,) in con.execute(f"SELECT DISTINCT run_id FROM {t}").fetchall()}
            for t in warehouse.schema.tables()
        }
    finally:
        con.close()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    data = write_jsonl(folder / "docs.jsonl", [f"{t} ({i})" for i in range(2) for t in SAMPLE_TEXTS])
    base_data = write_jsonl(folder / "base.jsonl", SAMPLE_TEXTS[:3])
    template = folder / "template"
    ingest(template, MODEL, [str(base_data)], SITES, run_id="base", progress=False, **OPTIONS)
    baseline = folder / "baseline"
    ingest(baseline, MODEL, [str(data)], SITES, run_id="r", progress=False, **OPTIONS)
    with warehouse.open(baseline) as wh:
        expected = content_checksum(wh, "r")
    return folder, data, template, expected


def _scenario(setup, scenario: Scenario, index: int) -> dict:
    folder, data, template, _ = setup
    root = folder / f"s{index:02d}"
    shutil.copytree(template, root)
    warehouse.open(root).close()  # catalog rebuilt for the new path, so the child's first rebuild is its commit's
    base_before = committed_bytes(root, "base")
    log = folder / f"s{index:02d}.log"
    args = ingest_args(root, data)
    result = {"root": root, "log": log, "base_before": base_before}
    result["kill_code"] = whq_child.run(args, log, {"WHQ_FAULT": scenario.kill})
    result["visible_after_kill"] = visible_runs(root)
    result["committed_after_kill"] = (root / "runs" / "r.json").exists()
    if scenario.resume_kill:
        result["resume_kill_code"] = whq_child.run(args + ["--resume"], log, {"WHQ_FAULT": scenario.resume_kill})
        result["visible_after_resume_kill"] = visible_runs(root)
    result["resume_code"] = whq_child.run(args + ["--resume"], log)
    return result


DISK_ERRORS = [
    ("part.partial:3:enospc", "No space left on device"),
    ("manifest.partial:1:enospc", "No space left on device"),
    ("state.partial:1:eacces", "Permission denied"),
    ("part.partial:1:eacces", "Permission denied"),
    ("part.renamed:2:enospc", "No space left on device"),  # the folder's fsync after the rename
    ("config.partial:1:erofs", "Read-only file system"),
]


def _disk_error(setup, fault: str, index: int) -> dict:
    folder, data, template, _ = setup
    root = folder / f"e{index:02d}"
    shutil.copytree(template, root)
    warehouse.open(root).close()
    log = folder / f"e{index:02d}.log"
    result = {"root": root, "log": log, "base_before": committed_bytes(root, "base")}
    result["code"] = whq_child.run(ingest_args(root, data), log, {"WHQ_FAULT": fault})
    result["lines"] = log.read_text().strip().splitlines()
    result["visible"] = visible_runs(root)
    result["committed"] = (root / "runs" / "r.json").exists()
    result["resume_code"] = whq_child.run(ingest_args(root, data) + ["--resume"], log) if index == 0 else None
    return result


@pytest.fixture(scope="module")
def outcomes(setup):
    """Every scenario and disk error, two at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {s: pool.submit(_scenario, setup, s, i) for i, s in enumerate(SCENARIOS)}
        futures.update({f: pool.submit(_disk_error, setup, f, i) for i, (f, _) in enumerate(DISK_ERRORS)})
        return {key: f.result() for key, f in futures.items()}


def test_every_fault_point_is_documented_and_reached_by_a_scenario():
    sources = "".join(p.read_text() for p in Path(warehouse.__file__).parent.glob("*.py"))
    used = {s.kill.split(":")[0] for s in SCENARIOS} | {s.resume_kill.split(":")[0] for s in SCENARIOS if s.resume_kill}
    assert used == set(faults.POINTS)
    assert len({s.id for s in SCENARIOS}) >= 20
    for point in faults.POINTS:
        prefix = point.split(".")[0]
        assert f'fault("{point}")' in sources or f'"{prefix}"' in sources, point


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_killed_ingest_resumes_to_the_uninterrupted_rows(scenario, outcomes, setup):
    out = outcomes[scenario]
    root, log = out["root"], out["log"]
    assert out["kill_code"] == -9, f"the ingest was not killed at {scenario.kill}: {log.read_text()[-2000:]}"
    allowed = {"base", "r"} if out["committed_after_kill"] else {"base"}
    assert all(runs <= allowed for runs in out["visible_after_kill"].values()), out["visible_after_kill"]
    if scenario.resume_kill:
        assert out["resume_kill_code"] == -9, (
            f"the resume was not killed at {scenario.resume_kill}: {log.read_text()[-2000:]}"
        )
        committed = (root / "runs" / "r.json").exists()
        assert all(
            runs <= ({"base", "r"} if committed else {"base"}) for runs in out["visible_after_resume_kill"].values()
        )
    assert out["resume_code"] == 0, log.read_text()[-3000:]

    with warehouse.open(root) as wh:
        assert wh.run_ids() == ["base", "r"]
        assert content_checksum(wh, "r") == setup[3]
        problems, _ = maintenance.check(wh)
        assert problems == []
        assert maintenance.gc(wh, dry_run=True) == []
    assert committed_bytes(root, "base") == out["base_before"]
    assert not any((root / "tmp").iterdir())
    assert not (root / "journal").exists() or not any((root / "journal").iterdir())
    assert not list(root.glob(".whq.duckdb.*"))


@pytest.mark.parametrize("fault,message", DISK_ERRORS, ids=[f for f, _ in DISK_ERRORS])
def test_disk_errors_give_one_line_and_commit_nothing_half(fault, message, outcomes, setup):
    """Disk full, permission denied, read-only mount (raised at the write): one line, exit 2, nothing half."""
    out = outcomes[fault]
    assert out["code"] == 2 and len(out["lines"]) == 1, out["lines"]
    line = out["lines"][0]
    assert line.startswith("error: cannot write ") and message in line and "--resume" in line
    assert not out["committed"]
    assert all(runs <= {"base"} for runs in out["visible"].values())
    assert committed_bytes(out["root"], "base") == out["base_before"]
    with warehouse.open(out["root"]) as wh:  # the committed run stays queryable
        assert wh.sql("SELECT count(*) FROM tokens WHERE run_id = 'base'").fetchall()[0][0] > 0
        if out["resume_code"] is not None:  # once the disk has room again, --resume finishes the run
            assert out["resume_code"] == 0
            assert content_checksum(wh, "r") == setup[3]


# -- real mounts: a full disk while the catalog is rebuilt, a read-only warehouse ------------------
@contextlib.contextmanager
def mounted(target: Path, *args: str):
    """`mount ARGS TARGET` for the block (root only: skip with the reason otherwise), unmounted after."""
    target.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount here ({(done.stderr or 'mount failed').strip()}): the test needs root and mount")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def golden_warehouse(root: Path) -> Path:
    shutil.copytree(FIXTURES / "golden_wh", root)
    return root


def part_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / "data").rglob("*.parquet")}


@pytest.mark.parametrize("free_kb", [8, 60, 250])
def test_a_real_full_disk_while_the_catalog_is_rebuilt_is_one_line_and_leaves_no_temporary(free_kb, tmp_path):
    """Measured on a 2 MB tmpfs: DuckDB fails in ATTACH, in a commit of its WAL or in the checkpoint of DETACH."""
    with mounted(tmp_path / "disk", "-t", "tmpfs", "-o", "size=2m", "tmpfs") as disk:
        root = golden_warehouse(disk / "wh")
        parts = part_bytes(root)
        filler = disk / "filler"
        free = shutil.disk_usage(disk).free - free_kb * 1024
        with open(filler, "wb") as fh:
            fh.write(b"\0" * max(free, 0))
        code, out, err = run_whq("repair", root)
        assert code == 2 and err.count("\n") == 1, out + err
        assert (
            err.startswith(f"error: cannot write the catalog {root}/whq.duckdb: ")
            and f"then run `whq repair {root}`" in err
        )
        assert not list(root.glob(".whq.duckdb*")) and not (root / "whq.duckdb").exists()
        assert part_bytes(root) == parts
        filler.unlink()
        assert run_whq("repair", root)[0] == 0
        code, out, err = run_whq("sql", root, "SELECT count(*) AS n FROM documents", "--format", "json")
        assert code == 0 and json.loads(out)[0]["n"] > 0, err


def test_a_read_only_warehouse_is_read_and_refuses_writes_with_one_line(tmp_path, sample_jsonl):
    source = golden_warehouse(tmp_path / "wh")
    with mounted(tmp_path / "ro", "--bind", str(source)) as view:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(view)], check=True)
        warehouse.open(source).close()  # a catalog exists (built for the other path: stale here)
        code, out, err = run_whq(
            "ingest", view, "--model", MODEL, "--data", sample_jsonl, "-q", "--run-id", "x", "--device", "cpu"
        )
        assert code == 2 and err.count("\n") == 1, out + err
        assert err.startswith(
            f"error: cannot lock {view}/journal/x/rank-0.lock: Read-only file system; "
            f"the warehouse folder must be writable"
        ), err
        for command in (("repair", view), ("gc", view), ("runs", view, "--delete", "g")):
            code, out, err = run_whq(*command)
            assert code == 2 and err.count("\n") == 1 and "Read-only file system" in err, (command, out + err)
        code, out, err = run_whq("check", view)
        assert code == 0 and "all verify" in out, out + err
        code, out, err = run_whq("runs", view, "--format", "json")
        assert code == 0 and [r["run_id"] for r in json.loads(out)] == ["g"], err
    assert sorted(p.name for p in (source / "runs").iterdir()) == ["g.json"]
