"""Everything whq writes is well-formed (warehouse/display.py, warehouse/jsonio.py): every value
a query can return is shown in every format of `whq sql` and by read-only SQL (the SQL box), every
JSON file whq writes is strict JSON, and JSON embedded in HTML cannot end its <script> early."""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import math
import unicodedata
from html.parser import HTMLParser
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import warehouse
from warehouse import jsonio
from warehouse.display import csv_text, json_text, result_frame, table_text
from warehouse.safesql import run_read_only

from .cli_runner import run_whq

MODEL = ["--model", "config:llama-tiny", "-q", "--device", "cpu"]

# A value of every kind DuckDB returns that Polars cannot import, hold or display as is, and kin.
VALUES = {
    "INTERVAL from a timestamp difference": "now() - created_at",
    "INTERVAL of months": "INTERVAL 3 MONTH",
    "UNION": "union_value(a := 1)::UNION(a INT, b VARCHAR)",
    "infinite TIMESTAMP": "'infinity'::TIMESTAMP",
    "-infinite TIMESTAMPTZ": "'-infinity'::TIMESTAMPTZ",
    "infinite DATE": "'infinity'::DATE",
    "infinite TIMESTAMP_S": "'infinity'::TIMESTAMP_S",
    "infinite TIMESTAMP_NS": "'infinity'::TIMESTAMP_NS",
    "year 50000": "DATE '50000-01-01'",
    "BLOB": "'\\xAA\\x00'::BLOB",
    "BIT": "'0101'::BIT",
    "VARINT": "12345678901234567890123456789012345678901234567890::VARINT",
    "HUGEINT": "170141183460469231731687303715884105727::HUGEINT",
    "UUID": "'00000000-0000-0000-0000-000000000001'::UUID",
    "ENUM": "'a'::ENUM('a', 'b')",
    "MAP": "MAP {'k': 1}",
    "MAP of INTERVAL": "MAP {'k': INTERVAL 1 DAY}",
    "TIMETZ": "'12:00:00+01'::TIMETZ",
    "fixed-size ARRAY": "[1, 2]::INTEGER[2]",
    "LIST of INTERVAL": "[INTERVAL 1 DAY]",
    "STRUCT of BLOB and NaN": "{'b': '\\xAA'::BLOB, 'x': 'nan'::DOUBLE}",
    "LIST of infinite DATE": "[DATE 'infinity']",
    "NaN and infinity": "'nan'::DOUBLE",
    "-infinity FLOAT": "'-inf'::FLOAT",
    "DECIMAL": "1.5::DECIMAL(38, 10)",
    "JSON": "'{\"a\": [1, 2]}'::JSON",
    "NULL": "NULL",
}


