"""Metadata that must never brick a warehouse (warehouse/metadata.py, `whq repair`).

- Every metadata file (a run manifest, the marker, quarantine.json, the catalog path) with
  any content (`{}`, `null`, `{"parts": 5}`, garbage bytes, a folder, and hypothesis' JSON
  and bytes): `runs` and `check` give lines naming the file, never a traceback; `repair`
  exits 0, after it `runs` and `check` pass, and not one committed part byte changed.
- A damaged journal of an interrupted run: resume redoes what it cannot read, or names
  `whq gc --interrupted`; a journal line cannot point resume outside the run.
- Maintenance advice fits the command: a repair is never told to `--resume`; repair, gc and
  opens racing each other all succeed.
- A Python session holding the warehouse open does not block the stock `duckdb` shell on
  whq.duckdb (the README's command), nor the shell a Python session.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import warehouse
from warehouse.errors import DamagedMetadata
from warehouse.layout import Layout
from warehouse.runwriter import RunWriter

from . import whq_child
from .cli_runner import run_whq
from .conftest import FIXTURES

CONTENTS = {
    "empty object": b"{}",
    "null": b"null",
    "parts not a list": b'{"parts": 5}',
    "list": b"[1, 2]",
    "string": b'"whq"',
    "empty file": b"",
    "garbage bytes": bytes(range(256)),
    "truncated JSON": b'{"run_id": "g", "parts": [',
    "version as a string": b'{"format_version": "1", "tool": "whq"}',
    "version true": b'{"format_version": true}',
    "deep nesting": b"[" * 100_000,
    "folder": None,
}
FILES = ["runs/g.json", "whq.json", "quarantine.json", "whq.duckdb"]


def committed_data(root: Path, run: str = "g") -> str:
    """sha256 over every file of the run under data/ (path and bytes): what no command may change."""
    digest = hashlib.sha256()
    for path in sorted(p for p in (root / "data").rglob("*") if p.is_file() and f"/run_id={run}/" in p.as_posix()):
        digest.update(path.relative_to(root).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def golden_copy(folder: Path) -> Path:
    root = folder / "wh"
    shutil.copytree(FIXTURES / "golden_wh", root)
    return root


def put(root: Path, name: str, content: bytes | None) -> None:
    path = root / name
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
    if content is None:
        path.mkdir()
        (path / "inside").write_text("a folder where a file belongs")
    else:
        path.write_bytes(content)


def one_line(code: int, err: str) -> None:
    assert err.count("\n") <= 1 and "Traceback" not in err, err
    if code == 2:
        assert err.startswith("error: ") and err.endswith("\n"), err


def assert_recovered(root: Path, data_before: str, expect_runs: list[str]) -> None:
    code, out, err = run_whq("repair", root)
    assert code == 0 and "rebuilt the catalog" in out and err == "", out + err
    assert all(line.isprintable() for line in out.splitlines())
    code, out, err = run_whq("runs", root, "--format", "json")
    assert code == 0, err
    assert [r["run_id"] for r in json.loads(out)] == expect_runs
    code, out, err = run_whq("check", root)
    assert code == 0 and "all verify" in out, out + err
    assert committed_data(root) == data_before


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("content", list(CONTENTS), ids=list(CONTENTS))
def test_any_content_of_any_metadata_file_is_one_line_and_repair_recovers(name, content, tmp_path):
    root = golden_copy(tmp_path)
    assert run_whq("runs", root)[0] == 0
    data_before = committed_data(root)
    put(root, name, CONTENTS[content])
    for command in ("runs", "check"):
        code, out, err = run_whq(command, root)
        one_line(code, err)
        if code:
            assert f"{root}/{name}" in err + out, err + out
            assert f"whq repair {root}" in err + out or "move it away" in err + out
    # The manifest of the only run cannot be read back: repair sets it aside, its data stays.
    lost_manifest = name == "runs/g.json"
    assert_recovered(root, data_before, [] if lost_manifest else ["g"])
    if lost_manifest:
        assert any(p.name.startswith("g.json.damaged") for p in (root / "runs").iterdir())


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["run_id", "parts", "rows", "config", "format_version", "table", "path", "bytes", "sha256", "x"]
            ),
            inner,
            max_size=5,
        )
    ),
    max_leaves=12,
)
PAYLOADS = st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=64))


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(name=st.sampled_from(FILES[:3]), payload=PAYLOADS)
def test_repair_recovers_from_arbitrary_metadata(name, payload, tmp_path_factory):
    root = golden_copy(tmp_path_factory.mktemp("any"))
    data_before = committed_data(root)
    put(root, name, payload)
    code, _, err = run_whq("runs", root)
    one_line(code, err)
    code, out, err = run_whq("repair", root)
    assert code == 0, out + err
    code, out, err = run_whq("check", root)
    assert code == 0, out + err
    assert committed_data(root) == data_before


def test_a_second_damaged_manifest_never_overwrites_the_first_set_aside(tmp_path):
    root = golden_copy(tmp_path)
    original = (root / "runs" / "g.json").read_bytes()
    for payload in (b"{}", b"null"):
        (root / "runs" / "g.json").write_bytes(payload)
        assert run_whq("repair", root)[0] == 0
        (root / "runs" / "g.json").write_bytes(original)
    assert sorted(p.name for p in (root / "runs").iterdir()) == ["g.json", "g.json.damaged", "g.json.damaged-2"]
    code, out, _ = run_whq("gc", root, "--dry-run")
    assert code == 0 and "would remove 0 item(s)" in out


def test_a_newer_format_is_never_rewritten_by_repair(tmp_path):
    root = golden_copy(tmp_path)
    (root / "whq.json").write_text(json.dumps({"format_version": 99}))
    code, _, err = run_whq("repair", root)
    assert code == 2 and "newer than this whq reads" in err
    assert json.loads((root / "whq.json").read_text()) == {"format_version": 99}


# -- journals of interrupted runs --------------------------------------------------------------
def interrupted(root: Path, run_id: str = "x") -> RunWriter:
    import pyarrow as pa

    warehouse.open(root).close()
    writer = RunWriter(Layout(root), run_id, {"source": "test"})
    rows = pa.table({"doc": pa.array([0], pa.int64()), "doc_id": ["d"], "dataset": ["t"]})
    writer.commit_shard([("documents", None, None, rows)])
    writer.close()
    return writer


@pytest.mark.parametrize("content", [b"{}", b"null", b"garbage \xff", b'{"started_at": "yesterday"}', None])
def test_a_damaged_saved_config_names_gc_interrupted(content, tmp_path):
    root = golden_copy(tmp_path)
    interrupted(root)
    put(root, "journal/x/config.json", content)
    with pytest.raises(DamagedMetadata, match=r"journal/x/config\.json is damaged .*`whq gc .* --interrupted`"):
        RunWriter(Layout(root), "x", {"source": "test"}, resume=True)
    code, out, err = run_whq("gc", root, "--interrupted")
    assert code == 0 and "removed journal/x" in out, out + err
    assert not (root / "journal" / "x").exists() and not list((root / "data").rglob("run_id=x"))


@pytest.mark.parametrize(
    "line",
    [
        b"garbage",
        b'{"shard": 0, "parts": 5, "state": {}, "info": {}}',
        b'{"shard": 0, "parts": [], "state": {"s": "../../../whq.json"}, "info": {}}',
        b'{"shard": 0, "parts": [{"table": "documents", "path": "../../whq.json", "rows": 1, "bytes": 1, "sha256": "'
        + b"0" * 64
        + b'"}], '
        b'"state": {}, "info": {}}',
    ],
)
def test_a_damaged_journal_line_is_redone_and_never_reaches_outside_the_run(line, tmp_path):
    root = golden_copy(tmp_path)
    writer = interrupted(root)
    journal = writer.journal
    journal.write_bytes(line + b"\n" + journal.read_bytes())
    resumed = RunWriter(Layout(root), "x", {"source": "test"}, resume=True)
    try:
        assert resumed.completed_shards == 0
        assert resumed.state("s") is None
    finally:
        resumed.close()
    assert (root / "whq.json").exists() and not list((root / "data").rglob("run_id=x/*.parquet"))


def test_an_unreadable_resume_state_names_gc_interrupted(tmp_path):
    import pyarrow as pa

    root = golden_copy(tmp_path)
    warehouse.open(root).close()
    writer = RunWriter(Layout(root), "x", {"source": "test"})
    writer.commit_shard([], state={"s": pa.table({"n": [1, 2]})})
    writer.close()
    (state,) = (root / "journal" / "x" / "state" / "rank-0").iterdir()
    state.write_bytes(b"not parquet")
    resumed = RunWriter(Layout(root), "x", {"source": "test"}, resume=True)
    try:
        with pytest.raises(DamagedMetadata, match=r"resume state .* is unreadable .*`whq gc .* --interrupted`"):
            resumed.state("s")
    finally:
        resumed.close()


# -- advice that fits ------------------------------------------------------------------------------
def test_a_repair_that_cannot_write_is_told_to_rerun_repair_not_resume(tmp_path, monkeypatch):
    root = golden_copy(tmp_path)
    part = next((root / "data" / "documents").rglob("*.parquet"))
    part.write_bytes(b"garbage")  # repair has a run to quarantine
    monkeypatch.setenv("WHQ_FAULT", "quarantine.partial:1:enospc")
    code, _, err = run_whq("repair", root)
    assert code == 2 and "No space left on device" in err and f"then run `whq repair {root}` again" in err, err
    assert "--resume" not in err
    monkeypatch.delenv("WHQ_FAULT")
    code, out, _ = run_whq("repair", root)
    assert code == 0 and "quarantined run g" in out


def test_repair_gc_ingest_and_opens_racing_each_other_all_succeed(tmp_path, sample_jsonl):
    from .test_faults import ingest_args

    root = golden_copy(tmp_path)
    assert run_whq("runs", root)[0] == 0
    data_before = committed_data(root)
    maintenance = [
        ["repair", root],
        ["gc", root],
        ["runs", root],
        ["check", root, "--quick"],
        ["repair", root],
        ["gc", root],
    ]
    for round_ in range(3):
        commands = [ingest_args(root, sample_jsonl, f"r{round_}"), *maintenance]
        children = [whq_child.start(args, tmp_path / f"{round_}-{i}.log") for i, args in enumerate(commands)]
        codes = [whq_child.join(child, 300) for child in children]
        logs = [(tmp_path / f"{round_}-{i}.log").read_text() for i in range(len(commands))]
        assert codes == [0] * len(commands), logs
    code, out, err = run_whq("runs", root, "--format", "json")
    assert code == 0 and sorted(r["run_id"] for r in json.loads(out)) == ["g", "r0", "r1", "r2"], err
    assert run_whq("check", root)[0] == 0
    assert committed_data(root) == data_before
    assert not list(root.glob(".whq.duckdb.*"))
    assert not any((root / "tmp").iterdir()) and not any((root / "journal").iterdir())


# -- the stock duckdb shell beside a Python session ------------------------------------------------
DUCKDB_SHELL = Path(sys.executable).parent / "duckdb"


@pytest.mark.skipif(not DUCKDB_SHELL.exists(), reason="the duckdb shell (duckdb-cli, test extra) is not installed")
def test_an_open_warehouse_does_not_block_the_duckdb_shell(tmp_path):
    root = golden_copy(tmp_path)
    query = "SELECT count(*) FROM documents"
    with warehouse.open(root) as wh:
        expected = wh.sql(query).fetchall()[0][0]
        held = wh.sql("SELECT * FROM tokens")  # a relation still open on the connection
        guarded = wh.sql(query, read_only=True).fetchall()[0][0]  # the untrusted-SQL connection is open too
        shell = subprocess.run(
            [str(DUCKDB_SHELL), str(root / "whq.duckdb"), "-csv", "-noheader", "-c", query],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert shell.returncode == 0 and shell.stdout.strip() == str(expected), shell.stderr
        assert held.fetchall()
        assert guarded == expected


@pytest.mark.skipif(not DUCKDB_SHELL.exists(), reason="the duckdb shell (duckdb-cli, test extra) is not installed")
def test_an_open_duckdb_shell_does_not_block_a_python_session(tmp_path):
    root = golden_copy(tmp_path)
    warehouse.open(root).close()
    shell = subprocess.Popen(
        [str(DUCKDB_SHELL), str(root / "whq.duckdb")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        shell.stdin.write("SELECT 'ready';\n")
        shell.stdin.flush()
        assert "ready" in shell.stdout.readline() + shell.stdout.readline() + shell.stdout.readline()
        with warehouse.open(root) as wh:  # the shell holds its write lock on whq.duckdb now
            assert wh.sql("SELECT count(*) FROM documents").fetchall()[0][0] > 0
    finally:
        shell.stdin.close()
        shell.wait(timeout=60)


def test_the_explain_call_journal_reads_back_the_same_calls_and_stops_at_a_torn_line(tmp_path):
    from explain.llm import Answer, Request
    from explain.store import CallCache

    wh = warehouse.open(golden_copy(tmp_path))
    # a document's text may hold U+2028 and quotes; a forced answer holds floats of every size
    request = Request("m", (("user", 'say "1"\u2028then\n2 \u00e9'),), forced="a\u2028b", marker="<x>")
    answer = Answer(
        '1\u2028"2"', [["1", -0.5, [["1", -0.5]]]], [{"0": -1e-300, "1": -float("inf"), "2": -0.1}], 7, 1, 0.25
    )
    other = Request("m", (("user", "another"),))
    cache = CallCache(wh, "x", "b", resume=False, keys=[request.key, other.key])
    cache.put(request.key, request, answer)
    cache.put(other.key, other, Answer("0"))
    written = cache.calls_table()
    cache.close()
    journal = cache.path.read_bytes()
    assert journal.count(b"\n") == 2
    cache.path.write_bytes(journal[:-9])  # the second line torn, as a kill mid-write leaves it
    resumed = CallCache(wh, "x", "b", resume=True, keys=[request.key, other.key])
    try:
        assert resumed.get(other.key) is None  # asked again
        again = resumed.get(request.key)
        assert (again.text, again.tokens, again.marks, again.prompt_tokens, again.latency_s) == (
            answer.text,
            answer.tokens,
            answer.marks,
            7,
            0.25,
        )
        read = resumed.calls_table()
        assert read.num_rows == 1 and read.to_pylist()[0] == written.to_pylist()[0]
        assert json.loads(read["request"][0].as_py())["messages"][0]["content"] == request.messages[0][1]
    finally:
        resumed.close()


def test_calls_answered_after_a_torn_line_survive_a_second_kill(tmp_path):
    from explain.llm import Answer, Request
    from explain.store import CallCache

    wh = warehouse.open(golden_copy(tmp_path))
    first, second, third = (Request("m", (("user", f"call {i}"),)) for i in range(3))
    keys = [first.key, second.key, third.key]
    cache = CallCache(wh, "x", "b", resume=False, keys=keys)
    cache.put(first.key, first, Answer("1"))
    cache.put(second.key, second, Answer("2"))
    cache.close()
    cache.path.write_bytes(cache.path.read_bytes()[:-9])  # killed while writing the second line
    resumed = CallCache(wh, "x", "b", resume=True, keys=keys)
    assert resumed.get(second.key) is None
    resumed.put(second.key, second, Answer("2"))
    resumed.put(third.key, third, Answer("3"))
    resumed.close()  # killed again before the commit: what was answered since must not be asked again
    again = CallCache(wh, "x", "b", resume=True, keys=keys)
    try:
        assert [again.get(k).text for k in keys] == ["1", "2", "3"]
    finally:
        again.close()


def test_a_full_disk_under_the_call_journal_is_one_line_and_resume_keeps_the_calls_before(tmp_path):
    import errno
    import os

    from explain.llm import Answer, Request
    from explain.store import CallCache
    from warehouse.errors import WarehouseError

    class FullDisk:
        """The journal's file once the disk is full: every write and the last flush fail."""

        def __init__(self, real):
            self.real = real

        def write(self, _line):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def flush(self):
            self.write("")

        def close(self):
            self.real.close()
            self.write("")

        def fileno(self):
            return self.real.fileno()

    wh = warehouse.open(golden_copy(tmp_path))
    first, second = (Request("m", (("user", f"call {i}"),)) for i in range(2))
    cache = CallCache(wh, "x", "b", resume=False, keys=[first.key, second.key])
    cache.put(first.key, first, Answer("1"))
    cache._journal.flush()
    cache._journal = FullDisk(cache._journal)
    with pytest.raises(WarehouseError) as failed:
        cache.put(second.key, second, Answer("2"))
    assert "No space left on device" in str(failed.value) and "--resume" in str(failed.value)
    cache.close()  # the torn line left in the buffer cannot be written either: no second error
    resumed = CallCache(wh, "x", "b", resume=True, keys=[first.key, second.key])
    try:
        assert resumed.get(first.key).text == "1" and resumed.get(second.key) is None
    finally:
        resumed.close()


