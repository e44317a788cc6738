"""The CLI end to end, its single error boundary, and the stock DuckDB shell on the catalog."""

from __future__ import annotations

import shutil
import subprocess

import pytest

import warehouse

from .cli_runner import run_cli


def test_init_ingest_runs_sql(tmp_path, sample_jsonl, capsys, monkeypatch):
    root = tmp_path / "wh"
    assert run_cli(capsys, monkeypatch, "init", root)[0] == 0
    code, out, _ = run_cli(
        capsys,
        monkeypatch,
        "ingest",
        root,
        "--model",
        "minilm",
        "--data",
        sample_jsonl,
        "--site",
        "mlp.act:topk=20",
        "--site",
        "mlp.up:nag=20",
        "--site",
        "resid.out:last",
        "--run-id",
        "cli",
        "-q",
        "--device",
        "cpu",
    )
    assert code == 0 and "committed run cli" in out and "token_neurons" in out
    code, out, _ = run_cli(capsys, monkeypatch, "runs", root, "--format", "csv")
    assert code == 0 and out.splitlines()[1].startswith("cli,")
    code, out, _ = run_cli(
        capsys, monkeypatch, "sql", root, "SELECT count(*) AS n FROM token_neurons", "--format", "json"
    )
    assert code == 0
    n_tokens = warehouse.open(root).sql("SELECT sum(n_tokens) FROM documents").fetchall()[0][0]
    assert f'"n": {n_tokens * 20 * 6}' in out


BAD_INPUTS = [
    (["runs", "{missing}"], "is not a whq warehouse"),
    (["ingest", "{root}", "--data", "{missing}/docs.jsonl", "-q"], "does not exist"),
    (["ingest", "{root}", "--data", "{data}", "--site", "mlp.nope:topk=3", "-q", "--device", "cpu"], "unknown site"),
    (["ingest", "{root}", "--data", "{data}", "--site", "mlp.act:tpk=3", "-q"], "did you mean 'topk'"),
    (["ingest", "{root}", "--data", "{data}", "--site", "mlp.act:topk=x", "-q"], "needs a whole number"),
    (
        ["ingest", "{root}", "--data", "{data}", "--site", "nothing.*.here:topk=3", "-q", "--device", "cpu"],
        "matches no module",
    ),
    (["ingest", "{root}", "--model", "{missing}/model", "--data", "{data}", "-q"], "does not exist"),
    (["ingest", "{root}", "--data", "{data}", "--device", "cuda:0", "-q"], None),
    (["ingest", "{root}", "--data", "{data}", "--dtype", "float64", "-q"], "unknown --dtype"),
    (["sql", "{wh}", "SELECT * FROM nope"], "SQL error"),
    (["sql", "{wh}", "SELECT * FROM runs WHERE run_id = 'x'; DROP VIEW runs", "--read-only"], "read-only"),
    (["ingest", "{wh}", "--data", "{data}", "--run-id", "r", "-q", "--device", "cpu"], "already committed"),
    (["ingest", "{root}", "--data", "{data}", "--run-id", "bad/id", "-q", "--device", "cpu"], "invalid run id"),
    (["sql", "{wh}"], "Missing argument"),
]


@pytest.mark.parametrize(
    "args,message", BAD_INPUTS, ids=[" ".join(a[:2]) + f" #{i}" for i, (a, _) in enumerate(BAD_INPUTS)]
)
def test_bad_input_is_one_line_exit_2(args, message, tmp_path, sample_jsonl, minilm_wh, capsys, monkeypatch):
    import torch

    if "cuda:0" in args and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    values = {"missing": tmp_path / "missing", "root": tmp_path / "new", "data": sample_jsonl, "wh": minilm_wh}
    code, out, err = run_cli(capsys, monkeypatch, *[a.format(**values) for a in args])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    if message:
        assert message in lines[0]
    else:
        assert "CUDA" in lines[0]


@pytest.fixture
def duckdb_shell():
    shell = shutil.which("duckdb")
    if shell is None:
        pytest.skip("the DuckDB shell is not installed (pip install duckdb-cli)")
    return shell


def test_stock_duckdb_shell_reads_every_table(minilm_wh, tmp_path, duckdb_shell):
    warehouse.open(minilm_wh).close()
    for table in warehouse.schema.tables():
        done = subprocess.run(
            [duckdb_shell, "-readonly", str(minilm_wh / "whq.duckdb"), "-csv", "-c", f"SELECT count(*) FROM {table}"],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr
        assert int(done.stdout.split()[-1]) >= 0
    done = subprocess.run(
        [
            duckdb_shell,
            "-readonly",
            str(minilm_wh / "whq.duckdb"),
            "-csv",
            "-c",
            "SELECT layer, count(*) FROM token_neurons GROUP BY ALL ORDER BY 1",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.stdout.splitlines()[1:] == [
        f"{layer},{n}"
        for layer, n in warehouse.open(minilm_wh)
        .sql("SELECT layer, count(*) FROM token_neurons GROUP BY ALL ORDER BY 1")
        .fetchall()
    ]


def test_moved_warehouse_is_repaired_by_any_command(minilm_wh, tmp_path, duckdb_shell, capsys, monkeypatch):
    moved = tmp_path / "elsewhere" / "wh"
    shutil.copytree(minilm_wh, moved)
    code, out, _ = run_cli(capsys, monkeypatch, "runs", moved, "--format", "csv")
    assert code == 0 and "r," in out
    done = subprocess.run(
        [
            duckdb_shell,
            "-readonly",
            str(moved / "whq.duckdb"),
            "-csv",
            "-c",
            "SELECT root FROM whq_info; SELECT count(*) FROM tokens",
        ],
        capture_output=True,
        text=True,
        cwd="/",
    )
    assert done.returncode == 0, done.stderr
    assert str(moved.resolve()) in done.stdout


def test_catalog_comments_document_every_table(minilm_wh):
    wh = warehouse.open(minilm_wh)
    views = dict(wh.sql("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall())
    for table in warehouse.schema.tables():
        assert views[table], table
    missing = wh.sql(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE comment IS NULL AND table_name IN "
        "(SELECT view_name FROM duckdb_views() WHERE NOT internal AND view_name <> 'whq_info') "
        "AND column_name NOT IN ('run_id', 'site', 'layer', 'doc')"
    ).fetchall()
    assert missing == []


def test_a_duckdb_error_no_check_foresaw_is_one_line(minilm_wh, capsys, monkeypatch):
    """A statement of whq's own failing where none should (a run's parts deleted by another process
    between the catalog build and the read) reaches the user as one line, not a traceback."""
    import duckdb

    from warehouse import cli

    def vanished(*args, **kwargs):
        raise duckdb.IOException('IO Error: No files found that match the pattern "wh/data/tokens/run_id=r/x.parquet"')

    monkeypatch.setattr(cli, "_rel_to_polars", vanished)
    code, out, err = run_cli(capsys, monkeypatch, "sql", minilm_wh, "SELECT 1")
    assert code == 2 and out == "" and "Traceback" not in err
    assert (
        err == 'error: SQL error: IO Error: No files found that match the pattern "wh/data/tokens/run_id=r/x.parquet"\n'
    )