def _strict(text: str):
    def refuse(token):
        raise ValueError(f"not JSON: {token}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def wh(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("display")
    (folder / "docs.jsonl").write_text(
        '{"text": "hello world", "score": NaN, "big": Infinity}\n{"text": "a </script><!-- second"}\n'
    )
    code, _, err = run_whq(
        "ingest", folder / "wh", *MODEL, "--data", folder / "docs.jsonl", "--site", "mlp.act:topk=3,examples=5",
        "--run-id", "r",
    )  # fmt: skip
    assert code == 0, err
    return folder / "wh"


@pytest.mark.parametrize("expression", VALUES.values(), ids=list(VALUES))
def test_every_value_is_shown_in_every_format(expression, wh):
    query = f"SELECT {expression} AS v, 1 AS n FROM runs"
    for read_only in ([], ["--read-only"]):
        code, out, err = run_whq("sql", wh, query, *read_only)
        assert code == 0 and err == "" and "│" in out, err
        code, out, err = run_whq("sql", wh, query, "--format", "csv", *read_only)
        assert code == 0 and err == "", err
        assert [row[1] for row in csv.reader(io.StringIO(out))] == ["n", "1"]
        code, out, err = run_whq("sql", wh, query, "--format", "json", *read_only)
        assert code == 0 and err == "", err
        assert [row["n"] for row in _strict(out)] == [1]


def test_the_sql_box_reads_every_value(wh):
    """The SQL box of `whq serve` runs untrusted SQL through run_read_only, which reads through result_frame."""
    columns = ", ".join(f"{expression} AS c{i}" for i, expression in enumerate(VALUES.values()))
    frame = run_read_only(warehouse.open(wh), f"SELECT {columns} FROM runs").frame
    assert frame.height == 1 and frame.width == len(VALUES)
    for shown in (table_text(frame), csv_text(frame), json_text(frame)):
        assert shown
    row = _strict(json_text(frame))[0]
    assert row["c3"] == "infinity" and row["c5"] == "infinity" and row["c22"] is None  # NaN is null in JSON


def test_values_keep_their_text(wh):
    con = warehouse.open(wh).connect()
    frame = result_frame(
        con.sql(
            "SELECT INTERVAL 3 MONTH AS i, 'infinity'::TIMESTAMP AS t, '\\xAA\\x00'::BLOB AS b, [1, 2]::INTEGER[2] AS a, "
            "{'x': [INTERVAL 1 DAY]} AS s, 1 AS dup, 2 AS dup"
        )
    )
    assert frame.row(0) == ("3 months", "infinity", "\\xAA\\x00", [1, 2], {"x": ["1 day"]}, 1, 2)


FLOATS = st.floats(allow_nan=True, allow_infinity=True)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | FLOATS | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def _nulled(value):
    """The reference: what strict JSON holds for `value` (non-finite floats as null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list):
        return [_nulled(v) for v in value]
    if isinstance(value, dict):
        return {k: _nulled(v) for k, v in value.items()}
    return value


@settings(max_examples=200, deadline=None)
@given(value=JSON_VALUES)
def test_jsonio_writes_strict_json_for_any_value(value):
    assert _strict(jsonio.dumps(value)) == _nulled(value)
    assert _strict(jsonio.dumps(value, indent=1, ascii=False)) == _nulled(value)


@settings(max_examples=300, deadline=None)
@given(value=JSON_VALUES, text=st.text(alphabet="<>/!-&sScriptRIPT\u2028 ", max_size=30))
def test_script_json_cannot_end_its_script_element(value, text):
    embedded = jsonio.script_json({"label": text, "value": value})
    lowered = embedded.lower()
    assert "</" not in lowered and "<!--" not in lowered and "<script" not in lowered and "\u2028" not in embedded
    assert _strict(embedded) == {"label": text, "value": _nulled(value)}


def _json_files(folder: Path):
    for path in sorted(folder.rglob("*")):
        if path.name.endswith((".json", ".jsonl", ".json.gz", ".jsonl.gz")) or path.name == ".whq-export":
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            yield path, data.decode("utf-8")


def test_every_json_file_whq_writes_is_strict(wh, tmp_path):
    """The warehouse's manifests and marker, the run config and document meta (NaN and Infinity in
    the data file), and every export: all read by a strict parser."""
    for command, out in (("features", "f"), ("neuronpedia", "np")):
        code, _, err = run_whq("export", command, wh, "--run", "r", "--site", "mlp.act", "--out", tmp_path / out)
        assert code == 0, err
    checked = 0
    for folder in (wh, tmp_path):
        for path, text in _json_files(folder):
            lines = text.splitlines() if ".jsonl" in path.name else [text]
            for line in filter(None, lines):
                _strict(line)
                checked += 1
    assert checked > 10
    con = warehouse.open(wh).connect()
    for (config,) in con.sql("SELECT config FROM runs").fetchall():
        _strict(config)
    metas = [_strict(m) for (m,) in con.sql("SELECT meta FROM documents WHERE meta IS NOT NULL").fetchall()]
    assert metas == [{"score": None, "big": None}]


class _Scripts(HTMLParser):
    """The text of each <script> element, as a browser's tokenizer splits the page."""

    def __init__(self):
        super().__init__()
        self.scripts, self._inside = [], False

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._inside = True
            self.scripts.append("")

    def handle_endtag(self, tag):
        self._inside = self._inside and tag != "script"

    def handle_data(self, data):
        if self._inside:
            self.scripts[-1] += data


def test_report_page_keeps_hostile_labels_inside_its_script():
    """The report's page with chart specs whose labels try to close the element or open a comment."""
    from queries.report import PAGE

    specs = {"chart0": {"title": "</script><script>alert(1)</script>", "x": "<!-- <script>", "y": float("nan")}}
    page = PAGE.format(title="t", meta="m", body="", bundle="var bundle = 1;", specs=jsonio.script_json(specs))
    parser = _Scripts()
    parser.feed(page)
    assert len(parser.scripts) == 2
    embedded = parser.scripts[1].split("const specs = ", 1)[1].split(";\n", 1)[0]
    assert _strict(embedded) == {"chart0": {**specs["chart0"], "y": None}}


HOSTILE_TEXT = {
    "a": "\x1b[31mRED",  # recolour
    "b": "\x1b]52;c;aGk=\x07",  # OSC 52: write the clipboard
    "c": "x\ry",
    "d": "\x9b31m",  # the one-byte CSI
    "e": "\u202eabc",  # bidirectional override
    "f\x1b[2J": "name",  # a column name that clears the screen
}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_csv_escapes_control_characters_for_a_terminal_and_keeps_them_for_a_pipe(wh, monkeypatch):
    """CSV is data: piped, its values are exact (click dropped what looked like a terminal escape);
    printed to a terminal, no value or column name may drive the terminal."""
    columns = ", ".join(
        f'{" || ".join(f"chr({ord(c)})" for c in value)} AS "{name}"' for name, value in HOSTILE_TEXT.items()
    )
    query = f"SELECT {columns}"
    code, out, err = run_whq("sql", wh, query, "--format", "csv")
    assert code == 0, err
    assert list(csv.reader(io.StringIO(out, newline=""))) == [list(HOSTILE_TEXT), list(HOSTILE_TEXT.values())]

    from warehouse import cli

    terminal = _Terminal()
    monkeypatch.setattr("sys.argv", ["whq", "sql", str(wh), query, "--format", "csv"])
    with contextlib.redirect_stdout(terminal):
        cli.main()  # returns on success
    shown = terminal.getvalue()
    unsafe = [c for c in shown if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    assert unsafe == [], shown
    assert "\\x1b[31mRED" in shown and "\\x1b]52;c;aGk=\\x07" in shown and "f\\x1b[2J" in shown
