"""Inputs and resume: the readers under raw bytes and odd files, and `--resume` tied to content.

Each bad input ends in exit 2 and one line, never a traceback, and leaves no interrupted
run behind: a rerun with good data and the same run id then commits. The reader-level
properties run many examples cheaply; the CLI-level ones run the tiny config model.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import sources
from ingest.shard import Shard
from warehouse import faults
from warehouse.errors import BadInput

from .cli_runner import run_whq

MODEL = ["--model", "config:llama-tiny", "-q", "--device", "cpu", "--site", "mlp.act:topk=3"]
GOOD = b'{"text": "hello world"}\n{"text": "a second document"}\n'


def _one_line_exit_2(code: int, out: str, err: str) -> None:
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err


def _no_interrupted_run(root: Path) -> None:
    journal = root / "journal"
    assert not journal.exists() or not any(journal.iterdir()), "a bad input left an interrupted run behind"


def _rerun_with_good_data_commits(root: Path, folder: Path, name: str = "good.jsonl") -> None:
    good = folder / name
    good.write_bytes(GOOD)
    code, out, err = run_whq("ingest", root, *MODEL, "--data", good, "--run-id", "r")
    assert code == 0, err
    assert "committed run r; 2 documents" in out


def _read_all(path: Path) -> list:
    """What the pipeline does with a file: check, scan, read, and build the documents rows."""
    paths = sources.check_paths([str(path)])
    sources.scan(paths, skip_bad=False)
    docs = list(sources.read(paths, sources.SkipCounter()))
    Shard([(i, doc, []) for i, doc in enumerate(docs)], len(docs)).documents_table()
    return docs


RAW = st.one_of(
    st.binary(min_size=1, max_size=64),
    st.lists(
        st.sampled_from(
            [
                b"\xef\xbb\xbf",
                b"\x00",
                b"\n",
                b"{",
                b"}",
                b'"text"',
                b":",
                b'"a\\ud800"',
                b"\xff",
                b'"dataset"',
                b"5",
                b"[1]",
                b"null",
                b",",
                b'"message_index"',
                b"-1",
                b"\r\n",
                b" ",
            ]
        ),
        min_size=1,
        max_size=16,
    ).map(b"".join),
)


@settings(max_examples=150, deadline=None)
@given(raw=RAW, suffix=st.sampled_from([".jsonl", ".txt", ".parquet"]))
def test_readers_accept_or_refuse_any_bytes_with_bad_input(raw, suffix):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"docs{suffix}"
        path.write_bytes(raw)
        try:
            docs = _read_all(path)
        except BadInput:
            return
        assert all(isinstance(d.text, str) for d in docs)


ROWS = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "text": st.one_of(st.text(max_size=8), st.integers(), st.none(), st.binary(max_size=4)),
            "doc_id": st.one_of(st.text(max_size=4), st.integers(), st.floats()),
            "dataset": st.one_of(st.text(max_size=4), st.integers(), st.none()),
            "message_index": st.one_of(st.integers(-3, 3), st.text(max_size=2), st.none()),
            "meta_value": st.one_of(st.floats(), st.text(max_size=3)),
        },
    ),
    min_size=1,
    max_size=4,
)


@settings(max_examples=60, deadline=None)
@given(rows=ROWS)
def test_parquet_of_any_column_types_is_read_or_refused_with_bad_input(rows):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "docs.parquet"
        try:
            table = pa.Table.from_pylist(rows)
        except (pa.ArrowException, TypeError, OverflowError):
            return  # no single column type fits these rows: not a Parquet file anyone could write
        pq.write_table(table, path)
        try:
            _read_all(path)
        except BadInput:
            pass


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _make_fifo(path: Path) -> None:
    os.mkfifo(path)


def _make_loop(path: Path) -> None:
    os.symlink(path.name, path)


ODD_FILES = {
    "a directory named docs.jsonl": ("docs.jsonl", lambda p: p.mkdir(), "is a directory, not a regular file"),
    "a FIFO": ("docs.jsonl", _make_fifo, "is a named pipe (FIFO), not a regular file"),
    "a symlink loop": ("docs.jsonl", _make_loop, "cannot be opened (Too many levels of symbolic links)"),
    "a dangling symlink": ("docs.jsonl", lambda p: os.symlink("nowhere.jsonl", p), "does not exist"),
    "an empty file": ("docs.jsonl", lambda p: p.write_bytes(b""), "is empty"),
    "invalid UTF-8 in the third line": (
        "docs.jsonl",
        lambda p: p.write_bytes(GOOD + b'{"text": "\xc3\x28"}\n'),
        ":3: not UTF-8 text",
    ),
    "a lone surrogate escape": ("docs.jsonl", lambda p: p.write_bytes(b'{"text": "a\\ud800b"}\n'), "lone surrogate"),
    "a dataset label that is a number": (
        "docs.jsonl",
        lambda p: p.write_bytes(b'{"text": "x", "dataset": 5}\n'),
        "column 'dataset' must be a string or null, got int",
    ),
    "a message_index that is text": (
        "docs.jsonl",
        lambda p: p.write_bytes(b'{"text": "x", "message_index": "one"}\n'),
        "column 'message_index' must be a whole number",
    ),
    "a UTF-16 file": ("docs.txt", lambda p: p.write_bytes("hello\n".encode("utf-16")), ":1: not UTF-8 text"),
    "a truncated parquet": (
        "docs.parquet",
        lambda p: p.write_bytes(_parquet_bytes(pa.table({"text": ["a"] * 50}))[:-30]),
        "is not a readable Parquet file",
    ),
    "a parquet whose text column is numbers": (
        "docs.parquet",
        lambda p: p.write_bytes(_parquet_bytes(pa.table({"text": [1, 2]}))),
        "column 'text' must be a string, got int",
    ),
    "a parquet whose label column is a list": (
        "docs.parquet",
        lambda p: p.write_bytes(_parquet_bytes(pa.table({"text": ["a"], "label": [[1, 2]]}))),
        "column 'label' must be a string or null, got list",
    ),
    "a parquet timestamp past year 9999": (
        "docs.parquet",
        lambda p: p.write_bytes(
            _parquet_bytes(pa.table({"text": ["a"], "when": pa.array([3 * 10**17], type=pa.timestamp("us"))}))
        ),
        "is not a readable Parquet file (date value out of range)",
    ),
    "a JSON id of 5000 digits": (
        "docs.jsonl",
        lambda p: p.write_bytes(b'{"text": "x", "id": ' + b"9" * 5000 + b"}\n"),
        ":1: Exceeds the limit (4300 digits)",
    ),
    "a bad record after many good ones": (
        "docs.jsonl",
        lambda p: p.write_bytes(GOOD * 200 + b"{oops}\n"),
        ":401: invalid JSON",
    ),
}


@pytest.mark.parametrize("what", list(ODD_FILES))
def test_odd_data_files_end_in_one_line_and_a_good_rerun_commits(what, tmp_path):
    name, make, expected = ODD_FILES[what]
    path = tmp_path / name
    make(path)
    root = tmp_path / "wh"
    # Small shards: a bad record late in the file is still refused before the first shard is journalled.
    code, out, err = run_whq("ingest", root, *MODEL, "--data", path, "--run-id", "r", "--shard-tokens", "8")
    _one_line_exit_2(code, out, err)
    assert expected in err
    _no_interrupted_run(root)
    _rerun_with_good_data_commits(root, tmp_path)


@pytest.mark.parametrize(
    "raw",
    [b"\xef\xbb\xbf" + GOOD, GOOD.replace(b"world", b"wor\\u0000ld"), GOOD.replace(b"\n", b"\r\n")],
    ids=["UTF-8 BOM", "NUL in the text", "CRLF line ends"],
)
def test_harmless_oddities_are_read(raw, tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_bytes(raw)
    code, out, err = run_whq("ingest", tmp_path / "wh", *MODEL, "--data", path, "--run-id", "r")
    assert code == 0, err
    assert "committed run r; 2 documents" in out


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=RAW, suffix=st.sampled_from([".jsonl", ".txt", ".parquet"]))
def test_any_bytes_through_the_cli_commit_or_refuse_cleanly(raw, suffix):
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        path = folder / f"docs{suffix}"
        path.write_bytes(raw)
        code, out, err = run_whq("ingest", folder / "wh", *MODEL, "--data", path, "--run-id", "r")
        if code == 0:
            return
        _one_line_exit_2(code, out, err)
        _no_interrupted_run(folder / "wh")
        _rerun_with_good_data_commits(folder / "wh", folder)


@settings(max_examples=40, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=40),
        RAW,
        st.just(b"a: 2001-13-01\n"),
        st.just(b"[" * 5000),
        st.just(b'name: "\\ud800"\n'),
        st.just(b"\xef\xbb\xbfname: x\n"),
    )
)
def test_scenario_loader_refuses_any_bytes_with_bad_input(raw):
    from ingest import scenario

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "scenario.yaml"
        path.write_bytes(raw)
        try:
            scenario.load(path)
        except BadInput as err:
            assert "\n" not in " ".join(str(err).split())


def test_scenario_that_is_a_directory_or_fifo_is_refused(tmp_path):
    from ingest import scenario

    (tmp_path / "dir.yaml").mkdir()
    os.mkfifo(tmp_path / "fifo.yaml")
    for name in ("dir.yaml", "fifo.yaml"):
        with pytest.raises(BadInput, match="not a regular file"):
            scenario.load(tmp_path / name)


def test_resume_refuses_data_edited_in_place_to_the_same_size(tmp_path, monkeypatch):
    data = tmp_path / "docs.jsonl"
    texts = [f"document number {i} says hello" for i in range(12)]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    root = tmp_path / "wh"
    args = ("ingest", root, *MODEL, "--data", data, "--run-id", "r", "--shard-tokens", "16")
    monkeypatch.setattr(faults, "_counts", {})
    # Four layers, one state table each: the fifth state write is the second shard's, after the first is journalled.
    monkeypatch.setenv("WHQ_FAULT", "state.partial:5:eacces")
    code, _, err = run_whq(*args)
    assert code == 2 and "cannot write" in err, err
    assert (root / "journal" / "r" / "rank-0.jsonl").read_text().count("\n") == 1
    monkeypatch.delenv("WHQ_FAULT")
    original = data.read_bytes()
    edited = original.replace(b"number 7", b"number X")
    assert len(edited) == len(original) and edited != original
    data.write_bytes(edited)

    code, out, err = run_whq(*args, "--resume")
    _one_line_exit_2(code, out, err)
    assert err == (
        f"error: data file {data} changed since run 'r' started (its sha256 differs), so resuming would mix "
        f"both versions: restore the file and --resume, or start a new --run-id\n"
    )
    assert not (root / "runs" / "r.json").exists()

    data.write_bytes(original)
    code, out, err = run_whq(*args, "--resume")
    assert code == 0, err
    assert "committed run r; 12 documents" in out
    manifest = json.loads((root / "runs" / "r.json").read_text())
    assert [entry["sha256"] for entry in manifest["config"]["data"]] == [hashlib.sha256(data.read_bytes()).hexdigest()]


@settings(max_examples=100, deadline=None)
@given(
    name=st.sampled_from(["threshold", "topk", "nag", "examples"]),
    arg=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.integers(-3, 10**30).map(str),
        st.sampled_from(["nan", "inf", "-inf", "+inf", "NaN", "1e999", "-0", "0x10", "1_000"]),
    ),
)
def test_spec_numbers_are_finite_and_in_range_or_refused(name, arg):
    from ingest.sites import parse_spec
    from warehouse.errors import BadSpec

    try:
        spec = parse_spec(f"mlp.act:{name}={arg}")
    except BadSpec:
        return
    value = spec.reductions[name]
    if name == "threshold":
        assert value == value and abs(value) != float("inf")
    else:
        assert isinstance(value, int) and value >= 1


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(option=st.sampled_from(["--batch-size", "--max-length", "--shard-tokens"]), value=st.integers(-(10**12), 0))
def test_numeric_ingest_options_below_one_are_refused_before_anything_is_written(option, value):
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / "docs.jsonl").write_bytes(GOOD)
        code, out, err = run_whq("ingest", folder / "wh", *MODEL, "--data", folder / "docs.jsonl", option, str(value))
        _one_line_exit_2(code, out, err)
        assert option in err
        assert not (folder / "wh").exists()


@pytest.mark.parametrize(
    "env,message",
    [
        ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' must be a whole number"),
        ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0 must be at least 1"),
        ({"WORLD_SIZE": "2"}, "RANK=None must be a whole number"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, "RANK=2 is outside 0..1 (WORLD_SIZE=2)"),
        ({"WORLD_SIZE": "2", "RANK": "-1"}, "RANK=-1 is outside 0..1 (WORLD_SIZE=2)"),
    ],
)
def test_torchrun_environment_out_of_range_is_refused_before_the_process_group(env, message, monkeypatch):
    from ingest.ranks import from_env

    monkeypatch.delenv("RANK", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(BadInput, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        from_env(None, "cpu", "config:llama-tiny")


@pytest.mark.parametrize("rank,world_size", [(1, 1), (-1, 2), (0, 0)])
def test_python_api_refuses_a_rank_outside_its_world(rank, world_size, tmp_path):
    from ingest.pipeline import ingest

    data = tmp_path / "docs.jsonl"
    data.write_bytes(GOOD)
    with pytest.raises(BadInput, match="out of range"):
        ingest(
            tmp_path / "wh",
            "config:llama-tiny",
            [str(data)],
            ["mlp.act:topk=3"],
            rank=rank,
            world_size=world_size,
            device="cpu",
            progress=False,
        )
    assert not (tmp_path / "wh").exists()


def test_examples_bound_refuses_the_reported_oom_and_names_the_limit(monkeypatch):
    """examples=99999 on all-MiniLM's mlp.act (1536 units x 6 layers) reached 24 GB and was OOM-killed."""
    from ingest import limits, models
    from ingest.sites import parse_spec, resolve
    from warehouse.errors import BadSpec

    loaded = models.load("minilm", "cpu", "float32")
    monkeypatch.setattr(limits, "_physical_memory", lambda: 24 * 10**9)

    def check(spec: str) -> None:
        limits.check_reductions([resolve(parse_spec(spec), loaded.module_names, loaded.aliases)], loaded, "cpu")

    with pytest.raises(BadSpec) as refused:
        check("mlp.act:examples=99999")
    most = 12 * 10**9 // (1536 * 6 * limits.BYTES_PER_EXAMPLE_SLOT)
    assert str(refused.value) == (
        "--site 'mlp.act:examples=99999': examples=99999 needs about 1,603.6 GB of memory (99999 x 1536 units x 6 layers "
        f"x 1740 bytes), over the 12.0 GB budget (half of this machine's memory): use examples=N with N at most {most}"
    )
    check(f"mlp.act:examples={most}")  # the bound itself is accepted
    with pytest.raises(BadSpec, match="less what the other sites' examples hold"):
        limits.check_reductions(
            [
                resolve(parse_spec(s), loaded.module_names, loaded.aliases)
                for s in (f"mlp.act:examples={most}", "mlp.up:examples=10")
            ],
            loaded,
            "cpu",
        )