def test_an_explain_commit_into_a_run_deleted_meanwhile_says_so(tmp_path):
    import pyarrow as pa

    from explain import store
    from warehouse.errors import UnknownRun

    root = golden_copy(tmp_path)
    wh = warehouse.open(root)
    run = wh.run_ids()[0]
    run_whq("runs", str(root), "--delete", run)
    rows = pa.table({"explanation_id": ["e"]})
    with pytest.raises(UnknownRun, match="deleted while this command ran"):
        store.commit(wh, run, "b", [("explanations", None, None, rows)], set())
    assert not any(Layout(root).runs_dir.glob("*.json"))


def test_a_resume_after_a_kill_past_the_commit_stores_each_call_once(tmp_path):
    from explain import store
    from explain.llm import Answer, Request
    from explain.store import CallCache

    wh = warehouse.open(golden_copy(tmp_path))
    run = wh.run_ids()[0]
    calls = [Request("m", (("user", f"call {i}"),)) for i in range(3)]
    keys = [r.key for r in calls]
    cache = CallCache(wh, run, "b", resume=False, keys=keys)
    for i, request in enumerate(calls[:2]):
        cache.put(request.key, request, Answer(str(i)))
    store.commit(wh, run, "b", [("model_calls", None, None, cache.calls_table())], set())
    cache.close()  # killed here: committed, the journal not yet removed
    wh = warehouse.open(wh.root)
    resumed = CallCache(wh, run, "b", resume=True, keys=keys)
    assert [resumed.get(k).text for k in keys[:2]] == ["0", "1"] and resumed.get(keys[2]) is None
    resumed.put(keys[2], calls[2], Answer("2"))
    store.commit(wh, run, "b", [("model_calls", None, None, resumed.calls_table())], set())
    resumed.discard()
    stored = warehouse.open(wh.root).sql("SELECT request_hash FROM model_calls").fetchall()
    assert sorted(h for (h,) in stored) == sorted(keys)
