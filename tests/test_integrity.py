"""`whq check`, `whq repair`, `whq gc` and `whq runs --delete` on a warehouse with two runs."""

from __future__ import annotations

import json
import shutil

import pytest

import warehouse
from ingest.pipeline import ingest
from warehouse import maintenance

from .cli_runner import run_whq
from .reference import content_checksum


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, sample_jsonl):
    root = tmp_path_factory.mktemp("integrity") / "wh"
    for run_id in ("a", "b"):
        ingest(
            root,
            "config:llama-tiny",
            [str(sample_jsonl)],
            ["mlp.act:topk=3", "resid.out:last"],
            run_id=run_id,
            device="cpu",
            max_length=32,
            progress=False,
        )
    return root


@pytest.fixture
def wh_copy(two_runs, tmp_path):
    root = tmp_path / "wh"
    shutil.copytree(two_runs, root)
    return root


def _part(root, run_id: str, table: str = "token_neurons") -> tuple[dict, object]:
    manifest = json.loads((root / "runs" / f"{run_id}.json").read_text())
    part = next(p for p in manifest["parts"] if p["table"] == table)
    return part, root / part["path"]


def test_check_passes_on_a_sound_warehouse(wh_copy):
    code, out, _ = run_whq("check", wh_copy)
    assert code == 0 and out.splitlines()[-1].endswith("all verify")


@pytest.mark.parametrize(
    "how,kind", [("flip", "corrupt"), ("truncate", "corrupt"), ("delete", "missing"), ("swap", "corrupt")]
)
def test_check_names_a_bad_part_and_repair_quarantines_only_its_run(wh_copy, how, kind):
    part, path = _part(wh_copy, "a")
    with warehouse.open(wh_copy) as wh:
        b_before = content_checksum(wh, "b")
    if how == "flip":  # same size, other bytes: only the checksum sees it
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "delete":
        path.unlink()
    else:  # a valid Parquet file of another table in its place
        _, other = _part(wh_copy, "a", "documents")
        shutil.copy(other, path)
    code, out, _ = run_whq("check", wh_copy)
    lines = out.splitlines()
    assert code == 1 and len(lines) == 2
    assert lines[0].startswith(f"{kind} part {part['path']} of run a: ") and f"`whq repair {wh_copy}`" in lines[0]
    assert lines[1].endswith("1 bad part(s)")

    code, out, _ = run_whq("repair", wh_copy)
    assert (
        code == 0
        and out.splitlines()[0] == "quarantined run a: its parts are missing or corrupt, queries no longer see it"
    )
    with warehouse.open(wh_copy) as wh:
        assert wh.quarantined() == {"a"}
        assert {r for (r,) in wh.sql("SELECT DISTINCT run_id FROM token_neurons").fetchall()} == {"b"}
        assert content_checksum(wh, "b") == b_before
    code, out, _ = run_whq("runs", wh_copy, "--delete", "a")
    assert code == 0
    assert run_whq("check", wh_copy)[0] == 0
    with warehouse.open(wh_copy) as wh:
        assert wh.run_ids() == ["b"] and wh.quarantined() == set()
        assert not (wh_copy / "data" / "token_neurons" / "run_id=a").exists()


def test_repair_releases_a_run_whose_part_was_restored(wh_copy):
    _, path = _part(wh_copy, "a")
    good = path.read_bytes()
    path.write_bytes(b"broken")
    run_whq("repair", wh_copy)
    path.write_bytes(good)
    code, out, _ = run_whq("repair", wh_copy)
    assert "released run a from quarantine: its parts verify again" in out
    with warehouse.open(wh_copy) as wh:
        assert wh.quarantined() == set() and wh.run_ids() == ["a", "b"]


def test_an_open_warehouse_sees_a_repair_once_refreshed(wh_copy):
    """repair() (or any other process) rebuilt the catalog, but an open Warehouse's queries kept the connection
    to the catalog it had copied: refresh() rebuilt nothing and the quarantined run stayed visible."""
    from warehouse.maintenance import repair

    _, path = _part(wh_copy, "a")
    with warehouse.open(wh_copy) as wh:
        runs = "SELECT DISTINCT run_id FROM token_neurons ORDER BY 1"
        assert wh.sql(runs).fetchall() == wh.sql(runs, read_only=True).fetchall() == [("a",), ("b",)]
        path.write_bytes(b"broken")
        repair(wh_copy)
        wh.refresh()
        assert wh.sql(runs).fetchall() == wh.sql(runs, read_only=True).fetchall() == [("b",)]


def test_delete_is_atomic_first_invisible_then_gone(wh_copy, monkeypatch):
    """Killed between the manifest's removal and the data's: the run is already invisible; gc removes the rest."""

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # stands in for the process dying before the data is removed

    with warehouse.open(wh_copy) as wh, monkeypatch.context() as patch:
        patch.setattr(maintenance.shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            maintenance.delete_run(wh, "a")
    with warehouse.open(wh_copy) as wh:
        assert wh.run_ids() == ["b"]
        assert {r for (r,) in wh.sql("SELECT DISTINCT run_id FROM tokens").fetchall()} == {"b"}
        removed = maintenance.gc(wh)
    assert removed and all("run_id=a" in p for p in removed)
    assert not any((wh_copy / "data").rglob("run_id=a"))


def test_gc_removes_orphans_and_keeps_what_runs_need(wh_copy):
    wh = warehouse.open(wh_copy)  # opened first: opening alone sweeps stale tmp/ entries and catalogs
    (wh_copy / "data" / "tokens" / "run_id=b" / "part-0-999999.parquet").write_bytes(b"orphan")
    (wh_copy / "data" / "tokens" / "run_id=zz").mkdir()
    (wh_copy / "data" / "tokens" / "run_id=zz" / "part-0-000000.parquet").write_bytes(b"orphan")
    (wh_copy / ".whq.duckdb.12345.tmp").write_bytes(b"stale catalog")
    (wh_copy / "tmp" / "zz.rank-0").mkdir(parents=True)
    # an interrupted run: kept (resumable) unless --interrupted
    (wh_copy / "journal" / "live").mkdir(parents=True)
    (wh_copy / "journal" / "live" / "config.json").write_text("{}")
    (wh_copy / "data" / "tokens" / "run_id=live").mkdir()
    (wh_copy / "data" / "tokens" / "run_id=live" / "part-0-000000.parquet").write_bytes(b"journalled part")
    expected = [
        "data/tokens/run_id=b/part-0-999999.parquet",
        "data/tokens/run_id=zz/part-0-000000.parquet",
        ".whq.duckdb.12345.tmp",
        "tmp/zz.rank-0",
    ]
    assert sorted(maintenance.gc(wh, dry_run=True)) == sorted(expected)
    assert (wh_copy / "data" / "tokens" / "run_id=zz").exists()
    assert sorted(maintenance.gc(wh)) == sorted(expected)
    wh.close()
    assert (wh_copy / "data" / "tokens" / "run_id=live" / "part-0-000000.parquet").exists()
    assert not (wh_copy / "data" / "tokens" / "run_id=zz").exists()
    code, out, _ = run_whq("gc", wh_copy, "--interrupted")
    assert "removed data/tokens/run_id=live/part-0-000000.parquet" in out and "removed journal/live" in out
    assert run_whq("check", wh_copy)[0] == 0
    with warehouse.open(wh_copy) as wh:
        assert wh.run_ids() == ["a", "b"]
