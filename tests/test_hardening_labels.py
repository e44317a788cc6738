"""Data fields are data (warehouse/names.py, warehouse/display.py): every label a data file
carries is checked like --dataset/--role before a run exists, a doc_id names one document,
and the table format escapes every control character a query can return."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from warehouse.display import terminal_safe
from warehouse.errors import BadInput
from warehouse.names import MAX_DOC_ID, MAX_LABEL, check_documents, check_label, label_problem

from .cli_runner import run_whq

MODEL = ["--model", "config:llama-tiny", "-q", "--device", "cpu"]

# What a hostile data file puts in a label: terminal escapes (colour, OSC 52 clipboard write,
# window title), line breaks, a bidirectional override, a NUL, blank or too long text.
HOSTILE = {
    "colour escape": "web\x1b[31m",
    "OSC 52 clipboard write": "web\x1b]52;c;aGk=\x07",
    "window title": "\x1b]0;pwned\x07",
    "newline": "a\nb",
    "carriage return": "ok\rEVIL",
    "bidi override": "\u202eadmin",
    "NUL": "a\x00b",
    "C1 CSI": "a\x9b31m",
    "line separator": "a\u2028b",
    "blank": "   ",
}
COLUMNS = ("doc_id", "dataset", "role", "label", "message_role")


def _ingest(folder: Path, lines: list[dict], *extra) -> tuple[int, str, str]:
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run_whq("ingest", folder / "wh", *MODEL, "--data", data, *extra)


@pytest.mark.parametrize("column", COLUMNS)
@pytest.mark.parametrize("value", HOSTILE.values(), ids=list(HOSTILE))
def test_hostile_labels_in_a_data_file_are_refused_before_the_run_exists(column, value, tmp_path):
    code, _, err = _ingest(tmp_path, [{"text": "fine"}, {"text": "x", column: value}], "--skip-bad")
    limit = MAX_DOC_ID if column == "doc_id" else MAX_LABEL
    message = (
        f"{tmp_path / 'docs.jsonl'}, document 2: invalid {column} {value!r}: use text of 1 to {limit} "
        "characters without control characters; fix it in the data file"
    )
    assert (code, err) == (2, "error: " + " ".join(message.split()) + "\n")  # the CLI prints one line
    assert not (tmp_path / "wh").exists(), "a refused data file created the warehouse"


def test_a_too_long_label_is_refused(tmp_path):
    code, _, err = _ingest(tmp_path, [{"text": "x", "dataset": "d" * (MAX_LABEL + 1)}])
    assert code == 2 and "invalid dataset 'ddd" in err and f"1 to {MAX_LABEL} characters" in err


def test_a_file_name_that_labels_documents_is_checked(tmp_path):
    data = tmp_path / "web\x1b[31m.txt"
    data.write_text("hello\n")
    code, _, err = run_whq("ingest", tmp_path / "wh", *MODEL, "--data", data)
    assert (code, err) == (
        2,
        f"error: data file {str(data)!r}: its name labels its documents, so it must be a valid label (use text of "
        f"1 to {MAX_LABEL} characters without control characters): rename it\n",
    )


DUPLICATES = {
    "one file": ([("a.jsonl", ['{"text": "x", "id": "7"}', '{"text": "y", "id": "7"}'])], [], "a.jsonl, document 2: doc_id '7' is also the id of a.jsonl, document 1"),
    "two files": ([("a.jsonl", ['{"text": "x", "doc_id": "q"}']), ("b.jsonl", ['{"text": "y", "doc_id": "q"}'])], [], "b.jsonl, document 1: doc_id 'q' is also the id of a.jsonl, document 1"),
    "two .txt files of one name": ([("d1/t.txt", ["one"]), ("d2/t.txt", ["two"])], [], "d2/t.txt, document 1: doc_id 't:0' is also the id of d1/t.txt, document 1"),
    "an id equal to a made-up one": ([("a.jsonl", ['{"text": "x"}', '{"text": "y", "id": "a:0"}'])], [], "a.jsonl, document 2: doc_id 'a:0' is also the id of a.jsonl, document 1"),
}  # fmt: skip


@pytest.mark.parametrize("case", DUPLICATES, ids=list(DUPLICATES))
def test_a_doc_id_names_one_document(case, tmp_path, monkeypatch):
    files, extra, expected = DUPLICATES[case]
    monkeypatch.chdir(tmp_path)
    for name, lines in files:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text("\n".join(lines) + "\n")
    args = [a for name, _ in files for a in ("--data", name)]
    code, _, err = run_whq("ingest", "wh", *MODEL, *args, *extra)
    assert code == 2 and err.startswith(f"error: {expected}, and pages and exports name documents by it: "), err
    assert not Path("wh").exists()


def test_one_data_file_given_twice_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("a.jsonl").write_text('{"text": "x"}\n')
    code, _, err = run_whq("ingest", "wh", *MODEL, "--data", "a.jsonl", "--data", tmp_path / "a.jsonl")
    assert (code, err) == (2, f"error: data file {tmp_path / 'a.jsonl'} is given twice: give each --data once\n")


def _documents(ids: list[str]):
    return [SimpleNamespace(doc_id=i, dataset=None, role=None, label=None, meta={}) for i in ids]


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.text(alphabet="ab:1", min_size=1, max_size=3), max_size=12))
def test_check_documents_refuses_exactly_the_repeated_ids(ids):
    """Against a plain set: refused iff some id repeats, naming the first repeat."""
    files = {"f.jsonl": _documents(ids)}
    repeats = [i for n, i in enumerate(ids) if i in ids[:n]]
    if not repeats:
        check_documents(files, files.get)
        return
    with pytest.raises(BadInput, match=f"doc_id {repeats[0]!r} is also the id"):
        check_documents(files, files.get)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=30))
def test_a_label_is_valid_exactly_when_the_flags_take_it_and_it_prints_as_itself(text):
    """One grammar for flags and data fields; a valid label needs no escaping on a terminal."""
    problem = label_problem(text)
    files = {"f.jsonl": [SimpleNamespace(doc_id="1", dataset=text, role=None, label=None, meta={})]}
    if problem is None:
        assert check_label("--dataset", text) == text
        check_documents(files, files.get)
        assert terminal_safe(text) == text
    else:
        with pytest.raises(BadInput):
            check_label("--dataset", text)
        with pytest.raises(BadInput, match="invalid dataset"):
            check_documents(files, files.get)


def _unsafe(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") and char != "\u200d"


@settings(max_examples=300, deadline=None)
@given(text=st.text())
def test_terminal_safe_leaves_no_control_character(text):
    shown = terminal_safe(text)
    assert not any(_unsafe(c) for c in shown)
    if not any(_unsafe(c) for c in text):
        assert shown == text


@pytest.mark.parametrize("value", HOSTILE.values(), ids=list(HOSTILE))
def test_whq_sql_prints_any_value_safely_in_the_table_format(value, tmp_path):
    """A value from a query (an older warehouse's labels, or any expression) reaches the terminal escaped."""
    assert run_whq("init", tmp_path / "wh")[0] == 0
    literal = " || ".join(f"chr({ord(c)})" for c in value)
    for read_only in ([], ["--read-only"]):
        code, out, err = run_whq("sql", tmp_path / "wh", f"SELECT {literal} AS v, [{literal}] AS l", *read_only)
        assert code == 0, err
        assert not any(_unsafe(c) for c in out if c != "\n"), out
        assert terminal_safe(value) in out


def test_error_lines_carry_no_raw_control_character(tmp_path):
    """The CLI's one error line escapes what a library's message quotes (DuckDB quotes the value)."""
    assert run_whq("init", tmp_path / "wh")[0] == 0
    code, _, err = run_whq("sql", tmp_path / "wh", "SELECT CAST(chr(27) || ']0;title' || chr(7) AS INTEGER)")
    assert (code, err) == (
        2,
        "error: SQL error: Conversion Error: Could not convert string '\\x1b]0;title\\x07' to INT32\n",
    )
